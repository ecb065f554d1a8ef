"""A ParamStore in shared memory: the learner publishes, actor processes read, nobody waits.

Same interface as `rlflow.sync.ParamStore` (`publish(params, version)`, `latest_version()`,
`read() -> (version, params)`), so actors use `rlflow.sync.ParamClient` over it unchanged.

Layout: a header and two buffers, each holding one copy of every parameter array (the shapes and
dtypes of the first published parameters; any nesting of lists, tuples and dicts of arrays).

    header  [active, latest, seq0, seq1, version0, version1]   int64
    pins    [readers, 2] int64: (buffer + 1 or 0, time.monotonic_ns() of the pin) per reader
    buffer 0: leaf arrays      buffer 1: leaf arrays

Writer (one: the learner), a seqlock per buffer with double buffering:

    b = 1 - active
    seq[b] += 1            (odd: buffer b is being written)
    copy params into buffer b;  version[b] = v
    seq[b] += 1            (even: buffer b is consistent)
    active = b;  latest = v

Reader (any number of processes, lock-free):

    repeat:
        b = active;  s1 = seq[b]          (retry if odd)
        v = version[b];  copy buffer b out
        s2 = seq[b]
    until s1 == s2                        -> (v, the copy): all from one version, never torn

A reader is only ever retried if the writer came back to its buffer twice during one copy. With
large parameters that was not rare: a 200 MB copy outlasted two learner steps, every read was
retried, and actors read for tens of seconds (a livelock). So each reader (actor i: `for_reader(i)`)
pins the buffer it copies (pins[i] = (buffer + 1, since when)), and the writer leaves a pinned
buffer alone: that publication is deferred (`publish` returns False; the learner's driver publishes
at its next step instead). The writer never waits for a reader, and a pin older than PIN_STALE
seconds (or 10 times the fastest of the last 8 copies) is ignored: an actor killed or stopped
mid-read cannot hold the parameters back, which a lock shared with actors could. The seqlock
stays the proof that no read is torn; pins only keep the writer off a buffer in use. The
ordering argument holds for x86-64's total store order (stores are seen in program order, loads
are not reordered with other loads), the platform this runs on; `tests/test_process_runtime.py`
checks it across processes.

The segment is named "/rlflow_<pid>_<hex>"; the store is picklable (pickling carries the name),
and actor processes attach to it by name. The creating process unlinks the name in `close()`.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np

from rlflow.errors import UsageError, mismatch
from rlflow.runtime.shm import SharedArrays
from rlflow.sync import ParamLayout, build_params

_ACTIVE, _LATEST, _SEQ, _VER = 0, 1, 2, 4
PIN_STALE = 1.0          # seconds after which a reader's pin no longer defers a publication (at least)


class SharedParamStore:
    """Parameters in shared memory; see the module docstring for the protocol.

        store = SharedParamStore(learner.get_params())      # layout from a template
        store.publish(learner.get_params(), version=0)
        # in an actor process (the store pickled into it):
        client = rf.sync.ParamClient(store, every_learner_steps=100)
    """

    def __init__(self, template, readers: int = 1):
        self._layout = ParamLayout(template)
        self._tree = self._layout.tree
        self._leaf_specs = self._layout.leaf_specs
        specs = {"header": ((6,), np.int64), "pins": ((max(1, int(readers)), 2), np.int64)}
        for b in (0, 1):
            for i, (shape, dtype) in enumerate(self._leaf_specs):
                specs[f"b{b}_{i}"] = (shape, dtype)
        self._block = SharedArrays(specs, named=True)
        self._owner = True
        self._bind()
        self._header[:] = [0, -1, 0, 0, -1, -1]
        self._pins[:] = 0

    def _bind(self):
        a = self._block.arrays
        self._header = a["header"]
        n = len(self._leaf_specs)
        self._bufs = [[a[f"b{b}_{i}"] for i in range(n)] for b in (0, 1)]
        self._pins = a["pins"]
        self._slot = None                      # this reader's row of pins (for_reader)
        self.retries = 0
        self.deferred = 0                      # publications deferred: a reader held the buffer
        self._copies = collections.deque(maxlen=8)   # how long the last publications' copies took

    def for_reader(self, slot: int) -> "SharedParamStore":
        """This process reads as reader `slot` (0 <= slot < readers): its reads pin their buffer."""
        if not 0 <= slot < len(self._pins):
            raise UsageError(mismatch("SharedParamStore.for_reader", "slot", f"in [0, {len(self._pins) - 1}]", slot))
        self._slot = int(slot)
        return self

    # ---- pickling: a reader in another process attaches by name ------------------------------
    def __getstate__(self):
        return {"handle": self._block.handle(), "tree": self._tree, "leaf_specs": self._leaf_specs}

    def __setstate__(self, state):
        self._block = SharedArrays.attach(state["handle"])
        self._tree = state["tree"]
        self._leaf_specs = state["leaf_specs"]
        self._layout = None                    # readers do not publish
        self._owner = False
        self._bind()

    # ---- the ParamStore interface ------------------------------------------------------------
    def publish(self, params, version: int) -> bool:
        """Publish `params` as `version`; False (nothing written) while a reader copies the buffer
        it would overwrite: publish again later (the learner's driver does at its next step)."""
        version = int(version)
        h = self._header
        if version <= h[_LATEST]:
            raise UsageError(mismatch("SharedParamStore.publish", "version",
                                      f"> {int(h[_LATEST])} (versions increase)", version))
        leaves = self._layout.leaves(params)   # SpecError unless it fits the first publication's layout
        b = 1 - int(h[_ACTIVE])
        if self._pinned(b):
            self.deferred += 1
            return False
        dst = self._bufs[b]
        t = time.monotonic_ns()
        h[_SEQ + b] += 1                       # odd: being written
        for a, d in zip(leaves, dst):
            np.copyto(d, a, casting="safe")
        h[_VER + b] = version
        h[_SEQ + b] += 1                       # even: consistent
        h[_ACTIVE] = b
        h[_LATEST] = version
        self._copies.append(time.monotonic_ns() - t)
        return True

    def _pinned(self, b: int) -> bool:
        pins = self._pins
        mine = pins[:, 0] == b + 1
        if not mine.any():
            return False
        # the fastest of the last copies (not one slow first write into fresh pages, or a busy
        # moment): a reader that copies for 10 times that, and over PIN_STALE, is stopped or gone
        stale = max(int(PIN_STALE * 1e9), 10 * min(self._copies, default=0))
        return bool((mine & (time.monotonic_ns() - pins[:, 1] < stale)).any())

    def latest_version(self) -> int:
        return int(self._header[_LATEST])

    @property
    def empty(self) -> bool:
        """The parameters are None (a learner without any): readers follow the version only."""
        return self._tree == ("none",)

    def read(self) -> tuple[int, Any]:
        h = self._header
        pin = None if self._slot is None else self._pins[self._slot]
        spins = 0
        try:
            while True:
                b = int(h[_ACTIVE])
                if pin is not None:
                    pin[1] = time.monotonic_ns()
                    pin[0] = b + 1             # the writer leaves buffer b alone from here on
                s1 = int(h[_SEQ + b])
                if s1 & 1 == 0 and int(h[_ACTIVE]) == b:
                    version = int(h[_VER + b])
                    copies = [np.array(x, copy=True) for x in self._bufs[b]]
                    if int(h[_SEQ + b]) == s1:
                        return version, (build_params(self._tree, copies) if version >= 0 else None)
                self.retries += 1
                spins += 1
                if spins > 3:
                    time.sleep(0.0001 * min(spins, 100))   # the writer is mid-copy: let it finish
        finally:
            if pin is not None:
                pin[0] = 0

    def close(self) -> None:
        """Creator: unlink the segment's name. Readers: drop the mapping."""
        self._block.close()
        self._bufs = [[], []]
