"""The process runtime: K actor processes, the table and the learner in this process.

    rf.run(experiment, backend="process", num_actors=2, max_env_steps=100_000)

Where everything lives:

    actor process i  (K of them)                       this process (the learner's)
    ----------------------------                       ----------------------------
    venv = make_venv(experiment)  (serial, or         main thread, each iteration:
           itself process-backed)                       move every published slot of every ring
    Actor(policy, venv, adder,                            into the table, as far as the rate
          sink = RingWriter(ring i),  ────ring i────▶     limiter lets it (else the slot waits:
          param_client = ParamClient(store))              backpressure)
    loop: actor.step(); actor.update_params()           sample a batch; learner.step(batch);
                                                          priorities back; every param_sync_steps
                 ◀──────── SharedParamStore ────────      steps publish the parameters
                                                        supervise actors, evaluate, log, checkpoint
                                                        (nothing to do: block on a semaphore that
                                                         every ring releases when it publishes)

  The learner's thread draws up to `prefetch` (4) batches with one `table.sample` and learns from
  them over as many steps: a draw of 4 x 64 items costs about what one of 64 does right after a
  torch step has emptied the caches (DQN/CartPole: ~40 us less per learner step).

  or, with receiver="thread", prefetch=N: one receiver thread per ring (`table.insert` blocks while
  the limiter refuses) and a sampler thread that draws N batches ahead into a queue while the
  learner computes.

Why the learner's own thread receives and samples by default: measured on DQN/CartPole (2 cores),
the learner made 850 steps/s that way against 635/s with a receiver and a prefetching sampler
thread. Python threads share one interpreter lock; every wake-up of a receiver or sampler thread
(one per published slot, one per batch) takes the lock from the learner right when a torch op
hands it back, and the learner then waits for the lock far longer than sampling (~15 us) or
inserting (~10 us) take. The threads pay off when the learner's step holds the lock little and
long (a GPU learner, large batches): choose them with receiver="thread", prefetch=2.

* Items cross through per-actor rings of preallocated shared-memory slots (`transport.py`): no
  pickling on the hot path; an actor blocks when its ring is full (never drops data).
* Parameters cross through `SharedParamStore` (`params.py`): versioned, never torn, lock-free for
  readers; each actor pulls through `rlflow.sync.ParamClient` (experiment.param_sync_steps /
  param_sync_seconds), exactly as in the local runtime.
* Evaluation (experiment.eval_every) happens at its env step: the actors wait there (a shared
  control word) until the learner has evaluated, then go on. With one actor the evaluated policy is
  that of exactly eval_every * k env steps, as in the local runtime; with K actors the total may
  pass it by less than a vector step per actor. With a samples-per-insert limiter the learner first
  takes every step the limiter allows on what the actors published, so the evaluated policy has
  had the same learner steps as the local runtime's at that env step (the learner, the slower
  side, would otherwise be short by up to the ring and the error buffer).
* The table's rate limiter counts a batch when it is drawn, so samples per insert hold as in the
  local runtime, prefetching or not; with `max_learner_steps` no batch is drawn past the limit.
* Faults. An actor process that dies without an exception (killed, out of memory; or one of its
  env workers did, with env_backend="process": the actor then exits and counts as dead) is restarted,
  up to `max_restarts` times per actor: the new one continues its counters (env steps, so no second
  warm-up), starts fresh episodes with a new seed, and pulls the latest parameters; what the dead
  one had published is inserted; the items of a step it was still waiting to publish (a full
  ring) die with it, and the final figures' `items_lost` counts them. An exception in user code on the actor side
  (policy, env, adder) stops the run with `rlflow.errors.WorkerError` carrying its traceback; the
  learner's exceptions propagate as they are. Ctrl-C (SIGINT) and SIGTERM stop the run within
  seconds: actors are asked to stop, then terminated, then killed; every shared-memory segment
  ("/dev/shm/rlflow_*") is unlinked, and so are the names of the run's semaphores ("sem.mp-*",
  which "spawn" would otherwise keep until they are garbage-collected). A signal whose exception
  was dropped (raised inside a ctypes callback, as numba's kernel loading runs at start-up) is
  raised again at the run loop's next turn. At the end of a run the actors are stopped before the
  last row of figures is written, and what they had published goes into the table as far as its
  rate limiter admits (`items_in_flight` in the final figures counts the rest; a checkpoint saves
  the rings' part of them, and a resume inserts those first). Actors ignore SIGINT (the terminal sends it to the whole
  process group; this process does the stopping) and die with this process (PR_SET_PDEATHSIG).
* Start method: "spawn" by default. Fork after torch's (or any) threads have started can deadlock,
  and this process runs threads (receivers, sampler) by the time actors restart; spawn is safe
  everywhere. The experiment's factories and env must therefore be picklable (module-level classes
  or functions, like examples/dqn.py's factories); this is checked up front. `start_method="fork"`
  or `"forkserver"` may be passed as an option.

Options (keyword arguments of `rf.run(..., backend="process", ...)`):
    max_restarts     restarts allowed per actor (default 3)
    actor_timeout    seconds an actor may go without a turn of its loop (or of its wait for ring
                     space) before it counts as hung (a policy or env call that never returns, a
                     stopped process): it is killed and restarted as a dead one (default 300;
                     None: never). One not acting yet that long after its start (stuck while it
                     imports or builds its env, policy or adder) stops the run with a WorkerError.
    start_method     "spawn" (default), "forkserver" or "fork"
    receiver         "inline" (default: the learner's thread moves ring slots into the table) or
                     "thread" (a receiver thread per actor)
    prefetch         batches drawn ahead of the learner. receiver="inline": the learner's thread
                     draws up to this many in one table.sample (default 4; 1 or 0: one at a time;
                     always one at a time in a run that checkpoints). receiver="thread": a sampler
                     thread keeps this many in a queue (default 0: the learner's thread samples)
    queue_slots      slots per actor ring (default: with a rate_limiters.Queue of size Q, whose size
                     bounds how far acting runs ahead of learning, Q // num_actors // slot_rows slots
                     (1 to 32): a ring holds at most its actor's share of the queue; 32 if the limiter
                     has a samples-per-insert ratio, which keeps acting close to learning; else as
                     many as fit 32 MiB, at most 256). A Queue table with one slot: an actor waits
                     after each publish until the learner's side took it into the table, so the ring
                     adds nothing to the table's bound: a PPO run through Table.queue(n) with batches
                     of every actor's rollout learned from data on average one, at most three,
                     learner versions older than local's (1-3 actors)
    actor_threads    math-library threads (OpenMP, MKL, OpenBLAS) in each actor process and its env
                     workers, unless the environment sets them (default 1; None: the libraries'
                     own default, usually one per core); see rlflow.runtime.threads
    slot_rows        rows per slot (default: the rows of one vector step)
    checkpoint_dir, checkpoint_every, resume   see rlflow.runtime.checkpoint
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import copy
import dataclasses
import math
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import weakref
from typing import Optional

import numpy as np

from rlflow.actor import Actor
from rlflow.adders.base import RowAdder
from rlflow.core import Learner, Policy, Sample
from rlflow.errors import (ClosedError, Timeout, UsageError, WorkerDied, WorkerError, clip_report, error_text, is_int,
                           is_real, mismatch)
from rlflow.replay import rate_limiters
from rlflow.experiment import (Experiment, RunResult, build, build_table, extras_specs_of, fresh_adder,
                               make_venv, seed_all)
from rlflow.runtime import checkpoint as ckpt
from rlflow.runtime.children import die_with_parent, ignore_sigint, sigint_blocked
from rlflow.runtime.common import (Evaluator, Figures, LearnerDriver, Limits, check_batch_size, close_or_warn,
                                   held_stop_note, make_logger, raise_for_signal, scalar_metrics,
                                   wait_until, warn_unsaved_learner)
from rlflow.runtime.params import SharedParamStore
from rlflow.runtime.shm import SharedArrays, tracked, unlink_semaphore
from rlflow.runtime.threads import child_threads
from rlflow.runtime.transport import Receiver, Ring, RingWriter, slot_bytes
from rlflow.sync import ParamClient
from rlflow.specs import batch_rows

# columns of the per-actor stats rows (float64, written by the actor process)
ENV_STEPS, ITEMS, EPISODES, RETURN, VERSION, READY, BLOCKED, READY_AT, UNSENT, BEAT, CLOSING, NSTATS = range(12)
STOP = 0                         # control flag: 1 = every actor should stop
ENV_LIMIT = 1                    # control: the run's max_env_steps (all actors together), -1 for none
EVAL_AT = 2                      # control: env steps (all actors) of the next evaluation, -1 for none:
                                 # the actors wait there until the learner has evaluated and moved it on
START_METHODS = ("spawn", "forkserver", "fork")
INLINE_PREFETCH = 4              # receiver="inline": batches the learner's thread draws at once


def _actor_seed(seed: int, index: int, incarnation: int) -> int:
    return int(seed) + 104_729 * index + 7_919 * incarnation


# --------------------------------------------------------------------------------------------------
# The actor process
# --------------------------------------------------------------------------------------------------
_TERMINATED = []                     # an actor's SIGTERM came (its SystemExit is the signal's, not user code's)


def _sigterm_exit(signum, frame):
    _TERMINATED.append(signum)
    raise_for_signal(signum)               # SystemExit(128 + signum), as in the learner's process


def _wait_for_store(store_conn, should_stop):
    """The param store, sent once the learner exists (actors start while the learner is built)."""
    while not store_conn.poll(0.1):
        if should_stop():
            raise ClosedError("the run is stopping")
    store = store_conn.recv()
    store_conn.close()
    return store


class _Publisher:
    """An actor's sink: its items into its ring, written whole (`__call__`) or by the adder straight
    into a slot (`reserve`, `commit`). The counters first, then the items: the learner's process
    then never holds (or checkpoints) an item whose step its counters leave out."""

    def __init__(self, row, writer, wait_taken: bool):
        self.row, self.writer, self.wait_taken = row, writer, wait_taken
        self.actor = None

    def _count(self, n: int) -> None:
        row, actor = self.row, self.actor
        row[ENV_STEPS] = actor.env_steps
        row[ITEMS] = actor.items_added + n

    def __call__(self, items) -> None:
        self._count(batch_rows(items))
        self.writer.write(items)
        if self.wait_taken:              # a Queue table's one-slot ring adds no buffering: the next
            self.writer.wait_taken()     # items are made with the parameters of after this wait

    def reserve(self, n: int):
        self._count(n)
        return self.writer.reserve(n)

    def cancel(self) -> None:
        self.writer.cancel()
        self.row[ITEMS] = self.actor.items_added       # those rows were not published after all

    def commit(self, n: int) -> None:
        self.writer.commit(n)
        if self.wait_taken:
            self.writer.wait_taken()


def _actor_main(index, incarnation, exp, seed, extras_specs, ring_args, store, control_handle, conn,
                parent_pid, base, store_conn=None):
    ignore_sigint()                                    # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, _sigterm_exit)       # so `finally` closes the env workers
    die_with_parent()
    # The process that started this one: the learner's ("spawn", "fork") or the fork server's
    # ("forkserver", which exits with the learner). A new parent pid means it is gone.
    ppid = os.getppid()
    venv = actor = writer = row = None
    try:
        os.kill(parent_pid, 0)        # the learner exited before this process watched its parent
        control = SharedArrays.attach(control_handle)
        row = control.arrays["stats"][index]
        flags = control.arrays["control"]

        def should_stop():           # also asked while it waits for ring space: it beats then too
            row[BEAT] = time.monotonic()
            return flags[STOP] != 0 or os.getppid() != ppid

        seed_all(seed)
        # env workers block at once and stay unpinned: the learner needs the cores
        venv = make_venv(exp, spin=0.0, pin=False)
        policy = build(exp.policy, Policy, venv.spec)
        adder = fresh_adder(exp)
        adder.item_specs(venv.spec, extras_specs)      # the adder checks the data against these
        writer = RingWriter(ring_args, should_stop=should_stop, trusted=isinstance(adder, RowAdder))
        if store is None:
            store = _wait_for_store(store_conn, should_stop)
        if isinstance(store, SharedParamStore):
            store.for_reader(index)           # its reads pin their buffer (rlflow.runtime.params)
        client = ParamClient(store, every_learner_steps=exp.param_sync_steps,
                             every_seconds=exp.param_sync_seconds)
        publish = _Publisher(row, writer, bool(base.get("wait_taken")))
        actor = publish.actor = Actor(policy, venv, adder, sink=publish, warmup_steps=exp.warmup_steps,
                                      seed=seed, param_client=client)
        if base.get("rng_state") is not None:
            actor.rng.bit_generator.state = base["rng_state"]
        actor.env_steps = int(base["env_steps"])
        actor.items_added = int(base["items"])
        actor.reset()
        actor.stats.episodes = int(base["episodes"])
        actor.update_params()                            # the latest published parameters
        row[VERSION] = client.version
        row[READY_AT] = row[BEAT] = time.monotonic()     # the system-wide clock: the learner reads it
        row[READY] = incarnation + 1
        episodes = actor.stats.episodes
        version = client.version
        blocked = 0.0

        def pull_params():       # the policy delayer; the figures show the version acted on
            nonlocal version
            actor.update_params()
            if client.version != version:
                version = row[VERSION] = client.version

        k = 0
        all_stats = control.arrays["stats"]
        limit = int(flags[ENV_LIMIT])
        alone = len(all_stats) == 1
        monotonic, step, stats = time.monotonic, actor.step, actor.stats
        while flags[STOP] == 0:
            k += 1
            row[BEAT] = monotonic()                      # the heartbeat (actor_timeout)
            if not k & 255 and os.getppid() != ppid:     # orphaned (PDEATHSIG covers Linux)
                break
            hold = flags[EVAL_AT]
            if limit >= 0 or hold >= 0:
                total = actor.env_steps if alone else all_stats[:, ENV_STEPS].sum()
                if limit >= 0 and total >= limit:
                    time.sleep(0.005)    # the run's env steps are done: no step past max_env_steps
                    continue
                if 0 <= hold <= total:
                    # the learner catches up and evaluates the policy of exactly these env steps;
                    # meanwhile this actor takes its newer parameters, and acts on them after
                    pull_params()
                    time.sleep(0.0002)
                    continue
            step()
            pull_params()
            row[ENV_STEPS] = actor.env_steps
            row[ITEMS] = actor.items_added
            if stats.episodes != episodes:
                episodes = stats.episodes
                row[EPISODES] = episodes
                row[RETURN] = stats.mean_return()
            if writer.blocked_seconds != blocked:
                blocked = row[BLOCKED] = writer.blocked_seconds
    except ClosedError:                                  # the run is stopping
        if actor is not None and writer.unsent:
            # the stop came while this step's items were being published (a full ring): the step
            # counts (`publish` counted its env steps and items), and the rows it could not
            # publish are in flight, as those in the ring are
            row[UNSENT] = writer.unsent
            row[EPISODES] = actor.stats.episodes
            row[RETURN] = actor.stats.mean_return()
    except WorkerDied as exc:
        # an env worker of this actor died (not the env's code raising): this actor dies too, and
        # is restarted like one that was killed itself
        try:
            conn.send(("died", str(exc).splitlines()[0]))
        except Exception:
            pass
        sys.exit(3)
    except BaseException as exc:                         # noqa: BLE001 - forwarded to the parent
        if isinstance(exc, SystemExit) and _TERMINATED or isinstance(exc, KeyboardInterrupt):
            raise                    # SIGTERM: the process ends with 128 + 15, which says so
        try:                         # user code's error (a SystemExit in a policy included)
            conn.send(("error", clip_report(error_text(exc), 4_000), clip_report(traceback.format_exc(), 16_000)))
        except Exception:
            pass
        sys.exit(1)
    finally:
        if venv is not None:
            if row is not None:
                row[CLOSING] = time.monotonic()      # the stop waits for the envs' close() a while longer
            close_or_warn(venv, f"actor {index}'s vector env")


# --------------------------------------------------------------------------------------------------
# The learner's process
# --------------------------------------------------------------------------------------------------
class _ActorHandle:
    """One actor slot: its current process, ring, receiver thread, restarts."""

    def __init__(self, index):
        self.index = index
        self.incarnation = -1
        self.process = None
        self.hung = None                 # why the supervisor killed it (actor_timeout), until handled
        self.conn = None
        self.store_send = None        # pipe end for the param store, until it is sent
        self.ring: Optional[Ring] = None
        self.receiver: Optional[Receiver] = None
        self.restarts = 0
        self.retired: list = []          # (ring, receiver or reader) of dead incarnations
        self.reader = None               # receiver="inline": the learner's thread reads the ring
        self.unlinked = False
        self.items_at_start = 0          # the items counter this incarnation started from
        self.started_at = 0.0            # time.monotonic() when this incarnation's process started


class _InlineSampler:
    """The learner's thread samples (a queue-like `get_nowait` / `get`). With `pump`
    (receiver="inline") it also moves ring slots into the table first, and waits on `wake` (a
    semaphore every ring releases when it publishes a slot) instead of the table.

    With `depth` k > 1 it draws up to k batches in one `table.sample(k * batch_size)` (as many as
    the rate limiter admits now, never past `limit`) and hands them out one per learner step. One
    draw of 4 x 64 items costs about what one of 64 does, right after a torch step has emptied the
    caches: on DQN/CartPole the learner's time outside its own step fell from ~190 to ~150 us a
    step. The limiter counts the batches when they are drawn, as with a prefetching thread."""

    GATHER = 0.001

    def __init__(self, table, batch_size, limit, pump=None, wake=None, depth=1):
        self.table, self.batch_size, self.limit, self.drawn = table, batch_size, limit, 0
        self.pump, self.wake, self.depth = pump, wake, max(1, int(depth))
        self.ahead: collections.deque = collections.deque()    # drawn, not handed out yet

    def _sample(self, timeout):
        if self.ahead:
            return self.ahead.popleft()
        room = self.depth if self.limit is None else min(self.depth, self.limit - self.drawn)
        if room <= 0:
            return None
        n = self.batch_size
        if self.pump is not None:
            self.pump()
            if not self.table.can_sample(n):
                return None
            timeout = 0
        k = max(1, min(room, self.table.capacity // n))
        while k > 1 and not self.table.can_sample(k * n):
            k -= 1
        try:
            sample = self.table.sample(k * n, timeout=timeout)
        except Timeout:
            return None
        self.drawn += k
        if k == 1:
            return sample
        keys, probs, data = sample.keys, sample.probabilities, sample.data
        for j in range(1, k):
            part = slice(j * n, (j + 1) * n)
            self.ahead.append(Sample(keys[part], probs[part], {f: a[part] for f, a in data.items()},
                                     dict(sample.info)))
        return Sample(keys[:n], probs[:n], {f: a[:n] for f, a in data.items()}, sample.info)

    def get_nowait(self):
        sample = self._sample(0)
        if sample is None:
            raise queue.Empty
        return sample

    def get(self, timeout):
        if self.ahead:
            return self.ahead.popleft()
        if self.limit is not None and self.drawn >= self.limit:
            time.sleep(timeout)
            raise queue.Empty
        if self.pump is None:
            sample = self._sample(timeout)
        else:
            # Until an actor publishes a slot; then a short pause lets more slots gather, so a
            # learner waiting for data (warm-up, a slow actor) is woken about once per
            # millisecond, not once per slot (each cross-process wake-up costs tens of us on
            # both sides). Only reached when no batch could be drawn at once.
            if self.wake.acquire(timeout=timeout):
                time.sleep(self.GATHER)
            sample = self._sample(0)
        if sample is None:
            raise queue.Empty
        return sample


class _Sampler(threading.Thread):
    """Draws the next batches into a queue while the learner computes (at most `limit` batches)."""

    def __init__(self, table, batch_size, depth, limit, on_error):
        super().__init__(name="rlflow-sampler", daemon=True)
        self.table, self.batch_size, self.limit = table, batch_size, limit
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.on_error = on_error
        self.error = None
        self.drawn = 0
        self.held: list = []       # drawn when told to stop, with the queue full
        self._halt = threading.Event()

    def stop(self):
        self._halt.set()

    def run(self):
        try:
            while not self._halt.is_set() and (self.limit is None or self.drawn < self.limit):
                try:
                    sample = self.table.sample(self.batch_size, timeout=0.2)
                except Timeout:
                    continue
                self.drawn += 1
                while True:
                    if self._halt.is_set():       # drawn and counted: the learner takes it at the end
                        self.held.append(sample)
                        break
                    try:
                        self.queue.put(sample, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except ClosedError:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
            self.on_error(e)


def _check_picklable(exp: Experiment) -> None:
    for f in dataclasses.fields(exp):
        value = getattr(exp, f.name)
        try:
            pickle.dumps(value)
        except Exception as e:
            raise UsageError(mismatch("Experiment", f.name, "a picklable value (actor processes are "
                                      "started with 'spawn': use module-level classes or functions, "
                                      "not lambdas or local closures)", f"{value!r:.80} ({e})")) from None


def run_process(experiment: Experiment, num_actors: int = 1, max_env_steps=None, max_learner_steps=None,
                max_seconds=None, log_dir=None, progress=True, progress_every=2.0, max_restarts: int = 3,
                start_method: str = "spawn", prefetch: Optional[int] = None, receiver: str = "inline",
                queue_slots: Optional[int] = None,
                slot_rows: Optional[int] = None, checkpoint_dir=None, checkpoint_every=None,
                resume=None, actor_threads: Optional[int] = 1,
                actor_timeout: Optional[float] = 300.0) -> RunResult:
    exp = experiment
    if actor_timeout is not None and (not is_real(actor_timeout) or not actor_timeout > 0):
        raise UsageError(mismatch("run", "actor_timeout", "None or seconds > 0", repr(actor_timeout)))
    if start_method not in START_METHODS:
        raise UsageError(mismatch("run", "start_method", f"one of {START_METHODS}", repr(start_method)))
    if prefetch is None:
        prefetch = INLINE_PREFETCH if receiver == "inline" else 0
    for name, value, low in (("max_restarts", max_restarts, 0), ("prefetch", prefetch, 0),
                             ("num_actors", num_actors, 1)):
        if not is_int(value) or value < low:
            raise UsageError(mismatch("run", name, f"an int >= {low}", repr(value)))
    for name, value in (("queue_slots", queue_slots), ("slot_rows", slot_rows)):
        if value is not None and (not is_int(value) or value < 1):
            raise UsageError(mismatch("run", name, "None or an int >= 1", repr(value)))
    if actor_threads is not None and (not is_int(actor_threads) or actor_threads < 1):
        raise UsageError(mismatch("run", "actor_threads", "None or an int >= 1", repr(actor_threads)))
    if receiver not in ("inline", "thread"):
        raise UsageError(mismatch("run", "receiver", "'inline' or 'thread'", repr(receiver)))
    checkpoint_every = ckpt.check_options(checkpoint_dir, checkpoint_every, resume)
    actor_exp = copy.copy(exp)             # what actors need: no learner, table or evaluation policy
    actor_exp.learner = actor_exp.table = actor_exp.eval_policy = None
    if start_method != "fork":
        _check_picklable(actor_exp)
    ctx = mp.get_context(start_method)

    run = _ProcessRun(exp, actor_exp, ctx, num_actors, max_restarts, prefetch, receiver, queue_slots,
                      slot_rows, actor_threads, actor_timeout)
    claim = ckpt.claimed(checkpoint_dir)
    claim.__enter__()                    # no other run writes checkpoints there while this one does
    old_handlers = _install_signal_handlers()
    _LIVE_RUNS.add(run)
    try:
        result = run.run(max_env_steps, max_learner_steps, max_seconds, log_dir, progress, progress_every,
                         checkpoint_dir, checkpoint_every, resume)
        _check_signals()                 # a signal lost while the run finished still stops the process
        return result
    finally:
        _ignore_signals()                # a second Ctrl-C must not interrupt the clean-up
        try:
            run.shutdown()
        finally:
            _LIVE_RUNS.discard(run)
            if old_handlers is not None:     # this run's (a run in another thread never arms it)
                _held_for.clear()
            _restore_signal_handlers(old_handlers)
            if old_handlers is not None:
                _signalled.clear()       # this run's signals were raised: none is left for a later run
            claim.__exit__(None, None, None)


_signalled: list = []            # SIGINT / SIGTERM received by this run's process, newest last
_LIVE_RUNS: "weakref.WeakSet" = weakref.WeakSet()     # runs going on in this process


@atexit.register
def _stop_live_runs():
    """Interpreter exit while a run goes on in another thread (a daemon thread whose main thread
    took Ctrl-C): multiprocessing's own exit handler, which runs after this one, waits for every
    actor process, and actors stop only when their run says so: the process would live on until
    the run's limit. Stop them now, and leave the run's shared-memory names to rlflow's own
    clean-up (rlflow.runtime.shm), not to multiprocessing's tracker, which would call them leaked."""
    for run in list(_LIVE_RUNS):
        run.exiting = True
        try:
            run._stop_actors(grace=1.0)
            for block in (run.control, getattr(run.store, "_block", None)):
                if block is not None:
                    _untrack(block)
        except Exception:  # pragma: no cover - best effort at exit
            pass


