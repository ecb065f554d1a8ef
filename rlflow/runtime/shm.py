"""Named numpy arrays in one block of memory shared between a parent and its worker processes.

Two kinds of block, one interface:

    anonymous  (start method "fork")   mmap(-1, size): inherited by forked children, no name, so
                                       nothing can ever be left behind in /dev/shm.
    named      (start method "spawn")  a POSIX shared-memory segment "/rlflow_<pid>_<random>" that
                                       children open by name. The parent unlinks it as soon as every
                                       worker has attached (`unlink()`), so a crash after start-up
                                       leaves nothing behind; `close()` unlinks it too if start-up
                                       never got that far, and interpreter exit (atexit) unlinks
                                       any named block its creator left linked.

    block = SharedArrays({"obs": ((16, 4), np.float32), "reward": ((16,), np.float32)}, named=False)
    block.arrays["obs"][3] = ...             # a view into the block
    handle = block.handle()                  # picklable (named) / inheritable (anonymous)
    child_block = SharedArrays.attach(handle)
"""

from __future__ import annotations

import atexit
import mmap
import os
import secrets

import numpy as np

try:  # POSIX shared memory without multiprocessing's resource tracker process
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

ALIGN = 64
PREFIX = "rlflow_"


def _offsets(specs):
    out, pos = {}, 0
    for name, (shape, dtype) in specs.items():
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out[name] = (pos, tuple(shape), dtype)
        pos += -(-max(nbytes, 1) // ALIGN) * ALIGN
    return out, max(pos, ALIGN)


class SharedArrays:
    """A block of shared memory holding named arrays (name -> (shape, dtype)), 64-byte aligned."""

    def __init__(self, specs: dict, named: bool):
        self.specs = {k: (tuple(s), np.dtype(d)) for k, (s, d) in specs.items()}
        layout, self.size = _offsets(self.specs)
        self.name = None
        self._unlinked = True
        if named:
            self.name = f"/{PREFIX}{os.getpid()}_{secrets.token_hex(6)}"
            self._mmap = _open_named(self.name, self.size, create=True)
            self._unlinked = False
            _LINKED[self.name] = os.getpid()
        else:
            self._mmap = mmap.mmap(-1, self.size)
        self.arrays = self._views(layout)

    def _views(self, layout):
        return {k: np.ndarray(shape, dtype, buffer=self._mmap, offset=off)
                for k, (off, shape, dtype) in layout.items()}

    def handle(self):
        """What a child needs to attach: (name, specs) for a named block, the block itself otherwise
        (valid only in a forked child)."""
        return ("named", self.name, self.specs) if self.name else ("inherited", self)

    @classmethod
    def attach(cls, handle) -> "SharedArrays":
        if handle[0] == "inherited":
            return handle[1]
        _, name, specs = handle
        self = cls.__new__(cls)
        self.specs = specs
        layout, self.size = _offsets(specs)
        self.name = name
        self._unlinked = True        # the parent owns the name
        self._mmap = _open_named(name, self.size, create=False)
        self.arrays = self._views(layout)
        return self

    def unlink(self) -> None:
        """Remove the name (mappings stay valid). Idempotent."""
        if not self._unlinked:
            self._unlinked = True
            _LINKED.pop(self.name, None)
            _unlink_named(self.name)

    def close(self) -> None:
        """Unlink (if named and not yet unlinked) and drop the arrays; the memory is freed once no
        process maps it any more."""
        self.unlink()
        self.arrays = {}
        m, self._mmap = getattr(self, "_mmap", None), None
        if m is not None:
            try:
                m.close()                # unmapped now, where no view of it is left
            except BufferError:
                pass                     # views elsewhere: unmapped when the last one goes


# Named segments this process created and has not unlinked yet: unlinked at interpreter exit, so
# even a user who never calls close() (or an exception on the way out) leaves nothing in /dev/shm.
_LINKED: dict[str, int] = {}


@atexit.register
def _unlink_leftovers():
    for name, pid in list(_LINKED.items()):
        if pid == os.getpid():            # not in forked children, which share the dict
            _unlink_named(name)
    _LINKED.clear()


def _open_named(name, size, create):
    if _posixshmem is not None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = _posixshmem.shm_open(name, flags, mode=0o600)
    else:  # pragma: no cover
        path = "/dev/shm" + name
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    except BaseException:
        if create:
            _unlink_named(name)
        raise
    finally:
        os.close(fd)


def _unlink_named(name):
    try:
        if _posixshmem is not None:
            _posixshmem.shm_unlink(name)
        else:  # pragma: no cover
            os.unlink("/dev/shm" + name)
    except FileNotFoundError:
        pass


def tracked(name, track: bool = True) -> bool:
    """Register (or with track=False unregister) a segment name with multiprocessing's resource
    tracker, a process that outlives this one and unlinks what is still registered when this one
    dies, SIGKILLed included. Returns whether it took the request (best effort)."""
    if not name:
        return False
    from multiprocessing import resource_tracker

    try:
        (resource_tracker.register if track else resource_tracker.unregister)(name, "shared_memory")
        return True
    except Exception:  # pragma: no cover - best effort
        return False


def unlink_semaphore(sem) -> None:
    """Remove the /dev/shm name ("sem.mp-...") of a multiprocessing Semaphore or Lock now.

    Under the "spawn" and "forkserver" start methods a semaphore keeps its name for as long as
    the object lives, so that children can open it by name; multiprocessing unlinks it only when
    the object is garbage-collected (a run's objects sit in reference cycles, and an exception's
    traceback keeps them alive) or at interpreter exit. Call this once no process will open it
    again: it runs multiprocessing's own finalizer for it (unlink, and unregister from the
    resource tracker) at once, so nothing is left to do at collection. Open handles stay valid.
    A semaphore made under "fork" has no name: nothing to do."""
    if sem is None or getattr(getattr(sem, "_semlock", None), "name", None) is None:
        return
    from multiprocessing import util

    for fin in list(getattr(util, "_finalizer_registry", {}).values()):
        ref = getattr(fin, "_weakref", None)
        if ref is not None and ref() is sem:
            try:
                fin()
            except OSError:  # pragma: no cover - already unlinked
                pass
            return
