"""Numba kernels of the sum tree (imported only when numba is installed; see sumtree.py).

Both kernels walk the batch level by level (all n paths one level at a time) rather than one
path after another: the loads of different paths do not depend on each other, so the CPU
overlaps their cache misses. The results are the same as walking path by path.
"""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def update(tree, base, ids, values):  # pragma: no cover - compiled
    n = ids.shape[0]
    nodes = np.empty(n, dtype=np.int64)
    for k in range(n):  # leaves first, in order: the last of repeated ids wins
        i = ids[k] + base
        tree[i] = values[k]
        nodes[k] = i >> 1
    level = base >> 1
    while level >= 1:  # then every parent, recomputed from its children, one level at a time
        for k in range(n):
            i = nodes[k]
            tree[i] = tree[2 * i] + tree[2 * i + 1]
            nodes[k] = i >> 1
        level >>= 1


@numba.njit(cache=True, nogil=True)
def find(tree, base, us, out):  # pragma: no cover - compiled
    n = us.shape[0]
    u = us.copy()
    for k in range(n):
        out[k] = 1
    level = 1
    while level < base:
        for k in range(n):
            i = out[k]
            left = tree[2 * i]
            if u[k] < left or tree[2 * i + 1] <= 0.0:
                out[k] = 2 * i
            else:
                u[k] -= left
                out[k] = 2 * i + 1
        level <<= 1
    for k in range(n):
        out[k] -= base
