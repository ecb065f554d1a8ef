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

from rlflow.errors import SpecError, UsageError, is_int, is_real, mismatch


def copy_params(params):
    """A deep copy of a list / tuple / dict of numpy arrays (nested), arrays made contiguous."""
    if params is None:
        return None
    if isinstance(params, dict):
        return {k: copy_params(v) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return type(params)(copy_params(v) for v in params)
    return np.array(params, copy=True, order="C")


def _as_leaf(value, at: str) -> np.ndarray:
    """`value` as a numpy array of plain values (numbers, bools, fixed-width strings), else SpecError
    naming where it sits (an object array holds pointers: copied into another process's memory,
    they crashed its reader)."""
    try:
        a = np.asarray(value)
    except Exception as e:          # a torch tensor that requires grad, ...
        raise SpecError(mismatch("params", at, "a numpy array (get_params returns a list or dict of numpy "
                                 "arrays; from a torch tensor: t.detach().cpu().numpy())",
                                 f"{type(value).__name__} ({type(e).__name__}: {e})")) from None
    if a.dtype.hasobject:
        raise SpecError(mismatch("params", at, "a numpy array of numbers or bools, not of Python objects "
                                 "(get_params returns a list or dict of numpy arrays)", f"{type(value).__name__} {value!r:.60} "
                                 f"(numpy dtype {a.dtype})"))
    return a


def flatten_params(params, leaves: list, at: str = "params"):
    """The structure of `params` with leaf indices in place of arrays (picklable)."""
    if params is None:
        return ("none",)
    if isinstance(params, dict):
        return ("dict", [(k, flatten_params(v, leaves, f"{at}[{k!r}]")) for k, v in params.items()])
    if isinstance(params, (list, tuple)):
        return ("tuple" if isinstance(params, tuple) else "list",
                [flatten_params(v, leaves, f"{at}[{i}]") for i, v in enumerate(params)])
    leaves.append(_as_leaf(params, at))
    return ("leaf", len(leaves) - 1)


def leaf_names(tree, at: str = "params") -> list:
    """Where each leaf sits in the user's structure ("params['w']", "params[0][1]"), in leaf order."""
    kind = tree[0]
    if kind == "leaf":
        return [at]
    if kind == "dict":
        return [n for k, v in tree[1] for n in leaf_names(v, f"{at}[{k!r}]")]
    if kind in ("list", "tuple"):
        return [n for i, v in enumerate(tree[1]) for n in leaf_names(v, f"{at}[{i}]")]
    return []


def build_params(tree, leaves):
    kind = tree[0]
    if kind == "none":
        return None
    if kind == "leaf":
        return leaves[tree[1]]
    if kind == "dict":
        return {k: build_params(v, leaves) for k, v in tree[1]}
    out = [build_params(v, leaves) for v in tree[1]]
    return tuple(out) if kind == "tuple" else out


def _leaves_like(tree, params, out: list, at: str = "params") -> bool:
    """Append `params`' arrays to `out` in the order of `tree` (a flatten_params structure), matching
    dict entries by key; False where the nesting differs otherwise."""
    kind = tree[0]
    if kind == "none":
        return params is None
    if kind == "leaf":
        if params is None or isinstance(params, (dict, list, tuple)):
            return False
        out.append(_as_leaf(params, at))
        return True
    if kind == "dict":
        if not isinstance(params, dict) or len(params) != len(tree[1]):
            return False
        return all(k in params and _leaves_like(v, params[k], out, f"{at}[{k!r}]") for k, v in tree[1])
    if not isinstance(params, tuple if kind == "tuple" else list) or len(params) != len(tree[1]):
        return False
    return all(_leaves_like(v, p, out, f"{at}[{i}]") for i, (v, p) in enumerate(zip(tree[1], params)))


def _few(names: list, most: int = 4) -> str:
    return "[" + ", ".join(names[:most]) + (f", ... {len(names) - most} more" if len(names) > most else "") + "]"


def _where_differs(first, now, at: str = "params"):
    """Where two flatten_params structures with the same leaf names first differ in a container's
    kind ("params['layers'] is a tuple (first: a list)"), or None."""
    if first[0] != now[0]:
        return f"{at} is a {now[0]} (first: a {first[0]})"
    if first[0] == "dict":
        inner = dict(now[1])
        for k, v in first[1]:
            if k in inner:
                d = _where_differs(v, inner[k], f"{at}[{k!r}]")
                if d:
                    return d
    elif first[0] in ("list", "tuple"):
        for i, (a, b) in enumerate(zip(first[1], now[1])):
            d = _where_differs(a, b, f"{at}[{i}]")
            if d:
                return d
    return None


class ParamLayout:
    """The layout of the first published parameters: their nesting (lists, tuples, dicts) and each
    array's shape and dtype. Every store keeps it for the whole run, the in-process one as the
    shared-memory one must (its buffers are allocated from it), so both runtimes take and refuse
    the same parameters. `leaves(params)` returns the arrays of a later publication, each in the
    first one's dtype (a later dtype is taken where every value survives the cast: int32 -> int64,
    float32 -> float64), or raises SpecError naming the leaf."""

    def __init__(self, template):
        leaves: list = []
        self.tree = flatten_params(template, leaves)
        self.leaf_specs = [(tuple(a.shape), a.dtype) for a in leaves]

    def leaves(self, params) -> list:
        leaves: list = []
        tree = flatten_params(params, leaves)
        if tree != self.tree:
            leaves = []
            if _leaves_like(self.tree, params, leaves):      # the same dicts, keys in another order
                tree = self.tree
        if tree != self.tree:
            first = ("None (get_params returned None at first: the first publication fixes the layout, so "
                     "build the parameters in the learner's __init__)" if self.tree == ("none",)
                     else "the nesting and number of arrays of the first published params")
            if tree == ("none",) or self.tree == ("none",):
                got = "None" if tree == ("none",) else "a different nesting or number of arrays"
            else:                  # name the arrays: where the new params differ from the first
                had, has = leaf_names(self.tree), leaf_names(tree)
                had_set, has_set = set(had), set(has)
                new = [n for n in has if n not in had_set]
                missing = [n for n in had if n not in has_set]
                got = (f"new {_few(new)}, missing {_few(missing)}" if new or missing else
                       _where_differs(self.tree, tree) or "the same arrays, nested otherwise")
            raise SpecError(mismatch("params", "structure", first, got))
        out = []
        for i, (a, (shape, dtype)) in enumerate(zip(leaves, self.leaf_specs)):
            if a.shape != shape:
                raise SpecError(mismatch("params", leaf_names(self.tree)[i], f"shape {shape} (as first "
                                         "published)", f"shape {a.shape}"))
            if a.dtype != dtype:
                if not np.can_cast(a.dtype, dtype, casting="safe"):
                    raise SpecError(mismatch("params", leaf_names(self.tree)[i], f"dtype {dtype} (as first "
                                             "published) or one that casts to it exactly", f"dtype {a.dtype}"))
                a = a.astype(dtype)
            out.append(a)
        return out


class ParamStore:
    """Holds the latest published parameters in this process. Thread-safe; readers get a copy taken
    under the lock, so a read never mixes two versions. Versions must increase."""

    def __init__(self):
        self._lock = threading.Lock()
        self._version = -1
        self._params = None
        self._layout = None               # the first publication's (ParamLayout)

    def publish(self, params, version: int) -> None:
        version = int(version)
        if self._layout is None:
            self._layout = ParamLayout(params)
        else:
            params = build_params(self._layout.tree, self._layout.leaves(params))
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
        if every_learner_steps is not None and (not is_int(every_learner_steps) or every_learner_steps < 0):
            raise UsageError(mismatch("ParamClient", "every_learner_steps", "an int >= 0 or None",
                                      repr(every_learner_steps)))
        if every_seconds is not None and (not is_real(every_seconds) or not every_seconds >= 0):
            raise UsageError(mismatch("ParamClient", "every_seconds", "a number of seconds >= 0 or None",
                                      repr(every_seconds)))
        if every_learner_steps is None and (every_seconds is None or every_seconds == float("inf")):
            raise UsageError(mismatch("ParamClient", "every_learner_steps / every_seconds", "at least one of "
                                      "them (with neither, no pull after the first would ever be due)",
                                      f"every_learner_steps=None, every_seconds={every_seconds!r}"))
        self.store = store
        self.every_learner_steps = every_learner_steps
        self.every_seconds = every_seconds
        self.version = -1
        self._clock = clock
        self._last_pull = -float("inf")

    def due(self) -> bool:
        return self._due(self.store.latest_version())

    def _due(self, latest: int) -> bool:
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
        latest = self.store.latest_version()
        if not self._due(latest):
            return None
        if getattr(self.store, "empty", False):
            self.version = latest            # > self.version: _due says so
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
