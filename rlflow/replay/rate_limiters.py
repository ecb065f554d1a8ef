"""Rate limiters: when a table lets an insert or a sample go ahead (Reverb's semantics).

One parametric class, `RateLimiter(samples_per_insert, min_size_to_sample, min_diff, max_diff)`, and
presets on top of it: `MinSize`, `SampleToInsertRatio`, `Queue`. The table holds the lock and the
condition variable; a limiter only counts and answers (see `rlflow.core.RateLimiter`).
"""

from __future__ import annotations

import math
from fractions import Fraction

from rlflow import core
from rlflow.errors import UsageError, is_real, mismatch

__all__ = ["RateLimiter", "MinSize", "SampleToInsertRatio", "Queue"]


def _number(name, value, *, integer=False, positive=False, allow_inf=False):
    if not is_real(value):               # "10" or True would pass float(); they are no counts
        raise UsageError(mismatch("rate limiter argument", name, "a number (int or float)", repr(value)))
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise UsageError(mismatch("rate limiter argument", name, "a finite number", repr(value)))
    if integer and (v != int(v)):
        raise UsageError(mismatch("rate limiter argument", name, "an integer", repr(value)))
    if positive and v <= 0:
        raise UsageError(mismatch("rate limiter argument", name, "a positive number", repr(value)))
    return int(v) if integer else v


def _blocked_error(spi: float, lo: float, hi: float):
    """An error value at which both calls block (float), or None.

    Both block for an error in the open band (max_diff - samples_per_insert, min_diff + 1). The
    error is inserts * spi - samples. Where spi = p / q with q a power of two up to 1024 (1, 0.5,
    0.25, 1.5...: floats compute these counts exactly) the error is always a multiple of 1 / q and
    every multiple is some such difference, so the band blocks iff it holds one (integers: q = 1).
    Any other ratio (0.1, 1/3: not exact in floats, so the limiter's own sums round, and the error
    comes arbitrarily close to any value) needs an empty band: max_diff - min_diff >=
    samples_per_insert + 1, as computed in floats."""
    f_spi = Fraction(spi)
    if f_spi.denominator > 1024:
        band_lo, band_hi = hi - spi, lo + 1
        return (band_lo + band_hi) / 2 if band_lo < band_hi else None
    band_lo, band_hi = Fraction(hi) - f_spi, Fraction(lo) + 1
    if band_lo >= band_hi:
        return None
    unit = Fraction(1, f_spi.denominator)
    k = math.floor(band_lo / unit) + 1          # the first multiple of 1 / q above band_lo
    return float(k * unit) if k * unit < band_hi else None


