"""Adders: turn the stream of `rf.Step` records of a vector env into trainable items.

    Transition(discount)                 1-step transitions (obs, action, reward, discount, next_obs)
    NStepTransition(n, discount)         n-step returns, shorter windows at episode ends
"""

from rlflow.adders.base import RowAdder
from rlflow.adders.transition import NStepTransition, Transition

__all__ = ["RowAdder", "Transition", "NStepTransition"]
