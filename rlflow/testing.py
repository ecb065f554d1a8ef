"""Fakes for tests: a scripted vector env that speaks `rf.Step`, and a policy with extras.

    env = FakeVectorEnv(4, seed=0, multi_agent=True, pool=True)
    policy = FakePolicy(env.spec, seed=0)
    step = env.reset()
    for _ in range(100):
        actions, extras = policy.act_step(step)
        step = env.step(actions)

`FakeVectorEnv` draws, from its seed, a schedule of terminations, truncations and (multi-agent)
agents that wait for their turn, die early and come back; in pool mode each step returns a random,
shuffled, non-empty subset of the rows whose actions are in flight. It follows every rule of the
`rf.Step` docstring, so adders, actors and runtimes can be tested on it without gymnasium.

Observations identify where they come from: float32 [4] = (row, episode, t, is_final), where
`episode` counts the row's episodes and `t` the steps taken in it; `final_obs` of an ended episode
has is_final = 1. With `dict_obs=True` the observation is {"pos": that vector, "t": int64 t}.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from gymnasium import spaces

from rlflow.core import Policy, Step
from rlflow.errors import SpecError, UsageError, mismatch
from rlflow.specs import EnvSpec

_ALIVE, _WAITING, _DEAD = 0, 1, 2


class FakeVectorEnv:
    """A scripted vector env of `num_envs` rows (agents x envs), random but seeded.

    Per returned row whose agent acted (single-agent: every row, every step):
      terminated with p_terminate, else truncated with p_truncate; reward ~ N(0, 1) (float32).
    Multi-agent only (`multi_agent=True`):
      an agent that acted is reported "waiting" (alive=False, not done, reward 0: its outcome comes
      later) with p_wait; a done agent stays dead (alive=False) with p_die, else its row starts a
      new episode at once; a dead row comes back alive (new episode, no flags, reward 0) with
      p_revive; after reset each row is alive with p_alive_at_reset (at least one row is).
    Pool mode (`pool=True`): the rows of the last step get actions; a step returns a random non-empty
      subset of all rows in flight, in random order.
    """

    def __init__(self, num_envs: int, *, seed: int = 0, p_terminate: float = 0.1, p_truncate: float = 0.05,
                 multi_agent: bool = False, p_wait: float = 0.2, p_die: float = 0.3, p_revive: float = 0.3,
                 p_alive_at_reset: float = 0.7, pool: bool = False, dict_obs: bool = False, n_actions: int = 3):
        if num_envs < 1:
            raise UsageError(mismatch("FakeVectorEnv", "num_envs", ">= 1", num_envs))
        self.num_envs = int(num_envs)
        self.p_terminate, self.p_truncate = float(p_terminate), float(p_truncate)
        self.multi_agent = bool(multi_agent)
        self.p_wait, self.p_die, self.p_revive = float(p_wait), float(p_die), float(p_revive)
        self.p_alive_at_reset = float(p_alive_at_reset)
        self.pool = bool(pool)
        self.dict_obs = bool(dict_obs)
        self.n_actions = int(n_actions)
        self.rng = np.random.default_rng(seed)
        vec = spaces.Box(-np.inf, np.inf, (4,), np.float32)
        self.single_observation_space = (spaces.Dict({"pos": vec, "t": spaces.Box(0, 2**31, (), np.int64)})
                                         if self.dict_obs else vec)
        self.single_action_space = spaces.Discrete(self.n_actions)
        self.spec = EnvSpec.from_spaces(self.single_observation_space, self.single_action_space, self.num_envs)
        self._last: Optional[Step] = None
        # every full step hands out this one read-only array, as rlflow's vector envs do (the
        # adders' short path for full steps keys on it)
        self._all_ids = np.arange(self.num_envs, dtype=np.int64)
        self._all_ids.flags.writeable = False

    # ---------------------------------------------------------------- helpers
    def _obs(self, rows: np.ndarray, final: bool):
        v = np.stack([rows, self._episode[rows], self._t[rows], np.full(len(rows), float(final))], axis=1)
        v = v.astype(np.float32)
        if self.dict_obs:
            return {"pos": v, "t": self._t[rows].astype(np.int64)}
        return v

    @staticmethod
    def _select(obs, mask):
        if isinstance(obs, dict):
            return {k: v[mask] for k, v in obs.items()}
        return obs[mask]

    def _where(self, cond, a, b):
        if isinstance(a, dict):
            return {k: np.where(cond.reshape((-1,) + (1,) * (a[k].ndim - 1)), a[k], b[k]) for k in a}
        return np.where(cond[:, None], a, b)

    # ---------------------------------------------------------------- API
    def reset(self, seed: Optional[int] = None) -> Step:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        n = self.num_envs
        self._episode = np.zeros(n, np.int64)
        self._t = np.zeros(n, np.int64)
        self._status = np.full(n, _ALIVE)
        if self.multi_agent:
            alive = self.rng.random(n) < self.p_alive_at_reset
            if not alive.any():
                alive[self.rng.integers(n)] = True
            self._status[~alive] = _DEAD
        self._in_flight = np.zeros(n, bool)
        rows = self._all_ids
        obs = self._obs(rows, False)
        self._last = Step(obs=obs, reward=np.zeros(n, np.float32), terminated=np.zeros(n, bool),
                          truncated=np.zeros(n, bool), final_obs=obs, env_ids=rows,
                          alive=(self._status == _ALIVE) if self.multi_agent else None)
        return self._last

    def step(self, actions) -> Step:
        if self._last is None:
            raise UsageError(mismatch("FakeVectorEnv", "step", "reset() first", "step before reset"))
        actions = np.asarray(actions)
        if actions.shape != (len(self._last),):
            raise SpecError(mismatch("action", "action", f"shape ({len(self._last)},)", f"shape {actions.shape}"))
        rng = self.rng
        self._in_flight[self._last.env_ids] = True
        if self.pool:
            cand = np.flatnonzero(self._in_flight)
            k = int(rng.integers(1, len(cand) + 1))
            rows = rng.permutation(cand)[:k].astype(np.int64)
        else:
            rows = self._all_ids
        self._in_flight[rows] = False
        B = len(rows)
        status = self._status[rows]
        acted = status != _DEAD              # alive agents acted; waiting ones are still acting
        resolve = acted.copy()
        if self.multi_agent:
            resolve &= rng.random(B) >= self.p_wait
        u = rng.random(B)
        terminated = resolve & (u < self.p_terminate)
        truncated = resolve & ~terminated & (u < self.p_terminate + self.p_truncate)
        done = terminated | truncated
        reward = np.where(resolve, rng.normal(size=B), 0.0).astype(np.float32)
        self._t[rows[resolve]] += 1
        final_obs_all = self._obs(rows, True)
        new_status = status.copy()
        new_status[resolve] = _ALIVE
        new_status[acted & ~resolve] = _WAITING
        if self.multi_agent:
            die = done & (rng.random(B) < self.p_die)
            new_status[die] = _DEAD
            revive = (status == _DEAD) & (rng.random(B) < self.p_revive)
            new_status[revive] = _ALIVE
        else:
            revive = np.zeros(B, bool)
        restart = (done & (new_status == _ALIVE)) | revive
        dead_done = done & (new_status == _DEAD)
        self._episode[rows[restart]] += 1          # a row that dies starts its next episode on revival
        self._t[rows[restart | dead_done]] = 0
        self._status[rows] = new_status
        obs = self._obs(rows, False)
        final_obs = self._where(done, final_obs_all, obs)
        alive = new_status == _ALIVE
        self._last = Step(obs=obs, reward=reward, terminated=terminated, truncated=truncated,
                          final_obs=final_obs, env_ids=rows, alive=alive if self.multi_agent else None)
        return self._last


class FakePolicy(Policy):
    """Random actions, and the extras an on-policy learner or a recurrent policy would give:

        value        float32 V(obs) = obs . w   (a fixed linear function of the observation)
        final_value  float32 V(final_obs)       (equals value where the episode did not end)
        log_prob     float32, random
        state        float32 [2], random        (stands for a recurrent state)
    """

    def __init__(self, env_spec: EnvSpec, seed: int = 0, extras: bool = True):
        self.n_actions = int(env_spec.action_space.n)
        self.rng = np.random.default_rng(seed)
        self.with_extras = extras
        self._w = np.array([0.1, 0.01, 0.05, 0.5], np.float32)

    def _value(self, obs):
        o = obs["pos"] if isinstance(obs, dict) else obs
        return (o @ self._w).astype(np.float32)

    def act(self, obs):
        n = len(obs["pos"] if isinstance(obs, dict) else obs)
        return self.rng.integers(0, self.n_actions, size=n)

    def act_step(self, step: Step):
        actions = self.act(step.obs)
        if not self.with_extras:
            return actions
        n = len(step)
        extras = {"value": self._value(step.obs), "final_value": self._value(step.final_obs),
                  "log_prob": self.rng.normal(size=n).astype(np.float32),
                  "state": self.rng.normal(size=(n, 2)).astype(np.float32)}
        return actions, extras
