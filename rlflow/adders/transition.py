"""Transition and NStepTransition: one item per (s_t, a_t) with an n-step return."""

from __future__ import annotations

import numpy as np

from rlflow.adders.base import RowAdder
from rlflow.errors import UsageError, mismatch
from rlflow.specs import ArraySpec


class NStepTransition(RowAdder):
    """n-step transitions: one item per action taken, with the discounted return of the next m <= n
    steps and the observation to bootstrap from.

    Items (field -> one row per transition):
        obs       the observation the action was taken in ("obs/<key>" for nested observations)
        action    the action ("action/<key>" for nested actions)
        reward    float32  R = sum_{k<m} gamma^k r_{t+k}
        discount  float32  gamma^m if the episode goes on or was truncated inside the window,
                           0 if it terminated inside the window
        next_obs  the observation m steps on, or the true final observation where the episode ended
        <extras>  the policy's extras of the step the action was taken in ("log_prob", "state/h"...)

    so that the learner's target is `reward + discount * V(next_obs)`. m = n, except for the last
    n-1 transitions of an episode, whose windows stop at the episode's end (m < n):

        episode      s0 --r0--> s1 --r1--> s2 --r2--> s3 (terminated)        n = 2
        items        (s0, r0 + g r1,  g^2, s2)
                     (s1, r1 + g r2,  0,   s3)
                     (s2, r2,         0,   s3)       <- shorter window at the episode's end
        truncated    same rewards; discounts g^2, g^2, g (bootstrap from the true final s3)

    Each row (env, or agent x env) is its own stream: rows that are not alive are skipped and their
    window resumes when they next act; in pool mode the rows of a step are indexed by `env_ids`.

    State: ring buffers [num_rows, n, ...] with a per-row head; every event is vectorized over rows.
    A transition's accumulated return `ret` and age `m` live in its ring slot; each close adds
    gamma^m * r to every open slot of the row, and emits the slots that reached m = n, or all of
    them when the episode ended.
    """

    def __init__(self, n: int, discount: float):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise UsageError(mismatch("NStepTransition", "n", "an int >= 1", repr(n)))
        discount = float(discount)
        if not 0.0 <= discount <= 1.0:
            raise UsageError(mismatch("NStepTransition", "discount", "a float in [0, 1]", discount))
        self.n = int(n)
        self.discount = discount
        super().__init__()

    def __repr__(self):
        return f"{type(self).__name__}(n={self.n}, discount={self.discount})"

    def _item_fields(self) -> dict[str, ArraySpec]:
        f = dict(self.obs_specs)
        f.update(self.action_specs)
        f["reward"] = ArraySpec((), np.float32)
        f["discount"] = ArraySpec((), np.float32)
        f.update({"next_" + k: s for k, s in self.obs_specs.items()})
        f.update(self.extras_specs)
        return f

    def _allocate(self) -> None:
        R, n = self.num_rows, self.n
        self._obs = {k: s.zeros((R, n)) for k, s in self.obs_specs.items()}
        self._act = {k: s.zeros((R, n)) for k, s in self.action_specs.items()}
        self._ext = {k: s.zeros((R, n)) for k, s in self.extras_specs.items()}
        self._ret = np.zeros((R, n), np.float64)
        self._age = np.full((R, n), -1, np.int64)       # -1: free slot; else steps summed so far
        self._head = np.zeros(R, np.int64)              # slot of the row's latest observation
        g = self.discount
        self._gpow_acc = np.append(g ** np.arange(n, dtype=np.float64), 0.0)  # [-1] -> 0 for free slots
        self._gpow = (g ** np.arange(n + 1, dtype=np.float64)).astype(np.float32)
        self._ones_n = np.ones(n, bool)

    def _start(self, rows, obs, new_episode) -> None:
        h = self._head[rows]
        h += 1
        if self.n > 1:
            h %= self.n
        else:
            h[:] = 0
        self._head[rows] = h
        for k, a in obs.items():
            self._obs[k][rows, h] = a

    def _open(self, rows, action, extras) -> None:
        h = self._head[rows]
        for k, a in action.items():
            self._act[k][rows, h] = a
        for k, a in extras.items():
            self._ext[k][rows, h] = a
        self._age[rows, h] = 0
        self._ret[rows, h] = 0.0

    def _close(self, rows, reward, terminated, truncated, done, final_obs):
        n = self.n
        age = self._age[rows]                                   # [k, n]
        self._ret[rows] += self._gpow_acc[age] * np.asarray(reward, np.float64)[:, None]
        age += age >= 0
        full = age == n
        if done.any():
            full |= done[:, None] & (age > 0)
        ci, slot = np.nonzero(full)
        if not len(ci):
            self._age[rows] = age
            return None
        r = rows[ci]
        m = age[ci, slot]
        age[ci, slot] = -1
        self._age[rows] = age
        out = {k: b[r, slot] for k, b in self._obs.items()}
        out.update({k: b[r, slot] for k, b in self._act.items()})
        out["reward"] = self._ret[r, slot].astype(np.float32)
        disc = self._gpow[m]
        if terminated.any():
            disc[terminated[ci]] = 0.0
        out["discount"] = disc
        for k, a in final_obs.items():
            out["next_" + k] = a[ci]
        out.update({k: b[r, slot] for k, b in self._ext.items()})
        return out


class Transition(NStepTransition):
    """One-step transitions: `NStepTransition(n=1, discount)`.

    Items: obs, action, reward (r_t), discount (gamma, or 0 where the episode terminated at this
    step; gamma where it was truncated), next_obs (the true final observation where the episode
    ended), plus the extras of the step the action was taken in. Target: reward + discount * V(next_obs).

        s_t --a_t, r_t--> s_{t+1}      item (s_t, a_t, r_t, gamma * (1 - terminated_t), s_{t+1})
    """

    def __init__(self, discount: float):
        super().__init__(1, discount)

    def __repr__(self):
        return f"Transition(discount={self.discount})"
