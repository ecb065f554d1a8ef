"""Replay: the Table (columnar storage + sampler + remover + rate limiter), its selectors and limiters.

    import rlflow as rf
    table = rf.Table(100_000, sampler=rf.selectors.Prioritized(alpha=0.6), remover=rf.selectors.Fifo(),
                     rate_limiter=rf.rate_limiters.SampleToInsertRatio(8.0, 1_000, error_buffer=800))
    sample = table.sample(256)
    w = rf.replay.importance_weights(sample.probabilities, len(table), beta=0.4)
"""

from __future__ import annotations

import numpy as np

from rlflow.errors import UsageError, is_int, mismatch
from rlflow.replay import rate_limiters, selectors
from rlflow.replay.table import Table

__all__ = ["Table", "selectors", "rate_limiters", "importance_weights"]


def importance_weights(probabilities, size: int, beta: float) -> np.ndarray:
    """Prioritized-replay importance weights, normalized so the largest is 1 (float32 [n]).

        w_i = (size * P_i) ** -beta / max_j w_j

    `probabilities` are the sample's draw probabilities P_i (> 0), `size` the number of items the
    table held, `beta` >= 0 (0: no correction, 1: full correction; PER anneals it towards 1).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 1:
        raise UsageError(mismatch("argument", "probabilities", "a 1-d array", f"shape {p.shape}"))
    if not (np.isfinite(p).all() and (p > 0).all() and (p <= 1).all()):
        raise UsageError(mismatch("argument", "probabilities", "values in (0, 1]", p[~((p > 0) & (p <= 1))][:3]))
    if not is_int(size) or size < 1:
        raise UsageError(mismatch("argument", "size", "an integer >= 1", repr(size)))
    beta = float(beta)
    if not np.isfinite(beta) or beta < 0:
        raise UsageError(mismatch("argument", "beta", "a finite number >= 0", beta))
    if len(p) == 0:
        return np.empty(0, dtype=np.float32)
    # (size * P)^-beta / max_j (size * P_j)^-beta = (P / min P)^-beta: no overflow for tiny P
    w = (p / p.min()) ** -beta
    return w.astype(np.float32)
