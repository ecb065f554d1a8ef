"""Experiment: the factories of one run, and `run`, which runs it on a backend.

    result = rf.run(rf.Experiment(env="CartPole-v1", policy=make_policy, learner=make_learner,
                                  adder=rf.adders.Transition(discount=0.99), table=make_table,
                                  batch_size=64, warmup_steps=1_000),
                    backend="local", max_env_steps=50_000)
    result.learner, result.figures, result.evals

The same Experiment runs unchanged on every backend: "local" (one process, deterministic for a seed
unless env_backend="pool", whose steps return whichever envs finished first),
"process" (actors in processes, shared memory). Components are given either as objects or as
factories; factories are what crosses into other processes:

    policy   Policy | (env_spec) -> Policy       env_spec: rf.EnvSpec of the actor's vector env
    learner  Learner | (env_spec) -> Learner
    adder    Adder  (each actor gets its own copy)
    table    Table  | (item_specs) -> Table       item_specs: the adder's output specs

How much learning per acting is the table's rate limiter's samples per insert; no runtime invents
its own ratio. A limiter with no ratio (MinSize) lets the learner run freely: the local runtime then
makes one learner step per actor step, concurrent runtimes let both run at full speed.
"""

from __future__ import annotations

import copy
import math
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from rlflow import specs as specs_lib
from rlflow.core import Adder, Learner, Policy
from rlflow.errors import UsageError, is_int, is_real, mismatch


