"""Transition and NStepTransition: one item per (s_t, a_t) with an n-step return."""

from __future__ import annotations

import numpy as np

from rlflow.adders.base import RowAdder, unit_float
from rlflow.errors import UsageError, is_int, mismatch
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

    State: ring buffers [num_rows, n, ...]; every event is vectorized over rows, no per-row Python.
    A transition's accumulated return and age m live in its ring slot; each close adds gamma^m * r
    to every open slot of the row, and emits the slots that reached m = n, or all of them when the
    episode ended. While every step holds every row, all alive (single-agent), the rows share one
    head and the ring is addressed by slicing (lockstep); otherwise each row has its own head.
    """

    def __init__(self, n: int, discount: float):
        if not is_int(n) or n < 1:
            raise UsageError(mismatch("NStepTransition", "n", "an int >= 1", repr(n)))
        discount = unit_float("NStepTransition", "discount", discount)
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
        self._age = None              # [R, n] off lockstep: -1 free slot, else steps summed so far
        self._head = np.zeros(R, np.int64)              # slot of the row's latest observation
        g = self.discount
        self._gpow_acc = np.append(g ** np.arange(n, dtype=np.float64), 0.0)  # [-1] -> 0 for free slots
        self._gpow = (g ** np.arange(n + 1, dtype=np.float64)).astype(np.float32)
        # lockstep state (see _lockstep): one head, a valid flag per entry, ages per slot
        self._lock, self._h = True, 0
        self._valid = np.zeros((R, n), bool)
        j = np.arange(n)
        self._w_by_head = np.stack([g ** ((h - j) % n) for h in range(n)])     # gamma^(age before close)
        self._age_by_head = np.stack([(h - j) % n + 1 for h in range(n)])      # age after the close
        self._disc_n = np.full(R, self._gpow[n], np.float32)
        self._plain = None            # Transition fast path: plain obs / action arrays, no extras

    # Lockstep: while every call is a full one (all rows alive, in env_ids order), all rows share
    # one head `self._h`, so every entry of ring slot j has the same age (h - j) % n + 1 after a
    # close: the ring is addressed by basic slicing and a valid flag per entry replaces the ages.
    # The first partial call writes the state out to per-row heads and ages, and the general path
    # takes over until add_first.
    def _lockstep(self) -> bool:
        if self._lock:
            if self._full_call:
                return True
            self._head[:] = self._h
            ages = self._age_by_head[(self._h - 1) % self.n]      # as of the last close
            self._age = np.where(self._valid, ages[None, :], -1)
            self._lock = False
        return False

    # Transition (n = 1) on a full call: the open, close and start of every row at once. The item's
    # obs is the ring's column itself (handed out, never written again: the ring takes a fresh
    # array for the new obs), so each observation is copied once on its way through.
    @property
    def _fast_full(self) -> bool:
        return self.n == 1 and self._lock

    def _full_discount(self, terminated, out=None) -> np.ndarray:
        """A full call's item discounts: gamma^n per row, 0 where the episode terminated (into
        `out` where given, else a new array)."""
        if out is None:
            out = self._disc_n.copy()
        else:
            out[...] = self._disc_n
        if np.count_nonzero(terminated):
            out[terminated] = 0.0
        return out

    def _full_add(self, act, ext, reward, terminated, obs, final):
        if self._plain is None:
            self._plain = (list(self.obs_specs) == ["obs"] and list(self.action_specs) == ["action"]
                           and not self.extras_specs)
        if self._plain:                # one observation array, one action array, no extras
            buf = self._obs["obs"]
            o_dt = buf.dtype
            a_dt = self.action_specs["action"].dtype
            out = {"obs": buf[:, 0], "action": np.array(act["action"], dtype=a_dt),
                   "reward": np.array(reward, dtype=np.float32), "discount": self._full_discount(terminated),
                   "next_obs": np.array(final["obs"], dtype=o_dt)}
            self._obs["obs"] = np.array(obs["obs"], dtype=o_dt)[:, None]
            return out
        out = {k: b[:, 0] for k, b in self._obs.items()}
        out.update({k: np.array(act[k], dtype=s.dtype) for k, s in self.action_specs.items()})
        out["reward"] = np.array(reward, dtype=np.float32)
        out["discount"] = self._full_discount(terminated)
        specs = self.obs_specs
        for k, a in final.items():
            out["next_" + k] = np.array(a, dtype=specs[k].dtype)
        out.update({k: np.array(ext[k], dtype=s.dtype) for k, s in self.extras_specs.items()})
        for k, a in obs.items():
            self._obs[k] = np.array(a, dtype=specs[k].dtype)[:, None]
        return out

    def _writes_into(self) -> bool:
        # a subclass that makes its items otherwise (its own add, _full_add or fields) is fed
        # through `add`: `_full_add_into` writes what this class's `_full_add` makes
        w = self.__dict__.get("_into_ok")
        if w is None:
            cls = type(self)
            w = self._into_ok = (cls.add is RowAdder.add and cls._fast_add is RowAdder._fast_add
                                 and cls._full_add is NStepTransition._full_add
                                 and cls._item_fields is NStepTransition._item_fields)
        return w

    def _full_add_into(self, ids, actions, step, sink):
        """`_full_add`'s plain case written straight into the buffers `sink.reserve` lends: each
        value is copied once, into the sink's memory (see RowAdder.add_into)."""
        if not self._plain:
            return None
        n = len(ids)
        out = sink.reserve(n)
        if out is None:
            return None
        buf = self._obs["obs"]
        try:
            out["obs"][...] = buf[:, 0]
            out["action"][...] = actions
            out["reward"][...] = step.reward
            self._full_discount(step.terminated, out["discount"])
            out["next_obs"][...] = step.final_obs
            # the ring's next observation, in place: this buffer was never handed out (`_full_add`
            # hands out its buffer and takes a fresh one)
            buf[:, 0] = step.obs
        except BaseException:
            sink.cancel()
            raise
        self._full_call = True
        self._prev_ids = ids
        self._prev_alive = None
        sink.commit(n)
        return n

    def _start(self, rows, obs, new_episode) -> None:
        if self._lockstep():
            self._h = h = (self._h + 1) % self.n
            for k, a in obs.items():
                self._obs[k][:, h] = a
            return
        h = self._head[rows]
        h += 1
        h %= self.n
        self._head[rows] = h
        for k, a in obs.items():
            self._obs[k][rows, h] = a

    def _open(self, rows, action, extras) -> None:
        if self._lockstep():
            h = self._h
            for k, a in action.items():
                self._act[k][:, h] = a
            for k, a in extras.items():
                self._ext[k][:, h] = a
            self._valid[:, h] = True
            self._ret[:, h] = 0.0
            return
        h = self._head[rows]
        for k, a in action.items():
            self._act[k][rows, h] = a
        for k, a in extras.items():
            self._ext[k][rows, h] = a
        self._age[rows, h] = 0
        self._ret[rows, h] = 0.0

    def _close(self, rows, reward, terminated, truncated, done, final_obs):
        n = self.n
        if self._lockstep():
            h = self._h
            self._ret += np.multiply.outer(reward, self._w_by_head[h])
            valid = self._valid
            s = (h + 1) % n                                   # the oldest slot: age n now
            if not np.count_nonzero(done):
                col = valid[:, s]
                if np.count_nonzero(col) == len(col):                                 # the usual case: one item per row
                    out = {k: b[:, s].copy() for k, b in self._obs.items()}
                    out.update({k: b[:, s].copy() for k, b in self._act.items()})
                    out["reward"] = self._ret[:, s].astype(np.float32)
                    out["discount"] = self._disc_n.copy()
                    for k, a in final_obs.items():
                        out["next_" + k] = np.array(a, dtype=self.obs_specs[k].dtype)
                    out.update({k: b[:, s].copy() for k, b in self._ext.items()})
                    col[:] = False
                    return out
                ci = np.flatnonzero(col)
                slot = np.full(len(ci), s)
            else:
                emit = valid & done[:, None]
                emit[:, s] |= valid[:, s]
                ci, slot = np.nonzero(emit)
                ci, slot = _in_time_order(ci, slot, self._age_by_head[h][slot])
            if not len(ci):
                return None
            valid[ci, slot] = False
            return self._emit(ci, slot, self._age_by_head[h][slot], ci, terminated, final_obs)
        age = self._age[rows]                                   # [k, n]
        self._ret[rows] += self._gpow_acc[age] * np.asarray(reward, np.float64)[:, None]
        age += age >= 0
        full = age == n
        if np.count_nonzero(done):
            full |= done[:, None] & (age > 0)
        ci, slot = np.nonzero(full)
        if not len(ci):
            self._age[rows] = age
            return None
        if len(ci) > len(rows) or np.count_nonzero(done):     # an episode's end: several per row
            ci, slot = _in_time_order(ci, slot, age[ci, slot])
        m = age[ci, slot]
        age[ci, slot] = -1
        self._age[rows] = age
        return self._emit(rows[ci], slot, m, ci, terminated, final_obs)

    def _emit(self, r, slot, m, ci, terminated, final_obs):
        """Items of ring entries (r, slot) that summed m steps; ci: their rows in this close."""
        out = {k: b[r, slot] for k, b in self._obs.items()}
        out.update({k: b[r, slot] for k, b in self._act.items()})
        out["reward"] = self._ret[r, slot].astype(np.float32)
        disc = self._gpow[m]
        if np.count_nonzero(terminated):
            disc[terminated[ci]] = 0.0
        out["discount"] = disc
        for k, a in final_obs.items():               # in the spec's dtype, as obs (the env's may differ)
            out["next_" + k] = a[ci].astype(self.obs_specs[k].dtype, copy=False)
        out.update({k: b[r, slot] for k, b in self._ext.items()})
        return out


def _in_time_order(ci, slot, ages):
    """(row, ring slot) pairs sorted by row, then oldest first (the ring's slot order is not the
    steps' order once it has wrapped): an episode's last items come out in the order of its steps."""
    order = np.lexsort((-np.asarray(ages), ci))
    return ci[order], slot[order]


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
