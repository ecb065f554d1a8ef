"""A sum tree over slot ids: O(log n) point updates and inverse-CDF lookups, batched.

    tree[1]                      = total
    tree[i]                      = tree[2i] + tree[2i+1]          (internal node, recomputed)
    tree[P + id]                 = value of id                    (leaf; P = power of two >= size)

Every internal node is recomputed as the sum of its two children, never updated by a delta, so
the totals do not drift and the order of updates does not matter: the numba kernels (used when
numba is installed) and the pure-numpy fallback give bit-identical trees and lookups.

Lookup of u in [0, total): walk down from the root; go left if u < left sum (or the right subtree
sums to 0), else subtract the left sum and go right. A lookup never lands on a zero leaf while the
total is positive.
"""

from __future__ import annotations

import os

import numpy as np

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
    except Exception:  # numba missing or broken: numpy fallback
        _KERNELS = False
        return None
    _KERNELS = (k.update, k.find)
    return _KERNELS


class SumTree:
    """Non-negative float64 values for ids 0..capacity-1 with their running sum."""

    def __init__(self, capacity: int, use_numba: bool | None = None):
        self.capacity = int(capacity)
        base = 1
        while base < max(self.capacity, 1):
            base *= 2
        self.base = base
        self.tree = np.zeros(2 * base, dtype=np.float64)
        kernels = _numba_kernels() if use_numba in (None, True) else None
        if use_numba and kernels is None:
            raise ImportError("numba is not available")
        self._kernels = kernels

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def values(self, ids) -> np.ndarray:
        return self.tree[self.base + np.asarray(ids, dtype=np.int64)]

    def update(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Set the values of `ids` (int64 [n], the last of repeated ids wins)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        values = np.ascontiguousarray(values, dtype=np.float64)
        if self._kernels is not None:
            self._kernels[0](self.tree, self.base, ids, values)
            return
        tree = self.tree
        if len(ids) > 1:  # keep the last of repeated ids, as the sequential kernel does
            rev_unique, first = np.unique(ids[::-1], return_index=True)
            if len(rev_unique) != len(ids):
                ids, values = rev_unique, values[::-1][first]
        tree[self.base + ids] = values
        nodes = np.unique((self.base + ids) >> 1)
        while len(nodes) and nodes[0] >= 1:
            tree[nodes] = tree[2 * nodes] + tree[2 * nodes + 1]
            if nodes[0] == 1:
                break
            nodes = np.unique(nodes >> 1)

    def rebuild(self) -> None:
        """Recompute every internal node from the leaves."""
        tree = self.tree
        lo = self.base
        while lo > 1:
            hi, lo = lo, lo // 2
            tree[lo:hi] = tree[2 * lo:2 * hi:2] + tree[2 * lo + 1:2 * hi:2]

    def find(self, us: np.ndarray) -> np.ndarray:
        """For each u in [0, total): the id whose prefix-sum interval holds u."""
        us = np.ascontiguousarray(us, dtype=np.float64)
        if self._kernels is not None:
            out = np.empty(len(us), dtype=np.int64)
            self._kernels[1](self.tree, self.base, us, out)
            return out
        tree = self.tree
        idx = np.ones(len(us), dtype=np.int64)
        u = us.copy()
        for _ in range(self.base.bit_length() - 1):  # depth of the tree
            left = tree[2 * idx]
            go_left = (u < left) | (tree[2 * idx + 1] <= 0.0)
            u = np.where(go_left, u, u - left)
            idx = np.where(go_left, 2 * idx, 2 * idx + 1)
        return idx - self.base
