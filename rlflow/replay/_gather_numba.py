"""Numba kernel of Table._gather for the packed small fields (imported only when numba is
installed; table.py falls back to numpy's take).

Two passes over the sampled slots: the first only loads one word of each row (a few instructions
per row, so the CPU keeps many of these cache misses in flight at once); the second copies each
field's words from the row, now in cache, into that field's run of the sample's block.
"""

import numba


@numba.njit(cache=True, nogil=True)
def gather_rows(src, row, slots, out, fsrc, fdst, fsize):  # pragma: no cover - compiled
    """src: the packed rows as words [capacity * row]; field f of slot s is the fsize[f] words at
    src[s * row + fsrc[f]]; it goes to out[fdst[f] * n + k * fsize[f]:...] for the k-th slot."""
    n = slots.shape[0]
    touch = 0
    for k in range(n):
        touch += src[slots[k] * row]
    for f in range(fsrc.shape[0]):  # field by field: the same word count for every row
        sz = fsize[f]
        s = fsrc[f]
        d = fdst[f] * n
        if sz == 1:
            for k in range(n):
                out[d + k] = src[slots[k] * row + s]
        elif sz == 2:
            for k in range(n):
                b = slots[k] * row + s
                out[d + 2 * k] = src[b]
                out[d + 2 * k + 1] = src[b + 1]
        else:
            for k in range(n):
                b = slots[k] * row + s
                o = d + k * sz
                for w in range(sz):
                    out[o + w] = src[b + w]
    return touch