class RateLimiter(core.RateLimiter):
    r"""Holds `error = inserts * samples_per_insert - samples` inside [min_diff, max_diff].

    Counters: `inserts`, `samples` (items drawn, so a sample of n counts n) and `deletes` (items
    evicted, deleted or removed after `max_times_sampled`); `size = inserts - deletes`.

        can_insert(n)  iff  size + n <= min_size_to_sample                       (stage 1: filling)
                       or   (inserts + n) * samples_per_insert - samples <= max_diff
        can_sample(n)  iff  size >= min_size_to_sample
                       and  inserts * samples_per_insert - samples - n >= min_diff

    These are Reverb's rules (rate_limiter.cc), applied to a whole batch of n at once.

        error ▲
     max_diff ┤ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─   inserts block above this line
              │        /\/\/\/\/\/\/\/\/\      (an insert moves error up by samples_per_insert,
              │       /                        a sample of one item moves it down by 1)
     min_diff ┤ ─ ─ ─/─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─   samples block below this line
              │     /  stage 1: size < min_size_to_sample, inserts free, samples blocked
              └─────┴──────────────────────────▶ time

    A configuration in which some reachable state lets neither an insert of one item nor a sample
    of one item go ahead is refused at construction with a UsageError saying why:
      * max_diff < min_diff;
      * the state right after stage 1 (size == min_size_to_sample, no samples yet, error =
        samples_per_insert * min_size_to_sample) admits neither an insert nor a sample;
      * the blocked band (max_diff - samples_per_insert, min_diff + 1), where both calls block,
        holds a value the error can take: for a ratio p / q with q a power of two up to 1024
        (1, 2, 0.5, 0.25, 1.5...), exact in floats, a multiple of 1 / q, checked exactly; for any
        other ratio (0.1, 1/3) the band must be empty: max_diff - min_diff >= samples_per_insert + 1
        (`_blocked_error`).
    A table adds one more check: min_size_to_sample <= its capacity.
    """

    def __init__(self, samples_per_insert: float, min_size_to_sample: int, min_diff: float,
                 max_diff: float):
        spi = _number("samples_per_insert", samples_per_insert, positive=True)
        min_size = _number("min_size_to_sample", min_size_to_sample, integer=True)
        if min_size < 1:
            raise UsageError(mismatch("rate limiter argument", "min_size_to_sample", "an integer >= 1",
                                      repr(min_size_to_sample)))
        lo = _number("min_diff", min_diff, allow_inf=True)
        hi = _number("max_diff", max_diff, allow_inf=True)
        if hi < lo:
            raise UsageError(
                f"rate limiter would deadlock: max_diff ({hi}) < min_diff ({lo}), so no state lets both "
                f"inserts and samples through")
        start = spi * min_size
        if not (start + spi <= hi or start - 1 >= lo):
            raise UsageError(
                f"rate limiter would deadlock as soon as min_size_to_sample={min_size} items are in: "
                f"error = samples_per_insert * min_size_to_sample = {start}; an insert needs "
                f"error + {spi} <= max_diff ({hi}) and a sample needs error - 1 >= min_diff ({lo})")
        if math.isfinite(lo) and math.isfinite(hi):
            stuck = _blocked_error(spi, lo, hi)
            if stuck is not None:
                raise UsageError(
                    f"rate limiter can deadlock: at an error of {stuck:g} (inserts * samples_per_insert - "
                    f"samples{', a value the counts can take' if Fraction(spi).denominator <= 1024 else ''}) "
                    f"neither an insert (error + samples_per_insert "
                    f"<= max_diff={hi:g}) nor a sample (error - 1 >= min_diff={lo:g}) can go ahead; widen "
                    f"[min_diff, max_diff] to at least samples_per_insert + 1 = {spi + 1:g}")
        self._spi = spi
        self.samples_per_insert = spi
        self.min_size_to_sample = min_size
        self.min_diff = lo
        self.max_diff = hi
        self.inserts = 0
        self.samples = 0
        self.deletes = 0

    # ---- the rules --------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.inserts - self.deletes

    @property
    def diff(self) -> float:
        """The error: inserts * samples_per_insert - samples."""
        return self.inserts * self._spi - self.samples

    def can_insert(self, n: int = 1) -> bool:
        if self.inserts + n - self.deletes <= self.min_size_to_sample:
            return True
        return (self.inserts + n) * self._spi - self.samples <= self.max_diff

    def can_sample(self, n: int = 1) -> bool:
        if self.inserts - self.deletes < self.min_size_to_sample:
            return False
        return self.inserts * self._spi - self.samples - n >= self.min_diff

    def on_insert(self, n: int) -> None:
        self.inserts += n

    def on_sample(self, n: int) -> None:
        self.samples += n

    def on_delete(self, n: int) -> None:
        self.deletes += n

    # ---- explanations and feasibility -------------------------------------------------------
    def why_not_insert(self, n: int) -> str:
        d = (self.inserts + n) * self._spi - self.samples
        return (f"inserting {n} would make inserts * samples_per_insert - samples = {d:g} > max_diff "
                f"= {self.max_diff:g} (inserts {self.inserts}, samples {self.samples}, "
                f"samples_per_insert {self._spi:g}); waiting for samples")

    def why_not_sample(self, n: int) -> str:
        if self.size < self.min_size_to_sample:
            return (f"table holds {self.size} items, sampling needs {self.min_size_to_sample} "
                    f"(min_size_to_sample)")
        d = self.inserts * self._spi - self.samples - n
        return (f"sampling {n} would make inserts * samples_per_insert - samples = {d:g} < min_diff = "
                f"{self.min_diff:g} (inserts {self.inserts}, samples {self.samples}, samples_per_insert "
                f"{self._spi:g}); waiting for inserts")

    def sample_feasible(self, n: int) -> bool:
        """False if no reachable state ever lets a sample of n go ahead (the error never gets above
        max(max_diff, samples_per_insert * min_size_to_sample))."""
        top = max(self.max_diff, self._spi * self.min_size_to_sample)
        return top - n >= self.min_diff

    def insert_feasible(self, n: int) -> bool:
        """False if no reachable state ever lets an insert of n go ahead."""
        if n <= self.min_size_to_sample:
            return True  # stage 1, from an empty table
        return min(self.min_diff, 0.0) + n * self._spi <= self.max_diff

    # ---- checkpoints ------------------------------------------------------------------------
    def config(self) -> dict:
        """Constructor arguments (JSON-able) that rebuild this limiter."""
        return {"samples_per_insert": self._spi, "min_size_to_sample": self.min_size_to_sample,
                "min_diff": self.min_diff, "max_diff": self.max_diff}

    def state_dict(self) -> dict:
        return {"inserts": self.inserts, "samples": self.samples, "deletes": self.deletes}

    def load_state_dict(self, state: dict) -> None:
        self.inserts = int(state["inserts"])
        self.samples = int(state["samples"])
        self.deletes = int(state["deletes"])

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class MinSize(RateLimiter):
    """Samples block until the table holds `min_size` items; inserts never block.

    RateLimiter(samples_per_insert=1, min_size_to_sample=min_size, min_diff=-inf, max_diff=+inf);
    `samples_per_insert` is None: there is no ratio.
    """

    def __init__(self, min_size: int = 1):
        size = _number("min_size", min_size, integer=True)
        if size < 1:
            raise UsageError(mismatch("rate limiter argument", "min_size", "an integer >= 1", repr(min_size)))
        super().__init__(1.0, size, -math.inf, math.inf)
        self.samples_per_insert = None

    def config(self) -> dict:
        return {"min_size": self.min_size_to_sample}

    def why_not_sample(self, n: int) -> str:
        return (f"table holds {self.size} items, sampling needs {self.min_size_to_sample} "
                f"(min_size_to_sample)")


