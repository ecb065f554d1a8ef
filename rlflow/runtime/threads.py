"""Math-library threads in the processes rlflow starts (actors, env workers).

Each such process gets OMP_NUM_THREADS, MKL_NUM_THREADS and OPENBLAS_NUM_THREADS = `threads` in its
environment (what PyTorch, numpy's BLAS and most numerical libraries read when they load), unless the
user's environment sets any of them already (then none is changed). Several processes each running a thread pool as large
as the machine oversubscribe the cores: on 2 cores, an actor whose policy ran PyTorch with the
default 2 threads slowed the learner beside it by about 25% (DQN on CartPole). Ray's workers get the
same default.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_lock = threading.Lock()


def _fresh_lock_in_child() -> None:
    # a process forked while another thread (or this one: an actor started with "fork" from inside
    # `child_threads`) held the lock would wait for it for ever when it starts processes itself
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_in_child)


@contextlib.contextmanager
def child_threads(threads: Optional[int]) -> Iterator[None]:
    """Processes started inside this block with "spawn" (the default start method: the child reads
    the environment when it starts) see `threads` math-library threads; None changes nothing.
    Children of "fork" and "forkserver" inherit their parent's environment and loaded libraries
    instead, so there it has no effect."""
    if threads is None:
        yield
        return
    with _lock:
        # a user who set any of them chose the threads: setting the others would override the
        # choice (torch reads MKL_NUM_THREADS=1 over OMP_NUM_THREADS=2)
        added = [] if any(v in os.environ for v in THREAD_VARS) else list(THREAD_VARS)
        for v in added:
            os.environ[v] = str(int(threads))
        try:
            yield
        finally:
            for v in added:
                os.environ.pop(v, None)
