"""The interfaces of rlflow, and the records that cross them.

Data flows env -> Actor(Policy) -> Adder -> Table(Selector, RateLimiter) -> Learner -> params -> Policy.
Every box below is an abstract class whose docstring shows the loop that drives it. Batches are plain
mappings of numpy arrays with a leading batch axis (field -> array), described by `rlflow.specs`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from rlflow.specs import ArraySpec, EnvSpec

Batch = Mapping[str, np.ndarray]


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
@dataclass
class Step:
    """What every vector env returns from `reset` and `step`: B rows, one per env (or agent x env).

    obs         observations the policy acts on next (array [B, ...] or a dict/tuple of them).
                Same-step autoreset: where an episode ended this step, `obs` already holds the
                first observation of that env's next episode.
    reward      float32 [B], the reward of the step that led here (0 after reset).
    terminated  bool [B], the episode reached a terminal state: do not bootstrap.
    truncated   bool [B], the episode was cut (time limit): bootstrap from `final_obs`.
    final_obs   like `obs`: the observation this step's transition ends in. Where an episode ended
                (terminated or truncated) it is the true last observation of that episode; in every
                other row it equals `obs`. So `next_obs = final_obs`, always, for every row.
    env_ids     int64 [B], which envs (rows of the full batch) these are: arange(num_envs) except in
                pool mode, where a step returns only the envs that finished first.
    alive       bool [B] or None (None: every row is live). Multi-agent: `alive[r]` says row r's
                agent acts next: its `obs` is live and its action in the next `step` call is
                applied. Rows not alive (dead agents, agents waiting for their turn) get actions
                that are ignored.
    action_mask optional int8 [B, n_actions], legal actions (PettingZoo classic games).
    info        optional extra per-step data (dict of arrays); adders ignore it.

    After `reset`, reward is 0 and both flags are False for every row.

    Which rows carry an outcome. A row's `reward`, flags and `final_obs` are meaningful where the row
    is alive or done; the reward is everything that row's agent received since it last acted (turn-
    based games accumulate it). Done rows are reported even when their agent does not act next (the
    other player at the end of a board game). Rows neither alive nor done carry nothing (reward 0).

    The adder rule that follows, per row r present in the step (see Adder):
      1. if r has an open transition (it acted earlier) and (alive[r] or done[r]): close it with
         (reward[r], terminated[r], truncated[r], final_obs[r]);
      2. if alive[r]: r's stream continues from obs[r] (a new episode if done[r]), and the action the
         policy picks for r is the next open transition's action; otherwise r's stream is idle.
    Single-agent envs have alive=None: every row is alive, done rows restart at once (autoreset).
    """

    obs: Any
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_obs: Any
    env_ids: np.ndarray
    alive: Optional[np.ndarray] = None
    action_mask: Optional[np.ndarray] = None
    info: dict = field(default_factory=dict)

    @property
    def done(self) -> np.ndarray:
        """terminated | truncated: rows whose episode ended this step."""
        return np.logical_or(self.terminated, self.truncated)

    def __len__(self) -> int:
        return len(self.env_ids)


class Sample:
    """A sampled batch: `keys` [n] int64, `probabilities` [n] float64, `data` field -> [n, ...].

    `sample["obs"]` is `sample.data["obs"]`. `probabilities` are the probabilities with which the
    sampler drew each item, so a learner can compute importance weights (see
    `rlflow.replay.importance_weights`). `info` may carry more (times sampled, table size).
    """

    __slots__ = ("keys", "probabilities", "data", "info")

    def __init__(self, keys: np.ndarray, probabilities: np.ndarray, data: Batch, info: dict | None = None):
        self.keys = keys
        self.probabilities = probabilities
        self.data = data
        self.info = info or {}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.data[name]

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self):
        fields = ", ".join(f"{k}: {v.shape} {v.dtype}" for k, v in self.data.items())
        return f"Sample(n={len(self.keys)}, {{{fields}}})"


# --------------------------------------------------------------------------------------------------
# User side
# --------------------------------------------------------------------------------------------------
class Policy(abc.ABC):
    """Maps a batch of observations to a batch of actions. Written by the user.

    The Actor drives it:

        step = venv.reset(seed=0)
        while running:
            out = policy.act(step.obs)                 # actions, or (actions, extras)
            actions, extras = out if isinstance(out, tuple) else (out, {})
            step = venv.step(actions)
            ...
            if new_params_available:
                policy.set_params(params)              # whatever the Learner's get_params returned

    `extras` is a dict of arrays with the batch axis (log-probs, values, recurrent state, ...); the
    adders store them beside the transition. A policy that wants the whole step record (env_ids to
    index per-env recurrent state, action masks, done flags) defines `act_step(step)` instead.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a policy that defines act_step alone (as the docstring allows) needs no act of its own
        if "act_step" in cls.__dict__ and getattr(cls.act, "__isabstractmethod__", False):
            def act(self, obs):
                raise NotImplementedError(f"{type(self).__name__} acts on whole steps: call act_step(step)")
            cls.act = act

    @abc.abstractmethod
    def act(self, obs):
        """Actions for a batch of observations; optionally `(actions, extras)`."""

    def act_step(self, step: Step):
        """Like `act`, with the whole step record. Default: `self.act(step.obs)`."""
        return self.act(step.obs)

    def set_params(self, params) -> None:
        """Take new parameters from the learner (a list or dict of numpy arrays). Default: ignore."""


