"""Adders: turn the stream of `rf.Step` records of a vector env into trainable items.

    Transition(discount)                         1-step transitions: obs, action, reward, discount, next_obs
    NStepTransition(n, discount)                 n-step returns, shorter windows at episode ends
    Sequence(length, period, discount, end_behavior)   fixed-length windows ("pad" | "truncate" | "continue")
    Episode(max_length, discount)                whole episodes, padded, with mask
    Rollout(length, discount, gae_lambda)        on-policy fragments with GAE advantages and returns

Every adder follows the row rule of `rf.Step` (multi-agent alive masks, pool-mode env_ids) and
declares its items with `item_specs(env_spec, extras_specs)` before any data exists.
"""

from rlflow.adders.base import RowAdder, TrajectoryAdder
from rlflow.adders.episode import Episode
from rlflow.adders.rollout import Rollout
from rlflow.adders.sequence import Sequence
from rlflow.adders.transition import NStepTransition, Transition

__all__ = ["RowAdder", "TrajectoryAdder", "Transition", "NStepTransition", "Sequence", "Episode", "Rollout"]
