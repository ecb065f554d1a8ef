"""Selectors: which slots a table reads (sampler) or evicts (remover). Batched, by slot id.

    selector      draws                                        probability returned
    Uniform       n ids uniformly, with replacement            1 / size
    Prioritized   n ids, P(i) = p_i^alpha / sum_j p_j^alpha    P(i)  (stratified inverse CDF)
    Fifo          the n oldest ids, oldest first               1
    Lifo          the n newest ids, newest first               1
    MaxHeap       the n highest priorities (ties: oldest)      1
    MinHeap       the n lowest priorities (ties: oldest)       1

Deterministic selectors (Fifo, Lifo, MaxHeap, MinHeap) draw n *distinct* ids, so they need
n <= len(selector); `with_replacement` says which kind a selector is. Each selector can be a
sampler or a remover. Ids are slot numbers 0..capacity-1 (the table maps them to keys). Random
selectors hold a numpy Generator (`seed`), whose state is part of `state_dict`.

Adding an id that is already present, or removing / updating one that is absent, is a UsageError.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

from rlflow import core
from rlflow.errors import UsageError, is_int, is_real, mismatch
from rlflow.replay.sumtree import SumTree

__all__ = ["Uniform", "Prioritized", "Fifo", "Lifo", "MaxHeap", "MinHeap"]

_I64 = np.int64
_MAX_TOTAL = np.finfo(np.float64).max / 4      # headroom for the tree's partial sums' rounding


def _ids(ids) -> np.ndarray:
    a = np.asarray(ids)
    if a.dtype.kind not in "iu" and a.size:          # 2.9 would be truncated to another id
        raise UsageError(mismatch("selector id", "ids", "integers", f"dtype {a.dtype}"))
    return a.astype(_I64, copy=False).reshape(-1)


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _grow(a: np.ndarray, n: int, fill) -> np.ndarray:
    if n <= len(a):
        return a
    out = np.full(max(n, 2 * len(a), 16), fill, dtype=a.dtype)
    out[:len(a)] = a
    return out


def _pos_for_new_ids(pos: np.ndarray, ids: np.ndarray, who: str) -> np.ndarray:
    """Check that `ids` (non-empty) are >= 0, distinct and not present (pos == -1); return `pos`
    grown to hold them."""
    if ids.min() < 0:
        raise UsageError(mismatch("selector id", "ids", ">= 0", int(ids.min())))
    pos = _grow(pos, int(ids.max()) + 1, -1)
    if (pos[ids] >= 0).any() or len(np.unique(ids)) != len(ids):
        raise UsageError(f"{who}.add: ids {ids.tolist()} include ids already present")
    return pos


def _check_priorities(priorities, n):
    """`priorities` as n float64s, finite and >= 0, or a UsageError naming the first bad one."""
    p = np.asarray(priorities, dtype=np.float64).reshape(-1)
    if len(p) != n:
        raise UsageError(mismatch("priorities", "priorities", f"shape ({n},)", f"shape {p.shape}"))
    if not np.isfinite(p).all() or (p < 0).any():
        bad = p[~(np.isfinite(p) & (p >= 0))][0]
        raise UsageError(mismatch("priority", "priorities", "finite values >= 0", bad))
    return p


def _update_checks(selector, ids, priorities) -> None:
    """update_priorities of a selector that ignores priorities: present ids, valid priorities."""
    ids = _ids(ids)
    _check_priorities(priorities, len(ids))
    if len(ids) and not selector._all_present(ids):
        raise UsageError(f"{type(selector).__name__}.update_priorities: ids {ids.tolist()} include ids "
                         "not present")


def _rng_for(seed):
    """The selector's random generator. With seed=None it is seeded from numpy's global RNG, so a
    run that seeds numpy (rf.run seeds it from the experiment's seed) samples the same items."""
    if seed is None:
        seed = int(np.random.randint(0, 2**63 - 1, dtype=np.int64))
    elif isinstance(seed, (np.random.Generator, np.random.BitGenerator, np.random.SeedSequence)):
        return np.random.default_rng(seed)
    elif not is_int(seed) or seed < 0:
        raise UsageError(mismatch("selector argument", "seed", "None, an int >= 0 or a numpy Generator",
                                  repr(seed)))
    return np.random.default_rng(int(seed))


class _Base(core.Selector):
    with_replacement = True

    def reserve(self, capacity: int) -> None:
        """Preallocate for ids 0..capacity-1 (the table calls this; otherwise arrays grow)."""

    def config(self) -> dict:
        """Constructor arguments (JSON-able)."""
        return {}

    # Fast paths the table uses; it guarantees the ids are absent / present and priorities valid.
    def add1(self, i: int, priority: float = 1.0) -> None:
        self.add(np.array([i], dtype=_I64), np.array([priority]))

    def add_range(self, start: int, n: int, priorities=None) -> None:
        self.add(np.arange(start, start + n, dtype=_I64), np.ones(n) if priorities is None else priorities)

    def _update(self, ids, priorities) -> None:
        self.update_priorities(ids, priorities)

    def _remove(self, ids) -> None:
        self.remove(ids)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------------------------------
class Uniform(_Base):
    """Every present id equally likely, drawn with replacement: P(i) = 1 / size.

    Holds the ids in an order, densely in a window `items[head:head + size]`, with each id's
    position, and a draw is `items[head + randint(size)]`. The order (part of `state_dict`) is:

        add(ids)       appends ids at the end, in the given order
        remove(ids)    if the k ids are the first k of the order (the oldest, when removals are
                       first-in first-out): they leave from the front, the rest keeps its order;
                       otherwise each hole, in ascending position, takes the next live id from the
                       end of the order (in order). Either way the result depends only on the
                       set of ids removed, not on the order they are listed in.

        order:   [ 7  3  9  4  8 ]      remove({7, 3}) -> [ 9  4  8 ]       (the front)
                                        remove({3, 4}) -> [ 7  8  9 ]       (holes filled from the end)

    add / remove are O(1) per id; the window slides through a buffer of 2 x capacity and is moved
    back to the start when it reaches the end (amortized O(1)).
    """

    with_replacement = True

    def __init__(self, seed=None):
        self._seed = seed
        self._rng = _rng_for(seed)
        self._items = np.empty(0, dtype=_I64)
        self._pos = np.empty(0, dtype=_I64)  # id -> index in items, -1 if absent
        self._head = 0
        self._size = 0
        # While items[j] == j for every j in the window (ids added in order from head, removed only
        # from the front): the arrays are then not written at all (`_identity`), and written out
        # once that stops being so.
        self._identity = True

    def _materialize(self):
        if self._identity:
            self._identity = False
            h, s = self._head, self._size
            self._items = _grow(self._items, h + s, -1)
            self._pos = _grow(self._pos, h + s, -1)
            self._items[h:h + s] = np.arange(h, h + s, dtype=_I64)
            self._pos[h:h + s] = np.arange(h, h + s, dtype=_I64)

    def _room(self, n):
        """Make room for n more ids after the window (lock held by the table, or single-threaded)."""
        h, s = self._head, self._size
        if h + s + n <= len(self._items):
            return
        self._materialize()
        live = self._items[h:h + s].copy()
        if s + n > len(self._items) // 2:  # keep at least half the buffer free after the move
            self._items = np.full(max(2 * (s + n), 16), -1, dtype=_I64)
        self._items[:s] = live
        self._pos[live] = np.arange(s, dtype=_I64)
        self._head = 0

    def reserve(self, capacity):
        self._items = _grow(self._items, 2 * capacity, -1)
        self._pos = _grow(self._pos, capacity, -1)

    def config(self):
        return {"seed": self._seed}

    def __len__(self):
        return self._size

    def add(self, ids, priorities=None):
        ids = _ids(ids)
        n = len(ids)
        if n == 0:
            return
        if priorities is not None:
            _check_priorities(priorities, n)
        self._materialize()
        self._pos = _pos_for_new_ids(self._pos, ids, type(self).__name__)
        self._room(n)
        t = self._head + self._size
        self._items[t:t + n] = ids
        self._pos[ids] = np.arange(t, t + n)
        self._size += n

    def add1(self, i: int, priority: float = 1.0) -> None:
        """Fast path of `add` for one id the table knows is absent."""
        t = self._head + self._size
        if self._identity:
            if i == t:
                self._size += 1
                return
            self._materialize()
        if t == len(self._items):
            self._room(1)
            t = self._size
        self._items[t] = i
        self._pos[i] = t
        self._size += 1

    def add_range(self, start, n, priorities=None):
        t = self._head + self._size
        if self._identity:
            if start == t:
                self._size += n
                return
            self._materialize()
        if t + n > len(self._items):
            self._room(n)
            t = self._size
        self._items[t:t + n] = np.arange(start, start + n, dtype=_I64)
        self._pos[start:start + n] = np.arange(t, t + n, dtype=_I64)
        self._size += n

    def _all_present(self, ids) -> bool:
        pos = self._pos
        if self._identity:
            h = self._head
            return bool(ids.min() >= h and ids.max() < h + self._size)
        return not (ids.max() >= len(pos) or ids.min() < 0 or (pos[ids] < 0).any())

    def remove(self, ids):
        ids = _ids(ids)
        if len(ids) == 0:
            return
        if not self._all_present(ids) or len(np.unique(ids)) != len(ids):
            raise UsageError(f"Uniform.remove: ids {ids.tolist()} include ids not present")
        self._remove(ids)

    def update_priorities(self, ids, priorities):
        """Priorities do not change a uniform draw; the ids must be present and the priorities
        valid all the same (finite, >= 0), as for every selector."""
        _update_checks(self, ids, priorities)

    def _update(self, ids, priorities):       # the table's fast path: it has checked both
        pass

    def _remove(self, ids):
        """Remove present, distinct ids (see the class docstring for the order that results)."""
        k = len(ids)
        h, s = self._head, self._size
        if self._identity:
            if (ids < h + k).all():  # the first k: the window slides
                self._head = h + k
                self._size = s - k
                return
            self._materialize()
        pos, items = self._pos, self._items
        if k == 1:
            i = int(ids[0])
            j = int(pos[i])
            pos[i] = -1
            if j == h:
                self._head = h + 1
            elif j != h + s - 1:
                last = items[h + s - 1]
                items[j] = last
                pos[last] = j
            self._size = s - 1
            return
        p = pos[ids]
        pos[ids] = -1
        if (p < h + k).all():  # the first k
            self._head = h + k
            self._size = s - k
            return
        end = h + s - k
        holes = np.sort(p[p < end])
        tail = items[end:h + s]
        movers = tail[pos[tail] >= 0]
        items[holes] = movers
        pos[movers] = holes
        self._size = s - k

    def _set_order(self, ids):
        """Replace the state by the order `ids` (distinct, >= 0); the table trusts it (no checks)."""
        n = len(ids)
        self._identity = False
        self._pos = _grow(self._pos, int(ids.max()) + 1 if n else 0, -1)
        self._pos[:] = -1
        self._items = _grow(self._items, n, -1)
        self._items[:n] = ids
        self._pos[ids] = np.arange(n, dtype=_I64)
        self._head = 0
        self._size = n

    def sample(self, n):
        size = self._size
        if size == 0:
            raise UsageError("Uniform.sample: no items to sample")
        idx = self._rng.integers(0, size, n)
        h = self._head
        if self._identity:
            return (idx + h if h else idx), np.full(n, 1.0 / size)
        return self._items[h:h + size][idx], np.full(n, 1.0 / size)

    def state_dict(self):
        h, s = self._head, self._size
        items = np.arange(h, h + s, dtype=_I64) if self._identity else self._items[h:h + s].copy()
        return {"items": items, "rng": _rng_state(self._rng)}

    def load_state_dict(self, state):
        items = _ids(state["items"])
        self._size = 0
        self._head = 0
        self._identity = False
        self._pos[:] = -1
        self.add(items)
        self._rng.bit_generator.state = state["rng"]


# --------------------------------------------------------------------------------------------------
class Fifo(_Base):
    """First in, first out: `sample(n)` is the n oldest present ids, oldest first (probability 1).

    Ids sit in insertion order in a buffer; a removed id leaves a hole that is skipped and later
    compacted away, so removing from the middle (delete, max_times_sampled) is O(1).

        buffer:  [ 7  x  3  9  x  4 ]      x = removed;  sample(2) -> [7, 3]
                   ^head            ^tail
    """

    with_replacement = False
    _newest_first = False

    def __init__(self):
        self._buf = np.empty(0, dtype=_I64)
        self._pos = np.empty(0, dtype=_I64)  # id -> its index in _buf, -1 if absent
        self._head = 0
        self._tail = 0
        self._size = 0

    def reserve(self, capacity):
        self._pos = _grow(self._pos, capacity, -1)
        self._buf = _grow(self._buf, 2 * capacity, -1)

    def __len__(self):
        return self._size

    def _compact(self, extra: int) -> None:
        buf, pos = self._buf, self._pos
        window = buf[self._head:self._tail]
        live = window[pos[window] == np.arange(self._head, self._tail)]
        cap = len(buf)
        while len(live) + extra > cap // 2:
            cap = max(2 * cap, 16)
        if cap != len(buf):
            buf = np.full(cap, -1, dtype=_I64)
            self._buf = buf
        buf[:len(live)] = live
        pos[live] = np.arange(len(live))
        self._head, self._tail = 0, len(live)

    def add(self, ids, priorities=None):
        ids = _ids(ids)
        n = len(ids)
        if n == 0:
            return
        if priorities is not None:
            _check_priorities(priorities, n)
        self._pos = _pos_for_new_ids(self._pos, ids, type(self).__name__)
        if self._tail + n > len(self._buf):
            self._compact(n)
        t = self._tail
        self._buf[t:t + n] = ids
        self._pos[ids] = np.arange(t, t + n)
        self._tail = t + n
        self._size += n

    def add1(self, i: int, priority: float = 1.0) -> None:
        t = self._tail
        if t == len(self._buf):
            self._compact(1)
            t = self._tail
        self._buf[t] = i
        self._pos[i] = t
        self._tail = t + 1
        self._size += 1

    def add_range(self, start, n, priorities=None):
        if self._tail + n > len(self._buf):
            self._compact(n)
        t = self._tail
        self._buf[t:t + n] = np.arange(start, start + n, dtype=_I64)
        self._pos[start:start + n] = np.arange(t, t + n, dtype=_I64)
        self._tail = t + n
        self._size += n

    def _set_order(self, ids):
        """Replace the state by `ids` (distinct, >= 0), oldest first; the table trusts it (no checks)."""
        n = len(ids)
        self._pos = _grow(self._pos, int(ids.max()) + 1 if n else 0, -1)
        self._pos[:] = -1
        self._buf = _grow(self._buf, 2 * n, -1)
        self._buf[:n] = ids
        self._pos[ids] = np.arange(n, dtype=_I64)
        self._head, self._tail, self._size = 0, n, n

    def _all_present(self, ids) -> bool:
        pos = self._pos
        return not (ids.min() < 0 or ids.max() >= len(pos) or (pos[ids] < 0).any())

    def remove(self, ids):
        ids = _ids(ids)
        if len(ids) == 0:
            return
        if not self._all_present(ids) or len(np.unique(ids)) != len(ids):
            raise UsageError(f"{type(self).__name__}.remove: ids {ids.tolist()} include ids not present")
        self._remove(ids)

    def update_priorities(self, ids, priorities):
        """Priorities do not change the order; the ids must be present and the priorities valid
        all the same (finite, >= 0), as for every selector."""
        _update_checks(self, ids, priorities)

    def _update(self, ids, priorities):       # the table's fast path: it has checked both
        pass

    def _remove(self, ids):
        self._pos[ids] = -1
        self._size -= len(ids)
        if self._size == 0:
            self._head = self._tail = 0

    def _ordered(self, n: int) -> np.ndarray:
        """The first n live ids in order (oldest first, or newest first for Lifo)."""
        buf, pos = self._buf, self._pos
        m = n
        while True:
            if self._newest_first:
                lo = max(self._head, self._tail - m)
                window = buf[lo:self._tail][::-1]
                where = np.arange(self._tail - 1, lo - 1, -1)
            else:
                hi = min(self._tail, self._head + m)
                window = buf[self._head:hi]
                where = np.arange(self._head, hi)
            live = pos[window] == where
            got = window[live]
            if len(got) >= n or len(window) == self._tail - self._head:
                # drop the holes at the end we read from
                if len(got):
                    first = int(where[np.argmax(live)])
                    if self._newest_first:
                        self._tail = first + 1
                    else:
                        self._head = first
                return got[:n].copy()
            m *= 2

    def sample(self, n):
        if n > self._size:
            raise UsageError(mismatch("sample size", "n", f"<= {self._size} (the items present; "
                                      f"{type(self).__name__} draws distinct items)", n))
        return self._ordered(n), np.ones(n)

    def state_dict(self):
        # oldest first for both Fifo and Lifo
        ids = self._ordered(self._size)
        if self._newest_first:
            ids = ids[::-1].copy()
        return {"order": ids}

    def load_state_dict(self, state):
        self._pos[:] = -1
        self._head = self._tail = self._size = 0
        self.add(_ids(state["order"]))


class Lifo(Fifo):
    """Last in, first out: `sample(n)` is the n newest present ids, newest first (probability 1)."""

    _newest_first = True


# --------------------------------------------------------------------------------------------------
class Prioritized(_Base):
    """Draws with replacement, P(i) = p_i^alpha / sum_j p_j^alpha (Schaul et al. 2016).

    A sum tree over slot ids holds p^alpha. A batch of n is stratified: u_k = (k + U_k) / n * total,
    k = 0..n-1, U_k ~ U[0, 1), and draw k is the id whose prefix-sum interval holds u_k. The
    probabilities returned are P(i) of the drawn ids. Priorities must be finite and >= 0; an item
    of priority 0 is never drawn, unless every present priority is 0: then all are equally likely.
    Numba compiles the tree if installed (`use_numba=None`: if available); results are identical.
    """

    with_replacement = True

    def __init__(self, alpha: float = 0.6, seed=None, use_numba: bool | None = None):
        if not is_real(alpha):
            raise UsageError(mismatch("selector argument", "alpha", "a finite number >= 0", repr(alpha)))
        alpha = float(alpha)
        if not np.isfinite(alpha) or alpha < 0:
            raise UsageError(mismatch("selector argument", "alpha", "a finite number >= 0", alpha))
        self.alpha = alpha
        self._seed = seed
        self._use_numba = use_numba
        self._rng = _rng_for(seed)
        self._tree = SumTree(16, use_numba)
        self._present = np.zeros(16, dtype=bool)
        self._prio = np.zeros(16, dtype=np.float64)
        self._size = 0

    def config(self):
        return {"alpha": self.alpha, "seed": self._seed}

    def warm_up(self):
        """Loads the sum tree's kernels (numba) with empty calls; changes nothing."""
        self._tree.warm_up()

    def reserve(self, capacity):
        self._resize(capacity)

    def _resize(self, n):
        if n <= self._tree.capacity:
            return
        old = self._tree
        tree = SumTree(max(n, 2 * old.capacity), self._use_numba)
        tree.leaves[:old.capacity] = old.leaves
        tree.rebuild()
        self._tree = tree
        self._present = _grow(self._present, tree.capacity, False)
        self._prio = _grow(self._prio, tree.capacity, 0.0)

    def __len__(self):
        return self._size

    def _powered(self, p):
        if self.alpha == 1.0:
            return p
        if self.alpha == 0.0:  # 0 ** 0 would be 1: a priority of 0 still means never drawn
            return (p > 0).astype(np.float64)
        return np.power(p, self.alpha)

    def check_fits(self, p, replacing=None) -> None:
        """Raise a UsageError unless the sum tree's total stays a finite float64 once priorities
        `p` are added (or replace those of the ids `replacing`): with an infinite total, draws
        would land on empty leaves. Only priorities near 1e308 ** (1 / alpha) fail. A table calls
        this before it changes anything."""
        p = np.asarray(p, dtype=np.float64)
        if not len(p):
            return
        with np.errstate(over="ignore"):          # an overflow is what this looks for
            if self._tree.total + len(p) * np.float64(p.max()) ** self.alpha <= _MAX_TOTAL:
                return                             # the usual case, from one max
            total = self._tree.total + float(np.sum(self._powered(p)))
            if (not np.isfinite(total) or total > _MAX_TOTAL) and replacing is not None and len(replacing):
                total -= float(self._tree.values(replacing).sum())
        if not np.isfinite(total) or total > _MAX_TOTAL:
            raise UsageError(mismatch("priority", "priorities", f"values whose p ** alpha (alpha={self.alpha}) "
                                      "keep the sum of all priorities a finite float64",
                                      f"values up to {float(np.max(p)):.3g}"))

    _check = staticmethod(_check_priorities)

    def add(self, ids, priorities=None):
        ids = _ids(ids)
        n = len(ids)
        if n == 0:
            return
        p = np.ones(n) if priorities is None else self._check(priorities, n)
        if ids.min() < 0:
            raise UsageError(mismatch("selector id", "ids", ">= 0", int(ids.min())))
        self._resize(int(ids.max()) + 1)
        if self._present[ids].any() or len(np.unique(ids)) != n:
            raise UsageError(f"Prioritized.add: ids {ids.tolist()} include ids already present")
        self.check_fits(p)
        self._present[ids] = True
        self._prio[ids] = p
        self._tree.update(ids, self._powered(p))
        self._size += n

    def remove(self, ids):
        ids = _ids(ids)
        if len(ids) == 0:
            return
        if (ids.min() < 0 or ids.max() >= len(self._present) or not self._present[ids].all()
                or len(np.unique(ids)) != len(ids)):
            raise UsageError(f"Prioritized.remove: ids {ids.tolist()} include ids not present")
        self._remove(ids)

    def _remove(self, ids):
        self._present[ids] = False
        self._prio[ids] = 0.0
        self._tree.update(ids, np.zeros(len(ids)))
        self._size -= len(ids)

    def add1(self, i, priority=1.0):
        self._present[i] = True
        self._prio[i] = priority
        self._tree.update(np.array([i], dtype=_I64), self._powered(np.array([priority], dtype=np.float64)))
        self._size += 1

    def add_range(self, start, n, priorities=None):
        ids = np.arange(start, start + n, dtype=_I64)
        p = np.ones(n) if priorities is None else priorities
        self._present[start:start + n] = True
        self._prio[start:start + n] = p
        self._tree.update(ids, self._powered(p))
        self._size += n

    def update_priorities(self, ids, priorities):
        ids = _ids(ids)
        p = self._check(priorities, len(ids))
        if len(ids) == 0:
            return
        if ids.min() < 0 or ids.max() >= len(self._present) or not self._present[ids].all():
            raise UsageError(f"Prioritized.update_priorities: ids {ids.tolist()} include ids not present")
        self.check_fits(p, replacing=ids)
        self._update(ids, p)

    def _update(self, ids, p):
        self._prio[ids] = p
        self._tree.update(ids, self._powered(p))

    def sample(self, n):
        if n == 0:
            return np.empty(0, dtype=_I64), np.empty(0, dtype=np.float64)
        if self._size == 0:
            raise UsageError("Prioritized.sample: no items to sample")
        total = self._tree.total
        if not total > 0:  # every priority is 0: uniform over the present ids
            present = np.flatnonzero(self._present)
            ids = present[self._rng.integers(0, len(present), n)]
            return ids, np.full(n, 1.0 / len(present))
        u = (np.arange(n) + self._rng.random(n)) * (total / n)
        ids, values = self._tree.find(u, with_values=True)
        return ids, values / total

    def priorities(self, ids) -> np.ndarray:
        return self._prio[_ids(ids)]

    def state_dict(self):
        ids = np.flatnonzero(self._present).astype(_I64)
        return {"ids": ids, "priorities": self._prio[ids].copy(), "rng": _rng_state(self._rng)}

    def load_state_dict(self, state):
        ids = _ids(state["ids"])
        self._present[:] = False
        self._prio[:] = 0.0
        self._tree.tree[:] = 0.0
        self._size = 0
        if len(ids):
            self._resize(int(ids.max()) + 1)
            p = self._check(state["priorities"], len(ids))
            self._present[ids] = True
            self._prio[ids] = p
            self._tree.leaves[ids] = self._powered(p)
            self._tree.rebuild()
            self._size = len(ids)
        self._rng.bit_generator.state = state["rng"]


# --------------------------------------------------------------------------------------------------
class MaxHeap(_Base):
    """`sample(n)`: the n present ids of highest priority, best first; ties go to the oldest
    (earliest added). Probability 1. A binary heap with lazy deletion: update and remove are
    O(log n), a sample of n is O(n log size)."""

    with_replacement = False
    _sign = -1.0  # heap keys are sign * priority; MinHeap flips it

    def __init__(self):
        self._heap: list = []  # (sign * priority, seq, token, id)
        self._token = {}  # id -> token of its live heap entry
        self._seq = {}  # id -> insertion sequence number
        self._prio = {}  # id -> priority
        self._counter = itertools.count()
        self._next_seq = 0

    def __len__(self):
        return len(self._token)

    def _push(self, i, p):
        tok = next(self._counter)
        self._token[i] = tok
        heapq.heappush(self._heap, (self._sign * p, self._seq[i], tok, i))

    def _maybe_compact(self):
        if len(self._heap) > 2 * len(self._token) + 64:
            self._heap = [e for e in self._heap if self._token.get(e[3]) == e[2]]
            heapq.heapify(self._heap)

    def add(self, ids, priorities=None):
        ids = _ids(ids).tolist()
        p = np.ones(len(ids)) if priorities is None else Prioritized._check(priorities, len(ids))
        if ids and min(ids) < 0:
            raise UsageError(mismatch("selector id", "ids", ">= 0", min(ids)))
        if any(i in self._token for i in ids) or len(set(ids)) != len(ids):
            raise UsageError(f"{type(self).__name__}.add: ids {ids} include ids already present")
        for i, pi in zip(ids, p.tolist()):
            self._seq[i] = self._next_seq
            self._next_seq += 1
            self._prio[i] = pi
            self._push(i, pi)

    def remove(self, ids):
        ids = _ids(ids).tolist()
        if any(i not in self._token for i in ids) or len(set(ids)) != len(ids):
            raise UsageError(f"{type(self).__name__}.remove: ids {ids} include ids not present")
        for i in ids:
            del self._token[i], self._seq[i], self._prio[i]
        self._maybe_compact()

    def update_priorities(self, ids, priorities):
        ids = _ids(ids).tolist()
        p = Prioritized._check(priorities, len(ids))
        if any(i not in self._token for i in ids):
            raise UsageError(f"{type(self).__name__}.update_priorities: ids {ids} include ids not present")
        for i, pi in zip(ids, p.tolist()):
            self._prio[i] = pi
            self._push(i, pi)
        self._maybe_compact()

    def sample(self, n):
        if n > len(self):
            raise UsageError(mismatch("sample size", "n", f"<= {len(self)} (the items present; "
                                      f"{type(self).__name__} draws distinct items)", n))
        heap, token = self._heap, self._token
        popped, out = [], []
        while len(out) < n:
            e = heapq.heappop(heap)
            if token.get(e[3]) == e[2]:
                popped.append(e)
                out.append(e[3])
        for e in popped:
            heapq.heappush(heap, e)
        return np.asarray(out, dtype=_I64), np.ones(n)

    def state_dict(self):
        ids = sorted(self._token, key=self._seq.__getitem__)
        return {"ids": np.asarray(ids, dtype=_I64),
                "priorities": np.asarray([self._prio[i] for i in ids], dtype=np.float64)}

    def load_state_dict(self, state):
        self.__init__()
        self.add(state["ids"], state["priorities"])


class MinHeap(MaxHeap):
    """`sample(n)`: the n present ids of lowest priority, lowest first; ties go to the oldest."""

    _sign = 1.0
