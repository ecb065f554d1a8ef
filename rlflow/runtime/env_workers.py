"""The process backend of vector envs: worker processes over shared memory, and its pool mode.

Each of W workers runs the same in-place vector env class as the serial backend (SerialVectorEnv,
or a PettingZoo one) over its contiguous slice of the N envs, with that class's row arrays placed in
one shared-memory block. A step is:

    parent                                   worker w (rows lo:hi)
    ------                                   ---------------------
    actions[lo:hi] = a  (shared memory)
    down word w = "step" (+ its bell) ─────▶ wait for the word (spin for `spin`, then block)
                                             venv.step_rows(actions[lo:hi])  -> writes obs, reward,
                                             terminated, truncated, final_obs in place
    wait for up word w ◀─────────────────── up word w = "done" (+ its bell), or write "e" + the
    Step = copies of the shared rows         pickled traceback to its up pipe

Two-phase replies (sync mode of plain single-agent rows, with the words below): the worker first
posts "stepped" (up[w, 2] = the step's seq, no bell) once reward, flags, final_obs and the obs of
the envs that go on are written, then resets its envs that ended and posts "done". The parent copies
everything but obs in between, so a worker's autoresets (~5 us each on CartPole, a step's largest
variable cost) run beside the parent's Step building instead of before it (`_await_stepped`).

Nothing is pickled per step. Seeds for `reset` travel in a small shared array beside the rows.
On Linux x86-64 commands and replies are words in the shared block, and eventfd "bells" wake a
side that blocked (see _BELLS and the words note below it); elsewhere the command or reply is one
byte on the worker's down or up pipe.

Two one-way pipes per worker, not one duplex socket: a socket's reader and writer share one wait
queue, so consuming the peer's byte wakes the peer (blocked in its next read) for nothing. With a
socket every step cost each worker one spurious wake-up and the parent another, which preempted a
stepping worker (perf sched: ~5 context switches per worker round trip instead of ~3; ~10 us of
the critical path per step). A pipe wakes only its readers on write.

Spin, then block (`spin`, seconds). A process about to block on a pipe first polls it (or, with
words, reads the word) for up to `spin` seconds: a worker after each reply (the next command comes
once the parent has stepped its own slice and the caller has acted), the parent before each
worker's reply (pool mode: before the first reply of any busy worker, through one poll set of every
worker's pipe). Each poll is one
`poll(2)` call that returns at once; after `spin` the read blocks as before, so an idle vector env
costs no CPU. (Pool mode, 16 CartPoles, 1 worker + inline, batch 8: ~245k -> ~270-285k steps/s from
polling before blocking and from one persistent poll set instead of a selector built per wait.) On a
2-vCPU VM whose idle vCPU halts at once (cpuidle driver "none"), waking a process blocked on it
costs ~15-20 us (an IPI and a VM exit) twice per step: CartPole, 16 envs, 1 worker + inline went
from ~240k to ~315k steps/s (serial ~200k) with spin = 100 us. Between polls a process yields its
CPU (sched_yield), so where there are more stepping processes than CPUs a poller gives way to
whichever of them has work: on a 2-vCPU VM (cpuidle "haltpoll"), 16 envs, 2 workers, CartPole went
from ~0.70x to ~1.25x serial (~1.14x with an inline slice) and a 200 us env from ~1.83x to ~1.87x
(2 x 15 interleaved rounds); 4 and 8 workers gained on CartPole and were unchanged on the 200 us
env. So it is on by default (`SPIN`, `default_spin`), except in pool mode with more stepping
slices (workers, plus the inline slice) than CPUs, or one CPU: pool mode returns whoever finishes
first, and a worker that shares a core with pollers finishes last more often (2 workers, an inline
slice, 2 CPUs: one worker's slice was returned ~1/8 of the time instead of ~1/4, though spin took its
CartPole rate from ~0.84x to ~1.0x serial; 4 workers, batch 8, 2 CPUs: the least returned slice 3x
less often than the most with spin, 2x without). With as many slices as CPUs it stays on: 2 workers,
no inline slice, batch 8, 2 CPUs, CartPole went from 0.62-0.70x to 0.83-0.99x serial (3 interleaved
rounds), the two slices returned 45% / 55% of the time (47% / 53% without spin), and a 200 us env
was unchanged (~1.86x). The process runtime turns it off for its actors' env workers, whose cores
the learner needs.

Inline slice (`inline=True`; sync mode, and pool mode below). The parent steps one more slice
itself, with the same class on the same shared block, between sending "s" and reading the replies:
W workers then give W + 1 slices in parallel for W wake-ups. On cheap envs (CartPole: ~6 us a step)
the wake-ups are most of the cost, so one worker plus the parent beats two workers on two cores. An
exception in the inline slice is raised as WorkerError too (where = "inline slice").

The inline slice is the last one, and larger: a worker's slice starts a wake-up later, so the
parent takes d = wake_cost / step_cost envs more than each worker (`inline_split`). step_cost is
measured before the workers start, on a throwaway env (`rf.envs.vector.measure_step_cost`: ~50
ms, at most ~200 ms). wake_cost is the median of 32 empty round trips to worker 0, which waits for its
slice until then (every worker gets all the factories and builds only its slice's envs). A round
trip holds two wake-ups where the step's critical path holds about one, and the 1-env step
includes the per-call overhead (~2 us); the two overestimates about cancel on CartPole, and the
split errs towards the parent, which is the cheaper side to err on (a parent that finishes first
blocks and pays a wake-up of its own).
CartPole, 16 envs, 1 worker on this 2-vCPU VM: ~6.5-7 us a step, ~30 us a round trip (~45-55 us
while other jobs load the machine), so the parent steps 10-12 envs and the worker 4-6 (a sweep of
the parent's share, 4 interleaved rounds against ~200k steps/s serial: 8 0.75x, 9 0.85x, 10 1.05x,
11 1.1x, 12 1.05x, 13 1.0x; the calibrated split picked 11).
A 200 us env gets d ~ 0.2: an even split. Env i keeps row i and seed + i whoever steps it.

Scheduling. Without an inline slice the workers run under SCHED_BATCH (rlflow.runtime.children):
the parent wakes them one after the other, and a worker woken onto the parent's CPU must not
preempt it before it has woken the rest (a stranded parent delayed a worker's start by a whole
time slice, ~1.2 ms, on 10-15% of the steps of a 200 us env on 2 workers). With an inline slice the
parent goes on stepping its own envs after the wake-ups, and when the slices outnumber the CPUs the
workers need the normal wake-up preemption to get their turn (under SCHED_BATCH a pool's worker
waited for the busy parent and was returned 7 times in 60 steps instead of ~20), so they keep
the parent's policy (SCHED_OTHER unless the user chose otherwise).

Faults. A worker whose env raises replies "e" with its traceback and the env index; a worker that
dies closes its up pipe, which the parent reads as end-of-file (never a hang). Both raise
`rlflow.errors.WorkerError` in the parent, after which the vector env is closed: it stops every
worker and frees the shared memory. Workers ignore SIGINT (Ctrl-C reaches the parent, which closes
them; a KeyboardInterrupt inside `step` or `reset` closes the vector env, whose replies are out of
step by then), die with the parent (Linux: PR_SET_PDEATHSIG), and `close()`, garbage collection and
interpreter exit (a weakref finalizer) stop and reap them.

Start method. "fork" on Linux while the parent runs a single Python thread (cheap, and the shared
block is an anonymous mapping, so nothing is ever named in /dev/shm); "spawn" otherwise (the envs'
factories must be picklable; the block is a named segment "rlflow_*" that the parent unlinks as
soon as every worker has attached).

Pool mode (`batch_size=k < N`, EnvPool's async mode). Each worker owns N/W envs and k must be a
multiple of that. `reset()` returns all N rows (env_ids = arange(N)). Each `step(actions)` takes
actions for the rows of the previous returned Step (after reset: all N), starts those workers, and
returns the rows of the first k/(N/W) workers to finish (a worker already finished but not yet
returned counts first), with `env_ids` saying which envs they are:

    reset()        -> rows of workers 0 1 2 3          env_ids 0..7      (N=8, W=4, k=4)
    step(a[0..7])  -> workers 2 0 finished first       env_ids 4 5 0 1
    step(a for 4 5 0 1) -> workers 1 3 (still running, now done) ...

So each env's stream is a strict alternation of (its rows returned, its actions given), and an
adder keyed by env_ids keeps every stream straight.

Pool mode with an inline slice (`inline=True`: W workers and this process own N/(W+1) envs each).
The inline slice is stepped by `step` itself, while the workers step theirs, when its actions are
in, fewer than k/(N/(W+1)) workers have finished and the last Step did not return it; otherwise it
waits (with its actions) for the next call, and is stepped then whatever the workers did; finished
slices are returned first come, first served. So it is returned at most every other call and at
least every W + 2, however fast or slow it is against the workers. With W=1, N=16, k=8 this is an
alternation: each call sends the worker's 8 envs off, steps its own 8 and returns them, and the
next call returns the worker's 8, finished meanwhile:

    step(a[8..15]) -> worker finished while the caller acted: env_ids 0..7   (envs 8..15 wait)
    step(a[0..7])  -> worker started; envs 8..15 stepped here: env_ids 8..15
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection
import os
import pickle
import platform
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque

import numpy as np

from rlflow.envs.vector import Layout, ObsBuffer, VectorEnv
from rlflow.errors import UsageError, WorkerDied, WorkerError, clip_report, mismatch
from rlflow.runtime.children import (batch_scheduling, die_with_parent, ignore_sigint, pin as pin_to, sigint_blocked,
                                     usable_cpus)
from rlflow.runtime.shm import SharedArrays
from rlflow.runtime.threads import child_threads

__all__ = ["ProcessVectorEnv", "default_start_method", "default_spin", "inline_split"]

PINGS = 32                  # round trips timed to the first worker for the wake-up cost
SPIN = 100e-6               # seconds a process polls (pipe or word) before it blocks ("Spin, then block")

_STEP, _RESET, _CLOSE, _ASSIGN, _PING = b"s", b"r", b"c", b"a", b"p"
_OK, _ERR = b"k", b"e"
# Doorbells (Linux x86-64): a blocked side is woken by an eventfd, not by a pipe byte. A
# pipe wakes its reader as a "sync" wake-up, which tells the scheduler the writer is about to sleep,
# so the woken process is placed on the writer's CPU; a parent that goes on stepping its inline
# slice (or a worker that polls after replying) then shares one CPU with the process it woke while
# the other CPU idles, until the load balancer splits them (CartPole, 16 envs, 1 worker + inline,
# 2 vCPUs: half-second spans at ~130k steps/s with the two on one CPU ~20% of the time, ~215k
# with 0%). An eventfd wake-up carries no such hint. The pipes stay for what they are needed for:
# a worker's error report, and end-of-file when either side dies (an eventfd has no EOF).
_BELLS = hasattr(os, "eventfd") and platform.machine().lower() in ("x86_64", "amd64")
_CODE = {_STEP: 1, _RESET: 2, _CLOSE: 4, _ASSIGN: 8, _PING: 16}
_MSG = {v: k for k, v in _CODE.items()}
# Words (with the bells). A command is a word in shared memory, down[w, 0] = seq << 8 | code (seq
# counts worker w's commands); a reply is up[w, 0] = the seq of the command done; the bells are
# only wake-ups. A waiter spins on the word for `spin` seconds (sched_yield between reads, no
# system call), then blocks on its bell and its pipe and re-reads the word. Only on x86-64 (TSO:
# stores are seen in program order, so the actions or rows written before a word are there once
# the word is); elsewhere the pipes carry commands and replies as bytes. Each side also publishes
# until when it is sure to spin (down[w, 1]: the parent, send time + spin; up[w, 1]: the worker,
# reply time + spin; monotonic ns), and a sender skips the bell when the receiver will still be
# spinning _MARGIN_NS after the word was written: a round trip between spinning sides then holds
# no system call (an empty one: ~5 -> ~3 us on a 2-vCPU VM). CartPole, 16 envs, against the bells
# carrying the commands (2 x 21 interleaved rounds in one process): 1 worker + inline 1.06x and
# 1.08x, 2 workers 1.11x and 1.15x. A blocked waiter also wakes every _INSURANCE_MS and re-reads
# its word, so not even a lost bell could hang it.
_MARGIN_NS = 20_000
STRAGGLER_NS = 2_000_000         # pool mode: a busy worker's pipe is polled once its step took this long
_INSURANCE_MS = 200
_NO_SEED = np.iinfo(np.int64).min
_CONTROL = ("seed", "slice", "down", "up")          # shared arrays beside the rows


def default_start_method() -> str:
    """"fork" on Linux while only one Python thread runs (forking threads can deadlock), else "spawn"."""
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return "fork"
    return "spawn"


def default_spin(workers: int, cpus: int | None = None, pool: bool = False, inline: bool = False) -> float:
    """`SPIN`, except in pool mode with more stepping slices than CPUs (W workers, + 1 with an inline
    slice, > CPUs) or a single CPU, where it is 0: pool mode returns whoever finishes first, and a
    worker that shares a CPU with pollers would finish last more often than its share."""
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    return SPIN if not pool or (cpus >= 2 and workers + bool(inline) <= cpus) else 0.0


def _check_picklable(env_fns, method: str, defaulted: bool) -> None:
    """UsageError naming the env unless each distinct factory pickles: "spawn" and "forkserver"
    send them to the workers by pickle (a lambda or a local function raised pickle's own
    AttributeError from deep inside multiprocessing, without a word about why it pickles)."""
    seen = set()
    for fn in env_fns:
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        try:
            pickle.dumps(fn)
        except Exception as exc:  # noqa: BLE001 - any pickling failure
            env = getattr(fn, "env", fn)           # CopyOf(instance): name the instance
            why = (" (the default: this process runs more than one thread, and forking a process "
                   "with threads can deadlock)" if defaulted else "")
            raise UsageError(mismatch(
                "argument", "env", f"a picklable env id, callable or instance with start_method={method!r}"
                f"{why}: a module-level function or class, or start_method='fork' on Linux",
                f"{env!r:.100} ({type(exc).__name__}: {exc})")) from None


def _takes_stepped(cls) -> bool:
    """Whether `cls.step_rows` takes the `stepped` hook of a two-phase reply: its class says so
    (`stepped_hook = True` beside the step_rows it defines; a subclass with a step_rows of its own
    says nothing, and gets one-phase replies)."""
    for c in cls.__mro__:
        if "step_rows" in vars(c):       # (and a subclass may turn it off: stepped_hook = False)
            return bool(vars(c).get("stepped_hook", False)) and bool(getattr(cls, "stepped_hook", False))
    return False


def _poll_for(poller, seconds: float) -> list:
    """Poll until a registered fd is readable (or closed) or `seconds` have passed; returns the
    last poll's (fd, event) list (empty: nothing readable yet). Between polls the process yields
    its CPU (sched_yield): a stepping process waiting for that CPU runs first, so polling takes
    only a CPU that would otherwise idle."""
    end = time.perf_counter() + seconds
    ready = poller.poll(0)
    while not ready and time.perf_counter() < end:
        os.sched_yield()
        ready = poller.poll(0)
    return ready


def _wait(poller, spin: float) -> list:
    """Poll for up to `spin` seconds, then block until a registered fd is readable (or closed);
    returns the (fd, event) list."""
    return (_poll_for(poller, spin) if spin else []) or poller.poll()


def _post(mine, word: int, spin_ns: int, peer_until, bell: int) -> int:
    """Write `word` into this side's words `mine` (mine[0]; mine[1] = until when this side spins
    before it blocks), and ring the peer's `bell` unless the peer will still be spinning
    _MARGIN_NS from now (`peer_until`, the peer's mine[1]). Returns this side's spin deadline.

    "Now" is read after the word is written: a sender preempted between a clock read and the
    write would otherwise judge by a time before the write, skip the bell, and leave a peer that
    stopped spinning meanwhile blocked until its next insurance re-read (_INSURANCE_MS)."""
    mine[1] = until = time.monotonic_ns() + spin_ns    # no blocking before then: the peer may skip our bell
    mine[0] = word
    if time.monotonic_ns() + _MARGIN_NS >= peer_until:
        os.eventfd_write(bell, 1)
    return until


def _await_word(done, poller, bells, until_ns: int) -> list:
    """Wait until `done()` holds: spin on it (sched_yield between reads, no system call) until the
    monotonic `until_ns`, then block on `poller`, reading the rung `bells` (eventfds) and
    re-reading `done()` after each wake-up (at least every _INSURANCE_MS). Returns [] once done,
    or the readable fds that are not bells (a pipe: an error report, a command, end-of-file).

    `done()` is read once more after the spin window closes, before the first block: a word
    posted between the window's last read and its close rang no bell (the sender saw this side
    spinning), so blocking without that read would wait for the insurance re-read."""
    clock = time.monotonic_ns
    while not done():
        if clock() >= until_ns:
            break
        os.sched_yield()
    else:
        return []
    while True:
        if done():
            return []
        ready = poller.poll(_INSURANCE_MS)
        for fd, _ in ready:
            if fd in bells:
                os.eventfd_read(fd)
        pipes = [fd for fd, _ in ready if fd not in bells]
        if pipes and not done():
            return pipes


def inline_split(n: int, workers: int, step_cost: float | None, wake_cost: float | None,
                 cores: int | None = None) -> list[int]:
    """Envs per slice, [worker 0, ..., worker W-1, inline slice], for the inline mode.

    A worker's slice pays a wake-up `wake_cost` (seconds: the pipe round trip that starts it and
    reports back) on top of its envs' steps; the inline slice starts at once. Each env step costs
    `step_cost`. The step ends when the slowest slice does, so the slices finish together when the
    inline slice takes d = wake_cost / step_cost envs more than each worker slice:

        inline: p envs   |##############|                 p * c
        worker: k envs   |~~~~~~|#######|                 w + k * c,    p = k + d
                          wake   steps
        W * k + p = n   =>   p = (n + W * d) / (W + 1)

    With `cores` < W + 1 the workers cannot all run beside this process: they share the
    cores - 1 others, so p is balanced against W' = max(1, cores - 1) workers' worth of parallel
    stepping (p = (n + W' * d) / (W' + 1)) and the rest is still spread over all W workers.
    p is rounded to the nearest int and kept in [1, n - W] (every worker keeps at least one env);
    the other n - p envs are split near-equally among the workers, lower slices first. Unknown
    costs (None) give d = 0: near-equal slices, as for an expensive env (d ~ 0).
    """
    if not 1 <= workers < n:
        raise UsageError(mismatch("argument", "workers", f"an int in [1, num_envs - 1 = {n - 1}] with "
                                  "an inline slice", workers))
    d = 0.0
    if step_cost is not None and wake_cost is not None and step_cost > 0 and wake_cost > 0:
        d = wake_cost / step_cost
    par = workers if cores is None or workers + 1 <= cores else max(1, cores - 1)
    p = min(int(np.floor((n + par * d) / (par + 1) + 0.5)), n - workers)
    p = max(p, 1)
    rest = n - p
    sizes = [rest // workers + (i < rest % workers) for i in range(workers)]
    return sizes + [p]


class ProcessVectorEnv(VectorEnv):
    """N envs in W worker processes, stepped over shared memory; optional pool mode (see module doc).

    `cls` is the in-place vector env class each worker runs over its slice (SerialVectorEnv,
    ParallelVectorEnv, AECVectorEnv); `env_fns` one zero-argument factory per env; `layout` the
    spaces (read from a probe env by `rf.envs.make`). Seeded resets give the same episodes as the
    serial backend: env i is reset with `seed + i` on every backend.

    `step_cost` / `wake_cost` (seconds; inline mode only) set the inline split (`inline_split`);
    None measures them (see the module docstring). Both are kept as attributes.
    `spin` (seconds) how long a process polls a pipe before it blocks on it; None: `default_spin`.
    `pin` runs worker w on the w-th CPU (modulo their count) of those this process may use.
    """

    def __init__(self, cls, env_fns, layout: Layout, workers: int, batch_size=None, seed=None,
                 start_method=None, inline: bool = False, step_cost: float | None = None,
                 wake_cost: float | None = None, spin: float | None = None, pin: bool = False):
        n = len(env_fns)
        if not isinstance(workers, int) or not 1 <= workers <= n:
            raise UsageError(mismatch("argument", "workers", f"an int in [1, num_envs={n}]", repr(workers)))
        for name, v in (("step_cost", step_cost), ("wake_cost", wake_cost)):
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise UsageError(mismatch("argument", name, "seconds >= 0, or None (measured)", repr(v)))
        if spin is not None and not (isinstance(spin, (int, float)) and not isinstance(spin, bool)
                                     and 0 <= spin < 1):
            raise UsageError(mismatch("argument", "spin", "seconds in [0, 1), or None (default)", repr(spin)))
        self.num_workers = workers
        self.inline = bool(inline)
        self.pinned = bool(pin)
        rpe = layout.rows_per_env
        bounds = None                   # inline mode: decided once the workers are up (wake cost)
        if batch_size is None or batch_size == n:
            self.batch_size = n
            slices = workers + self.inline
            if slices > n:
                raise UsageError(mismatch("argument", "workers", f"at most num_envs - 1 = {n - 1} with "
                                          "inline=True (this process steps one slice too)", workers))
            if not self.inline:
                bounds = np.linspace(0, n, slices + 1).round().astype(int)   # near-equal slices
            elif step_cost is None:     # calibration on a throwaway env (never one of the n)
                from rlflow.envs.vector import measure_step_cost

                step_cost = measure_step_cost(cls, env_fns[-1](), layout)   # as the later envs are built
        else:
            slices = workers + self.inline
            if n % slices:
                raise UsageError(mismatch("argument", "workers", f"a count whose slices (workers"
                                          f"{' + 1 inline' if self.inline else ''}) divide num_envs={n} "
                                          "in pool mode", workers))
            epw = n // slices
            if slices < 2:            # one slice returns all its envs at once: no batch is below num_envs
                raise UsageError(mismatch("argument", "workers", "at least 2 slices in pool mode (workers, "
                                          "+ 1 with inline): a step returns the slices that finished first",
                                          f"{workers}{' + 1 inline' if self.inline else ''}"))
            if not isinstance(batch_size, int) or not (0 < batch_size < n) or batch_size % epw:
                raise UsageError(mismatch("argument", "batch_size", f"a multiple of the envs per worker "
                                          f"({epw}: {slices} slices of num_envs={n}) below num_envs",
                                          repr(batch_size)))
            self.batch_size = batch_size
            bounds = np.arange(0, n + 1, epw)
        self.pool = self.batch_size < n
        self.spin = float(default_spin(workers, pool=self.pool, inline=self.inline) if spin is None else spin)
        self.step_cost = step_cost
        self.wake_cost = wake_cost
        super().__init__(layout, n * rpe, seed=seed)
        method = start_method or default_start_method()
        if method not in ("fork", "spawn", "forkserver"):
            raise UsageError(mismatch("argument", "start_method", "'fork', 'spawn' or 'forkserver'",
                                      repr(method)))
        self.start_method = method
        # sync mode of plain rows with words: workers reply in two phases (see _await_stepped)
        self._two_phase = bool(_BELLS and _takes_stepped(cls))
        if method != "fork":
            _check_picklable(env_fns, method, defaulted=start_method is None)
        ctx = mp.get_context(method)

        specs = layout.array_specs(self.num_envs)
        specs["seed"] = ((workers,), np.dtype(np.int64))
        specs["slice"] = ((workers, 2), np.dtype(np.int64))     # each worker's envs [e0, e1)
        specs["down"] = ((workers, 8), np.dtype(np.int64))      # words (see _BELLS): a cache line a
        specs["up"] = ((workers, 8), np.dtype(np.int64))        # worker and direction
        self._block = SharedArrays(specs, named=method != "fork")
        self.arrays = {k: v for k, v in self._block.arrays.items() if k not in _CONTROL}
        self._seeds = self._block.arrays["seed"]
        # per worker: its words, as memoryviews of int64 (a Python int per read or write: ~3x
        # faster than a numpy scalar, on every step's critical path)
        self._down_rows = [memoryview(r) for r in self._block.arrays["down"]]
        self._up_rows = [memoryview(r) for r in self._block.arrays["up"]]
        self._seq = [1] * workers          # the seq of the last command (1: a worker's attach reply)
        self._spin_ns = int(self.spin * 1e9)
        self._actions = self.arrays["actions"]
        self._obs = ObsBuffer(layout, self.arrays, "obs")
        self._final = ObsBuffer(layout, self.arrays, "final_obs")

        # per worker: down pipe (parent writes, worker reads), up pipe (worker writes, parent reads)
        self._procs, self._ups, self._downs, self._pids = [], [], [], []
        self._up_fds, self._down_fds, self._pollers = [], [], []
        self._bells: list = []           # per worker (down bell, up bell), eventfds (see _BELLS)
        self._any_up = select.poll()     # every worker's up pipe (pool mode: whichever replies first)
        self._up_bell_fds: set = set()
        self._bell_fds: list = []        # per worker: its down bell's descriptor
        self._local = None
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._downs, self._ups,
                                           self._block, self._bells)
        self._env_bounds = [None] * workers         # until each worker is given its slice
        cpus = usable_cpus() if pin else []
        try:
            # every worker gets every factory and waits for its slice: the inline split needs the
            # wake-up cost, measured on a running worker
            for w in range(workers):
                down_r, down_w = ctx.Pipe(duplex=False)
                up_r, up_w = ctx.Pipe(duplex=False)
                # an eventfd in a Connection: multiprocessing hands its descriptor to the child on
                # every start method
                bells = (tuple(Connection(os.eventfd(0, os.EFD_CLOEXEC)) for _ in "du") if _BELLS
                         else (None, None))
                # fork: the child inherits every parent end so far (and the other workers' bells)
                inherited = (self._downs + self._ups + [down_w, up_r] + [b for bs in self._bells for b in bs]
                             if method == "fork" else [])
                # spawned workers get the env factories as bytes, unpickled in the worker's own
                # error handling: a factory that fails to unpickle there is reported with its
                # traceback (it killed the process before its code ran: exit code 1, no traceback)
                fns = list(env_fns) if method == "fork" else pickle.dumps(list(env_fns))
                p = ctx.Process(target=_worker_main, name=f"rlflow-env-worker-{w}", daemon=True,
                                args=(w, cls, fns, layout, self._block.handle(),
                                      down_r, up_w, inherited, not self.inline, self.spin, bells,
                                      threading.current_thread() is threading.main_thread()))
                # W workers share the cores: one math-library thread each; a Ctrl-C during the
                # start is held until it is done, then raised here
                with child_threads(1), sigint_blocked(method):
                    p.start()
                down_r.close()         # the worker holds the only write end of its up pipe:
                up_w.close()           # its death reads as EOF
                self._procs.append(p)
                self._pids.append(p.pid)
                if pin:
                    pin_to(p.pid, cpus[w % len(cpus)])
                self._downs.append(down_w)
                self._ups.append(up_r)
                self._down_fds.append(down_w.fileno())
                self._up_fds.append(up_r.fileno())
                poller = select.poll()
                for fd in [up_r.fileno()] + ([bells[1].fileno()] if _BELLS else []):
                    poller.register(fd, select.POLLIN)
                    self._any_up.register(fd, select.POLLIN)
                self._pollers.append(poller)
                if _BELLS:
                    self._bells.append(bells)
                    self._bell_fds.append(bells[0].fileno())
                    self._up_bell_fds.add(bells[1].fileno())
            for w in range(workers):
                self._recv(w)          # each worker replies once it has attached the block
            self._block.unlink()       # every worker has attached: nothing left to leak by name
            if bounds is None:
                if self.wake_cost is None:
                    self.wake_cost = self._ping(0, PINGS)
                sizes = inline_split(n, workers, self.step_cost, self.wake_cost, os.cpu_count())
                bounds = np.concatenate([[0], np.cumsum(sizes)])
            self._env_bounds = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
            self._row_bounds = [(a * rpe, b * rpe) for a, b in self._env_bounds]
            self._block.arrays["slice"][:] = self._env_bounds[:workers]
            for w in range(workers):
                self._send(w, _ASSIGN)
            for w in range(workers):
                self._recv(w)          # each worker replies once its envs are built
            self._local = None
            if self.inline:            # this process steps the last slice itself, into the same block
                (e0, e1), (r0, r1) = self._env_bounds[-1], self._row_bounds[-1]
                self._local = cls(list(env_fns[e0:e1]), layout=layout, seed_offset=e0,
                                  arrays={k: v[r0:r1] for k, v in self.arrays.items()})
                self._local_actions = self._actions[r0:r1]
        except BaseException:
            self._abort()
            raise
        self._ids_of = [np.arange(r0, r1, dtype=np.int64) for r0, r1 in self._row_bounds]
        self._busy: set[int] = set()     # stepping, result not read
        self._sent_ns = [0] * workers    # pool mode: when each worker's last step was sent
        self._ready: deque[int] = deque()  # result read, rows not yet returned (pool mode)
        self._last: list[int] = list(range(len(self._env_bounds)))   # slices the last Step returned
        self._local_pending = False      # pool mode: the inline slice holds actions not yet stepped
        self._range_ids: dict = {}       # (r0, r1) -> read-only arange: env_ids of such a Step

    # ---- transport --------------------------------------------------------------------------------
    def _ping(self, w, k):
        """Median seconds of `k` empty round trips to worker w (after one to warm up).

        The median, not the fastest: now and then the scheduler runs both ends on one CPU and a
        trip takes ~5 us, no cross-CPU wake-up at all. (Timing the trip with this process spinning
        instead, as it would while stepping its slice, gave ~5 us every time: the woken worker
        preempts the spinner on its own CPU.)"""
        times = []
        for _ in range(k + 1):
            t = time.perf_counter()
            self._send(w, _PING)
            self._recv(w)
            times.append(time.perf_counter() - t)
        return float(np.median(times[1:]))

    def _send(self, w, msg):
        try:
            if _BELLS:
                seq = self._seq[w] = self._seq[w] + 1
                _post(self._down_rows[w], seq << 8 | _CODE[msg], self._spin_ns, self._up_rows[w][1],
                      self._bell_fds[w])
            else:
                os.write(self._down_fds[w], msg)
        except OSError:
            self._fail(w, "died (its pipe is closed)")

    def _acked(self, w) -> bool:
        """Wait (spin, then block) until worker w has done the last command (True), or its up pipe is
        readable (False: an error report, or end-of-file)."""
        up, seq = self._up_rows[w], self._seq[w]
        if up[0] == seq:                 # the common case: done while this process stepped its slice
            return True
        # -seq: the worker reported an error on its pipe (read it now, not after the spin)
        pipes = _await_word(lambda: up[0] == seq or up[0] == -seq, self._pollers[w],
                            self._up_bell_fds, time.monotonic_ns() + self._spin_ns)
        return not pipes and up[0] == seq

    def _await_stepped(self, w):
        """Two-phase replies (`_two_phase`): wait (spin, then block) until worker w has written
        its rows but for its autoresets' obs (up word 2 = the step's seq, posted without a bell)
        or has replied; an error report or end-of-file raises here. Blocked past the spin, only
        the reply's bell wakes this process: at worst this waits for the reply, as without two
        phases.

        What that gains: a worker whose envs ended resets them (~5 us each, CartPole) while this
        process copies its rows and counts the episode statistics, instead of before (16 CartPoles,
        1 worker + inline: ~0.5-1 us less a step, 3 interleaved A/B pairs: the worker's resets off
        the critical path, where they made the parent wait ~2 us a step in the mean)."""
        up, seq = self._up_rows[w], self._seq[w]
        pipes = _await_word(lambda: up[2] == seq or up[0] == seq or up[0] == -seq, self._pollers[w],
                            self._up_bell_fds, time.monotonic_ns() + self._spin_ns)
        if pipes or up[0] == -seq:
            self._recv(w)              # raises the worker's error, or its death

    def _await_replies(self):
        """Wait for every worker's reply to the last command (raising its error or death). With
        words, a worker whose word says done already (the common case) is not waited on."""
        up, seq = self._up_rows, self._seq
        for w in range(self.num_workers):
            if not _BELLS or up[w][0] != seq[w]:
                self._recv(w)

    def _recv(self, w):
        if _BELLS:
            if self._acked(w):
                return
            # else the up pipe is readable: an error report, or end-of-file (the worker died)
        elif self.spin:
            _poll_for(self._pollers[w], self.spin)
        self._read_pipe(w)

    def _read_pipe(self, w):
        """Read worker w's up pipe: return on "done" (pipes only), raise WorkerError on an error
        report or end-of-file."""
        try:
            msg = os.read(self._up_fds[w], 1)
        except OSError:
            msg = b""
        if msg == _OK:
            return
        if msg == _ERR:
            try:
                tb, env_index = pickle.loads(self._ups[w].recv_bytes())[:2]
            except Exception:
                tb, env_index = "(the traceback could not be read)", None
            where = f"env worker {w}" + ("" if env_index is None else f", env {env_index}")
            self._abort()
            raise WorkerError("an environment raised an exception", tb, where)
        self._fail(w, "died" if not msg else f"sent an unknown message {msg!r}")

    def _fail(self, w, what):
        p = self._procs[w]
        p.join(timeout=1.0)
        code, pid = p.exitcode, p.pid
        envs = ("no envs yet" if self._env_bounds[w] is None
                else f"envs {self._env_bounds[w][0]}..{self._env_bounds[w][1] - 1}")
        self._abort()
        raise WorkerDied(f"the worker process {what} (exit code {code}"
                          f"{', signal ' + signal.Signals(-code).name if code and code < 0 else ''}"
                          f"{', signal SIGTERM' if code == 128 + signal.SIGTERM else ''})",
                          "", f"env worker {w} ({envs}, pid {pid})")

    # ---- VectorEnv ----------------------------------------------------------------------------------
    def _reset(self, seed):
        try:
            return self._reset_workers(seed)
        except KeyboardInterrupt:       # the replies are out of step now: stop the workers
            self._abort()
            raise

    def _step(self, actions):
        try:
            if self.pool:
                return self._step_workers(actions)
            # sync mode, on every step's critical path: one call level, the inline slice stepped here
            np.copyto(self._actions, actions)
            for w in range(self.num_workers):
                self._send(w, _STEP)
            local = self._local
            if local is not None:
                try:
                    local.step_rows(self._local_actions)
                except BaseException as exc:
                    self._local_failed(exc)
            # what needs no worker's results is done first (while a worker may still step)
            lengths = self._count_lengths() if self._plain else None
            up, seq = self._up_rows, self._seq
            if lengths is not None and self._two_phase:
                # the Step is built from each worker's rows as soon as they are written, all but
                # obs while the worker resets the envs that ended (`_await_stepped`)
                for w in range(self.num_workers):
                    if up[w][2] != seq[w] and up[w][0] != seq[w]:
                        self._await_stepped(w)
                return self._make_full_step(self.arrays, self._obs, self._final, lengths=lengths,
                                            obs_ready=self._await_replies)
            self._await_replies()
            if lengths is not None:
                return self._make_full_step(self.arrays, self._obs, self._final, lengths=lengths)
            return self._make_step(self.arrays, self._obs, self._final)
        except KeyboardInterrupt:
            self._abort()
            raise

    def _reset_workers(self, seed):
        for w in list(self._busy):     # pool mode: let running steps finish first
            self._recv(w)
        if self._local_pending:
            # pool mode: the inline slice's actions are in too; its envs take them as the workers'
            # envs took theirs, so every env has taken every action given (state that outlives a
            # reset, such as a wrapper's running statistics, is the same whoever steps the env)
            r0, r1 = self._row_bounds[self.num_workers]
            self._run_local(self._local.step_rows, self._actions[r0:r1])
        self._busy.clear()
        self._ready.clear()
        self._local_pending = False
        self._seeds[:] = _NO_SEED if seed is None else seed
        for w in range(self.num_workers):
            self._send(w, _RESET)
        if self._local is not None:
            self._run_local(self._local.reset_rows, seed)
        for w in range(self.num_workers):
            self._recv(w)
        self._last = list(range(len(self._env_bounds)))
        return self._make_step(self.arrays, self._obs, self._final)

    def _step_workers(self, actions):
        # pool mode (sync mode is stepped in `_step`): actions belong to the rows of the slices
        # returned last
        local = self.num_workers           # the inline slice's number, if there is one
        passed = self._local_pending       # its actions came before the last call, which passed it over
        j = 0
        for w in self._last:
            r0, r1 = self._row_bounds[w]
            self._actions[r0:r1] = actions[j:j + r1 - r0]
            j += r1 - r0
            if w == local:
                self._local_pending = True
            else:
                self._send(w, _STEP)
                self._busy.add(w)
                self._sent_ns[w] = time.monotonic_ns()
        need = self.batch_size // (self._env_bounds[0][1] - self._env_bounds[0][0])
        if self._local_pending:
            self._collect(block=False)     # workers that finished while the caller acted come first
            if passed or (len(self._ready) < need and local not in self._last):
                r0, r1 = self._row_bounds[local]   # stepped here while the workers step theirs
                self._run_local(self._local.step_rows, self._actions[r0:r1])
                self._local_pending = False
                self._ready.append(local)
        while len(self._ready) < need:
            self._collect(block=True)
        chosen = [self._ready.popleft() for _ in range(need)]
        self._last = chosen
        if all(b == a + 1 for a, b in zip(chosen, chosen[1:])):
            # adjacent slices in order (always so for one slice a step): rows r0:r1, a slice
            r0, r1 = self._row_bounds[chosen[0]][0], self._row_bounds[chosen[-1]][1]
            ids = self._range_ids.get((r0, r1))
            if ids is None:
                ids = self._range_ids[r0, r1] = np.arange(r0, r1, dtype=np.int64)
                ids.flags.writeable = False
            index = slice(r0, r1)
        else:
            ids = index = np.concatenate([self._ids_of[w] for w in chosen])
        step = self._make_step(self.arrays, self._obs, self._final, ids=ids, index=index)
        self._expected_rows = len(step)
        return step

    def _collect(self, block: bool):
        """Read the replies of the busy workers that have finished (block: wait for at least one,
        polling for up to `spin` seconds before blocking, as `_recv` does). An idle worker's pipe
        is readable only when the worker died (end-of-file): `_recv` raises WorkerError for it."""
        if not self._busy:
            return
        if _BELLS:
            self._collect_words(block)
            return
        fds = {fd for fd, _ in (_wait(self._any_up, self.spin) if block else self._any_up.poll(0))}
        for w in range(self.num_workers):
            if self._up_fds[w] in fds:
                self._recv(w)
                if w in self._busy:
                    self._busy.discard(w)
                    self._ready.append(w)

    def _collect_words(self, block: bool):
        """Pool mode with words: collect the busy workers whose up word is their command's seq.
        A worker whose word is -seq has reported an error on its pipe: it is read (and raised)
        at once. A worker that died posts nothing: while others keep finishing, this process
        would block (and see its pipe's end-of-file) only by chance, so the pipes are polled,
        without blocking, whenever a busy worker has not finished STRAGGLER_NS after its
        command."""
        up, seq = self._up_rows, self._seq
        done = []

        def finished():
            done[:] = [w for w in sorted(self._busy) if up[w][0] == seq[w] or up[w][0] == -seq[w]]
            return bool(done)

        if not finished() and block:
            pipes = _await_word(finished, self._any_up, self._up_bell_fds,
                                time.monotonic_ns() + self._spin_ns)
            for w in range(self.num_workers):    # an error report, or a worker's death
                if self._up_fds[w] in pipes:
                    self._read_pipe(w)
        for w in done:
            if up[w][0] != seq[w]:
                self._read_pipe(w)               # raises the worker's error
            self._busy.discard(w)
            self._ready.append(w)
        if self._busy:
            late = time.monotonic_ns() - STRAGGLER_NS
            if any(self._sent_ns[w] < late for w in self._busy):
                readable = {fd for fd, _ in self._any_up.poll(0)}
                for w in sorted(self._busy):
                    if self._up_fds[w] in readable:
                        self._read_pipe(w)       # an error report or end-of-file: raises

    def _run_local(self, fn, arg):
        try:
            fn(arg)
        except BaseException as exc:
            self._local_failed(exc)

    def _local_failed(self, exc: BaseException):
        """Called in the `except` block of the inline slice's step or reset: close this vector env
        (the workers' replies are out of step) and raise WorkerError naming the env, or re-raise
        what is no env error (SystemExit, Ctrl-C...)."""
        tb = traceback.format_exc() if isinstance(exc, Exception) else None
        self._abort()
        if tb is None:
            raise exc
        index = getattr(exc, "rlflow_env_index", None)
        raise WorkerError("an environment raised an exception", tb,
                          "inline slice (this process)" + ("" if index is None else f", env {index}")
                          ) from exc

    def _close(self):
        errors = self._finalizer() or []         # what the workers' envs raised in their close()
        if getattr(self, "_local", None) is not None:
            self._local.close()                  # raises the inline slice's env error, if any
        if errors:         # a close() error, or a pool step's error that no step had returned yet
            (tb, index, when), w = errors[0]
            raise WorkerError("an environment raised an exception" + (" in close()" if when == "close" else
                              " (in a step whose results close() found unread)"), tb,
                              f"env worker {w}" + ("" if index is None else f", env {index}"))

    @property
    def slices(self) -> list[tuple[int, int]]:
        """Env ranges [e0, e1) of worker 0, ..., worker W-1, then the inline slice if any."""
        return list(self._env_bounds)

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids."""
        return list(self._pids)


def _shutdown(procs, downs, ups, block, bells):
    """Stop and reap every worker, close the pipes and bells, free the shared block. Safe to call
    twice. (A worker waits on its bell and its pipe: the close command goes down the pipe.)
    Ctrl-C waits until it is done: it runs once (a weakref finalizer), and a KeyboardInterrupt in
    its joins left workers running or unreaped, with nothing that would ever reap them."""
    came = []
    old = None
    # (Python handles signals in the main thread only; a handler not set from Python, None, could
    # not be put back: then nothing is swapped)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None:
        try:
            old = signal.signal(signal.SIGINT, lambda signum, frame: came.append(frame))
        except (ValueError, TypeError):
            old = None
    try:
        return _shutdown_now(procs, downs, ups, block, bells)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
            if came and callable(old):
                old(signal.SIGINT, came[-1])       # the Ctrl-C that came: KeyboardInterrupt, now
            elif came and old == signal.SIG_DFL:
                raise KeyboardInterrupt


def _shutdown_now(procs, downs, ups, block, bells):
    for c in downs:
        try:
            os.write(c.fileno(), _CLOSE)
        except (OSError, ValueError):
            pass
    # one deadline for all: a worker busy in a long env step cannot read the close command, and W
    # such workers cost 2 s in all, not 2 s each (Ctrl-C in a step of slow envs)
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + 1.0
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()
    errors = []            # ((traceback, env index, "step" | "close"), worker) left unread in the pipes
    for w, c in enumerate(ups):
        try:
            errors.extend((e, w) for e in _close_reports(c))
        except Exception:
            pass
    for c in downs + ups + [b for pair in bells for b in pair]:
        try:
            c.close()
        except OSError:
            pass
    for p in procs:
        try:
            p.close()
        except ValueError:
            pass
    procs.clear()
    downs.clear()
    ups.clear()
    bells.clear()
    block.close()
    return errors


def _close_reports(conn) -> list:
    """The error reports left in an exited worker's up pipe (skipping its "done" bytes): what its
    envs' close() raised. The worker has exited, so reading ends at end-of-file, never waits."""
    out = []
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    while poller.poll(0):
        msg = os.read(conn.fileno(), 1)
        if msg == _ERR:
            out.append(pickle.loads(conn.recv_bytes()))
        elif msg != _OK:
            break                                  # end-of-file
    return out


# --------------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------------
class _Terminated(BaseException):
    """SIGTERM in a worker: it closes its envs and exits (143), reporting no env error."""


def _worker_sigterm(signum, frame):
    raise _Terminated()


def _worker_main(w, cls, env_fns, layout, handle, down, up, inherited, batch, spin, bells=(None, None),
                 made_by_main_thread=True):
    ignore_sigint()                                   # Ctrl-C is the parent's to handle
    # SIGTERM (a whole process group stopped: Slurm, systemd, a container) ends the worker quietly;
    # forked from an actor it had the actor's handler, whose exit was reported as an env's error
    signal.signal(signal.SIGTERM, _worker_sigterm)
    terminated = False
    if made_by_main_thread:
        # Linux sends PR_SET_PDEATHSIG when the *thread* that started this process ends: a vector
        # env made in a thread that then ends would lose its workers. Made elsewhere than in the
        # main thread, a worker finds its parent gone by its pipe's end-of-file instead.
        die_with_parent()
    if batch:
        batch_scheduling()
    for c in inherited:                                # the parent's pipe ends (fork)
        c.close()
    rfd, wfd = down.fileno(), up.fileno()
    bell_down, bell_up = (b.fileno() if b is not None else None for b in bells)
    bells_down = {bell_down}
    venv = None

    def reply_error(exc, when="step"):
        index = getattr(exc, "rlflow_env_index", None)
        payload = pickle.dumps((clip_report(traceback.format_exc(), 16_000), index, when))
        try:
            os.write(wfd, _ERR)
            up.send_bytes(payload)
        except OSError:
            pass
        if up_words is not None:        # the report is on the pipe: -seq tells a waiter to read it
            up_words[0] = -seq

    seq = 1                      # the attach reply's; the parent's first command is 2
    up_words = None
    spin_ns = int(spin * 1e9)
    deadline = 0                 # monotonic ns until which this worker spins before it blocks

    def receive():
        """The next command (b"" when the parent is gone). With bells: the down word's command, or
        what the pipe holds (the close command, or end-of-file)."""
        nonlocal seq
        if bell_down is None:
            if spin:
                _poll_for(poller, spin)
            return os.read(rfd, 1)
        want = seq + 1
        if _await_word(lambda: down_words[0] >> 8 == want, poller, bells_down, deadline):
            return os.read(rfd, 1)               # the close command, or end-of-file
        seq = want
        return _MSG.get(down_words[0] & 0xFF, b"?")

    def stepped():
        up_words[2] = seq       # the rows are written but for the autoresets' obs (see _await_stepped)

    def done():
        nonlocal deadline
        if bell_up is None:
            os.write(wfd, _OK)
        else:
            deadline = _post(up_words, seq, spin_ns, down_words[1], bell_up)

    try:
        block = SharedArrays.attach(handle)
        # this worker's words, as the parent's: memoryviews of int64
        down_words, up_words = memoryview(block.arrays["down"][w]), memoryview(block.arrays["up"][w])
        if isinstance(env_fns, bytes):
            env_fns = pickle.loads(env_fns)
        poller = select.poll()
        for fd in (rfd, bell_down):
            if fd is not None:
                poller.register(fd, select.POLLIN)
        done()
        while True:                                    # up: answer pings until given a slice
            msg = receive()
            if msg == _PING:
                done()
            elif msg == _ASSIGN:
                break
            else:
                return
        e0, e1 = (int(x) for x in block.arrays["slice"][w])
        rpe = layout.rows_per_env
        arrays = {k: v[e0 * rpe:e1 * rpe] for k, v in block.arrays.items() if k not in _CONTROL}
        seeds = block.arrays["seed"]
        venv = cls(env_fns[e0:e1], layout=layout, arrays=arrays, seed_offset=e0)
        del env_fns
        two_phase = bell_up is not None and _takes_stepped(type(venv))
        actions = arrays["actions"]
        done()
        while True:
            msg = receive()
            if msg == _STEP:
                if two_phase:
                    venv.step_rows(actions, stepped)
                else:
                    venv.step_rows(actions)
            elif msg == _RESET:
                seed = int(seeds[w])
                venv.reset_rows(None if seed == _NO_SEED else seed)
            elif msg != _PING:                         # close, or the parent is gone
                break
            done()
    except (BrokenPipeError, ConnectionResetError):
        pass
    except _Terminated:
        terminated = True
    except BaseException as exc:                       # noqa: BLE001 - forwarded to the parent
        reply_error(exc)
    finally:
        if venv is not None:
            try:
                venv.close()
            except _Terminated:
                terminated = True
            except BaseException as exc:                # noqa: BLE001 - the parent reads it at close
                if not terminated:
                    reply_error(exc, "close")
        for c in (down, up, *bells):
            if c is None:
                continue
            try:
                c.close()
            except OSError:
                pass
    if terminated:
        sys.exit(128 + signal.SIGTERM)
