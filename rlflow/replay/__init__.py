"""Replay: storage, selectors, rate limiters and the Table (placeholder until the replay work lands)."""
from rlflow.replay import rate_limiters, selectors
from rlflow.replay.table import Table

__all__ = ["Table", "selectors", "rate_limiters"]