@dataclass
class Experiment:
    """Everything one run needs. Flat on purpose: each field is one decision."""

    env: Any
    """A Gymnasium env id, a zero-argument callable returning a Gymnasium (or PettingZoo) env."""
    policy: Any
    """A Policy, or a factory `(env_spec) -> Policy`. Process backends call the factory per actor."""
    learner: Any
    """A Learner, or a factory `(env_spec) -> Learner`."""
    adder: Adder
    """The adder that turns steps into items (Transition, NStepTransition, Sequence, ...)."""
    table: Any
    """A Table, or a factory `(item_specs) -> Table` (the adder's output specs)."""
    batch_size: int = 256
    """Items per learner step."""
    num_envs: int = 1
    """Envs per actor's vector env."""
    env_backend: str = "serial"
    """How each actor steps its envs: "serial", "process" or "pool" (see rf.envs.make)."""
    env_workers: Optional[int] = None
    """Worker processes for env_backend="process" or "pool"."""
    env_batch_size: Optional[int] = None
    """env_backend="pool": the envs each step returns (those that finish first), < num_envs."""
    warmup_steps: int = 0
    """Env steps (per actor) taken with uniform random actions before the policy's own."""
    seed: int = 0
    """Seeds the envs, the warm-up actions, and numpy / random / torch (if imported)."""
    param_sync_steps: int = 1
    """The policy delayer: actors take new learner parameters at most every this many learner steps."""
    param_sync_seconds: Optional[float] = None
    """... or when this many seconds have passed since their last pull (whichever comes first)."""
    eval_policy: Any = None
    """Policy or factory for evaluation (e.g. greedy); None: the acting policy."""
    eval_every: int = 0
    """Evaluate every this many env steps (0: never)."""
    eval_episodes: int = 20
    """Episodes per evaluation (one per env of an eval vector env; multi-agent: games, every agent
    of each counted, see rf.evaluate)."""
    target_return: Optional[float] = None
    """Stop the run once an evaluation's mean return reaches this."""

    def __post_init__(self):
        for name in ("batch_size", "num_envs", "param_sync_steps", "eval_episodes"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise UsageError(mismatch("Experiment", name, "an int >= 1", repr(v)))
        for name in ("warmup_steps", "eval_every"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise UsageError(mismatch("Experiment", name, "an int >= 0", repr(v)))
        if not isinstance(self.adder, Adder):
            got = (f"the class {self.adder.__name__} itself (make one: {self.adder.__name__}(...))"
                   if isinstance(self.adder, type) and issubclass(self.adder, Adder) else type(self.adder).__name__)
            raise UsageError(mismatch("Experiment", "adder", "an rf.Adder (e.g. rf.adders.Transition(discount=0.99))",
                                      got))
        if not is_int(self.seed) \
                or not 0 <= self.seed <= 2**62:
            # envs are seeded seed + i (+ offsets per actor and resume): non-negative, within int64
            raise UsageError(mismatch("Experiment", "seed", "an int in [0, 2**62]", repr(self.seed)))
        if self.param_sync_seconds is not None and (not is_real(self.param_sync_seconds)
                                                    or not self.param_sync_seconds >= 0):
            raise UsageError(mismatch("Experiment", "param_sync_seconds", "None or a number of seconds >= 0",
                                      repr(self.param_sync_seconds)))
        if self.env_backend not in ("serial", "process", "pool"):
            raise UsageError(mismatch("Experiment", "env_backend", "'serial', 'process' or 'pool'",
                                      repr(self.env_backend)))
        if self.env_workers is not None:
            v = self.env_workers
            if not is_int(v) or v < 1:
                raise UsageError(mismatch("Experiment", "env_workers", "None (default) or an int >= 1", repr(v)))
            if self.env_backend == "serial":
                raise UsageError(mismatch("Experiment", "env_workers", "None with env_backend='serial' "
                                          "(worker processes are env_backend='process' or 'pool')", repr(v)))
        v = self.env_batch_size
        if self.env_backend == "pool":
            if not is_int(v) or not 1 <= v < self.num_envs:
                raise UsageError(mismatch("Experiment", "env_batch_size", f"an int in [1, num_envs - 1 = "
                                          f"{self.num_envs - 1}] with env_backend='pool'", repr(v)))
        elif v is not None:
            raise UsageError(mismatch("Experiment", "env_batch_size", "None unless env_backend='pool' (the "
                                      "other backends step every env)", repr(v)))
        if self.target_return is not None and not (is_real(self.target_return) and not math.isnan(self.target_return)):
            raise UsageError(mismatch("Experiment", "target_return", "None or a number (a mean return)",
                                      repr(self.target_return)))
        for name, cls in (("policy", Policy), ("learner", Learner), ("eval_policy", Policy)):
            v = getattr(self, name)
            if v is None and name == "eval_policy":
                continue
            if not isinstance(v, cls) and not callable(v):
                raise UsageError(mismatch("Experiment", name, f"an rf.{cls.__name__} or a factory "
                                          f"(env_spec) -> rf.{cls.__name__}", type(v).__name__))
        if self.target_return is not None and self.eval_every == 0:
            raise UsageError(mismatch("Experiment", "eval_every", "> 0 when target_return is set", 0))


@dataclass
class RunResult:
    """What `rf.run` returns."""

    learner: Learner
    table: Any
    figures: dict
    """The final figures: env_steps, learner_steps, episodes, wall_time, episode_return, ...
    wall_time counts from the moment the run starts acting: everything is built (env, policy,
    learner, table) and, with backend="process", the first actor process is up. The time before
    (building; starting actor processes, which import the user's modules anew) is
    startup_seconds."""
    history: list = field(default_factory=list)
    """The figures rows written during the run."""
    evals: list = field(default_factory=list)
    """(env_steps, wall_time, mean_return) of every evaluation."""
    solved_at: Optional[int] = None
    """Env steps at the first evaluation that reached `target_return`."""
    solved_time: Optional[float] = None
    """Training wall time (evaluation time excluded) at that evaluation."""


# --------------------------------------------------------------------------------------------------
# Building blocks shared by the runtimes
# --------------------------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    """Seed Python's `random`, numpy's global RNG and torch's (only if torch is already imported)."""
    seed = int(seed)                 # a numpy integer too (random.seed refuses those)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def build(component, cls, *args):
    """An instance of `cls` as given, or the result of calling the factory with `args`."""
    if isinstance(component, cls):
        return component
    if callable(component):
        made = component(*args)
        if not isinstance(made, cls):
            raise UsageError(mismatch("factory result", getattr(component, "__name__", "factory"),
                                      f"an instance of rf.{cls.__name__}", type(made).__name__))
        return made
    raise UsageError(mismatch("component", cls.__name__, f"an rf.{cls.__name__} or a factory",
                              type(component).__name__))


def make_venv(experiment: Experiment, num_envs: Optional[int] = None, backend: Optional[str] = None,
              spin: Optional[float] = None, pin: Optional[bool] = None, own_copy: bool = False):
    """The experiment's vector env. `spin`, `pin`: as rf.envs.make's, for a process env backend.
    `own_copy`: an env given as an instance is copied, not used as env 0 (the evaluation's vector
    env, beside the acting one that does use it: evaluations stepped training env 0)."""
    from rlflow import envs
    from rlflow.envs.make import CopyOf, _is_env

    env = CopyOf(experiment.env) if own_copy and _is_env(experiment.env) else experiment.env

    kwargs = {}
    backend = backend or experiment.env_backend
    if backend != "serial":          # process-backend options; the serial backend refuses them
        if experiment.env_workers:
            kwargs["workers"] = experiment.env_workers
        if spin is not None:
            kwargs["spin"] = spin
        if pin is not None:
            kwargs["pin"] = pin
        if backend == "pool":
            kwargs["batch_size"] = int(experiment.env_batch_size)
    try:
        return envs.make(env, num_envs=num_envs or experiment.num_envs, backend=backend, **kwargs)
    except UsageError as e:
        # rf.envs.make names its own arguments: say which Experiment fields they came from
        msg = str(e)
        fields = [f for arg, f in (("'batch_size'", "env_batch_size"), ("'workers'", "env_workers"))
                  if arg in msg and arg[1:-1] in kwargs]
        if not fields:
            raise
        raise UsageError(f"Experiment {' / '.join(fields)} (env_backend={backend!r}, num_envs="
                         f"{num_envs or experiment.num_envs}, env_workers={experiment.env_workers}, "
                         f"env_batch_size={experiment.env_batch_size}): {msg}") from None


def extras_specs_of(policy: Policy, env_spec, first_step) -> dict:
    """The policy's extras specs: `policy.extras_specs(env_spec)` if it has one, else one probe call."""
    if hasattr(policy, "extras_specs"):
        return dict(policy.extras_specs(env_spec))
    from rlflow.actor import split_policy_output

    # The probe call goes to a copy, with the global random streams put back after it: the acting
    # policy keeps its state (a recurrent policy's first state, its step count, its own generator)
    # and a run draws the same numbers whether or not its table needed the probe.
    try:
        probe = copy.deepcopy(policy)
    except Exception as e:            # an uncopyable policy is probed itself: say so
        import warnings

        warnings.warn(f"rlflow: the policy ({type(policy).__name__}) cannot be copied ({type(e).__name__}: "
                      f"{e}), so the call that reads its extras' specs goes to the acting policy itself, "
                      f"before the run: a policy with state (a recurrent one) then starts from the state "
                      f"after that call. Give the policy an extras_specs(env_spec) method to skip the "
                      f"call.", RuntimeWarning, stacklevel=2)
        probe = policy
    from rlflow.runtime.checkpoint import capture_rng, restore_rng

    states = capture_rng()
    try:
        _, extras = split_policy_output(probe.act_step(first_step))
    except Exception as e:          # the user's error, with why the call came before any parameters
        e.add_note(f"(rlflow called {type(policy).__name__}.act once on the first reset's observations, "
                   f"on a copy of the policy and before any parameters were set, to learn the shapes of "
                   f"its extras; a policy with an extras_specs(env_spec) method is not called so)")
        raise
    finally:
        restore_rng(states)
    return specs_lib.from_extras(extras)


def build_table(experiment: Experiment, env_spec, extras_specs):
    """The experiment's table: the Table given, or its factory called with the adder's item specs.
    `extras_specs` may be a zero-argument callable, called only when a factory needs it."""
    from rlflow.replay import Table

    if isinstance(experiment.table, Table) and experiment.table.specs is not None:
        return experiment.table
    if callable(extras_specs):
        extras_specs = extras_specs()
    item_specs = experiment.adder.item_specs(env_spec, extras_specs)
    if isinstance(experiment.table, Table):       # made without specs: the adder's, up front
        experiment.table.declare_specs(item_specs)
        return experiment.table
    return build(experiment.table, Table, item_specs)


def fresh_adder(experiment: Experiment) -> Adder:
    """A copy of the experiment's adder, as built: an rlflow adder the user already fed (a 4-env
    vector env's steps, then a run of 2 envs) forgets those rows and specs ("expected 4 rows" from
    a run's first reset), as the Experiment's adder is a template, not a stream."""
    from rlflow.adders.base import RowAdder

    adder = copy.deepcopy(experiment.adder)
    if isinstance(adder, RowAdder) and adder.obs_specs is not None:
        adder._declared_obs = adder._declared_action = adder._declared_extras = None
        adder._clear()           # rows and specs are the run's (per-row state is made at its first add)
    return adder


# --------------------------------------------------------------------------------------------------
BACKENDS = ("local", "process")


PROCESS_OPTIONS = ("start_method", "prefetch", "receiver", "queue_slots", "slot_rows", "actor_threads",
                   "actor_timeout")


def run(experiment: Experiment, backend: str = "local", *, max_env_steps: Optional[int] = None,
        max_learner_steps: Optional[int] = None, max_seconds: Optional[float] = None,
        num_actors: int = 1, log_dir: Optional[str] = None, progress: bool = True,
        progress_every: float = 2.0, checkpoint_dir: Optional[str] = None,
        checkpoint_every: Optional[int] = None, resume: Optional[str] = None,
        max_restarts: int = 3, **backend_options) -> RunResult:
    """Run `experiment` on `backend` until a limit (env steps, learner steps, seconds) or its
    `target_return` is reached. At least one limit or a target must be given.

    num_actors        actor processes (backend="process"; "local" has exactly one actor)
    log_dir           write figures.csv (and TensorBoard files when tensorboardX is installed)
    progress          print a progress line every `progress_every` seconds (stderr)
    checkpoint_dir    write whole-run checkpoints here (learner state, table, counters, RNG states)
    checkpoint_every  ... every this many learner steps (and when the run ends: at a limit, its
                      target, or a Ctrl-C / SIGTERM, which is held until the checkpoint is written
                      and raised then; a second one stops at once; an error writes none)
    resume            a checkpoint directory to carry on from: counters and table continue exactly
    max_restarts      how many times a dead actor process is restarted before the run fails
    backend_options   backend="process" only: start_method ("spawn"), receiver ("inline" | "thread"),
                      prefetch (batches drawn ahead of the learner: 4 at once by default),
                      queue_slots, slot_rows,
                      actor_threads (math-library threads per actor process, default 1),
                      actor_timeout (seconds an actor may go without progress before it is killed
                      as hung and restarted, default 300)
    """
    if not isinstance(experiment, Experiment):
        raise UsageError(mismatch("run", "experiment", "an rf.Experiment", type(experiment).__name__))
    if backend not in BACKENDS:
        raise UsageError(mismatch("run", "backend", f"one of {BACKENDS}", repr(backend)))
    if max_env_steps is None and max_learner_steps is None and max_seconds is None \
            and experiment.target_return is None:
        raise UsageError("run: give at least one of max_env_steps, max_learner_steps, max_seconds "
                         "or the experiment's target_return, else the run never ends")
    for name, value in (("max_env_steps", max_env_steps), ("max_learner_steps", max_learner_steps)):
        if value is not None and (not is_int(value)
                                  or value < 1):
            raise UsageError(mismatch("run", name, "None or an int >= 1", repr(value)))
    if max_seconds is not None and (not is_real(max_seconds) or not max_seconds > 0):
        raise UsageError(mismatch("run", "max_seconds", "None or a number of seconds > 0", repr(max_seconds)))
    if not is_int(max_restarts) or max_restarts < 0:
        raise UsageError(mismatch("run", "max_restarts", "an int >= 0", repr(max_restarts)))
    if not is_real(progress_every) or not 0 < progress_every < math.inf:
        raise UsageError(mismatch("run", "progress_every", "a number of seconds > 0", repr(progress_every)))
    if not is_int(num_actors) or num_actors < 1:
        raise UsageError(mismatch("run", "num_actors", "an int >= 1", repr(num_actors)))
    allowed = PROCESS_OPTIONS if backend == "process" else ()
    unknown = sorted(set(backend_options) - set(allowed))
    if unknown:
        raise UsageError(mismatch("run", unknown[0], f"an option of backend={backend!r}: "
                                  f"{list(allowed) or 'none beyond the common ones'}", "an unknown option"))
    common = dict(max_env_steps=max_env_steps, max_learner_steps=max_learner_steps,
                  max_seconds=max_seconds, log_dir=log_dir, progress=progress,
                  progress_every=progress_every, checkpoint_dir=checkpoint_dir,
                  checkpoint_every=checkpoint_every, resume=resume, max_restarts=max_restarts)
    if backend == "local":
        if num_actors != 1:
            raise UsageError(mismatch("run", "num_actors", "1 with backend='local'", num_actors))
        from rlflow.runtime.local import run_local

        return run_local(experiment, **common)
    from rlflow.runtime.process import run_process

    return run_process(experiment, num_actors=num_actors, **common, **backend_options)
