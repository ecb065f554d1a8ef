"""The Table: fixed-capacity columnar storage + a sampler + a remover + a rate limiter."""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Mapping

import numpy as np

from rlflow.core import Sample
from rlflow.errors import ClosedError, SpecError, Timeout, UsageError, mismatch
from rlflow.replay import rate_limiters as _rl
from rlflow.replay import selectors as _sel
from rlflow.specs import ArraySpec, validate_batch

_I64 = np.int64
_ndarray = np.ndarray


_GATHER = None


_GATHER_BIG = None
_BIG_ROW = 1024  # contiguous fields of at least this many bytes per item use gather_big


def _gather_kernel():
    """The numba gather of packed rows, or None (numba missing, or RLFLOW_NO_NUMBA=1)."""
    global _GATHER
    if _GATHER is None:
        _GATHER = False
        if not os.environ.get("RLFLOW_NO_NUMBA"):
            try:
                from rlflow.replay._gather_numba import gather_rows
                _GATHER = gather_rows
            except Exception:  # numba missing or broken: numpy's take
                pass
    return _GATHER or None


def _gather_big_kernel():
    """The numba gather of large rows (memcpy + prefetch), checked on a small case, or None."""
    global _GATHER_BIG
    if _gather_kernel() is None:  # without numba (or with it turned off)
        return None
    if _GATHER_BIG is None:
        _GATHER_BIG = False
        try:
            from rlflow.replay._gather_numba import gather_big
            src = np.arange(3 * 200, dtype=np.int64).astype(np.uint8).reshape(3, 200)
            out = np.zeros(4 * 200, dtype=np.uint8)
            slots = np.array([2, 0, 2, 1], dtype=_I64)
            gather_big(np.array([src.ctypes.data], dtype=_I64), np.array([200], dtype=_I64),
                       out.ctypes.data, np.zeros(1, dtype=_I64), slots, 2)
            if np.array_equal(out.reshape(4, 200), src[slots]):
                _GATHER_BIG = gather_big
        except Exception:  # an LLVM without these intrinsics: numpy's take
            pass
    return _GATHER_BIG or None


NO_THREAD_CHECK = 0.25
"""Seconds between the checks of a wait without a timeout for another running thread."""


def _check_timeout(timeout) -> float:
    """`timeout` as a float >= 0, or UsageError naming it (checked whether or not the call waits)."""
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        t = float("nan")
    if isinstance(timeout, bool) or not t >= 0:
        raise UsageError(mismatch("argument", "timeout", "None or a number >= 0 (seconds)", repr(timeout)))
    return t


