"""A sum tree over slot ids: point updates and inverse-CDF lookups in O(log n), batched.

The tree is 8-ary (FANOUT), stored level by level in one float64 array, with every group of 8
siblings in one 64-byte cache line, so a lookup touches one cache line per level: 7 levels for a
million ids instead of the 20 of a binary tree.

    level 0 (root)   tree[offs[0]]                      = total     (group padded to 8)
    level l          tree[offs[l] + j]                  = node j of level l
    children of j    tree[offs[l+1] + 8j .. 8j + 7]     (one aligned cache line)
    leaves           tree[offs[D] + id]  (= tree[base + id])       value of id
    node j           = ((c0 + c1) + c2) + ... + c7     (its children, summed left to right)

Level sizes, bottom up: m_D = capacity, m_l = ceil(m_{l+1} / 8), down to m_0 = 1 (D >= 1); level
l + 1 holds 8 * m_l entries, the ones past m_{l+1} are 0. Every internal node is recomputed
from its children, never updated by a delta, so the totals do not drift and the order of
updates does not matter: the numba kernels (used when numba is installed) and the pure-numpy
fallback do the same float operations in the same order and give bit-identical trees and lookups.

Lookup of u in [0, total): walk down from the root; at each node, over its children c0..c7 in
order: stop at the first c_m with u < c_m, else u -= c_m and go on. If rounding carries u past
every child, take the last positive child (with u as it was before subtracting that child).
A lookup never lands on a zero leaf while the total is positive. With exact arithmetic (e.g.
integer values) the result is the id whose prefix-sum interval [S_{id-1}, S_id) holds u.
"""

from __future__ import annotations

import os

import numpy as np

FANOUT = 8
_KERNELS = None


def _numba_kernels():
    """(update, find) compiled with numba, or None. Imported lazily; RLFLOW_NO_NUMBA=1 disables."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS or None
    if os.environ.get("RLFLOW_NO_NUMBA"):
        _KERNELS = False
        return None
    try:
        from rlflow.replay import _sumtree_numba as k
        assert k.B == FANOUT
    except Exception:  # numba missing or broken: numpy fallback
        _KERNELS = False
        return None
    _KERNELS = (k.update, k.find)
    return _KERNELS


def _layout(capacity: int):
    """(offsets of the levels, nodes per level), root level first."""
    B = FANOUT
    sizes = [max(capacity, 1)]
    while sizes[-1] > 1 or len(sizes) == 1:
        sizes.append(-(-sizes[-1] // B))
    sizes.reverse()  # sizes[0] == 1 (root) ... sizes[-1] == capacity
    offs = [0]
    for lvl in range(1, len(sizes)):
        offs.append(offs[-1] + (B if lvl == 1 else B * sizes[lvl - 2]))
    end = offs[-1] + B * sizes[-2]
    return np.asarray(offs, dtype=np.int64), sizes, end


class SumTree:
    """Non-negative float64 values for ids 0..capacity-1 with their running sum."""

    def __init__(self, capacity: int, use_numba: bool | None = None):
        self.capacity = int(capacity)
        self.offs, self._sizes, size = _layout(self.capacity)
        self.base = int(self.offs[-1])  # leaves: tree[base + id]
        raw = np.zeros(size + FANOUT, dtype=np.float64)  # aligned to 64 bytes below
        start = ((-raw.ctypes.data) % 64) // 8
        self.tree = raw[start:start + size]
        kernels = _numba_kernels() if use_numba in (None, True) else None
        if use_numba and kernels is None:
            raise ImportError("numba is not available")
        self._kernels = kernels

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the kernels with empty calls; changes nothing."""
        if self._kernels is not None:
            self.update(np.empty(0, dtype=np.int64), np.empty(0))
            self.find(np.empty(0))

    @property
    def total(self) -> float:
        return float(self.tree[0])

    @property
    def leaves(self) -> np.ndarray:
        """The values of ids 0..capacity-1 (a view: call `rebuild` after writing into it)."""
        return self.tree[self.base:self.base + self.capacity]

    def values(self, ids) -> np.ndarray:
        return self.tree[self.base + np.asarray(ids, dtype=np.int64)]

    def update(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Set the values of `ids` (int64 [n], the last of repeated ids wins)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        values = np.ascontiguousarray(values, dtype=np.float64)
        if self._kernels is not None:
            self._kernels[0](self.tree, self.offs, ids, values)
            return
        tree, offs, B = self.tree, self.offs, FANOUT
        if len(ids) > 1:  # keep the last of repeated ids, as the sequential kernel does
            rev_unique, first = np.unique(ids[::-1], return_index=True)
            if len(rev_unique) != len(ids):
                ids, values = rev_unique, values[::-1][first]
        tree[self.base + ids] = values
        nodes = np.unique(ids // B)
        for lvl in range(len(offs) - 2, -1, -1):
            c = offs[lvl + 1] + nodes * B
            s = tree[c]
            for m in range(1, B):
                s += tree[c + m]
            tree[offs[lvl] + nodes] = s
            nodes = np.unique(nodes // B)

    def rebuild(self) -> None:
        """Recompute every internal node from the leaves."""
        tree, offs, B = self.tree, self.offs, FANOUT
        for lvl in range(len(offs) - 2, -1, -1):
            m = self._sizes[lvl]
            children = tree[offs[lvl + 1]:offs[lvl + 1] + B * m].reshape(m, B)
            s = children[:, 0].copy()
            for j in range(1, B):
                s += children[:, j]
            tree[offs[lvl]:offs[lvl] + m] = s

    def find(self, us: np.ndarray, with_values: bool = False):
        """For each u in [0, total): the id whose prefix-sum interval holds u (and, with
        `with_values`, also the values of those ids)."""
        us = np.ascontiguousarray(us, dtype=np.float64)
        n = len(us)
        if self._kernels is not None:
            out = np.empty(n, dtype=np.int64)
            vals = np.empty(n, dtype=np.float64)
            self._kernels[1](self.tree, self.offs, us, out, vals)
            return (out, vals) if with_values else out
        tree, offs, B = self.tree, self.offs, FANOUT
        idx = np.zeros(n, dtype=np.int64)
        r = us.copy()
        for lvl in range(len(offs) - 1):
            children = tree[(offs[lvl + 1] + idx * B)[:, None] + np.arange(B)]
            pick = np.full(n, -1, dtype=np.int64)
            last = np.zeros(n, dtype=np.int64)
            rlast = r.copy()
            for m in range(B):
                v = children[:, m]
                active = pick < 0
                hit = active & (r < v)
                pick[hit] = m
                still = active & ~hit
                pos = still & (v > 0.0)
                last[pos] = m
                rlast[pos] = r[pos]
                r = np.where(still, r - v, r)
            miss = pick < 0
            pick[miss] = last[miss]
            r[miss] = rlast[miss]
            idx = idx * B + pick
        if with_values:
            return idx, tree[self.base + idx]
        return idx