class SampleToInsertRatio(RateLimiter):
    """Holds samples / inserts near `samples_per_insert` once `min_size_to_sample` items are in.

        offset   = samples_per_insert * min_size_to_sample
        min_diff = offset - error_buffer        (samples block below)
        max_diff = offset + error_buffer        (inserts block above)

    `error_buffer` may be a pair (min_diff, max_diff), used without offset. As in Reverb, the band
    must be at least 2 * max(1, samples_per_insert) wide (error_buffer >= max(1, samples_per_insert)),
    else one side could block the other for good: a UsageError says so.
    """

    def __init__(self, samples_per_insert: float, min_size_to_sample: int, error_buffer=None):
        spi = _number("samples_per_insert", samples_per_insert, positive=True)
        min_size = _number("min_size_to_sample", min_size_to_sample, integer=True)
        if error_buffer is None:
            error_buffer = max(1.0, spi) * 2
        if isinstance(error_buffer, (tuple, list)):
            if len(error_buffer) != 2:
                raise UsageError(mismatch("rate limiter argument", "error_buffer",
                                          "a number or a pair (min_diff, max_diff)", repr(error_buffer)))
            lo = _number("error_buffer[0]", error_buffer[0])
            hi = _number("error_buffer[1]", error_buffer[1])
        else:
            eb = _number("error_buffer", error_buffer)
            if eb < 0:
                raise UsageError(mismatch("rate limiter argument", "error_buffer", ">= 0", repr(error_buffer)))
            offset = spi * min_size
            lo, hi = offset - eb, offset + eb
        if hi - lo < 2 * max(1.0, spi):
            raise UsageError(
                f"rate limiter SampleToInsertRatio 'error_buffer': expected a buffer of at least "
                f"max(1, samples_per_insert) = {max(1.0, spi):g} on each side (Reverb's rule: [min_diff, "
                f"max_diff] at least 2 * max(1, samples_per_insert) = {2 * max(1.0, spi):g} wide, so that "
                f"inserts and samples are never held back one item at a time), got {error_buffer!r}, "
                f"which gives [{lo:g}, {hi:g}]; RateLimiter(samples_per_insert, min_size_to_sample, "
                f"min_diff, max_diff) takes a narrower band where it cannot deadlock")
        self._error_buffer = list(error_buffer) if isinstance(error_buffer, (tuple, list)) else float(error_buffer)
        super().__init__(spi, min_size, lo, hi)

    def config(self) -> dict:
        return {"samples_per_insert": self._spi, "min_size_to_sample": self.min_size_to_sample,
                "error_buffer": self._error_buffer}


class Queue(RateLimiter):
    """At most `size` items waiting to be read: RateLimiter(1, 1, min_diff=0, max_diff=size).

    With max_times_sampled=1 and Fifo sampler and remover (see `Table.queue`) inserts block while
    `size` items are unread, and samples block until one is there.
    """

    def __init__(self, size: int):
        size = _number("size", size, integer=True)
        if size < 1:
            raise UsageError(mismatch("rate limiter argument", "size", "an integer >= 1", repr(size)))
        super().__init__(1.0, 1, 0.0, float(size))
        self.queue_size = size

    def config(self) -> dict:
        return {"size": self.queue_size}

    def on_delete_unread(self, n: int) -> None:
        """n items left the table unread (deleted): they no longer wait to be read, as if read.
        (Counted as unread for ever, they shrank the queue for good: an emptied Table.queue(4)
        never took a batch again.)"""
        self.samples += n

