"""The policy delayer: how learner parameters reach the actors.

The learner publishes parameters (any list or dict of numpy arrays) with a version (its step count);
actors pull the latest version at most every `every_learner_steps` learner steps or `every_seconds`
seconds, whichever comes first, and never see a torn mix of two versions.

    store = ParamStore()                         # in-process; runtimes provide cross-process stores
    client = ParamClient(store, every_learner_steps=100)
    # learner side                                # actor side
    store.publish(learner.get_params(), version)  got = client.poll()
                                                  if got is not None:
                                                      version, params = got; policy.set_params(params)

A store is anything with `publish(params, version)` and `latest_version()` / `read() -> (version,
params)`; `rlflow.runtime.process` has one over shared memory, whose `read` copies out a consistent
version. This module is pure logic: no threads, processes or I/O.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

import numpy as np

from rlflow.errors import UsageError, mismatch


def copy_params(params):
    """A deep copy of a list / tuple / dict of numpy arrays (nested), arrays made contiguous."""
    if params is None:
        return None
    if isinstance(params, dict):
        return {k: copy_params(v) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return type(params)(copy_params(v) for v in params)
    return np.array(params, copy=True, order="C")


class ParamStore:
    """Holds the latest published parameters in this process. Thread-safe; readers get a copy taken
    under the lock, so a read never mixes two versions. Versions must increase."""

    def __init__(self):
        self._lock = threading.Lock()
        self._version = -1
        self._params = None

    def publish(self, params, version: int) -> None:
        version = int(version)
        snapshot = copy_params(params)
        with self._lock:
            if version <= self._version:
                raise UsageError(mismatch("ParamStore.publish", "version",
                                          f"> {self._version} (versions increase)", version))
            self._params, self._version = snapshot, version

    def latest_version(self) -> int:
        return self._version

    @property
    def empty(self) -> bool:
        """No parameters published (a learner whose get_params returns None)."""
        return self._params is None

    def read(self) -> tuple[int, Any]:
        with self._lock:
            return self._version, copy_params(self._params)


class ParamClient:
    """Pulls parameters from a store, at most every `every_learner_steps` versions or every
    `every_seconds` seconds (whichever allows first; 0 for both means every poll). Versions seen by
    the caller only ever increase."""

    def __init__(self, store, every_learner_steps: int = 1, every_seconds: Optional[float] = None,
                 clock=time.monotonic):
        if every_learner_steps is not None and every_learner_steps < 0:
            raise UsageError(mismatch("ParamClient", "every_learner_steps", ">= 0", every_learner_steps))
        if every_seconds is not None and every_seconds < 0:
            raise UsageError(mismatch("ParamClient", "every_seconds", ">= 0 or None", every_seconds))
        self.store = store
        self.every_learner_steps = every_learner_steps
        self.every_seconds = every_seconds
        self.version = -1
        self._clock = clock
        self._last_pull = -float("inf")

    def due(self) -> bool:
        latest = self.store.latest_version()
        if latest <= self.version:
            return False
        if self.version < 0:
            return True
        if self.every_learner_steps is not None and latest - self.version >= self.every_learner_steps:
            return True
        return self.every_seconds is not None and self._clock() - self._last_pull >= self.every_seconds

    def poll(self):
        """`(version, params)` if a newer version is due, else None. A store holding no parameters
        (the learner's get_params returns None) is followed by version only: nothing to hand over."""
        if not self.due():
            return None
        if getattr(self.store, "empty", False):
            self.version = max(self.version, self.store.latest_version())
            self._last_pull = self._clock()
            return None
        version, params = self.store.read()
        if version <= self.version:
            return None
        self.version = version
        self._last_pull = self._clock()
        if params is None:
            return None
        return version, params

    def lag(self) -> int:
        """How many learner steps behind the latest published version this client is."""
        return max(0, self.store.latest_version() - self.version)
