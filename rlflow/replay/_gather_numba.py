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


# ---- rows of large contiguous fields (images): libc memcpy per row, the next rows prefetched ------
from llvmlite import ir as _ir  # noqa: E402
from numba import types as _types  # noqa: E402
from numba.core import cgutils as _cgutils  # noqa: E402
from numba.extending import intrinsic as _intrinsic  # noqa: E402

_I8P = _ir.IntType(8).as_pointer()


@_intrinsic
def _prefetch(typingctx, addr):
    """llvm.prefetch (read, keep in all cache levels) of the byte at integer address `addr`."""
    if not isinstance(addr, _types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = _ir.IntType(32)
        name = "llvm.prefetch.p0" if _ir.PointerType(_ir.IntType(8)).is_opaque else "llvm.prefetch.p0i8"
        fn = _cgutils.get_or_insert_function(
            builder.module, _ir.FunctionType(_ir.VoidType(), [_I8P, i32, i32, i32]), name)
        builder.call(fn, [builder.inttoptr(args[0], _I8P), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return _types.void(addr), codegen


@_intrinsic
def _memcpy(typingctx, dst, src, nbytes):
    """memcpy(dst, src, nbytes) between integer addresses (llvm.memcpy: a libc call)."""
    if not all(isinstance(a, _types.Integer) for a in (dst, src, nbytes)):
        return None

    def codegen(context, builder, sig, args):
        d, s, m = (builder.inttoptr(args[0], _I8P), builder.inttoptr(args[1], _I8P), args[2])
        _cgutils.raw_memcpy(builder, d, s, m, 1)
        return context.get_dummy_value()
    return _types.void(dst, src, nbytes), codegen


@numba.njit(cache=True, nogil=True)
def gather_big(src_addr, row, dst_addr, dst_off, slots, dist):  # pragma: no cover - compiled
    """Field f of slot s is row[f] bytes at src_addr[f] + s * row[f]; the k-th slot's goes to
    dst_addr + dst_off[f] * n + k * row[f]. While row k is copied, row k + dist is prefetched
    (every cache line of it, every field), so the copies do not wait for DRAM at each row start."""
    n = slots.shape[0]
    nf = src_addr.shape[0]
    for k in range(n + dist):
        if k + dist < n:
            s = slots[k + dist]
            for f in range(nf):
                b = src_addr[f] + s * row[f]
                for off in range(0, row[f], 64):
                    _prefetch(b + off)
        if k < n:
            s = slots[k]
            for f in range(nf):
                _memcpy(dst_addr + dst_off[f] * n + k * row[f], src_addr[f] + s * row[f], row[f])