_held_for: list = []             # the checkpoint_dir of a run that holds its first signal (see _ProcessRun.run)


def _on_signal(signum, frame):
    _signalled.append(signum)
    if _held_for and len(_signalled) == 1:
        # a run writing checkpoints stops at its next turn and writes one first; again: at once
        held_stop_note(signum, _held_for[0])
        return
    raise_for_signal(signum)


def _check_signals():
    """Raise for a SIGINT / SIGTERM whose exception was lost where the handler raised it: inside a
    ctypes callback (numba loading its compiled kernels at start-up) Python prints such an
    exception and drops it, and the run would go on. Called where the run loops and waits."""
    if _signalled:
        raise_for_signal(_signalled.pop())


def _install_signal_handlers():
    if threading.current_thread() is not threading.main_thread():
        return None
    _signalled.clear()
    _held_for.clear()              # armed by the run's main loop (a signal in start-up stops at once)
    old_int = signal.getsignal(signal.SIGINT)
    if old_int is signal.default_int_handler:     # a handler of the caller's own stays in place
        signal.signal(signal.SIGINT, _on_signal)
    old_term = signal.getsignal(signal.SIGTERM)
    if old_term is signal.SIG_DFL:                # so does a SIGTERM handler of the caller's (as on local)
        signal.signal(signal.SIGTERM, _on_signal)
    return old_term, old_int