def _positive_int(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(mismatch("argument", name, "an integer >= 1", repr(value)))
    return int(value)


def _memory_bytes():
    """(physical memory, available memory) of this machine in bytes; None where unknown."""
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None, None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return phys, avail


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _check_fits(capacity: int, specs) -> None:
    """UsageError naming capacity where the table's storage exceeds this machine's physical memory;
    a RuntimeWarning (shown by default) where it exceeds the memory available now."""
    item = sum(sp.dtype.itemsize * int(np.prod(sp.shape, dtype=np.int64)) for sp in specs.values())
    need = capacity * item
    phys, avail = _memory_bytes()
    if phys and need > phys:
        raise UsageError(mismatch("Table", "capacity", f"at most {phys // max(item, 1):,} items of "
                                  f"{item:,} bytes (this machine's {_gib(phys)} of memory)",
                                  f"{capacity:,} items ({_gib(need)} of storage)"))
    if avail and need > avail:
        import warnings

        warnings.warn(f"Table: capacity {capacity:,} items of {item:,} bytes needs {_gib(need)}, more than "
                      f"the {_gib(avail)} of memory available now", RuntimeWarning, stacklevel=4)



class _Restoring(threading.local):
    """Table.load builds the table around selectors and limiters unpickled from a checkpoint (a
    user's class without config()): they carry the saved table's mark and contents, which a new
    table refuses; the load sets their state right after."""
    on = False


_RESTORING = _Restoring()

class Table:
    """Items in preallocated columns, chosen by a sampler, evicted by a remover, paced by a limiter.

        table = Table(capacity, sampler=Uniform(), remover=Fifo(), rate_limiter=MinSize(1),
                      max_times_sampled=0, specs=None)
        keys   = table.insert({"obs": obs[n, ...], ...}, priorities=None)   # int64 [n]
        sample = table.sample(256)            # .keys [256] int64, .probabilities [256], .data
        table.update_priorities(sample.keys, new_priorities)

    Storage. One numpy array per field, shape [capacity, *spec.shape]. `specs` (field -> ArraySpec)
    fixes the fields up front; with `specs=None` the first insert fixes them (its shapes and dtypes)
    and every later insert is checked against them. A sample returns copies.

    Keys. Every inserted item gets the next int64 key (0, 1, 2, ... per table). A key is valid until
    its item is removed; `update_priorities` / `delete` of a removed key are ignored (they never
    touch the item now in that slot); a key never issued is a UsageError.

    Life of an item:

        insert ──▶ in sampler and remover ──▶ sampled k times ──▶ removed when
                                                 k == max_times_sampled (if > 0),
                                                 or evicted by the remover when an insert finds
                                                 the table full, or deleted

    Priorities default to 1.0. The sampler and the remover both see every item and its priority.
    Times sampled are counted per item when max_times_sampled > 0 (and checkpointed); without a
    limit they are not counted (the sample hot path skips that write). A sample of n > capacity
    is a UsageError at once, even for samplers that draw with replacement.

    Blocking. `insert` waits while the rate limiter refuses it, `sample(n)` while the limiter
    refuses n draws or (for a sampler that draws distinct items: Fifo, Lifo, heaps) fewer than n
    items are present, or (with max_times_sampled) fewer than n draws remain. `timeout=None` waits
    indefinitely, as Reverb does; past the deadline `rlflow.errors.Timeout` says what it waited
    for; `close()` wakes every waiter with ClosedError. Waits are on a condition variable: they
    never spin. A request that can never be met (n > capacity, or more than the limiter ever
    allows) is a UsageError at once.

    Batches. A sample of n draws the n ids in one call of the sampler. With max_times_sampled > 0
    and a sampler that draws with replacement, an item is never returned more often than it has
    draws left: if the batch would break that, it is redrawn one item at a time (Reverb's order:
    draw, count, remove when exhausted).

    Ring mode (speed only: every call gives what the general path gives). With a Uniform sampler,
    a Fifo remover and max_times_sampled=0 (the defaults), items arrive and leave in key order,
    so while nothing is deleted the table is a ring:

        slot of key k = k % capacity            live keys = [next_key - size, next_key)
        Fifo victim   = the oldest live key     Uniform draw i = the i-th oldest live key

    Inserts then copy the fields straight into their slots (one item: one copy of its packed
    row) without touching the selectors or the key index, and samples draw keys by arithmetic
    from the Uniform sampler's generator. The first delete that removes an item writes the
    ring's state into the general structures (selector orders, key index, free slots) and the
    table stays on the general path from then on. A checkpoint records the mode and a load
    restores it. Selectors.Uniform's order rules (removing the oldest k keeps the order) are
    what make the two paths draw the same items.

    Every public method holds one lock: inserting and sampling threads may run at once.
    """

    def __init__(self, capacity: int, sampler=None, remover=None, rate_limiter=None,
                 max_times_sampled: int = 0, specs: Mapping[str, ArraySpec] | None = None):
        capacity = _positive_int("capacity", capacity)
        sampler = _sel.Uniform() if sampler is None else sampler
        remover = _sel.Fifo() if remover is None else remover
        rate_limiter = _rl.MinSize(1) if rate_limiter is None else rate_limiter
        for name, obj, cls in (("sampler", sampler, _sel.core.Selector), ("remover", remover, _sel.core.Selector),
                               ("rate_limiter", rate_limiter, _rl.core.RateLimiter)):
            if not isinstance(obj, cls):
                raise UsageError(mismatch("argument", name, f"an instance of {cls.__module__}.{cls.__name__}",
                                          f"{type(obj).__name__}"))
            if getattr(obj, "_rlflow_table", None) is not None and not _RESTORING.on:
                raise UsageError(f"argument '{name}': this {type(obj).__name__} already belongs to a table; "
                                 f"give each table its own")
        if sampler is remover:
            raise UsageError("argument 'remover': the same selector object cannot be both sampler and "
                             "remover; pass two instances")
        if isinstance(max_times_sampled, (bool, np.bool_)) or not isinstance(max_times_sampled, (int, np.integer)) \
                or max_times_sampled < 0:
            raise UsageError(mismatch("argument", "max_times_sampled", "an integer >= 0 (0: no limit)",
                                      repr(max_times_sampled)))
        min_size = getattr(rate_limiter, "min_size_to_sample", None)
        if min_size is not None and min_size > capacity:
            raise UsageError(
                f"table would deadlock: rate limiter min_size_to_sample={min_size} > capacity={capacity}, "
                f"so sampling could never start")
        spi = getattr(rate_limiter, "samples_per_insert", None)
        if (max_times_sampled and spi is not None and spi > max_times_sampled
                and math.isfinite(getattr(rate_limiter, "max_diff", math.inf))):
            raise UsageError(mismatch("argument", "max_times_sampled", f">= the rate limiter's samples_per_insert "
                                      f"= {spi:g} (or 0: no limit): each item read at most {max_times_sampled} "
                                      f"time(s) cannot give {spi:g} samples per insert, and the table would "
                                      "deadlock", repr(max_times_sampled)))
        queue_size = getattr(rate_limiter, "queue_size", None)
        if queue_size is not None and queue_size > capacity:
            raise UsageError(mismatch("argument", "rate_limiter", f"a Queue of size <= capacity = {capacity} "
                                      "(more unread items than the table holds: inserts would push out "
                                      "items never read)", f"Queue(size={queue_size})"))
        if not _RESTORING.on and (len(sampler) or len(remover) or getattr(rate_limiter, "inserts", 0)):
            raise UsageError("sampler, remover and rate_limiter must be fresh (empty) when a table is built")
        self.capacity = capacity
        self.sampler = sampler
        self.remover = remover
        self.rate_limiter = rate_limiter
        self.max_times_sampled = int(max_times_sampled)
        for obj in (sampler, remover, rate_limiter):
            obj._rlflow_table = True
        for sel in (sampler, remover):
            if hasattr(sel, "reserve"):
                sel.reserve(capacity)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiters = 0
        self._closed = False
        # slots
        # slot_key[capacity] is a sentinel slot that never matches a key
        self._slot_key_ext = np.full(capacity + 1, -1, dtype=_I64)
        self._slot_key_ext[capacity] = -2
        self._slot_key = self._slot_key_ext[:capacity]
        self._times = np.zeros(capacity, dtype=_I64)
        self._prio = np.ones(capacity, dtype=np.float64)  # free slots hold 1.0
        # free-slot stack, top at the end. While `_free_sorted`, it decreases from bottom to top, so
        # pops come out ascending and a batch of n pops is contiguous iff its ends differ by n - 1.
        self._free = np.arange(capacity - 1, -1, -1, dtype=_I64)
        self._nfree = capacity
        self._free_sorted = True
        # key -> slot: ring[key % R] holds the slot of key (R >= 2 * capacity); a live key older than
        # next_key - R / 2 is moved to `_old_keys` (dict) before the ring entry could be overwritten.
        ring = 16
        while ring < 2 * capacity:
            ring *= 2
        self._ring = np.full(ring, capacity, dtype=_I64)
        self._ring_mask = ring - 1
        self._ring_safe_until = ring  # keys below this can be issued without spilling
        self._old_keys: dict[int, int] = {}
        self._next_key = 0
        self._last = None  # slots of the last sample: update_priorities' fast path
        self._budget = 0  # draws left before max_times_sampled removes items (when > 0)
        self._stats = {"inserts": 0, "samples": 0, "deletes": 0, "evictions": 0, "expired": 0}
        self._specs = None
        self._storage: dict[str, np.ndarray] = {}
        self._cols = None
        # bound methods of the hot path (user selectors without the fast hooks get adapters)
        # selectors whose sums could overflow (Prioritized) check priorities before anything changes
        self._fit_checks = [x.check_fits for x in (sampler, remover) if hasattr(x, "check_fits")]
        self._s_add, self._r_add = sampler.add, remover.add
        self._s_add1, self._r_add1 = (getattr(x, "add1", None) or (
            lambda i, p, x=x: x.add(np.array([i], dtype=_I64), np.array([p]))) for x in (sampler, remover))
        self._s_add_range, self._r_add_range = (getattr(x, "add_range", None) or (
            lambda s0, n, p, x=x: x.add(np.arange(s0, s0 + n, dtype=_I64), np.ones(n) if p is None else p))
            for x in (sampler, remover))
        self._s_remove, self._r_remove = (getattr(x, "_remove", x.remove) for x in (sampler, remover))
        # a selector of the user's (DESIGN: "user may add one"): what it returns is checked, and an
        # insert that it refuses with an exception is undone; rlflow's own selectors skip both
        self._user_sampler, self._user_remover = (not type(x).__module__.startswith("rlflow.")
                                                  for x in (sampler, remover))
        self._added = [False, False]     # user selectors: whose add went through (`_store_undoable`)
        for k in range(2) if self._user_sampler or self._user_remover else ():
            names = ("_s_add", "_s_add1", "_s_add_range") if k == 0 else ("_r_add", "_r_add1", "_r_add_range")
            for name in names:
                setattr(self, name, self._noting_add(getattr(self, name), k))
        self._s_update, self._r_update = (getattr(x, "_update", x.update_priorities) for x in (sampler, remover))
        self._distinct = not getattr(sampler, "with_replacement", True)
        self._insert_feasible = getattr(rate_limiter, "insert_feasible", None)
        # our limiter with an unmodified on_insert: the one-item path bumps its counter directly
        self._plain_limiter = type(rate_limiter).on_insert is _rl.RateLimiter.on_insert
        self._sample_feasible = getattr(rate_limiter, "sample_feasible", None)
        # ring mode (class docstring): Uniform sampler, Fifo remover, no max_times_sampled
        self._ring_ok = (type(sampler) is _sel.Uniform and type(remover) is _sel.Fifo
                         and self.max_times_sampled == 0)
        self._ring_mode = self._ring_ok
        self._sampler_rng = getattr(sampler, "_rng", None)
        self._ring_prio = False  # a priority other than 1 was written in ring mode: inserts write them
        self._fast = False  # ring mode, storage allocated, not closed: insert may take _fast_insert
        self._fast_insert = None
        self._packed = None
        if specs is not None:
            self._allocate(self._check_specs(specs))

    # ---- presets --------------------------------------------------------------------------------
    @classmethod
    def queue(cls, size: int, specs=None) -> "Table":
        """A FIFO queue of at most `size` unread items: each item is read once, oldest first.

        Fifo sampler, Fifo remover, max_times_sampled=1, rate_limiters.Queue(size)."""
        return cls(size, _sel.Fifo(), _sel.Fifo(), _rl.Queue(size), max_times_sampled=1, specs=specs)

    @classmethod
    def stack(cls, size: int, specs=None) -> "Table":
        """A LIFO stack of at most `size` unread items: each item is read once, newest first.

        Lifo sampler, Lifo remover, max_times_sampled=1, rate_limiters.Queue(size)."""
        return cls(size, _sel.Lifo(), _sel.Lifo(), _rl.Queue(size), max_times_sampled=1, specs=specs)

    # ---- specs and storage ----------------------------------------------------------------------
    @staticmethod
    def _check_specs(specs):
        if not isinstance(specs, Mapping) or not specs:
            raise UsageError(mismatch("argument", "specs", "a non-empty flat dict field -> ArraySpec",
                                      repr(specs)))
        for k, v in specs.items():
            if not isinstance(k, str) or not isinstance(v, ArraySpec):
                nested = isinstance(v, Mapping)
                raise UsageError(mismatch("spec", str(k), "an ArraySpec under a str field name" + (
                    " (a table stores flat fields: rf.specs.flatten(specs) names nested ones 'obs/img', ...)"
                    if nested else ""), repr(v)))
        return dict(specs)

    def _allocate(self, specs):
        """Preallocate the columns, touched now (so inserts never page-fault on fresh memory).

        Layout: fields of at most 64 bytes per item share one block of rows, each row padded to
        a power of two and aligned to a cache line, so one sampled item costs one cache miss
        instead of one per field; each such field is a strided view [capacity, ...] into it.
        Larger fields (images) get their own contiguous array.

        Storage that could not fit in this machine's memory is refused before any is touched (a
        UsageError naming capacity, instead of swapping, or the kernel killing the process)"""
        cap = self.capacity
        _check_fits(cap, specs)
        small = [k for k, s in specs.items() if s.dtype.itemsize * int(np.prod(s.shape, dtype=np.int64)) <= 64]
        storage = {}
        if len(small) > 1:
            offsets, off = {}, 0
            for k in sorted(small, key=lambda k: -specs[k].dtype.alignment):
                sp = specs[k]
                off = -(-off // sp.dtype.alignment) * sp.dtype.alignment
                offsets[k] = off
                off += sp.dtype.itemsize * int(np.prod(sp.shape, dtype=np.int64))
            row = 8
            while row < off:
                row *= 2
            raw = np.empty(cap * row + 64, dtype=np.uint8)
            start = (-raw.ctypes.data) % 64
            block = raw[start:start + cap * row]
            block.fill(0)
            self._packed = (block, row, sorted((offsets[k], k) for k in small))
            for k in small:
                sp = specs[k]
                inner = []
                stride = sp.dtype.itemsize
                for d in reversed(sp.shape):
                    inner.insert(0, stride)
                    stride *= d
                storage[k] = np.ndarray((cap,) + sp.shape, dtype=sp.dtype, buffer=block, offset=offsets[k],
                                        strides=(row,) + tuple(inner))
        for k, sp in specs.items():
            if k not in storage:
                a = np.empty((cap,) + sp.shape, dtype=sp.dtype)
                a.fill(0)
                storage[k] = a
        self._storage = {k: storage[k] for k in specs}
        self._cols = [(k, self._storage[k], s.shape, s.dtype, (1,) + s.shape, s, len(s.shape) + 1)
                      for k, s in specs.items()]
        self._stores = [c[1] for c in self._cols]
        layout, off = [], 0
        in_rows = set(small) if self._packed is not None else set()
        for k, sp in specs.items():  # per-item byte offsets of the fields in a sample's block
            nbytes = sp.dtype.itemsize * int(np.prod(sp.shape, dtype=np.int64))
            off = -(-off // 16) * 16
            packed = k in in_rows
            layout.append((k, self._storage[k], sp.shape, sp.dtype, off, nbytes, packed))
            off += nbytes
        self._layout = layout
        self._row_bytes = -(-off // 16) * 16
        self._gather_rows = None
        self._packed_rows = None
        if self._packed is not None:  # numpy's fallback: whole packed rows in one take, then views
            block, row, _ = self._packed
            self._packed_rows = (block.reshape(cap, row), row,
                                 {k: int(s.ctypes.data - block.ctypes.data) for k, s, *_r in layout if _r[-1]})
        kernel = _gather_kernel() if self._packed is not None else None
        if kernel is not None:  # the packed fields, gathered in words by one numba call
            block, row, _ = self._packed
            fields = [(int(s.ctypes.data - block.ctypes.data), off, nbytes)
                      for k, s, _sh, _dt, off, nbytes, packed in layout if packed]
            w = row
            for x in fields:
                w = math.gcd(w, *x)
            w = 8 if w % 8 == 0 else 4 if w % 4 == 0 else 2 if w % 2 == 0 else 1
            wd = np.dtype(f"u{w}")
            f = np.array([[a // w for a in x] for x in fields], dtype=_I64).T.copy()
            self._gather_rows = (kernel, block.view(wd), row // w, wd, f[0], f[1], f[2])
        self._gather_big = None
        big = [(s, off, nbytes) for k, s, _sh, _dt, off, nbytes, packed in layout
               if not packed and nbytes >= _BIG_ROW]
        kernel = _gather_big_kernel() if big else None
        if kernel is not None:  # image-sized fields: one numba call copies their rows
            self._gather_big = (kernel, np.array([b[0].ctypes.data for b in big], dtype=_I64),
                                np.array([b[2] for b in big], dtype=_I64),
                                np.array([b[1] for b in big], dtype=_I64))
        self._specs = specs
        self._fast_insert = self._build_fast_insert()
        self._fast = self._ring_mode and not self._closed

    @property
    def specs(self) -> dict | None:
        """field -> ArraySpec of the stored items (None until the first insert if not given)."""
        return None if self._specs is None else dict(self._specs)

    def _validate(self, items):
        """items -> (list of arrays in column order, n). Raises SpecError naming the field."""
        cols = self._cols
        if items.__class__ is not dict and not isinstance(items, Mapping):
            raise UsageError(mismatch("argument", "items", "a mapping field -> array", type(items).__name__))
        if len(items) != len(cols):
            return self._validate_slow(items)
        arrays = []
        n = -1
        try:
            for name, store, shape, dtype, shape1, spec, nd in cols:
                a = items[name]
                if a.__class__ is not _ndarray or a.dtype is not dtype or a.shape != shape1:
                    if a.__class__ is not _ndarray or a.dtype is not dtype or a.ndim != nd or a.shape[1:] != shape:
                        a = spec.validate(a, name)
                if n != a.shape[0]:
                    if n != -1:
                        raise SpecError(mismatch("field", name, f"batch size {n} like the other fields",
                                                 f"batch size {a.shape[0]}"))
                    n = a.shape[0]
                arrays.append(a)
        except KeyError:
            return self._validate_slow(items)
        return arrays, n

    def _validate_slow(self, items):
        validated = validate_batch(items, self._specs)
        arrays = [validated[c[0]] for c in self._cols]
        return arrays, arrays[0].shape[0]

    # ---- ring mode ------------------------------------------------------------------------------
    def _build_fast_insert(self):
        """Compile this table's insert of a batch in ring mode without priorities.

        The function checks every field exactly (a dict of exactly the table's fields, each an
        ndarray of the spec's dtype object and shape [n, *shape]) and returns None for anything
        else, for a limiter that refuses, or when the table left ring mode or closed meanwhile:
        the general path then does the work (and raises the errors). One item: the small fields'
        bytes, joined in row order, are written into the item's row in one copy. Generated source
        (like dataclasses) so that each field's checks are inline, not a loop: field names and
        dtypes are passed as values, never pasted into the source."""
        cols = self._cols
        limiter = self.rate_limiter
        lim_cls = type(limiter)
        plain = all(getattr(lim_cls, m) is getattr(_rl.RateLimiter, m)
                    for m in ("can_insert", "on_insert", "on_delete"))
        ns = {"_nd": _ndarray, "_arange": np.arange, "_I64": _I64, "T": self, "L": limiter,
              "cap": self.capacity, "lock": self._lock}
        a = [f"a{i}" for i in range(len(cols))]
        checks = []
        for i, (name, store, shape, dtype, *_rest) in enumerate(cols):
            ns[f"k{i}"], ns[f"d{i}"], ns[f"s{i}"] = name, dtype, store
            dims = "".join(f", {int(d)}" for d in shape)
            checks.append(f"{a[i]}.__class__ is _nd and {a[i]}.dtype is d{i} and {a[i]}.shape == (n{dims},)")
        if type(limiter) is _rl.MinSize and limiter.max_diff == float("inf"):
            ok = "True"
            on_ins, on_del = "L.inserts += {n}", "L.deletes += 1"
        elif plain:
            ok = ("(L.inserts + {n} - L.deletes <= L.min_size_to_sample "
                  "or (L.inserts + {n}) * L._spi - L.samples <= L.max_diff)")
            on_ins, on_del = "L.inserts += {n}", "L.deletes += 1"
        else:
            ok, on_ins, on_del = "L.can_insert({n})", "L.on_insert({n})", "L.on_delete(1)"
        # the one-item copy: packed small fields as one byte string, the others one by one
        packed, row, joined, one = set(), 1, None, []
        if self._packed is not None:
            block, row, order = self._packed
            parts, end = [], 0
            index = {c[0]: i for i, c in enumerate(cols)}
            for off, name in order:
                if off > end:
                    ns[f"pad{end}"] = bytes(off - end)
                    parts.append(f"pad{end}")
                i = index[name]
                parts.append(f"{a[i]}.tobytes()")
                packed.add(i)
                end = max(end, off + self._storage[name].dtype.itemsize * int(np.prod(cols[i][2], dtype=np.int64)))
            ns["mv"] = memoryview(block)
            joined = " + ".join(parts)
            one.append(f"o = slot * {row}")
            one.append(f"mv[o:o + {end}] = b")
        for i, c in enumerate(cols):
            if i not in packed:
                one.append(f"s{i}[slot] = {a[i]}" + ("[0]" if len(c[2]) == 0 else ""))
        ind = "\n" + " " * 8
        src = f'''
def fast_insert(items):
    try:
        {ind.join(f"{a[i]} = items[k{i}]" for i in range(len(cols)))}
        n = len(a0)
        if not (len(items) == {len(cols)} and {(" and" + ind + "        ").join(checks)}):
            return None
    except (KeyError, TypeError, AttributeError):
        return None
    if n != 1:
        if n == 0 or n > cap:
            return None
        with lock:
            if not T._fast or not {ok.format(n="n")}:
                return None
            return T._ring_store(({", ".join(a)},), n, None)
    {"b = " + joined if joined else ""}
    with lock:
        if not T._fast or not {ok.format(n="1")}:
            return None
        key = T._next_key
        slot = key % cap
        {ind.join(one)}
        if T._nfree:
            T._nfree -= 1
        else:
            T._stats["evictions"] += 1
            {on_del}
        if T._ring_prio:
            T._prio[slot] = 1.0
        T._next_key = key + 1
        {on_ins.format(n="1")}
        T._stats["inserts"] += 1
        if T._waiters:
            T._cond.notify_all()
    return _arange(key, key + 1, dtype=_I64)
'''
        exec(compile(src, f"<rlflow.Table fast insert {id(self):x}>", "exec"), ns)
        fn = ns["fast_insert"]
        fn.source = src
        return fn

    def _ring_store(self, arrays, n, p):
        """Store n items in ring mode (lock held, limiter checked): key k goes to slot k % capacity;
        when the table is full the oldest items (the ring's front) are the victims."""
        cap = self.capacity
        key = self._next_key
        nf = self._nfree
        if nf >= n:
            self._nfree = nf - n
        else:
            k = n - nf
            self._nfree = 0
            self._stats["evictions"] += k
            self.rate_limiter.on_delete(k)
        s0 = key % cap
        end = s0 + n
        if p is not None:
            self._ring_prio = True
        prio = self._ring_prio
        if end <= cap:
            for store, a in zip(self._stores, arrays):
                store[s0:end] = a
            if prio:
                self._prio[s0:end] = 1.0 if p is None else p
        else:
            m = cap - s0
            for store, a in zip(self._stores, arrays):
                store[s0:] = a[:m]
                store[:end - cap] = a[m:]
            if prio:
                self._prio[s0:] = 1.0 if p is None else p[:m]
                self._prio[:end - cap] = 1.0 if p is None else p[m:]
        self._next_key = key + n
        self.rate_limiter.on_insert(n)
        self._stats["inserts"] += n
        if self._waiters:
            self._cond.notify_all()
        return np.arange(key, key + n, dtype=_I64)

    def _ring_live(self):
        """(keys, slots) of the items present in ring mode, oldest first."""
        nxt = self._next_key
        keys = np.arange(nxt - (self.capacity - self._nfree), nxt, dtype=_I64)
        return keys, keys % self.capacity

    def _materialize(self):
        """Write the ring's state into the general structures (lock held): slot keys, free-slot
        stack, key index, sampler and remover orders: exactly the state the general path has
        after the same calls. The table stays in ring mode (checkpoints use this)."""
        cap, nf = self.capacity, self._nfree
        keys, slots = self._ring_live()
        self._slot_key[:] = -1
        self._slot_key[slots] = keys
        pops = (self._next_key + np.arange(nf, dtype=_I64)) % cap  # free slots in the ring's order
        self._free[:nf] = pops[::-1]
        self._free_sorted = bool(nf < 2 or (np.diff(pops) > 0).all())
        self._ring[:] = cap
        self._old_keys = {}
        self._reindex()
        self.sampler._set_order(slots)
        self.remover._set_order(slots)
        self._last = None

    def _leave_ring(self):
        """Switch to the general path for good (lock held): a delete, a checkpoint's state, ..."""
        if self._ring_mode:
            self._materialize()
            self._ring_mode = False
            self._fast = False

    def _ring_consistent(self):
        """Whether the general structures hold a state that ring mode represents (checkpoint load)."""
        if not self._ring_ok:
            return False
        nf = self._nfree
        keys, slots = self._ring_live()
        if (self._slot_key >= 0).sum() != len(keys) or not np.array_equal(self._slot_key[slots], keys):
            return False
        pops = (self._next_key + np.arange(nf, dtype=_I64)) % self.capacity
        if not np.array_equal(self._free[:nf], pops[::-1]) or (self._times != 0).any():
            return False
        return (np.array_equal(self.sampler.state_dict()["items"], slots)
                and np.array_equal(self.remover.state_dict()["order"], slots))

    # ---- checks ---------------------------------------------------------------------------------
    @staticmethod
    def _check_priorities(priorities, n):
        try:
            p = np.asarray(priorities, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise UsageError(mismatch("argument", "priorities", "numbers", f"{exc}")) from None
        if p.shape != (n,):
            raise UsageError(mismatch("argument", "priorities", f"shape ({n},)", f"shape {p.shape}"))
        if n and not (p.min() >= 0 and p.max() < np.inf):  # NaN fails the first test
            ok = np.isfinite(p) & (p >= 0)
            i = int(np.argmin(ok))
            raise UsageError(mismatch("argument", "priorities", "finite values >= 0",
                                      f"{p[i]} at index {i}"))
        return p

    def _check_keys(self, keys):
        k = np.asarray(keys)
        if k.ndim != 1 or (k.size and k.dtype.kind not in "iu"):
            raise UsageError(mismatch("argument", "keys", "a 1-d integer array of keys",
                                      f"shape {k.shape} dtype {k.dtype}"))
        return k.astype(_I64, copy=False)

    def _check_issued(self, keys):
        if len(keys) and (keys.min() < 0 or keys.max() >= self._next_key):
            bad = keys[(keys < 0) | (keys >= self._next_key)][0]
            raise UsageError(mismatch("argument", "keys", f"keys issued by this table (0..{self._next_key - 1})",
                                      f"key {int(bad)}, never issued"))

    def _check_open(self):
        if self._closed:
            raise ClosedError("the table is closed")

    # ---- waiting --------------------------------------------------------------------------------
    def _wait(self, ok, timeout, why):
        """Wait (lock held) until ok(); Timeout with why() past the deadline. Without a timeout,
        the wait wakes every NO_THREAD_CHECK seconds to see whether another thread still runs
        (one that ends while this one waits would otherwise leave it waiting for ever)."""
        if timeout is not None:      # checked by the caller (insert, sample: `_check_timeout`)
            deadline = time.monotonic() + timeout
        self._waiters += 1
        try:
            while not ok():
                if self._closed:
                    raise ClosedError("the table was closed while waiting")
                if timeout is None:
                    if threading.active_count() == 1:
                        # only another thread of this process could insert, sample or close
                        # (a table is never shared across processes): without one this wait
                        # would never end
                        raise UsageError(f"{why()}, and no other thread of this process is running "
                                         "to change that: waiting without a timeout would never end "
                                         "(pass timeout= to wait for another thread)")
                    self._cond.wait(NO_THREAD_CHECK)
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Timeout(f"timed out after {timeout:g} s: {why()}")
                    self._cond.wait(min(left, 3600.0))     # timeout=inf: wait in hours
            if self._closed:
                raise ClosedError("the table was closed while waiting")
        finally:
            self._waiters -= 1

    def _notify(self):
        if self._waiters:
            self._cond.notify_all()

    # ---- insert ---------------------------------------------------------------------------------
    def insert(self, items: Mapping[str, np.ndarray], priorities=None, timeout: float | None = None) -> np.ndarray:
        """Store a batch (field -> array [n, ...]); returns the n new keys (int64 [n]).

        Priorities: float [n], finite and >= 0; default 1.0 for every item."""
        if timeout is not None:
            timeout = _check_timeout(timeout)
        if self._fast and priorities is None:
            keys = self._fast_insert(items)
            if keys is not None:
                return keys
        if self._closed:
            raise ClosedError("the table is closed")
        if self._cols is None:
            self._first_specs(items)
        arrays, n = self._validate(items)
        if n == 1 and priorities is None:  # the lean path of one item
            limiter = self.rate_limiter
            with self._lock:
                if self._closed or not limiter.can_insert(1):
                    self._wait(lambda: limiter.can_insert(1), timeout, lambda: self._why_insert(1))
                if self._ring_mode:
                    return self._ring_store(arrays, 1, None)
                if self._user_sampler or self._user_remover:
                    return self._store_undoable(arrays, 1, None)
                return self._store1(arrays, 1.0)
        if n == 0:
            if priorities is not None:
                self._check_priorities(priorities, 0)
            return np.empty(0, dtype=_I64)
        p = None if priorities is None else self._check_priorities(priorities, n)
        if n > self.capacity:
            raise UsageError(mismatch("argument", "items", f"at most capacity={self.capacity} rows",
                                      f"{n} rows"))
        limiter = self.rate_limiter
        if self._insert_feasible is not None and not self._insert_feasible(n):
            raise UsageError(f"an insert of {n} items can never go ahead under {limiter!r}")
        with self._lock:
            if not limiter.can_insert(n) or self._closed:
                self._wait(lambda: limiter.can_insert(n), timeout, lambda: self._why_insert(n))
            if p is not None:
                for check in self._fit_checks:
                    check(p)
            if self._ring_mode:
                return self._ring_store(arrays, n, p)
            if self._user_sampler or self._user_remover:
                return self._store_undoable(arrays, n, p)
            if n == 1:
                return self._store1(arrays, float(p[0]))
            return self._store(arrays, n, p)

    def _store_undoable(self, arrays, n, p):
        """`_store` with user selectors (lock held): where one's add() raises, the items stored are
        taken out of everything again (out of the selector whose add went through, too), so that no
        slot is left that no selector knows (stored, never sampled, never evicted); the error goes
        to the caller."""
        first = self._next_key
        self._added = [False, False]
        try:
            return self._store1(arrays, 1.0 if p is None else float(p[0])) if n == 1 else self._store(arrays, n, p)
        except BaseException:
            slots = np.flatnonzero(self._slot_key >= first)
            if len(slots):
                for added, remove in zip(self._added, (self._s_remove, self._r_remove)):
                    if added:
                        remove(slots)
                self._slot_key[slots] = -1
                self._prio[slots] = 1.0
                self._free[self._nfree:self._nfree + len(slots)] = slots[::-1]
                self._nfree += len(slots)
                self._free_sorted = False
            raise

    def _why_insert(self, n):
        f = getattr(self.rate_limiter, "why_not_insert", None)
        return f(n) if f else f"rate limiter {self.rate_limiter!r} refuses an insert of {n}"

    def _first_specs(self, items):
        if not isinstance(items, Mapping) or not items:
            raise UsageError(mismatch("argument", "items", "a non-empty mapping field -> array", repr(items)))
        specs = {}
        for k, v in items.items():
            if not isinstance(k, str):
                raise UsageError(mismatch("argument", "items", "str field names", repr(k)))
            a = np.asarray(v)
            if a.ndim < 1 or a.dtype == object:
                raise SpecError(mismatch("field", k, "an array with a leading batch axis",
                                         f"shape {a.shape} dtype {a.dtype}"))
            specs[k] = ArraySpec(a.shape[1:], a.dtype)
        with self._lock:
            if self._cols is None:
                self._allocate(specs)

    def declare_specs(self, specs) -> None:
        """Give a table made without `specs` its item specs (field -> ArraySpec) before its first
        insert, so its storage and kernels can be ready up front (the runtimes do this with the
        adder's item specs for a Table given as an object). A table that has specs keeps them."""
        specs = {k: v if isinstance(v, ArraySpec) else ArraySpec(*v) for k, v in dict(specs).items()}
        with self._lock:
            if self._cols is None:
                self._allocate(specs)

    def _evict(self, k):
        """Free k slots by asking the remover for victims (lock held)."""
        remover = self.remover
        distinct = not getattr(remover, "with_replacement", True)
        while k > 0:
            ids, p = remover.sample(k)
            if self._user_remover:
                ids, _ = self._checked_draw(remover, "remover", k, ids, p, evict=True)
                distinct = False          # repeats are taken once, whatever it declares
            ids = np.asarray(ids, dtype=_I64)
            if not distinct:  # a remover drawing with replacement may repeat ids: keep the first of each
                _, first = np.unique(ids, return_index=True)
                ids = ids[np.sort(first)]
            self._remove_slots(ids)
            self._stats["evictions"] += len(ids)
            k -= len(ids)

    def _remove_slots(self, slots):
        """Remove the items in `slots` from everything (lock held); slots are distinct and live."""
        k = len(slots)
        if k == 0:
            return
        self._s_remove(slots)
        self._r_remove(slots)
        self._slot_key[slots] = -1
        if self.max_times_sampled:
            self._budget -= int((self.max_times_sampled - self._times[slots]).sum())
            unread = getattr(self.rate_limiter, "on_delete_unread", None)
            if unread is not None:              # a queue: an item deleted unread leaves its place
                unread(int(np.count_nonzero(self._times[slots] == 0)))
            self._times[slots] = 0  # a free slot always has times 0 and priority 1: inserts rely on it
        self._prio[slots] = 1.0
        nf = self._nfree
        if k == 1:
            s0 = int(slots[0])
            if nf and self._free[nf - 1] < s0:
                self._free_sorted = False
            self._free[nf] = s0
        else:
            desc = np.sort(slots)[::-1]
            if nf and self._free[nf - 1] < desc[0]:
                self._free_sorted = False
            self._free[nf:nf + k] = desc
        self._nfree = nf + k
        self.rate_limiter.on_delete(k)

    def _spill(self, end_key):
        """Before keys up to `end_key` are issued: move live keys older than end_key - R/2 from
        the ring to `_old_keys`, so no live key's ring entry is overwritten (lock held)."""
        live = np.flatnonzero(self._slot_key >= 0)
        lk = self._slot_key[live]
        old = lk < end_key - (self._ring_mask + 1) // 2
        d = {k: s for k, s in self._old_keys.items() if self._slot_key[s] == k}  # drop removed ones
        d.update(zip(lk[old].tolist(), live[old].tolist()))
        self._old_keys = d
        rest = lk[~old]
        # the window of ring-indexed keys starts at the oldest one left in the ring, or else at
        # the first key about to be issued (`_next_key`: the caller issues _next_key..end_key - 1)
        low = int(rest.min()) if len(rest) else self._next_key
        self._ring_safe_until = low + self._ring_mask + 1

    def _reindex(self):
        """Rebuild the key -> slot index from slot_key (after a checkpoint load)."""
        self._spill(self._next_key)
        live = np.flatnonzero(self._slot_key >= 0)
        lk = self._slot_key[live]
        recent = lk >= self._ring_safe_until - (self._ring_mask + 1)
        self._ring[lk[recent] & self._ring_mask] = live[recent]

    def _store1(self, arrays, priority):
        """Store one item (lock held)."""
        if self._nfree == 0:
            self._evict(1)
        self._nfree -= 1
        slot = int(self._free[self._nfree])
        for store, a in zip(self._stores, arrays):
            store[slot] = a[0]
        key = self._next_key
        if key >= self._ring_safe_until:
            self._spill(key + 1)
        self._next_key = key + 1
        self._slot_key[slot] = key
        self._ring[key & self._ring_mask] = slot
        if priority != 1.0:
            self._prio[slot] = priority
        self._s_add1(slot, priority)
        self._r_add1(slot, priority)
        if self.max_times_sampled:
            self._budget += self.max_times_sampled
        if self._plain_limiter:
            self.rate_limiter.inserts += 1
        else:
            self.rate_limiter.on_insert(1)
        self._stats["inserts"] += 1
        if self._waiters:
            self._cond.notify_all()
        return np.arange(key, key + 1, dtype=_I64)

    def _store(self, arrays, n, p):
        """Store n > 1 items (lock held)."""
        if self._nfree < n:
            self._evict(n - self._nfree)
        nf = self._nfree - n
        free = self._free
        key = self._next_key
        if key + n > self._ring_safe_until:
            self._spill(key + n)
        keys = np.arange(key, key + n, dtype=_I64)
        s0 = int(free[self._nfree - 1])
        if self._free_sorted and int(free[nf]) - s0 == n - 1:  # contiguous slots s0 .. s0 + n - 1
            self._nfree = nf
            end = s0 + n
            for (name, store, *_), a in zip(self._cols, arrays):
                store[s0:end] = a
            self._slot_key[s0:end] = keys
            if p is not None:
                self._prio[s0:end] = p
            self._s_add_range(s0, n, p)
            self._r_add_range(s0, n, p)
            slots = None
        else:
            slots = free[nf:self._nfree][::-1].copy()
            self._nfree = nf
            for (name, store, *_), a in zip(self._cols, arrays):
                store[slots] = a
            self._slot_key[slots] = keys
            pr = np.ones(n) if p is None else p
            if p is not None:
                self._prio[slots] = p
            self._s_add(slots, pr)
            self._r_add(slots, pr)
        r0 = key & self._ring_mask
        if r0 + n <= len(self._ring):
            self._ring[r0:r0 + n] = np.arange(s0, s0 + n, dtype=_I64) if slots is None else slots
        else:
            self._ring[keys & self._ring_mask] = np.arange(s0, s0 + n, dtype=_I64) if slots is None else slots
        self._next_key = key + n
        if self.max_times_sampled:
            self._budget += self.max_times_sampled * n
        self.rate_limiter.on_insert(n)
        self._stats["inserts"] += n
        if self._waiters:
            self._cond.notify_all()
        return keys

    # ---- sample ---------------------------------------------------------------------------------
    def can_sample(self, n: int = 1) -> bool:
        """Whether a sample of n would go ahead now without waiting."""
        n = _positive_int("n", n)
        with self._lock:
            return not self._closed and self._can_sample(n)

    def _can_sample(self, n):
        size = self.capacity - self._nfree
        if size == 0 or not self.rate_limiter.can_sample(n):
            return False
        if self._distinct and size < n:
            return False
        if self.max_times_sampled and self._budget < n:
            return False
        return True

    def can_insert(self, n: int = 1) -> bool:
        """Whether an insert of n would go ahead now without waiting (never for n above the
        capacity: such an insert raises)."""
        n = _positive_int("n", n)
        with self._lock:
            return not self._closed and self._insert_ok(n)

    def _insert_ok(self, n: int) -> bool:
        return n <= self.capacity and self.rate_limiter.can_insert(n)

    def wait_for_insert(self, n: int, timeout: float) -> bool:
        """Wait until an insert of n would go ahead (`can_insert(n)`), at most `timeout` seconds;
        returns whether it would. Inserts nothing: a caller that must take its own lock before
        inserting waits here, without holding that lock."""
        n = _positive_int("n", n)
        timeout = _check_timeout(timeout)
        with self._lock:
            try:
                self._wait(lambda: self._insert_ok(n), timeout, lambda: self._why_insert(n))
            except Timeout:
                return False
            return True

    def never_goes_ahead(self, kind: str, n: int) -> str | None:
        """Why an insert (`kind="insert"`) or a sample (`"sample"`) of n items can never go ahead
        in this table, whatever else happens (more than its capacity, or more than its rate limiter
        ever admits at once), or None if it can. What `insert` and `sample` raise at once; a caller
        that only ever asks `can_insert` / `can_sample` (the process runtime) asks this up front."""
        what = f"{'an insert' if kind == 'insert' else 'a sample'} of {n} items"
        if n > self.capacity:
            return f"{what} is more than the table's capacity ({self.capacity})"
        feasible = self._insert_feasible if kind == "insert" else self._sample_feasible
        if feasible is not None and not feasible(n):
            return f"{what} can never go ahead under {self.rate_limiter!r}"
        return None

    def _why_sample(self, n):
        size = len(self)
        if size and self.rate_limiter.can_sample(n):
            if self._distinct and size < n:
                return (f"table holds {size} items, the {type(self.sampler).__name__} sampler draws "
                        f"{n} distinct items")
            return (f"items have {self._budget} draws left before max_times_sampled="
                    f"{self.max_times_sampled} removes them, sampling needs {n}")
        f = getattr(self.rate_limiter, "why_not_sample", None)
        if f:
            return f(n)
        return f"table holds {size} items; rate limiter {self.rate_limiter!r} refuses a sample of {n}"

    def sample(self, n: int, timeout: float | None = None) -> Sample:
        """Draw n items: keys [n] int64, probabilities [n] float64, data field -> [n, ...] (copies).

        `info` holds "table_size" (items present before this sample)."""
        if self._closed:
            raise ClosedError("the table is closed")
        if timeout is not None:
            timeout = _check_timeout(timeout)
        if n.__class__ is not int:
            n = _positive_int("n", n)
        elif n < 1:
            raise UsageError(mismatch("argument", "n", "an integer >= 1", n))
        if n > self.capacity:
            raise UsageError(mismatch("argument", "n", f"at most capacity={self.capacity}", n))
        limiter = self.rate_limiter
        if self._sample_feasible is not None and not self._sample_feasible(n):
            raise UsageError(f"a sample of {n} items can never go ahead under {limiter!r}")
        with self._lock:
            if self._closed or not self._can_sample(n):
                self._wait(lambda: self._can_sample(n), timeout, lambda: self._why_sample(n))
            size = self.capacity - self._nfree
            if self._ring_mode:  # Uniform over the ring: draw i is the i-th oldest item
                keys = self._sampler_rng.integers(0, size, n)
                keys += self._next_key - size
                slots = keys % self.capacity
                data = self._gather(slots)
                limiter.on_sample(n)
                self._stats["samples"] += n
                if self._waiters:
                    self._cond.notify_all()
                return Sample(keys, np.full(n, 1.0 / size), data, {"table_size": size})
            mts = self.max_times_sampled
            slots, probs = self.sampler.sample(n)
            if self._user_sampler:
                slots, probs = self._checked_draw(self.sampler, "sampler", n, slots, probs)
            if slots.__class__ is not _ndarray or slots.dtype != _I64:
                slots = np.asarray(slots, dtype=_I64)
            if mts:
                u, c = np.unique(slots, return_counts=True)
                if (self._times[u] + c > mts).any():
                    slots, probs = self._sample_one_by_one(n)
                else:
                    self._times[u] += c
                    self._budget -= n
            keys = self._slot_key[slots]
            self._last = slots
            data = self._gather(slots)
            if mts:
                done = np.unique(slots)
                done = done[self._times[done] >= mts]
                if len(done):
                    self._remove_slots(done)
                    self._stats["expired"] += len(done)
            limiter.on_sample(n)
            self._stats["samples"] += n
            if self._waiters:
                self._cond.notify_all()
        if probs.__class__ is not _ndarray or probs.dtype != np.float64:
            probs = np.asarray(probs, dtype=np.float64)
        return Sample(keys, probs, data, {"table_size": size})

    def _noting_add(self, add, k):
        def noted(*args):
            out = add(*args)
            self._added[k] = True
            return out
        return noted

    def _checked_draw(self, sel, role, n, ids, probs, evict=False):
        """A user selector's `sample(n)` result as arrays, or a UsageError naming the selector and
        what is wrong (lock held; nothing changed yet): n ids of items in the table (a remover: 1..n
        of them), and n probabilities in (0, 1]."""
        name = f"{role} {type(sel).__name__}.sample({n})"
        try:
            ids = np.asarray(ids)
            probs = np.asarray(probs, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise UsageError(mismatch("selector", name, "(ids, probabilities) arrays", f"{exc}")) from None
        ok_len = 1 <= len(ids) <= n if evict and ids.ndim == 1 else ids.shape == (n,)
        if not ok_len or ids.dtype.kind not in "iu":
            raise UsageError(mismatch("selector", name, f"{'1 to ' if evict else ''}{n} integer ids, shape "
                                      f"({n},)", f"shape {ids.shape} dtype {ids.dtype}"))
        ids = ids.astype(_I64)
        bad = (ids < 0) | (ids >= self.capacity)
        if not bad.any():
            bad = self._slot_key[ids] < 0
        if bad.any():
            raise UsageError(mismatch("selector", name, "ids of items in the table (the ids its add() got, "
                                      "not yet removed)", f"id {int(ids[np.flatnonzero(bad)[0]])}"))
        if not evict and (probs.shape != (n,) or not np.all((probs > 0) & (probs <= 1))):
            raise UsageError(mismatch("selector", name, f"{n} probabilities in (0, 1]",
                                      f"shape {probs.shape}, values {probs[:4].tolist()}"))
        return ids, probs

    def _gather(self, slots):
        """Copies of every field at `slots`, all in one fresh allocation (lock held).

        One block rather than one array per field: for image-sized samples, several multi-MB
        allocations freed together make glibc give the memory back to the OS and page-fault it in
        again on the next sample (5x slower); one block of the same size does not."""
        n = len(slots)
        out = {}
        block = np.empty(n * self._row_bytes, dtype=np.uint8)
        g = self._gather_rows
        if g is not None:  # every packed field at once (numba)
            g[0](g[1], g[2], slots, block.view(g[3]), g[4], g[5], g[6])
        gb = self._gather_big
        if gb is not None:  # every large contiguous field at once (numba: memcpy per row)
            if slots.dtype != _I64 or slots.min() < 0 or slots.max() >= self.capacity:
                raise AssertionError("slots out of range")  # never: the kernel copies raw memory
            gb[0](gb[1], gb[2], block.ctypes.data, gb[3], slots, 2)
        rows = None
        if g is None and self._packed_rows is not None:
            # np.take of a strided field view would first copy the whole field (the capacity) to
            # a contiguous array, on every sample; the packed rows themselves are contiguous
            prows, row, offsets = self._packed_rows
            rows = np.take(prows, slots, axis=0, mode="clip")
        for name, store, shape, dtype, off, nbytes, packed in self._layout:
            a = _ndarray((n,) + shape, dtype, block, off * n)
            if packed:
                if g is None:
                    a[...] = _ndarray((n,) + shape, dtype, rows, offsets[name], (row,) + store.strides[1:])
            elif gb is None or nbytes < _BIG_ROW:  # slots are valid; mode "raise" would buffer
                np.take(store, slots, axis=0, out=a, mode="clip")
            out[name] = a
        return out

    def _sample_one_by_one(self, n):
        """Reverb's order for max_times_sampled: draw one, count it, take it out when exhausted."""
        mts = self.max_times_sampled
        out_s, out_p = [], []
        expired = []
        for _ in range(n):
            s, p = self.sampler.sample(1)
            if self._user_sampler:
                s, p = self._checked_draw(self.sampler, "sampler", 1, s, p)
            s = int(s[0])
            out_s.append(s)
            out_p.append(float(p[0]))
            self._times[s] += 1
            self._budget -= 1
            if self._times[s] >= mts:  # out of the sampler now; the table removes it fully below
                self._s_remove(np.array([s], dtype=_I64))
                expired.append(s)
        if expired:  # back in, so that _remove_slots finds it in both selectors
            e = np.asarray(expired, dtype=_I64)
            self._s_add(e, self._prio[e])
        return np.asarray(out_s, dtype=_I64), np.asarray(out_p)

    # ---- priorities and deletes -----------------------------------------------------------------
    def _slots_of(self, keys):
        """Slots of the live keys, -1 where a key's item was removed (lock held; keys issued).
        The caller must not modify the array (it may be the last sample's slots)."""
        if self._ring_mode:
            slots = keys % self.capacity
            slots[keys < self._next_key - (self.capacity - self._nfree)] = -1
            return slots
        ls = self._last
        if ls is not None and len(ls) == len(keys):  # the last sample's keys: the usual update
            if (self._slot_key_ext[ls] == keys).all():  # each key lives in that slot
                return ls  # (callers do not modify it)
        slots = self._ring[keys & self._ring_mask]
        ok = self._slot_key_ext[slots] == keys
        if not ok.all():
            old, sk = self._old_keys, self._slot_key
            for i in np.flatnonzero(~ok).tolist():
                s = old.get(int(keys[i]), -1)
                slots[i] = s if s >= 0 and sk[s] == keys[i] else -1
        return slots

    def update_priorities(self, keys, priorities) -> None:
        """Set new priorities (finite, >= 0) for keys; keys of removed items are ignored. If a key
        appears more than once, its last priority wins."""
        if self._closed:
            raise ClosedError("the table is closed")
        keys = self._check_keys(keys)
        p = self._check_priorities(priorities, len(keys))
        if len(keys) == 0:
            return
        with self._lock:
            ls = self._last
            if ls is not None and len(ls) == len(keys) and (self._slot_key_ext[ls] == keys).all():
                slots = ls  # the last sample's keys, every one live (so issued): the usual update
            else:
                self._check_issued(keys)
                slots = self._slots_of(keys)
                live = slots >= 0
                if not live.all():
                    slots, p = slots[live], p[live]
            if len(slots) > 1 and not (slots[1:] > slots[:-1]).all():  # not strictly increasing
                order = np.sort(slots)
                if (order[1:] == order[:-1]).any():  # keep the last priority of a repeated key
                    u, first = np.unique(slots[::-1], return_index=True)
                    slots, p = u, p[::-1][first]
            if len(slots) == 0:
                return
            for check in self._fit_checks:
                check(p, slots)
            self._ring_prio = True
            self._prio[slots] = p
            self._s_update(slots, p)
            self._r_update(slots, p)

    def delete(self, keys) -> int:
        """Remove the items of `keys` (removed ones are ignored); returns how many were removed."""
        self._check_open()
        keys = self._check_keys(keys)
        with self._lock:
            self._check_issued(keys)
            slots = self._slots_of(keys)
            slots = np.unique(slots[slots >= 0])
            if len(slots) and self._ring_mode:
                self._leave_ring()  # every item keeps its slot
            self._remove_slots(slots)
            self._stats["deletes"] += len(slots)
            self._notify()
            return len(slots)

    def priorities(self, keys) -> np.ndarray:
        """The current priorities of keys (NaN for removed ones)."""
        keys = self._check_keys(keys)
        with self._lock:
            self._check_issued(keys)
            slots = self._slots_of(keys)
            out = np.full(len(keys), np.nan)
            out[slots >= 0] = self._prio[slots[slots >= 0]]
            return out

    # ---- size, stats, close ---------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load the compiled kernels that insert, sample and update_priorities use now, not at
        their first call: numba's first call in a process takes ~0.25 s (loading its cache). The
        runtimes call this during start-up (the process runtime while the actor processes start),
        so a run's clock never counts it. Does nothing without numba; changes no state."""
        g = getattr(self, "_gather_rows", None)    # none before the specs are known
        if g is not None:   # an empty gather: compiles (or loads) the kernel for this row layout
            g[0](g[1], g[2], np.empty(0, dtype=_I64), np.empty(0, dtype=g[3]), g[4], g[5], g[6])
        for sel in (self.sampler, self.remover):
            warm = getattr(sel, "warm_up", None)
            if warm is not None:
                warm()

    def __len__(self) -> int:
        return self.capacity - self._nfree

    def stats(self) -> dict:
        """Counters: inserts, samples (items drawn), deletes (by `delete`), evictions (by the remover),
        expired (by max_times_sampled), size, capacity, and the rate limiter's error if it has one."""
        with self._lock:
            out = dict(self._stats, size=len(self), capacity=self.capacity)
            diff = getattr(self.rate_limiter, "diff", None)
            if diff is not None and self.rate_limiter.samples_per_insert is not None:
                out["diff"] = float(diff)
            return out

    def close(self) -> None:
        """Refuse further calls; callers blocked in insert/sample get ClosedError."""
        with self._lock:
            self._closed = True
            self._fast = False
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"Table(capacity={self.capacity}, size={len(self)}, sampler={self.sampler!r}, "
                f"remover={self.remover!r}, rate_limiter={self.rate_limiter!r}, "
                f"max_times_sampled={self.max_times_sampled})")

    # ---- checkpoints (see checkpoint.py) --------------------------------------------------------
    def save(self, directory) -> None:
        """Write a checkpoint to `directory` atomically (a temporary directory beside it, renamed)."""
        from rlflow.replay import checkpoint
        checkpoint.save(self, directory)

    @classmethod
    def load(cls, directory) -> "Table":
        """Rebuild a table saved with `save`: data, keys, priorities, selectors, counters, RNGs."""
        from rlflow.replay import checkpoint
        return checkpoint.load(cls, directory)
