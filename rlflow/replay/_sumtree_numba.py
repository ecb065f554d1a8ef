"""Numba kernels of the sum tree (imported only when numba is installed; see sumtree.py)."""

import numba


@numba.njit(cache=True, nogil=True)
def update(tree, base, ids, values):  # pragma: no cover - compiled
    for k in range(ids.shape[0]):
        i = ids[k] + base
        tree[i] = values[k]
        i >>= 1
        while i >= 1:
            tree[i] = tree[2 * i] + tree[2 * i + 1]
            i >>= 1


@numba.njit(cache=True, nogil=True)
def find(tree, base, us, out):  # pragma: no cover - compiled
    for k in range(us.shape[0]):
        u = us[k]
        i = 1
        while i < base:
            left = tree[2 * i]
            if u < left or tree[2 * i + 1] <= 0.0:
                i = 2 * i
            else:
                u -= left
                i = 2 * i + 1
        out[k] = i - base
