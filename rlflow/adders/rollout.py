"""Rollout: on-policy fragments with GAE advantages and returns (PPO, A2C)."""

from __future__ import annotations

import numpy as np

from rlflow.adders.base import TrajectoryAdder, unit_float
from rlflow.errors import UsageError, is_int, mismatch
from rlflow.specs import ArraySpec


class Rollout(TrajectoryAdder):
    """Fragments of `length` consecutive steps of one row, with GAE advantages and returns.

    One item per row-fragment, each field with a leading time axis [length, ...]:
        obs, action, reward (float32), terminated, truncated (bool),
        advantage  float32 A_t (GAE)
        return     float32 A_t + V(s_t), the value target
        <extras>   the policy's extras of each step: "value" (= V(s_t)), "log_prob", ... ;
                   "final_value" is consumed here and not stored

    The policy gives, as extras of the step it acts on, extras["value"] = V(obs) and
    extras["final_value"] = V(final_obs) (equal to value where the episode did not end). Then,
    with V'_t = V(the observation step t led to) = the final_value the policy gives for that row at
    its next call (the true final observation where the episode ended, else s_{t+1}):

        delta_t = r_t + gamma * V'_t * (1 - terminated_t) - V(s_t)
        A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1},   A_{length} = 0
        return_t = A_t + V(s_t)

    So the fragment bootstraps from the value after its last step and at every truncation, never
    at a termination. Fragments run across episode boundaries (done_t cuts the recursion):

        steps       t0 t1 t2 t3 | t4 t5 t6 t7 | ...      length = 4
        call k:     t3 closes;  call k+1: the policy's extras bring V'_3 -> the fragment is emitted

    The value after a fragment's last step reaches the adder with the NEXT add call (the extras
    belong to the previous step's rows), so a fragment is emitted one add call after its last step
    closes. Each row is its own stream (multi-agent: rows not alive are skipped; pool mode: rows
    indexed by env_ids). A fragment still filling at a reset is dropped.
    """

    required_extras = ("value", "final_value")
    required_extras_help = (" (value = V(step.obs), final_value = V(step.final_obs), a float per row: a "
                            "policy that defines act_step(step) sees both; see examples/ppo.py)")
    store_next_obs = False

    def __init__(self, length: int, discount: float, gae_lambda: float = 0.95):
        if not is_int(length) or length < 1:
            raise UsageError(mismatch("Rollout", "length", "an int >= 1", repr(length)))
        self.length = int(length)
        self.discount = unit_float("Rollout", "discount", discount)
        self.gae_lambda = unit_float("Rollout", "gae_lambda", gae_lambda)
        super().__init__()

    def __repr__(self):
        return f"Rollout(length={self.length}, discount={self.discount}, gae_lambda={self.gae_lambda})"

    def _ring_capacity(self) -> int:
        return self.length + 1      # the next fragment's first observation arrives before the emit

    def _stored_extras(self):
        return {k: s for k, s in self.extras_specs.items() if k != "final_value"}

    def _item_fields(self) -> dict[str, ArraySpec]:
        L = (self.length,)
        f = {k: ArraySpec(L + s.shape, s.dtype) for k, s in self.obs_specs.items()}
        f.update({k: ArraySpec(L + s.shape, s.dtype) for k, s in self.action_specs.items()})
        f["reward"] = ArraySpec(L, np.float32)
        f["terminated"] = ArraySpec(L, bool)
        f["truncated"] = ArraySpec(L, bool)
        f["advantage"] = ArraySpec(L, np.float32)
        f["return"] = ArraySpec(L, np.float32)
        f.update({k: ArraySpec(L + s.shape, s.dtype) for k, s in self._stored_extras().items()})
        return f

    def _allocate(self) -> None:
        super()._allocate()
        self._next_value = np.zeros((self.num_rows, self.length + 1), np.float32)
        self._awaiting = np.full(self.num_rows, -1, np.int64)   # slot waiting for its V', or -1

    def _check_extras_names(self, ext):
        super()._check_extras_names(ext)
        for k in self.required_extras:
            s = ext[k]
            if s.shape != () or np.dtype(s.dtype).kind != "f":
                raise UsageError(mismatch("extras field", k, "a float scalar per row (spec shape ())",
                                          f"{s!r}"))

    def _before_open(self, rows, extras):
        slot = self._awaiting[rows]
        has = slot >= 0
        if not np.count_nonzero(has):
            return None
        r = rows[has]
        self._next_value[r, slot[has]] = extras["final_value"][has]
        self._awaiting[r] = -1
        count = self._count[r]
        ready = count % self.length == 0        # the fragment's last step just got its V'
        if not np.count_nonzero(ready):
            return None
        return self._emit(r[ready], count[ready] - self.length)

    def _close(self, rows, reward, terminated, truncated, done, final_obs):
        slot = self._record_close(rows, reward, terminated, truncated, done, final_obs)
        self._awaiting[rows] = slot
        return None

    def _emit(self, rows, starts):
        bufs = dict(self._obs)
        bufs.update(self._act)
        bufs.update(self._ext)
        bufs["reward"] = self._rew
        bufs["terminated"] = self._term
        bufs["truncated"] = self._trunc
        bufs["next_value"] = self._next_value
        L = self.length
        g, _ = self._gather(rows, starts, np.full(len(rows), L), L, bufs)
        rew, term, trunc = g["reward"], g["terminated"], g["truncated"]
        value = g["value"].astype(np.float64)
        nv = g.pop("next_value").astype(np.float64)
        gamma, lam = self.discount, self.gae_lambda
        delta = rew + gamma * nv * ~term - value
        carry = gamma * lam * ~(term | trunc)
        adv = np.empty_like(delta)
        a = np.zeros(len(rows))
        for t in range(self.length - 1, -1, -1):
            a = delta[:, t] + carry[:, t] * a
            adv[:, t] = a
        g["reward"] = rew
        g["terminated"] = term
        g["truncated"] = trunc
        g["advantage"] = adv.astype(np.float32)
        g["return"] = (adv + value).astype(np.float32)
        g.pop("final_value", None)
        return {k: g[k] for k in self._specs}