class Learner(abc.ABC):
    """Consumes sampled batches and improves the parameters. Written by the user.

    The runtime drives it:

        while running:
            sample = table.sample(batch_size)          # rf.Sample: keys, probabilities, data
            metrics = learner.step(sample)             # dict of floats, may hold "priorities"
            if "priorities" in metrics:
                table.update_priorities(sample.keys, metrics.pop("priorities"))
            params_publisher.publish(learner.get_params())   # every K steps: the policy delayer

    `state_dict` / `load_state_dict` make checkpoints: return anything picklable (numpy arrays, torch
    state dicts, ...), and restore it exactly.
    """

    @abc.abstractmethod
    def step(self, batch: Sample) -> Mapping[str, Any]:
        """One learning step on a batch; returns metrics (optionally "priorities": array [n])."""

    def get_params(self):
        """Parameters for the actors' policies: a list or dict of numpy arrays. Default: None.

        The first call fixes their layout for the run, on every backend: later calls return the
        same nesting, shapes and dtypes (or dtypes that cast to those exactly); anything else is a
        SpecError naming the array. So build the weights in `__init__`, not lazily."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# rlflow side (users may add their own)
# --------------------------------------------------------------------------------------------------
class Adder(abc.ABC):
    """Turns the stream of steps of a vector env into trainable items. A pure transform.

        spec = venv.spec                                # rf.specs.EnvSpec
        table = rf.Table(..., specs=adder.item_specs(spec, extras_specs))   # before any data
        step = venv.reset(seed=0)
        adder.add_first(step)
        while running:
            actions, extras = policy.act(step.obs)
            step = venv.step(actions)
            items = adder.add(actions, step, extras)   # field -> array [k, ...], k >= 0
            if items: table.insert(items)

    `actions` and `extras` belong to the rows of the PREVIOUS step (the observations the policy acted
    on), which in pool mode are not the rows of the new step: an adder keeps per-env state indexed by
    `env_ids`. Rows with `alive == False` are skipped and do not break that row's stream. Where a row's
    episode ended (`step.done`), the adder closes that episode (emitting what it still holds) and the
    row's `obs` starts the next one.
    """

    @abc.abstractmethod
    def item_specs(self, env_spec: EnvSpec, extras_specs: Mapping[str, ArraySpec] | None = None
                   ) -> dict[str, ArraySpec]:
        """The specs of the items this adder emits (flat field names), known before any data."""

    @abc.abstractmethod
    def add_first(self, step: Step) -> None:
        """Start (or restart) every row's stream from a `reset` step."""

    @abc.abstractmethod
    def add(self, actions, step: Step, extras: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Feed one vector step; return the items that are ready (possibly with zero rows)."""

    def reset(self) -> None:
        """Forget all partial streams (the next call must be `add_first`)."""


class Selector(abc.ABC):
    """Chooses items of a table by slot id: used as a sampler (what to read) or a remover (what to
    evict when the table is full). Batched throughout. The table drives it:

        selector.add(ids, priorities)                   # new items in slots `ids`
        ids, probabilities = sampler.sample(n)          # n ids and the probability of each draw
        victims, _ = remover.sample(k)                  # which k items to evict
        selector.remove(victims)
        selector.update_priorities(ids, new_priorities)

    Selectors that ignore priorities (Uniform, Fifo, Lifo) check them as every selector does (present
    ids; finite priorities >= 0) and do nothing with them.
    `state_dict` / `load_state_dict` let a checkpoint restore the exact order and priorities.
    """

    @abc.abstractmethod
    def add(self, ids: np.ndarray, priorities: np.ndarray) -> None: ...

    @abc.abstractmethod
    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]: ...

    @abc.abstractmethod
    def remove(self, ids: np.ndarray) -> None: ...

    def update_priorities(self, ids: np.ndarray, priorities: np.ndarray) -> None:
        """Default: priorities do not matter to this selector (rlflow's own selectors still check
        that the ids are present and the priorities finite and >= 0)."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def state_dict(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} cannot be checkpointed")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be checkpointed")


class RateLimiter(abc.ABC):
    """Decides whether an insert or a sample may go ahead now; the table blocks (on a condition
    variable, never spinning) until it may, or the call's timeout passes. The table drives it:

        with lock:
            while not limiter.can_insert(n): wait(cond, deadline)     # -> rf.errors.Timeout
            ... store n items ...;  limiter.on_insert(n);  cond.notify_all()
        with lock:
            while not limiter.can_sample(n): wait(cond, deadline)
            ... draw n items ...;   limiter.on_sample(n);  cond.notify_all()
        limiter.on_delete(k)                                            # items evicted or deleted

    `samples_per_insert` is the ratio the limiter holds learning to (None: no ratio); the same knob
    sets how much learning per acting in every runtime.

    Optional hooks, which rlflow's limiters have: `insert_feasible(n) -> bool` and
    `sample_feasible(n) -> bool`, False where an insert / a sample of n could never go ahead
    whatever else happens. The table then raises at once instead of waiting, and the runs refuse
    such a configuration up front; without them, a limiter that never admits a sample waits (a
    run whose only limit is `max_learner_steps` then never ends), and `why_not_insert(n)` /
    `why_not_sample(n) -> str` word the Timeout's reason.
    """

    samples_per_insert: Optional[float] = None

    @abc.abstractmethod
    def can_insert(self, n: int = 1) -> bool: ...

    @abc.abstractmethod
    def can_sample(self, n: int = 1) -> bool: ...

    @abc.abstractmethod
    def on_insert(self, n: int) -> None: ...

    @abc.abstractmethod
    def on_sample(self, n: int) -> None: ...

    @abc.abstractmethod
    def on_delete(self, n: int) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
