"""Pieces every runtime shares: the learner step, evaluation, figures and stop conditions."""

from __future__ import annotations

import copy
import math
import numbers
import signal
import sys
import threading
import time
import warnings
from typing import Mapping, Optional

import numpy as np

from rlflow.actor import evaluate
from rlflow.core import Learner, Policy
from rlflow.errors import UsageError, mismatch
from rlflow.experiment import Experiment, build, make_venv
from rlflow.logging import Logger


class LearnerDriver:
    """Samples from the table, steps the learner, writes back priorities, publishes parameters
    every `publish_every` learner steps (the experiment's param_sync_steps) and, with
    `publish_seconds` (its param_sync_seconds), also once that many seconds have passed since the
    last publication: the actors' time-based pulls then find a newer version."""

    def __init__(self, learner: Learner, table, batch_size: int, store, publish_every: int,
                 sampler=None, publish_seconds: Optional[float] = None):
        self.learner = learner
        self.table = table
        self.batch_size = batch_size
        self.store = store
        self.publish_every = publish_every
        self.publish_seconds = publish_seconds
        self.sample = sampler or (lambda: table.sample(batch_size))
        self.steps = 0
        self.last_metrics: dict = {}
        self._published_at = -math.inf
        self._publish_pending = False

    def publish(self) -> None:
        if self.store is not None:
            # False: a reader held the buffer (SharedParamStore); publish at the next step instead
            self._publish_pending = self.store.publish(self.learner.get_params(), self.steps) is False
            if not self._publish_pending:
                self._published_at = time.monotonic()

    def step(self, sample=None) -> dict:
        """One learner step on `sample` (a batch drawn elsewhere, e.g. by a prefetching thread),
        or on a batch drawn now."""
        if sample is None:
            sample = self.sample()
        metrics = self.learner.step(sample)
        if metrics is None:
            metrics = {}
        elif isinstance(metrics, Mapping):
            metrics = dict(metrics)
        else:
            raise UsageError(mismatch("learner", "step() result", "a dict of metrics name -> number (or None)",
                                      f"{type(metrics).__name__} {metrics!r:.80}"))
        for k in metrics:
            if not isinstance(k, str):      # the figures' columns are names (an int key crashed the first row)
                raise UsageError(mismatch("learner metrics", "name", "a str (step() returns a dict name -> "
                                          "number)", f"{k!r} ({type(k).__name__})"))
        priorities = metrics.pop("priorities", None)
        if priorities is not None:
            priorities = np.asarray(priorities, dtype=np.float64)
            if priorities.shape != (len(sample),):
                raise UsageError(mismatch("learner metrics", "priorities", f"shape ({len(sample)},)",
                                          f"shape {priorities.shape}"))
            self.table.update_priorities(sample.keys, priorities)
        self.steps += 1
        self.last_metrics = metrics
        if self.steps % self.publish_every == 0 or self._publish_pending or (
                self.publish_seconds is not None
                and time.monotonic() - self._published_at >= self.publish_seconds):
            self.publish()
        return metrics


class Evaluator:
    """Evaluates the learner's current parameters on a separate vector env (one episode per env)."""

    def __init__(self, experiment: Experiment, env_spec, seed: int):
        self.experiment = experiment
        self.venv = make_venv(experiment, num_envs=experiment.eval_episodes, backend="serial", own_copy=True)
        source = experiment.eval_policy if experiment.eval_policy is not None else experiment.policy
        if isinstance(source, Policy) and source is experiment.policy:
            # the acting policy given as an object: evaluate a copy, so that evaluations neither
            # hand it parameters past the policy delayer nor step its exploration schedule or RNG
            source = copy.deepcopy(source)
        self.policy = build(source, Policy, self.venv.spec)
        self.seed = seed
        self.results: list = []
        self.seconds = 0.0
        """time spent evaluating, so runs can report training time without it"""

    def __call__(self, params, env_steps: int, wall_time: float) -> float:
        t = time.monotonic()
        if params is not None:
            self.policy.set_params(params)
        out = evaluate(self.policy, self.venv, self.experiment.eval_episodes, seed=self.seed)
        self.results.append((int(env_steps), float(wall_time), out["mean_return"]))
        self.seconds += time.monotonic() - t
        return out["mean_return"]

    def close(self):
        close_or_warn(self.venv, "the evaluation's vector env")


