"""Episode: whole episodes of one row, padded to a fixed length."""

from __future__ import annotations

import numpy as np

from rlflow.adders.base import TrajectoryAdder, unit_float
from rlflow.errors import UsageError, is_int, mismatch
from rlflow.specs import ArraySpec


class Episode(TrajectoryAdder):
    """One item per finished episode of a row, padded to `max_length` steps.

    Items, each field with a leading time axis [max_length, ...]:
        obs, action, reward (float32), discount (float32: 0 where terminated, else `discount`,
        0 on padding), mask (bool: the first T entries are the episode's T steps), next_obs (the
        observation each step led to; at step T-1 the true final observation), and the extras.

        episode of T = 4 steps, max_length = 6:
            obs       s0 s1 s2 s3  0  0
            next_obs  s1 s2 s3 sF  0  0        sF: the final observation (terminated or truncated)
            mask      1  1  1  1   0  0

    An episode is emitted when it ends (terminated or truncated; a dead agent's episode ends when
    its row is done). Episodes still running are never emitted, partially or otherwise. An episode
    longer than `max_length` steps raises UsageError naming `max_length` at the step that would
    exceed it: raise max_length (or use Sequence for chunks).
    """

    def __init__(self, max_length: int, discount: float = 1.0):
        if not is_int(max_length) or max_length < 1:
            raise UsageError(mismatch("Episode", "max_length", "an int >= 1", repr(max_length)))
        discount = unit_float("Episode", "discount", discount)
        self.max_length, self.discount = int(max_length), discount
        super().__init__()

    def __repr__(self):
        return f"Episode(max_length={self.max_length}, discount={self.discount})"

    def _ring_capacity(self) -> int:
        return self.max_length

    def _item_fields(self) -> dict[str, ArraySpec]:
        return self._stacked_fields(self.max_length)

    def _open(self, rows, action, extras) -> None:
        over = self._count[rows] >= self.max_length
        if np.count_nonzero(over):
            r = int(rows[np.argmax(over)])
            raise UsageError(mismatch("Episode", "max_length",
                                      f"episodes of at most {self.max_length} steps",
                                      f"row {r} taking step {self.max_length + 1} of its episode"))
        super()._open(rows, action, extras)

    def _close(self, rows, reward, terminated, truncated, done, final_obs):
        self._record_close(rows, reward, terminated, truncated, done, final_obs)
        if not np.count_nonzero(done):
            return None
        drows = rows[done]
        T = self._count[drows]
        self._count[drows] = 0
        bufs = dict(self._obs)
        bufs.update(self._act)
        bufs["reward"] = self._rew
        bufs["terminated"] = self._term
        bufs.update(self._nobs)
        bufs.update(self._ext)
        g, mask = self._gather(drows, np.zeros(len(drows), np.int64), T, self.max_length, bufs)
        out = {k: g[k] for k in self.obs_specs}
        out.update({k: g[k] for k in self.action_specs})
        out["reward"] = g["reward"]
        out["discount"] = np.where(g["terminated"] | ~mask, 0.0, self.discount).astype(np.float32)
        out["mask"] = mask
        out.update({"next_" + k: g["next_" + k] for k in self.obs_specs})
        out.update({k: g[k] for k in self.extras_specs})
        return out
