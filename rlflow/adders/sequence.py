"""Sequence: fixed-length windows of consecutive steps of one row (R2D2-style recurrent replay)."""

from __future__ import annotations

import numpy as np

from rlflow.adders.base import TrajectoryAdder, unit_float
from rlflow.errors import UsageError, is_int, mismatch
from rlflow.specs import ArraySpec

END_BEHAVIORS = ("pad", "truncate", "continue")


class Sequence(TrajectoryAdder):
    """Windows of `length` consecutive steps of one row, a new window every `period` steps
    (windows overlap when period < length).

    Items, each field with a leading time axis [length, ...]:
        obs        observation the step's action was taken in ("obs/<key>" for nested observations)
        action     the action
        reward     float32 r_t
        discount   float32 per-step discount: 0 where the episode terminated at this step, else
                   `discount` (truncated steps keep it: bootstrap from next_obs); 0 on padding
        mask       bool, True on real steps, False on padding
        is_first   bool, True where the step is the first of an episode
        next_obs   the observation the step led to: obs[t+1] inside an episode, the true final
                   observation at the step that ends one (so every step bootstraps the same way,
                   including the window's last step and a truncation inside a "continue" window)
        <extras>   the policy's extras of each step (e.g. "state": the recurrent state the policy
                   acted from; extras["state"][0] is the state at the window's start, for burn-in)

    Windows start at steps 0, period, 2*period, ... counted from the start of each episode
    ("pad", "truncate") or from the start of the row's stream ("continue"). Full windows are emitted
    as soon as their last step closes. At an episode's end, with length 3, period 2 and an episode
    of 6 steps (1..6, F = first step of the next episode, 0 = zero padding, mask False):

        steps            1 2 3 4 5 6 | F ...
        full windows     1 2 3
                             3 4 5
        pad              . . . . 5 6 0          the next window, zero-padded (Acme ZERO_PAD)
        truncate         (nothing)              only full windows: the partial one is dropped
        continue         . . . . 5 6 F          windows run on into the next episode; is_first marks F

    "pad" emits, at the episode's end, the one window that would start next (the first start s with
    s + length > T, if s < T), so every step of the episode is in some item and an episode shorter
    than `length` gives one padded item. "truncate" is Acme's TRUNCATE for a fixed-shape table:
    a shorter item cannot be stored, so the partial window is dropped (episodes shorter than
    `length` give no item). "continue" never pads; the stream of a row goes on across its episodes.

    Multi-agent and pool mode: each row is its own stream; rows that are not alive are skipped
    without breaking their window.
    """

    def __init__(self, length: int, period: int, discount: float = 1.0, end_behavior: str = "pad"):
        for name, v in (("length", length), ("period", period)):
            if not is_int(v) or v < 1:
                raise UsageError(mismatch("Sequence", name, "an int >= 1", repr(v)))
        if end_behavior not in END_BEHAVIORS:
            raise UsageError(mismatch("Sequence", "end_behavior", f"one of {END_BEHAVIORS}", repr(end_behavior)))
        discount = unit_float("Sequence", "discount", discount)
        self.length, self.period, self.discount = int(length), int(period), discount
        self.end_behavior = end_behavior
        super().__init__()

    def __repr__(self):
        return (f"Sequence(length={self.length}, period={self.period}, discount={self.discount}, "
                f"end_behavior={self.end_behavior!r})")

    def _ring_capacity(self) -> int:
        return self.length

    def _item_fields(self) -> dict[str, ArraySpec]:
        return self._stacked_fields(self.length, flags=("is_first",))

    def _close(self, rows, reward, terminated, truncated, done, final_obs):
        self._record_close(rows, reward, terminated, truncated, done, final_obs)
        L, p = self.length, self.period
        k = self._count[rows]
        s = k - L
        full = s >= 0
        if p > 1:
            full &= s % p == 0
        parts = []
        if np.count_nonzero(full):
            parts.append((rows[full], s[full], np.full(int(full.sum()), L)))
        if self.end_behavior != "continue" and np.count_nonzero(done):
            T = k[done]
            drows = rows[done]
            if self.end_behavior == "pad":
                nxt = np.where(T < L, 0, ((T - L) // p + 1) * p)
                m = nxt < T
                if np.count_nonzero(m):
                    parts.append((drows[m], nxt[m], (T - nxt)[m]))
            self._count[drows] = 0
        if not parts:
            return None
        w_rows, starts, valid = (np.concatenate(x) for x in zip(*parts)) if len(parts) > 1 else parts[0]
        return self._emit(w_rows, starts, valid)

    def _emit(self, rows, starts, valid):
        bufs = dict(self._obs)
        bufs.update(self._act)
        bufs["reward"] = self._rew
        bufs["terminated"] = self._term
        bufs["is_first"] = self._first
        bufs.update(self._nobs)
        bufs.update(self._ext)
        g, mask = self._gather(rows, starts, valid, self.length, bufs)
        out = {k: g[k] for k in self.obs_specs}
        out.update({k: g[k] for k in self.action_specs})
        out["reward"] = g["reward"]
        out["discount"] = np.where(g["terminated"] | ~mask, 0.0, self.discount).astype(np.float32)
        out["mask"] = mask
        out["is_first"] = g["is_first"]
        out.update({"next_" + k: g["next_" + k] for k in self.obs_specs})
        out.update({k: g[k] for k in self.extras_specs})
        return out