def check_batch_size(table, batch_size: int, backend: str) -> None:
    """UsageError, up front, where the table can never hand out a batch of `batch_size` (more than
    its capacity, or more than its rate limiter ever admits): the learner would wait for ever."""
    why = table.never_goes_ahead("sample", batch_size)
    if why is not None:
        raise UsageError(f"{backend} run: {why} (the experiment's batch_size)")


def close_or_warn(venv, what: str) -> None:
    """Close a run's vector env; what its envs' close() raised becomes a warning: the run is over by
    then, and the rest of its shutdown (processes, shared memory) must still happen."""
    try:
        venv.close()
    except Exception as exc:
        warnings.warn(f"{what}: an env's close() raised {type(exc).__name__}: {exc}", RuntimeWarning,
                      stacklevel=2)


class Limits:
    """When a run stops."""

    def __init__(self, max_env_steps, max_learner_steps, max_seconds):
        self.max_env_steps = max_env_steps
        self.max_learner_steps = max_learner_steps
        self.max_seconds = max_seconds

    def reached(self, env_steps: int, learner_steps: int, elapsed: float) -> bool:
        return ((self.max_env_steps is not None and env_steps >= self.max_env_steps)
                or (self.max_learner_steps is not None and learner_steps >= self.max_learner_steps)
                or (self.max_seconds is not None and elapsed >= self.max_seconds))


class Figures:
    """Rates over the interval since the last row, and the row itself."""

    def __init__(self, t0: Optional[float] = None, env_steps: int = 0, learner_steps: int = 0):
        self.t0 = time.monotonic() if t0 is None else t0
        self._last = (self.t0, env_steps, learner_steps)
        self._paused = 0.0

    def due(self, every: float) -> bool:
        return time.monotonic() - self._last[0] >= every

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (the whole run was paused: an evaluation in one process) out of the
        next row's rates."""
        self._paused += seconds

    def row(self, env_steps, learner_steps, table, episodes, episode_return, extra=None,
            metrics=None, now: Optional[float] = None) -> dict:
        """The figures row; the learner's scalar `metrics` join it under their own names, except
        names the run's figures use (RESERVED and the row's own keys), which get "learner/" in
        front: a learner's "env_steps" metric never hides the run's counter. `now`: the row's
        time.monotonic() (the moment a run stopped; default: now)."""
        now = time.monotonic() if now is None else now
        t, e, l = self._last
        dt = max(now - t - self._paused, 1e-9)
        self._paused = 0.0
        self._last = (now, env_steps, learner_steps)
        stats = table.stats() if hasattr(table, "stats") else {}
        inserts = stats.get("inserts", 0)
        row = {
            "env_steps": env_steps,
            "env_steps_per_s": (env_steps - e) / dt,
            "learner_steps": learner_steps,
            "learner_steps_per_s": (learner_steps - l) / dt,
            "samples_per_insert": stats.get("samples", 0) / inserts if inserts else math.nan,
            "table_size": len(table),
            "episodes": episodes,
            "episode_return": episode_return,
            "wall_time": now - self.t0,
        }
        if extra:
            row.update(extra)
        for k, v in (metrics or {}).items():
            row[f"learner/{k}" if k in row or reserved(k) else k] = v
        return row


RESERVED = frozenset({"startup_seconds", "eval_seconds", "eval_return", "param_lag", "queue_depth",
                      "queue_capacity", "prefetch_depth", "actor_blocked_s", "actor_restarts",
                      "learner_wait_s", "actor_items", "items_in_flight", "items_lost"})
"""Names of run figures that are not in every row (the final figures' extras, the runtimes' live
figures, on any backend): a learner metric of one of these names, or of a per-actor figure's
("param_lag_<i>", "queue_depth_<i>"), is logged as "learner/<name>" on every backend."""


def warn_unsaved_learner(learner, checkpoint_dir) -> None:
    """A RuntimeWarning when checkpoints are written for a learner whose class keeps rf.Learner's
    empty state_dict: its checkpoints hold the counters and the table, and a resume would start
    the learner afresh."""
    if checkpoint_dir is not None and type(learner).state_dict is Learner.state_dict:
        warnings.warn(f"the learner {type(learner).__name__} does not define state_dict / load_state_dict: "
                      "checkpoints hold the counters and the table but not the learner, which a resume "
                      "builds afresh", RuntimeWarning, stacklevel=3)