def _ignore_signals():
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            # a handler set outside Python (None: an embedding program's) is left alone: nothing
            # could put it back after the clean-up
            if signal.getsignal(sig) is not None:
                signal.signal(sig, signal.SIG_IGN)


def _restore_signal_handlers(old):
    if old is not None:
        for sig, handler in ((signal.SIGTERM, old[0]), (signal.SIGINT, old[1])):
            if handler is not None:          # None: set outside Python, nothing to put back
                signal.signal(sig, handler)


class _ProcessRun:
    def __init__(self, exp, actor_exp, ctx, num_actors, max_restarts, prefetch, receiver, queue_slots,
                 slot_rows, actor_threads=1, actor_timeout=300.0):
        self.actor_threads = actor_threads
        self.actor_timeout = None if actor_timeout is None else float(actor_timeout)
        self.inline = receiver == "inline"
        self.exiting = False
        self.items_lost = 0              # items that killed actors had counted but not published
        self.insert_gate = threading.Lock()
        self.wake = ctx.Semaphore(0) if self.inline else None
        self.exp, self.actor_exp, self.ctx = exp, actor_exp, ctx
        self.num_actors, self.max_restarts, self.prefetch = int(num_actors), int(max_restarts), int(prefetch)
        self.queue_slots, self.slot_rows = queue_slots, slot_rows
        self.actors = [_ActorHandle(i) for i in range(self.num_actors)]
        self.control = None
        self.store = None
        self.sampler = None
        self.inline_sampler = None
        self.evaluator = None
        self.logger = None
        self.errors: list = []
        self._error_event = threading.Event()
        self.stopping = False
        self.learner_wait = 0.0          # seconds the learner waited for a batch
        self.step_seconds = 0.0          # the last learner step's duration (the inline pump's budget)
        self.catching_up = False         # before an evaluation: the inline pump moves all it can
        self._pump_turn = 0              # which live ring the inline pump serves first (it moves on)
        # items a resumed checkpoint held in flight (in the actors' rings when it was taken): they
        # go into the table before the rings' new ones, as the rate limiter admits them
        self.carried: collections.deque = collections.deque()
        self.carried_hold = None         # the actors' EVAL_AT once they are in (None: not holding)

    # ---- set-up ------------------------------------------------------------------------------
    def _on_thread_error(self, e):
        self.errors.append(e)
        self._error_event.set()

    def _start_actor(self, h: _ActorHandle, base: dict):
        h.incarnation += 1
        h.items_at_start = int(base["items"])
        h.ring = Ring(self.item_specs, self.rows_per_slot, self.slots, self.ctx, wake=self.wake)
        parent_end, child_end = self.ctx.Pipe(duplex=False)
        store_recv = None
        if self.store is None:       # started while the learner is being built: the store follows
            store_recv, h.store_send = self.ctx.Pipe(duplex=False)
        seed = _actor_seed(self.seed0, h.index, h.incarnation)
        h.conn = parent_end
        p = self.ctx.Process(
            target=_actor_main, name=f"rlflow-actor-{h.index}", daemon=False,
            args=(h.index, h.incarnation, self.actor_exp, seed, self.extras_specs, h.ring.writer_args(),
                  self.store, self.control.handle(), child_end, os.getpid(),
                  dict(base, wait_taken=self.wait_taken), store_recv))
        try:
            with child_threads(self.actor_threads), sigint_blocked(self.ctx.get_start_method()):
                p.start()
            h.started_at = time.monotonic()
        finally:
            child_end.close()
            if store_recv is not None:
                store_recv.close()
        h.process = p
        h.unlinked = False
        if self.inline:
            h.reader = h.ring.reader()
        else:
            h.receiver = Receiver(h.ring, self._gated_insert, self._on_thread_error,
                                  name=f"rlflow-receiver-{h.index}.{h.incarnation}")
            h.receiver.start()

    def run(self, max_env_steps, max_learner_steps, max_seconds, log_dir, progress, progress_every,
            checkpoint_dir, checkpoint_every, resume):
        start = time.monotonic()
        exp = self.exp
        seed_all(exp.seed)
        resumed = ckpt.load_run(resume) if resume is not None else None
        # specs: a probe vector env and policy in this process (also the learner's env_spec)
        probe = make_venv(exp, backend="serial")
        try:
            spec = probe.spec
            policy = build(exp.policy, Policy, spec)
            extras_specs = extras_specs_of(policy, spec, probe.reset(seed=exp.seed))
        finally:
            probe.close()
        self.extras_specs = extras_specs
        self.item_specs = fresh_adder(exp).item_specs(spec, extras_specs)
        table = ckpt.resumed_table(resumed, build_table(exp, spec, extras_specs), exp.adder)
        self.table = table
        if resumed is not None:
            self.carried.extend(resumed.in_flight)
        self.rows_per_slot = self.slot_rows or max(1, spec.num_envs)
        ratio = getattr(table.rate_limiter, "samples_per_insert", None)
        if self.queue_slots:
            self.slots = self.queue_slots
        elif isinstance(table.rate_limiter, rate_limiters.Queue):
            # a queue bounds how far acting runs ahead of learning (on-policy data: PPO, A2C): a
            # ring holds at most its actor's share of the queue (32 slots on top of a one-rollout
            # queue aged a PPO run's data by one learner version per learner step until the rings
            # filled). A share of one slot's rows gets one slot, which the actor waits to see taken
            share = table.rate_limiter.queue_size // max(1, self.num_actors)     # each actor's part
            self.slots = int(max(1, min(32, share // self.rows_per_slot)))
        elif ratio is not None:
            self.slots = 32          # few enough that the actors stay close to the learner; the reader frees 16 at a time
        else:
            self.slots = int(min(256, max(8, (32 << 20) // max(1, slot_bytes(self.item_specs, self.rows_per_slot)))))
        # a Queue table's one-slot rings: the actor waits after each publish until its slot was taken
        self.wait_taken = self.slots == 1 and isinstance(table.rate_limiter, rate_limiters.Queue)
        self.seed0 = ckpt.env_seed(exp.seed, resumed)

        self.logger = make_logger(log_dir, progress, progress_every, resumed)
        K = self.num_actors
        self.control = SharedArrays({"stats": ((K, NSTATS), np.float64), "control": ((4,), np.int64)},
                                    named=True)
        _track(self.control)
        stats = self.control.arrays["stats"]
        stats[:] = 0
        # The actors start now (process start-up, imports, envs, policies) while the learner is built
        # here; each gets the param store through a pipe once it exists.
        bases = ckpt.actor_bases(resumed, K)
        base_env_steps = sum(int(b["env_steps"]) for b in bases)
        env_limit = -1 if max_env_steps is None else int(max_env_steps)
        if (resumed is not None and max_learner_steps is not None
                and int(resumed.counters["learner_steps"]) >= max_learner_steps):
            env_limit = base_env_steps       # resumed at its learner-step limit: the actors take no step
        self.control.arrays["control"][ENV_LIMIT] = env_limit
        next_eval = (base_env_steps // exp.eval_every + 1) * exp.eval_every if exp.eval_every else None
        self.control.arrays["control"][EVAL_AT] = -1 if next_eval is None else next_eval
        if self.carried:
            # the actors hold (as for an evaluation) until the checkpoint's in-flight items are in:
            # new items go after them, and a run resumed again and again does not pile up a ring
            # per actor of new ones beside the old each time
            self.control.arrays["control"][EVAL_AT] = base_env_steps
            self.carried_hold = -1 if next_eval is None else next_eval
        if resumed is not None:
            self.items_lost = int(resumed.counters.get("items_lost", 0))
        for h, b in zip(self.actors, bases):
            stats[h.index, ENV_STEPS], stats[h.index, EPISODES] = b["env_steps"], b["episodes"]
            stats[h.index, ITEMS] = b["items"]
            self._start_actor(h, b)
        # Compiled kernels (numba: ~0.25 s on its first call in a process) load now, while the
        # actors start, and not at the first sample inside the run's clock.
        check_batch_size(table, exp.batch_size, "process")
        table.warm_up()
        _check_signals()
        learner = build(exp.learner, Learner, spec)
        warn_unsaved_learner(learner, checkpoint_dir)
        self.learner = learner
        _check_signals()
        base_learner_steps = 0
        if resumed is not None:
            learner.load_state_dict(resumed.learner_state)
            ckpt.restore_rng(resumed.rng)
            base_learner_steps = int(resumed.counters["learner_steps"])
        self.store = store = SharedParamStore(learner.get_params(), readers=self.num_actors)
        _track(store._block)
        driver = LearnerDriver(learner, table, exp.batch_size, store, exp.param_sync_steps,
                              publish_seconds=exp.param_sync_seconds)
        driver.steps = base_learner_steps
        driver.publish()                 # the actors start from the learner's parameters
        for h in self.actors:
            try:
                h.store_send.send(store)
            except OSError:          # that actor died already: supervision restarts it with the store
                pass
            h.store_send.close()
            h.store_send = None
        if exp.eval_every:
            self.evaluator = Evaluator(exp, spec, seed=exp.seed + 1_000_003)
        limit = None if max_learner_steps is None else max(0, max_learner_steps - base_learner_steps)
        # drawing ahead stays off in a run that checkpoints: no checkpoint holds a batch that the
        # limiter counted and the learner has not learned from
        if self.prefetch and not self.inline and checkpoint_dir is None:
            self.sampler = _Sampler(table, exp.batch_size, self.prefetch, limit, self._on_thread_error)
            self.sampler.start()
            batches = self.sampler.queue
        else:
            depth = self.prefetch if self.inline and checkpoint_dir is None else 1
            batches = self.inline_sampler = _InlineSampler(
                table, exp.batch_size, limit, self._pump if self.inline else None, self.wake, depth)

        limits = Limits(max_env_steps, max_learner_steps, max_seconds)
        history, solved_at, solved_time, eval_return = [], None, None, float("nan")
        next_ckpt = (driver.steps // checkpoint_every + 1) * checkpoint_every if checkpoint_every else None
        resumes = 0 if resumed is None else int(resumed.counters["resumes"]) + 1
        t0 = self._wait_for_an_actor()   # the run's clock starts when the first actor starts acting
        figures = Figures(t0, base_env_steps, driver.steps)
        next_check = 0.0
        stalled_at = None
        # a resumed run may begin at its limits: then it takes no step, and the loop writes its row
        at_limit = limits.reached(base_env_steps, driver.steps, 0.0)
        interrupted = False              # a held Ctrl-C / SIGTERM: stop, write the checkpoint, then raise it
        if checkpoint_dir is not None and threading.current_thread() is threading.main_thread():
            _held_for[:] = [checkpoint_dir]      # from here on, the first signal is held (_on_signal)
        while True:
            if _signalled:
                if _held_for and len(_signalled) == 1:
                    interrupted = True
                else:
                    _check_signals()
            if self.carried_hold is not None and not at_limit:
                with self.insert_gate:
                    if self._insert_carried():          # all in: the actors go on
                        self.control.arrays["control"][EVAL_AT] = self.carried_hold
                        self.carried_hold = None
            sample = None if at_limit else self._ready_batch(batches)
            if sample is None and not at_limit:
                w = time.monotonic()
                try:
                    sample = batches.get(timeout=0.05)
                except queue.Empty:
                    sample = None
                self.learner_wait += time.monotonic() - w
            if sample is not None:
                t_step = time.monotonic()
                driver.step(sample)
                self.step_seconds = time.monotonic() - t_step
                stalled_at = None
            now = time.monotonic()
            if now >= next_check:
                self._supervise()
                next_check = now + 0.05
                if sample is None and not at_limit:
                    stalled_at = self._check_stall(stalled_at, exp.batch_size, now)
            env_steps = int(stats[:, ENV_STEPS].sum())
            elapsed = now - t0
            evaluated = False
            if next_eval is not None and env_steps >= next_eval:
                if ratio is not None:
                    env_steps = self._catch_up(batches, driver, stats)
                    now = time.monotonic()       # those learner steps are training time
                    elapsed = now - t0
                next_eval = (env_steps // exp.eval_every + 1) * exp.eval_every
                train_time = elapsed - self.evaluator.seconds
                before = self.evaluator.seconds
                eval_return = self.evaluator(learner.get_params(), env_steps, elapsed)
                # the actors held at the evaluation's env step: out of the rates, as on local
                figures.exclude(self.evaluator.seconds - before)
                self.control.arrays["control"][EVAL_AT] = next_eval      # the actors go on
                evaluated = True
                if exp.target_return is not None and eval_return >= exp.target_return and solved_at is None:
                    solved_at, solved_time = env_steps, train_time
            if next_ckpt is not None and driver.steps >= next_ckpt:
                next_ckpt = (driver.steps // checkpoint_every + 1) * checkpoint_every
                self._checkpoint(checkpoint_dir, driver, resumes)
            stop = limits.reached(env_steps, driver.steps, elapsed) or solved_at is not None or interrupted
            if (stop and not interrupted and ratio is not None and solved_at is None and not evaluated
                    and max_env_steps is not None and env_steps >= max_env_steps
                    and not limits.reached(0, driver.steps, elapsed)):
                # the env steps are done: the learner takes every step the rate limiter allows on
                # what the actors made, as the local runtime's learner has by then (the slower
                # learner stopped up to a ring plus the error buffer short of it: 80 steps of 93)
                env_steps = self._catch_up(batches, driver, stats)
            if stop and solved_at is None:
                self._learn_what_was_drawn(driver)
            stopped_at = None
            if stop:
                stopped_at = time.monotonic()   # the last row's clock: stopping the actors is not running
                env_steps = self._wind_down(interrupted)
            if evaluated or stop or figures.due(progress_every):
                row = figures.row(env_steps, driver.steps, table, int(stats[:, EPISODES].sum()),
                                  self._mean_return(), {"eval_return": eval_return, **self._live(driver.steps)},
                                  scalar_metrics(driver.last_metrics), now=stopped_at)
                history.append(row)
                self.logger.write(row, force=True)   # due: the progress line too
            if stop:
                break
        self._stop_actors(close_grace=0.0 if interrupted else self.CLOSE_GRACE)
        self._count_killed_at_stop()
        self._stop_threads()
        # published and not inserted, and rows a stop left unpublished in a step's write
        in_flight = (sum(r.pending_rows() for r in self._readers()) + int(stats[:, UNSENT].sum())
                     + sum(batch_rows(items) for items in self.carried))
        if checkpoint_dir is not None:
            self._checkpoint(checkpoint_dir, driver, resumes, final=True)
        if threading.current_thread() is threading.main_thread():
            _held_for.clear()            # written: a signal from now on (or held) is raised at once
        final = dict(history[-1]) if history else {}
        final["env_steps"] = int(stats[:, ENV_STEPS].sum())
        final["wall_time"] = history[-1]["wall_time"] if history else time.monotonic() - t0
        final["startup_seconds"] = t0 - start
        final["eval_seconds"] = self.evaluator.seconds if self.evaluator else 0.0
        final["actor_restarts"] = sum(h.restarts for h in self.actors)
        final["actor_items"] = int(stats[:, ITEMS].sum())
        final["items_in_flight"] = int(in_flight)    # published by actors, not inserted when the run stopped
        final["items_lost"] = self.items_lost         # counted by actors that were killed before publishing them
        return RunResult(learner=learner, table=table, figures=final, history=history,
                         evals=list(self.evaluator.results) if self.evaluator else [], solved_at=solved_at,
                         solved_time=solved_time)

    def _learn_what_was_drawn(self, driver) -> None:
        """At the run's end: every batch drawn ahead (and counted by the limiter) is learned from,
        the inline sampler's and the prefetching thread's (stopped first, so it draws no more)."""
        if self.inline_sampler is not None:
            while self.inline_sampler.ahead:
                driver.step(self.inline_sampler.ahead.popleft())
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler.join(timeout=5.0)
            while True:
                try:
                    driver.step(self.sampler.queue.get_nowait())
                except queue.Empty:
                    break
            while self.sampler.held:
                driver.step(self.sampler.held.pop(0))

    def _wind_down(self, interrupted: bool = False) -> int:
        """At the run's end: stop the actors, then move what they published into the table, as
        far as its rate limiter admits (receiver="inline"; receiver threads insert on their own
        until stopped). Returns the env steps then: the last row and the final figures count the
        same steps (with max_seconds the actors step on until they see the stop)."""
        self._stop_actors(close_grace=0.0 if interrupted else self.CLOSE_GRACE)
        if self.inline:
            self._pump(drain=True)
        return int(self.control.arrays["stats"][:, ENV_STEPS].sum())

    STALL_SECONDS = 1.0

    def _check_stall(self, since, batch_size: int, now: float):
        """The local runtime's deadlock error, for this backend: every actor's ring holds a slot
        (rings are FIFO: its oldest must go in first), the rate limiter refuses the smallest of
        those slots and refuses the learner a batch. Only an insert or a sample changes the
        limiter, so nothing can move: once that has held for STALL_SECONDS with the table's
        counters unchanged, it is a UsageError (the run would hang). Returns the stall's start
        (table counters, time) or None."""
        heads = []
        if self.carried:        # a resume's in-flight items wait to go first: the rings follow them
            heads.append(batch_rows(self.carried[0]))
        for h in self.actors if not heads else ():
            readers = [r if self.inline else r.reader for _, r in h.retired if r is not None]
            current = h.reader if self.inline else (h.receiver.reader if h.receiver is not None else None)
            if current is None or h.process is None or not h.process.is_alive():
                return None               # starting, restarting or gone: it may still publish
            rows = [r.head_rows() for r in readers + [current]]
            rows = [x for x in rows if x is not None]
            if not rows:
                return None               # this actor is still producing: its next slot may fit
            heads.append(min(rows))
        table = self.table
        n = min(heads)
        if table.can_insert(n) or table.can_sample(batch_size):
            return None
        stats = table.stats()
        counts = (stats.get("inserts"), stats.get("samples"))
        if since is None or since[0] != counts:
            return (counts, now)
        if now - since[1] >= self.STALL_SECONDS:
            raise UsageError(f"process run: the table admits neither an insert of {n} items nor a "
                             f"sample of {batch_size} ({table._why_sample(batch_size)}; table stats {stats}), "
                             f"and every actor waits to insert: this configuration deadlocks (the local "
                             f"backend reports the same)")
        return since

    MID_PUBLICATION_WAIT = 0.5     # seconds the catch-up waits for an actor's counted, unpublished items

    def _catch_up(self, batches, driver, stats) -> int:
        """Before an evaluation (rate-limited tables): the items the actors published so far go
        into the table and the learner takes every step the rate limiter allows on them, as the
        local runtime's learner has when it evaluates. The learner, the slower side, otherwise
        evaluates up to ring + error buffer items (~50 learner steps on DQN/CartPole) short of
        that. Returns the env steps then (the actors hold at the evaluation's env step)."""
        self.catching_up = True
        give_up = time.monotonic() + 10.0
        mid_until = time.monotonic() + self.MID_PUBLICATION_WAIT
        try:
            while time.monotonic() < give_up and not _signalled:    # a held Ctrl-C / SIGTERM: stop now
                sample = self._ready_batch(batches)
                if sample is not None:
                    driver.step(sample)
                    continue
                if time.monotonic() < mid_until and self._mid_publication(stats):
                    # an actor counted its last step and is still writing its items: they come at
                    # once (within MID_PUBLICATION_WAIT, a blocked writer aside), and the learner's
                    # steps on them belong before the evaluation or the end (a run that ended so
                    # left steps to take to the run that resumed it)
                    time.sleep(0.0005)
                    continue
                if self.inline:            # the pump moved all the table takes: nothing more comes
                    break
                # receiver threads may still be inserting what the rings hold, a sampler thread
                # drawing what the table gives: wait for them while either can go ahead
                heads = [n for n in (r.head_rows() for r in self._readers()) if n is not None]
                if not ((heads and self.table.can_insert(min(heads)))
                        or (self.sampler is not None and self.table.can_sample(self.exp.batch_size))):
                    break
                time.sleep(0.0005)
        finally:
            self.catching_up = False
        return int(stats[:, ENV_STEPS].sum())

    def _mid_publication(self, stats) -> bool:
        """Whether a running actor counted rows it has not published yet while its ring has room
        for them: it is between its counters and its items (`_Publisher`), and they come at once."""
        for h in self.actors:
            ring = h.ring
            if (ring is not None and h.process is not None and h.process.is_alive()
                    and self._unpublished(h, stats) > 0 and ring.depth() < ring.slots):
                return True
        return False

    def _ready_batch(self, batches):
        """A batch that can be had now, else None; a receiver or sampler thread's error first."""
        if self.errors:
            raise self.errors[0]
        try:
            return batches.get_nowait()
        except queue.Empty:
            return None

    # ---- figures -----------------------------------------------------------------------------
    def _mean_return(self) -> float:
        s = self.control.arrays["stats"]
        w = np.minimum(s[:, EPISODES], 100.0)
        if w.sum() == 0:
            return math.nan
        return float((s[:, RETURN] * w).sum() / w.sum())

    def _live(self, learner_steps: int) -> dict:
        """Queue depths and each actor's parameter lag: learner steps between the learner's
        parameters and the version the actor acts with."""
        s = self.control.arrays["stats"]
        latest = learner_steps
        out = {}
        lags, depths = [], []
        for h in self.actors:
            lag = float(max(0.0, latest - s[h.index, VERSION])) if s[h.index, READY] else math.nan
            depth = h.ring.depth() if h.ring is not None else 0
            out[f"param_lag_{h.index}"] = lag
            out[f"queue_depth_{h.index}"] = float(depth)
            lags.append(lag)
            depths.append(depth)
        finite = [x for x in lags if not math.isnan(x)]
        out["param_lag"] = max(finite) if finite else math.nan
        out["queue_depth"] = float(sum(depths))
        out["queue_capacity"] = float(self.slots * len(self.actors))
        out["prefetch_depth"] = float(self.sampler.queue.qsize() if self.sampler else
                                      len(self.inline_sampler.ahead) if self.inline_sampler else 0)
        out["actor_blocked_s"] = float(s[:, BLOCKED].sum())
        out["actor_restarts"] = float(sum(h.restarts for h in self.actors))
        out["learner_wait_s"] = self.learner_wait
        return out

    # ---- supervision -------------------------------------------------------------------------
    def _wait_for_an_actor(self) -> float:
        """Wait until an actor has built its env and policy and taken the parameters; return the
        time it did (its first env step follows at once). Actor processes start with the run and
        build while the learner is built here, but a spawned actor imports the user's modules
        anew (torch: ~0.8 s on this 2-core VM), so the learner may be ready first. Counting from
        here is what a single-process library counts from, once its constructor has built the env,
        the policy and the learner; `startup_seconds` in the final figures is the time before."""
        stats = self.control.arrays["stats"]
        while True:
            if self.errors:
                raise self.errors[0]
            _check_signals()
            self._supervise()
            ready = stats[:, READY] > 0
            if ready.any():
                return min(float(stats[ready, READY_AT].min()), time.monotonic())
            time.sleep(0.002)

    def _release_retired(self):
        """Free the rings of dead incarnations once everything they published is in the table
        (their memory stayed mapped until the run ended: one ring per restart)."""
        for h in self.actors:
            if not h.retired:
                continue
            keep = []
            for ring, rec in h.retired:
                reader = rec if self.inline else (rec.reader if rec is not None else None)
                if self.inline or rec is None or not rec.is_alive():
                    if reader is None or reader.drained():
                        if reader is not None:
                            reader.close()
                        ring.close()
                        continue
                keep.append((ring, rec))
            h.retired = keep

    @staticmethod
    def _stopping_by_signal(wait: float = 0.5) -> bool:
        """Whether this process got SIGINT / SIGTERM too, waiting up to `wait` seconds for it: a
        stop sent to the whole process group reaches the actors as well, which then exit 143, maybe
        before this process's handler ran (held or raised). Their deaths are no failure to restart."""
        return wait_until(lambda: bool(_signalled), wait)

    def _supervise(self):
        if self.exiting:                 # the interpreter is exiting: no restarts
            return
        self._release_retired()
        stats = self.control.arrays["stats"]
        for h in self.actors:
            if not h.unlinked and stats[h.index, READY] == h.incarnation + 1:
                h.ring.unlink()          # the actor has attached: no name left to leak
                h.unlinked = True
            p = h.process
            if p.exitcode is None:
                ready = stats[h.index, READY] == h.incarnation + 1
                # read after READY: the actor writes its first BEAT before READY, so a BEAT read
                # first could be the previous incarnation's (or 0) beside this one's READY
                beat = stats[h.index, BEAT]
                if self.actor_timeout is not None and not ready \
                        and time.monotonic() - h.started_at > self.actor_timeout:
                    # still starting after actor_timeout: a restart would hang the same way
                    p.kill()
                    p.join(5.0)
                    raise WorkerError(f"the actor process did not start acting within actor_timeout="
                                      f"{self.actor_timeout:g} s (stuck while it imported or built its env, "
                                      f"policy or adder); killed", "", f"actor {h.index} (pid {p.pid})")
                if self.actor_timeout is None or not ready or time.monotonic() - beat < self.actor_timeout:
                    continue
                # alive but stuck: no loop turn and no wait for ring space for actor_timeout seconds
                # (a policy or env call that never returns, a stopped process): killed, and then
                # restarted like an actor that died
                h.hung = (f"no progress for {time.monotonic() - beat:.0f} s, more than actor_timeout="
                          f"{self.actor_timeout:g}: stuck in a policy or env call, or stopped; killed")
                p.kill()
                p.join(5.0)
                if p.exitcode is None:
                    continue
            message = None
            try:
                if h.conn.poll():
                    message = h.conn.recv()
            except (EOFError, OSError):
                message = None
            where = f"actor {h.index} (pid {p.pid})"
            if message is not None and message[0] == "error":
                raise WorkerError(message[1], message[2], where)
            code = p.exitcode
            if code in (-signal.SIGTERM, 128 + signal.SIGTERM) and self._stopping_by_signal():
                continue                 # SIGTERM to the process group: the run's own stop, not a death
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if code == 128 + signal.SIGTERM:
                how = f"signal SIGTERM, exit code {code}"
            if h.hung is not None:
                how, h.hung = h.hung, None
            if message is not None and message[0] == "died":
                how = f"its vector env's {message[1]}"
            if code >= 0 and stats[h.index, READY] != h.incarnation + 1:
                # it never started acting: a restart would fail the same way (see its stderr)
                raise WorkerError(f"the actor process exited ({how}) before it started acting; its "
                                  f"output above says why (with start method 'spawn', a script "
                                  f"must start the run under `if __name__ == \"__main__\":`)", "", where)
            if h.restarts >= self.max_restarts:
                raise WorkerError(f"the actor process died ({how}) and was already restarted "
                                  f"{h.restarts} times (max_restarts={self.max_restarts})", "", where)
            h.restarts += 1
            # A kill while the actor waited to publish a step (a full ring) loses the step's rows
            # that were not in the ring yet, which the actor had counted already (it counts a step
            # before publishing it, so a checkpoint never holds items its counters leave out).
            # They leave the items counter, and are reported.
            items = int(stats[h.index, ITEMS])
            lost = self._unpublished(h, stats)
            self.items_lost += lost
            gone = f"; {lost} items of the step it was publishing were lost with it" if lost else ""
            self.logger.stream.write(f"rlflow: {where} died ({how}); restarting it "
                                     f"({h.restarts}/{self.max_restarts}){gone}\n")
            if self.inline:
                h.retired.append((h.ring, h.reader))      # _pump keeps draining it
            else:
                h.receiver.drain_and_stop()  # insert what it published, then exit
                h.retired.append((h.ring, h.receiver))
            h.conn.close()
            p.join()
            p.close()
            base = {"env_steps": int(stats[h.index, ENV_STEPS]), "episodes": int(stats[h.index, EPISODES]),
                    "items": items - lost, "rng_state": None}
            stats[h.index, ITEMS] = items - lost
            stats[h.index, READY] = stats[h.index, CLOSING] = 0
            self._start_actor(h, base)

    def _gated_insert(self, items, timeout=0.2, then=None):
        """A receiver thread's insert (`then()`: its slot's release); a checkpoint holds the gate,
        so the table it saves, the rings' items it saves and the counters it reads are one moment's.
        The wait for the rate limiter is outside the gate (the learner, which alone can end it,
        takes the gate for its checkpoints: receivers waiting inside it starved them, ~0.5 s a
        checkpoint per actor). Timeout after `timeout` seconds, as Table.insert."""
        n = batch_rows(items)
        deadline = time.monotonic() + timeout
        while True:
            if not self.table.wait_for_insert(n, max(0.0, deadline - time.monotonic())):
                raise Timeout(f"insert of {n} items: the rate limiter refused for {timeout:g} s")
            with self.insert_gate:
                if self.table.can_insert(n):        # receivers take turns here: still admitted
                    self.table.insert(items, timeout=0)
                    if then is not None:
                        then()
                    return

    def _insert_carried(self) -> bool:
        """The checkpoint's in-flight items, oldest first, as far as the table takes them now.
        Returns whether none is left."""
        carried = self.carried
        while carried:
            if not self._try_insert(carried[0]):
                return False
            carried.popleft()
        return True

    def _checkpoint(self, directory, driver, resumes, final=False):
        with self.insert_gate:            # receiver threads wait: counters >= what the table holds
            self._checkpoint_now(directory, driver, resumes, final)

    def _stats_now(self) -> np.ndarray:
        """A copy of the actors' stats rows in which no actor was between its two counter stores
        (env steps, then items): two copies in a row that agree on both (a copy takes longer than
        the gap between the stores, so both cannot fall into one gap)."""
        live = self.control.arrays["stats"]
        last = live.copy()
        for _ in range(100):
            now = live.copy()
            if np.array_equal(now[:, [ENV_STEPS, ITEMS]], last[:, [ENV_STEPS, ITEMS]]):
                return now
            last = now
        return last

    def _checkpoint_now(self, directory, driver, resumes, final):
        # the rings first, each as of one read of its head, then the counters: the actors count a
        # step before they publish it, so every item saved in flight is counted, and what was
        # counted but published after the snapshot is in `cut` below (items_lost). (Counters read
        # first left the items published meanwhile saved but uncounted: a resume then held more
        # items than its env steps made.)
        in_flight = list(self.carried)
        published = {}                    # actor index -> rows its live ring had published, at the snapshot
        for h, ring, reader in self._ring_readers():
            if reader is None:
                continue
            items, rows = reader.snapshot()
            in_flight.extend(items)
            if ring is h.ring:
                published[h.index] = rows
        stats = self._stats_now()
        counters = {"env_steps": int(stats[:, ENV_STEPS].sum()), "learner_steps": driver.steps,
                    "episodes": int(stats[:, EPISODES].sum()), "param_version": self.store.latest_version(),
                    "resumes": resumes,
                    "actors": [{"env_steps": int(stats[i, ENV_STEPS]), "episodes": int(stats[i, EPISODES]),
                                "items": int(stats[i, ITEMS]), "rng_state": None} for i in range(len(stats))]}
        # rows an actor counted and had not published yet (it waits for ring space with them, or a
        # stop left them unsent): they are in neither the table nor the rings, so a resume from this
        # checkpoint has lost them, and counts them so (env steps = inserts + in flight + lost; the actors' items leave them out)
        cut = 0
        for h in self.actors:
            if h.ring is None:
                continue
            lost = self._unpublished(h, stats, published.get(h.index)) + int(stats[h.index, UNSENT])
            # out of the actor's items, as a restart and a stop take them out: per actor, items =
            # inserts + in flight; env steps = inserts + in flight + items_lost
            counters["actors"][h.index]["items"] -= lost
            cut += lost
        counters["items_lost"] = self.items_lost + cut
        ckpt.save_run(directory, learner=self.learner, table=self.table, counters=counters,
                      rng=ckpt.capture_rng(), supersede=final, adder=self.exp.adder, in_flight=in_flight)

    # ---- shutting down -----------------------------------------------------------------------
    @staticmethod
    def _unpublished(h, stats, published=None) -> int:
        """Rows actor h's incarnation counted (ITEMS) but neither published into its ring (by now,
        or as of a snapshot's `published` rows) nor reported as UNSENT (a stop's in-flight rows):
        what it took with it when it was killed."""
        items = int(stats[h.index, ITEMS])
        published = h.ring.published_rows() if published is None else published
        return max(0, items - h.items_at_start - published - int(stats[h.index, UNSENT]))

    def _count_killed_at_stop(self) -> None:
        """An actor the stop had to kill (it did not stop within the grace period: stuck in user
        code, or SIGSTOPped, while it waited to publish a step) took the rows of that step it had
        counted and not published with it: they count as lost, as a restart counts them. An actor
        that stopped on its own wrote those rows as UNSENT (in flight) instead."""
        stats = self.control.arrays["stats"]
        for h in self.actors:
            if h.ring is None or h.process is None:
                continue
            lost = self._unpublished(h, stats)
            if lost:
                self.items_lost += lost
                stats[h.index, ITEMS] -= lost

    CLOSE_GRACE = 10.0       # seconds an actor closing its envs gets beyond the stop's grace

    def _stop_actors(self, grace: float = 3.0, close_grace: float = 0.0):
        stats = None
        if self.control is not None and self.control.arrays:
            self.control.arrays["control"][STOP] = 1
            stats = self.control.arrays["stats"]
        handles = [h for h in self.actors if h.process is not None and h.process._popen is not None]
        procs = [h.process for h in handles]
        _join_within(procs, grace)
        # at a run's normal end, an actor that left its loop and is closing its envs (a user env's
        # slow close()) is not cut short at `grace`: its envs' close() runs to its end, up to
        # `close_grace` more (not after Ctrl-C, SIGTERM or an error: those stop within seconds)
        _join_within([h.process for h in handles if close_grace and stats is not None
                      and stats[h.index, CLOSING] > 0], close_grace)
        for p in procs:
            try:
                if p.exitcode is None:
                    p.terminate()
            except ValueError:
                pass
        for p in procs:
            try:
                p.join(timeout=2.0)
                if p.exitcode is None:
                    p.kill()
                    p.join()
            except ValueError:
                pass

    def _ring_readers(self, actors=None):
        """(actor handle, ring, its reader or None) of every ring of `actors` (all), each actor's
        retired ones (of its earlier incarnations) first, then its live one."""
        for h in self.actors if actors is None else actors:
            for ring, rec in h.retired + [(h.ring, h.reader if self.inline else h.receiver)]:
                yield h, ring, (rec if self.inline or rec is None else rec.reader)

    def _readers(self):
        return (reader for _, _, reader in self._ring_readers() if reader is not None)

    def _try_insert(self, items) -> bool:
        # Asking first: a refused insert would build and raise a Timeout, once per learner step.
        n = batch_rows(items)
        if not self.table.can_insert(n):
            why = self.table.never_goes_ahead("insert", n)
            if why is not None:                 # refused for ever: the run could only hang
                raise UsageError(f"process run: {why}; an actor publishes up to {self.rows_per_slot} "
                                 f"items at a time (its vector env's rows)")
            return False
        try:
            self.table.insert(items, timeout=0)
            return True
        except Timeout:
            return False

    PUMP_SECONDS = 0.0005

    def _pump(self, drain: bool = False) -> int:
        """receiver="inline": move the published slots the table takes now into it. While the run
        goes on, for at most as long as the last learner step took (PUMP_SECONDS at least): when
        actors publish faster than this thread inserts (a free-running limiter), inserting and
        learning then share the thread about evenly, as a receiver thread shares the interpreter
        with the learner's. `drain` (the actors have stopped): everything the table takes."""
        if self.carried and not self._insert_carried():      # a resume's in-flight items go first
            return 0
        moved = 0
        until = (None if drain or self.catching_up
                 else time.monotonic() + max(self.PUMP_SECONDS, self.step_seconds))
        for h in self.actors:
            for _, reader in h.retired:
                moved += reader.pump(self._try_insert, until)
        # The live rings take turns, a slot each, from a start that moves on every call: the
        # inserts a rate limiter admits are shared among the actors. (Ring by ring from actor 0,
        # actor 0 refilled its ring while the others' stayed full: with 3 actors under a
        # samples-per-insert limiter it gave 92% of the items and actor 2 0.2%, and the starved
        # actors, blocked on their rings, fell thousands of parameter versions behind.)
        live = [h.reader for h in self.actors if h.reader is not None]
        if len(live) == 1:                 # one actor: its ring in one call
            moved += live[0].pump(self._try_insert, until)
        elif live:
            n = len(live)
            start = self._pump_turn % n
            turn = [[live[i % n], live[i % n].ring.slots, i % n] for i in range(start, start + n)]  # reader, slots left, index
            while turn:
                for t in turn:
                    took = t[0].pump(self._try_insert, None, most=1)
                    moved += took
                    t[1] = t[1] - 1 if took else 0
                    if took:
                        # the next call starts after the last ring that gave a slot (a start moved on
                        # every call aliased with a limiter admitting one slot every other call: with
                        # 2 actors one gave 96% of the items, the other stayed blocked on a full ring)
                        self._pump_turn = t[2] + 1
                turn = [t for t in turn if t[1]]
                if until is not None and time.monotonic() >= until:
                    break
        for _ in range(moved):
            self.wake.acquire(block=False)
        return moved

    def _stop_threads(self):
        threads = []
        if self.sampler is not None:
            self.sampler.stop()
            threads.append(self.sampler)
        for h in self.actors:
            for ring, rec in h.retired + [(h.ring, h.receiver)]:
                if isinstance(rec, Receiver):
                    rec.stop()
                    threads.append(rec)
        for t in threads:
            t.join(timeout=5.0)

    def shutdown(self):
        """Stop everything this run started; safe to call in any state."""
        self.stopping = True
        try:
            self._stop_actors()
        finally:
            self._stop_threads()
            for h in self.actors:
                for _, ring, reader in self._ring_readers([h]):
                    if reader is not None:
                        reader.close()       # its views go first: the ring's close unmaps it
                    if ring is not None:
                        ring.close()
                if h.conn is not None:
                    h.conn.close()
                if h.store_send is not None:
                    h.store_send.close()
                if h.process is not None:
                    try:
                        h.process.close()
                    except ValueError:
                        pass
            if self.store is not None:
                _untrack(self.store._block)
                self.store.close()
            if self.control is not None:
                _untrack(self.control)
                self.control.close()
            if self.evaluator is not None:
                self.evaluator.close()
            if self.logger is not None:
                self.logger.close()
            unlink_semaphore(self.wake)       # no actor starts any more: its name can go


def _join_within(procs, seconds: float) -> None:
    """Wait for `procs` to exit, all of them within one deadline `seconds` from now."""
    deadline = time.monotonic() + seconds
    for p in procs:
        try:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        except ValueError:          # closed already
            pass


def _track(block):
    """The store and control segments keep their names for the whole run (a restarted actor attaches
    to them by name): registered with the resource tracker, they go even if this process is SIGKILLed."""
    tracked(block.name)


def _untrack(block):
    tracked(block.name, False)
