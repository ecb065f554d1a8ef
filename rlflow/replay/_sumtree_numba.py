"""Numba kernels of the sum tree (imported only when numba is installed; see sumtree.py).

Each kernel walks the batch level by level (all n paths one level at a time) rather than one
path after another: the loads of different paths do not depend on each other, so the CPU
overlaps their cache misses. The results are the same as walking path by path. Every float
operation is the one the numpy fallback in sumtree.py does, in the same order, so both give
bit-identical trees and lookups.
"""

import numba
import numpy as np

B = 8  # the fan-out; sumtree.FANOUT (a compile-time constant here)


@numba.njit(cache=True, nogil=True)
def update(tree, offs, ids, values):  # pragma: no cover - compiled
    n = ids.shape[0]
    depth = offs.shape[0] - 1
    base = offs[depth]
    nodes = np.empty(n, dtype=np.int64)
    for k in range(n):  # leaves first, in order: the last of repeated ids wins
        tree[base + ids[k]] = values[k]
        nodes[k] = ids[k] // B
    for lvl in range(depth - 1, -1, -1):  # then every parent, recomputed from its children
        child, own = offs[lvl + 1], offs[lvl]
        for k in range(n):
            j = nodes[k]
            c = child + j * B
            s = tree[c]
            for m in range(1, B):
                s += tree[c + m]
            tree[own + j] = s
            nodes[k] = j // B


@numba.njit(cache=True, nogil=True)
def find(tree, offs, us, out, vals):  # pragma: no cover - compiled
    n = us.shape[0]
    depth = offs.shape[0] - 1
    u = us.copy()
    for k in range(n):
        out[k] = 0
    for lvl in range(depth):
        child = offs[lvl + 1]
        for k in range(n):
            c = child + out[k] * B
            # Branch-free (u is random, so a branch per child would be mispredicted about once
            # per level): r runs through r - c0 - c1 - ... ; once r < c_m, every later r is < 0,
            # so the pick is the number of children passed (r >= c_m); r_sel is r at the pick.
            r = u[k]
            pick = 0
            r_sel = r
            for m in range(B):
                v = tree[c + m]
                past = r >= v
                pick += past
                r = r - v
                r_sel = r if past else r_sel
            if pick == B:  # rounding carried r past every child: the last positive one (rare)
                r = u[k]
                pick = 0
                r_sel = r
                for m in range(B):
                    v = tree[c + m]
                    if v > 0.0:
                        pick = m
                        r_sel = r
                    r -= v
            out[k] = out[k] * B + pick
            u[k] = r_sel
    base = offs[depth]
    for k in range(n):
        vals[k] = tree[base + out[k]]