def raise_for_signal(signum: int):
    """The exception a SIGINT / SIGTERM stops a run with: KeyboardInterrupt, or SystemExit(128 + signum)."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def wait_until(done, seconds: float, poll: float = 0.01) -> bool:
    """`done()` as soon as it is true, polling every `poll` seconds for up to `seconds`."""
    end = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= end:
            return False
        time.sleep(poll)
    return True


def held_stop_note(signum: int, checkpoint_dir) -> None:
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    sys.stderr.write(f"rlflow: {name}: stopping after writing a checkpoint to {checkpoint_dir} "
                     f"(again: stop at once, without it)\n")
    sys.stderr.flush()


class HeldStop:
    """SIGINT / SIGTERM in a run that writes checkpoints (local runtime; the process runtime holds
    them in its own handler): the first is held (`signum`), so the run stops at its next turn,
    writes its last checkpoint, then raises it (`raise_held`: KeyboardInterrupt, or SystemExit
    128 + signum); a second one raises at once. Only in the main thread, and only where the
    caller kept Python's default handlers."""

    def __init__(self, checkpoint_dir):
        self.checkpoint_dir = checkpoint_dir
        self.signum = None
        self.armed = False          # held only while the run's loop goes on (`arm`; `raise_held` ends it)
        self._raised = False
        self._old = {}

    def arm(self) -> None:
        self.armed = bool(self._old)

    def __enter__(self):
        if self.checkpoint_dir is None or threading.current_thread() is not threading.main_thread():
            return self
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        self.armed = False
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        if self.signum is not None and not self._raised and exc[0] is None:
            raise_for_signal(self.signum)  # held and not raised yet (the run left its loop some other way)

    def _handler(self, signum, frame):
        if self.armed and self.signum is None:
            self.signum = signum
            held_stop_note(signum, self.checkpoint_dir)
            return
        raise_for_signal(signum)

    def came(self, wait: float = 0.5) -> bool:
        """Whether a signal is held, waiting up to `wait` seconds for one (armed only): a SIGTERM
        to the whole process group ends the env workers too, maybe before this process's handler
        ran; their deaths are then the run's stop, not a failure."""
        return self.armed and wait_until(lambda: self.signum is not None, wait)

    def raise_held(self) -> None:
        self.armed = False          # from here on a signal is raised at once
        if self.signum is not None:
            self._raised = True
            raise_for_signal(self.signum)


def reserved(name: str) -> bool:
    return name in RESERVED or name.startswith(("param_lag_", "queue_depth_"))


_SKIPPED_METRICS: set = set()      # names already warned about (once per process)


def scalar_metrics(metrics: dict) -> dict:
    """The learner's metrics that are real scalars, as floats (for the figures); the rest is left
    out, with a warning the first time a name is."""
    out = {}
    for k, v in metrics.items():
        try:
            if isinstance(v, (numbers.Number, np.bool_)) and not isinstance(v, (complex, np.complexfloating)):
                out[k] = float(v)            # Python and numpy numbers, Fraction, Decimal (a timedelta: skipped)
                continue
            if callable(getattr(v, "item", None)) and not isinstance(v, (np.ndarray, np.generic)):
                v = v.item()            # a one-element tensor (one that requires grad too)
            a = np.asarray(v)
            if a.size == 1 and a.dtype.kind in "biuf":
                out[k] = float(a.reshape(()))
                continue
        except (TypeError, ValueError, RuntimeError, OverflowError):     # 10 ** 400 has no float
            pass
        if k not in _SKIPPED_METRICS:
            _SKIPPED_METRICS.add(k)
            shape = f" of shape {tuple(v.shape)}" if hasattr(v, "shape") else ""
            warnings.warn(f"rlflow: learner metric {k!r} ({type(v).__name__}{shape}) is not a real scalar that "
                          f"a float holds: it is left out of the figures, CSV and TensorBoard", RuntimeWarning,
                          stacklevel=2)
    return out


def make_logger(log_dir: Optional[str], progress: bool, progress_every: float, resumed=None) -> Logger:
    """The run's logger; a resumed run keeps the figures rows written up to its checkpoint."""
    upto = None if resumed is None else float(resumed.counters["env_steps"])
    return Logger(directory=log_dir, progress_every=progress_every if progress else None,
                  keep_rows_upto=upto)
