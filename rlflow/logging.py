"""Run figures: a progress line on the terminal, a CSV file, and TensorBoard when tensorboardX is
installed.

    logger = Logger(directory="runs/dqn", progress_every=2.0)
    logger.write({"env_steps": 1000, "env_steps_per_s": 5120.0, "return": 21.5})   # each is optional
    logger.close()

`write` takes a flat dict of numbers; the CSV's columns are the union of all keys seen (the file is
rewritten with the wider header when a new key appears). Progress lines go to stderr at most every
`progress_every` seconds (and always when `force=True`; the runtimes decide when a row is due and
pass it).

A new Logger starts `figures.csv` afresh, except with `keep_rows_upto=N` (a resumed run: N is the
env steps it resumes from), where the file's rows up to N env steps stay and the new rows follow
them; rows past N (written after the checkpoint the run resumes from) are dropped, so the file is
one series. TensorBoard files are never rewritten; the new writer purges (tensorboardX's
`purge_step`: TensorBoard hides) the old points that figures.csv dropped: those past N, or every
point of an earlier run in the same directory when a run starts afresh there (with a warning).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
import warnings
from typing import Mapping, Optional

from rlflow.errors import UsageError, mismatch

_SHORT = [
    ("env_steps", "env steps", "{:,.0f}"),
    ("env_steps_per_s", "steps/s", "{:,.0f}"),
    ("learner_steps", "learner steps", "{:,.0f}"),
    ("learner_steps_per_s", "learn/s", "{:,.0f}"),
    ("samples_per_insert", "samples/insert", "{:.1f}"),
    ("episodes", "episodes", "{:,.0f}"),
    ("episode_return", "return", "{:.1f}"),
    ("eval_return", "eval return", "{:.1f}"),
    ("table_size", "table", "{:,.0f}"),
    ("param_lag", "param lag", "{:,.0f}"),
    ("queue_depth", "queue", "{:,.0f}"),
]


def usable_dir(name: str, directory) -> str:
    """Create `directory` (and its parents) if need be and check that files can be written there,
    before a run starts: a path that cannot be used is a UsageError naming `name`, not an error at
    the first save, after the run's work."""
    try:
        d = os.fsdecode(os.fspath(directory))     # bytes paths as str: the file names joined to it are
    except TypeError:
        raise UsageError(mismatch("run", name, "a path (str or os.PathLike)", repr(directory))) from None
    if not d:
        raise UsageError(mismatch("run", name, "a directory path (None: none)", repr(directory)))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise UsageError(mismatch("run", name, "a directory that can be created",
                                  f"{d!r} ({e.strerror or e})")) from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise UsageError(mismatch("run", name, "a writable directory", f"{d!r} (not writable)"))
    return d



_PER_ACTOR = ("param_lag", "queue_depth")     # shown per actor too where a run has several


def _per_actor(row: Mapping[str, float], key: str) -> list:
    """The values of `key`_0, `key`_1, ... in actor order."""
    found = []
    for k, v in row.items():
        tail = k[len(key) + 1:]
        if k.startswith(key + "_") and tail.isdigit():
            found.append((int(tail), v))
    return [v for _, v in sorted(found)]


def format_progress(row: Mapping[str, float]) -> str:
    """One progress line. With several actors, the parameter lag (the largest) and the queue
    depth (the sum) are followed by each actor's, in actor order: `param lag 4 (1/4/2)`."""
    parts = []
    for key, label, fmt in _SHORT:
        v = row.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        text = f"{label} {fmt.format(v)}"
        if key in _PER_ACTOR:
            each = _per_actor(row, key)
            if len(each) > 1:
                text += " (" + "/".join(fmt.format(x) for x in each) + ")"
        parts.append(text)
    return " | ".join(parts)


class Logger:
    """Writes figures to a progress line, a CSV file (`<directory>/figures.csv`) and TensorBoard."""

    def __init__(self, directory: Optional[str] = None, progress_every: Optional[float] = 2.0,
                 tensorboard: bool = True, stream=None, step_key: str = "env_steps",
                 keep_rows_upto: Optional[float] = None):
        self.directory = directory
        self.progress_every = progress_every
        self.stream = stream if stream is not None else sys.stderr
        self.step_key = step_key
        self._last_progress = -float("inf")
        self._rows: list[dict] = []
        self._columns: list[str] = []
        self._csv_file = None
        self._csv = None
        self._tb = None
        if directory is not None:
            self.directory = directory = usable_dir("log_dir", directory)
            if os.path.isdir(self.csv_path):      # refused now, not at the first row after the run's work
                raise UsageError(mismatch("run", "log_dir", "a directory where figures.csv can be written",
                                          f"{directory!r}, where figures.csv is a directory"))
            earlier = os.path.exists(self.csv_path)
            if keep_rows_upto is not None:
                self._keep_old_rows(keep_rows_upto)
            elif earlier:
                warnings.warn(f"log_dir {directory!r} holds an earlier run's figures: figures.csv starts "
                              "afresh and TensorBoard hides that run's points (resume= keeps them up "
                              "to its checkpoint)", UserWarning, stacklevel=3)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter  # optional
                except ImportError:
                    SummaryWriter = None
                if SummaryWriter is not None:
                    # TensorBoard shows what figures.csv holds: the points past a resumed run's
                    # checkpoint (or all of an earlier run's) are purged, not shown beside the new
                    purge = (int(keep_rows_upto) + 1 if keep_rows_upto is not None else 0 if earlier else None)
                    self._tb = SummaryWriter(logdir=directory, purge_step=purge)

    @property
    def csv_path(self) -> Optional[str]:
        return os.path.join(self.directory, "figures.csv") if self.directory else None

    def write(self, row: Mapping[str, float], force: bool = False) -> None:
        row = {k: float(v) for k, v in row.items() if v is not None}
        if self.directory:
            self._write_csv(row)
            if self._tb is not None:
                step = int(row.get(self.step_key, len(self._rows)))
                for k, v in row.items():
                    # NaN (no evaluation yet, no episode ended): no point, not tensorboardX's warning
                    if k != self.step_key and math.isfinite(v):
                        self._tb.add_scalar(k, v, step)
        now = time.monotonic()
        if self.progress_every is not None and (force or now - self._last_progress >= self.progress_every):
            self._last_progress = now
            print(format_progress(row), file=self.stream, flush=True)

    def _keep_old_rows(self, upto: float) -> None:
        try:
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                rows = []
                for r in reader:
                    row = {k: float(v) for k, v in r.items() if k is not None and v not in (None, "")}
                    if row.get(self.step_key, math.inf) <= upto:
                        rows.append(row)
        except FileNotFoundError:
            return
        except (OSError, ValueError, csv.Error):
            return                 # not a figures file this logger can read: started afresh
        self._rows, self._columns = rows, columns

    def _write_csv(self, row):
        new = [k for k in row if k not in self._columns]
        self._rows.append(row)
        if new or self._csv is None:          # (re)write the whole file: header, kept and new rows
            self._columns.extend(new)
            if self._csv_file is not None:
                self._csv_file.close()
            self._csv_file = open(self.csv_path, "w", newline="")
            self._csv = csv.DictWriter(self._csv_file, fieldnames=self._columns)
            self._csv.writeheader()
            for r in self._rows:
                self._csv.writerow(r)
        else:
            self._csv.writerow(row)
        self._csv_file.flush()

    def close(self) -> None:
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
