"""One small error hierarchy for everything rlflow raises on purpose.

    RLFlowError            base of all of them
    ├── UsageError         a bad argument or an impossible configuration (also a ValueError)
    │   └── SpecError      an array whose field, shape or dtype differs from its spec
    ├── ClosedError        the component was closed
    ├── Timeout            a blocking call ran past its deadline (also a TimeoutError)
    └── WorkerError        user code failed in another process or thread; carries its traceback
        └── WorkerDied     a worker process died (killed or exited) instead

Messages name the field, the expected and the actual value: use `mismatch` to build them.
"""

from __future__ import annotations

import numbers

import numpy as np


class RLFlowError(Exception):
    """Base class of every error rlflow raises on purpose."""


class UsageError(RLFlowError, ValueError):
    """A bad argument, an unknown option or a configuration that cannot work."""


class SpecError(UsageError):
    """An array (or a space) that does not match its spec: wrong field, shape or dtype."""


class ClosedError(RLFlowError):
    """The component was closed and cannot be used any more."""


class Timeout(RLFlowError, TimeoutError):
    """A blocking call (table insert/sample, queue get, worker reply) ran past its deadline."""


class WorkerError(RLFlowError):
    """User code raised in another process or thread.

    `remote_traceback` holds the formatted traceback from where it happened, `where` says which
    worker / env index / actor it was.
    """

    def __init__(self, message: str, remote_traceback: str = "", where: str = ""):
        self.remote_traceback = remote_traceback
        self.where = where
        text = message
        if where:
            text = f"{where}: {text}"
        if remote_traceback:
            text = f"{text}\n\n--- traceback from {where or 'the worker'} ---\n{remote_traceback}"
        super().__init__(text)

    def __reduce__(self):  # keep the fields when the error crosses a process boundary
        return (_rebuild_worker_error, (self.__class__, self.args[0], self.remote_traceback, self.where))


class WorkerDied(WorkerError):
    """A worker process died (killed, or exited) rather than raised: the process runtime restarts
    an actor whose env worker died, as it restarts an actor that died itself."""


def _rebuild_worker_error(cls, text, remote_traceback, where):
    err = cls.__new__(cls)
    RLFlowError.__init__(err, text)
    err.remote_traceback = remote_traceback
    err.where = where
    return err


def mismatch(what: str, field: str, expected, actual) -> str:
    """The standard message: `<what> '<field>': expected <expected>, got <actual>`."""
    return f"{what} '{field}': expected {expected}, got {actual}"


def is_real(value) -> bool:
    """A number for a seconds (or other real) argument: a Python or numpy int or float, not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_int(value) -> bool:
    """An integer for an int argument: a Python or numpy integer, not a bool (True is no count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def error_text(exc: BaseException) -> str:
    """"Type: message" of an exception, also for one whose str() raises."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception as e:              # noqa: BLE001 - a broken __str__ is the user's
        return f"{type(exc).__name__}: <its str() raised {type(e).__name__}>"


def clip_report(text: str, limit: int) -> str:
    """`text` cut to about `limit` bytes of UTF-8, a third from its start and the rest from its end,
    the cut said where it is: an error report crossing a pipe stays far below the pipe's buffer
    (a sender blocked on a full pipe, whose reader waits for it to exit, hung the run; bytes, not
    characters: 20,000 four-byte characters overfilled a 64 KiB pipe)."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    head = limit // 3
    tail = limit - head
    return (f"{raw[:head].decode('utf-8', 'ignore')}\n[... {len(raw) - limit:,} bytes of this report cut: "
            f"reports between processes are kept under {limit:,} bytes ...]\n"
            f"{raw[-tail:].decode('utf-8', 'ignore')}")
