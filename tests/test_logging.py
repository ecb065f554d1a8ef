"""Run figures: CSV rows as written, TensorBoard scalars (tensorboardX) without NaN points."""

import csv
import math
import struct

import pytest

from rlflow.logging import Logger


def test_csv_keeps_every_row_and_nan_stays_nan(tmp_path):
    log = Logger(str(tmp_path), progress_every=None, tensorboard=False)
    log.write({"env_steps": 10, "episode_return": math.nan, "loss": 1.5})
    log.write({"env_steps": 20, "episode_return": 3.0, "loss": 0.5, "eval_return": 7.0})
    log.close()
    with open(tmp_path / "figures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["env_steps"]) for r in rows] == [10.0, 20.0]
    assert math.isnan(float(rows[0]["episode_return"])) and float(rows[1]["eval_return"]) == 7.0


def test_tensorboard_gets_the_finite_figures_only(tmp_path, capsys):
    """A figure that is NaN (no evaluation yet, no episode ended) is no point on a TensorBoard
    curve: it is left out, and tensorboardX has nothing to warn about."""
    pytest.importorskip("tensorboardX")
    log = Logger(str(tmp_path), progress_every=None)
    for i in range(3):
        log.write({"env_steps": 100 * (i + 1), "eval_return": math.nan if i < 2 else 9.0, "loss": float(i)})
    log.close()
    out = capsys.readouterr()
    assert "NaN" not in out.out + out.err
    points = _scalars(tmp_path)
    assert points["loss"] == [(100, 0.0), (200, 1.0), (300, 2.0)]
    assert points["eval_return"] == [(300, 9.0)]


def _scalars(directory):
    """tag -> [(step, value)] of the TensorBoard event files in `directory` (TFRecord framing:
    length, its CRC, an Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            n = struct.unpack("<Q", data[pos:pos + 8])[0]
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_a_resumed_logger_keeps_the_rows_up_to_its_checkpoint(tmp_path):
    """keep_rows_upto=N: the old file's rows up to N env steps stay, those past N (written after the
    checkpoint) go, and the new rows follow: one series, whatever columns either run had."""
    log = Logger(str(tmp_path), progress_every=None, tensorboard=False)
    for e in (100, 200, 300):
        log.write({"env_steps": e, "loss": e / 100})
    log.close()
    log = Logger(str(tmp_path), progress_every=None, tensorboard=False, keep_rows_upto=200)
    log.write({"env_steps": 250, "loss": 9.0, "eval_return": 5.0})
    log.close()
    with open(tmp_path / "figures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["env_steps"]) for r in rows] == [100.0, 200.0, 250.0]
    assert [r["eval_return"] for r in rows] == ["", "", "5.0"] and rows[1]["loss"] == "2.0"
    fresh = Logger(str(tmp_path), progress_every=None, tensorboard=False)     # not a resume: a new file
    fresh.write({"env_steps": 7})
    fresh.close()
    with open(tmp_path / "figures.csv") as f:
        assert [r["env_steps"] for r in csv.DictReader(f)] == ["7.0"]


def test_a_log_dir_that_cannot_be_made_names_log_dir(tmp_path):
    from rlflow.errors import UsageError

    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="'log_dir'.*file"):
        Logger(str(tmp_path / "file"), progress_every=None)
    # refused when the run starts, not with an IsADirectoryError at its first row, after its work
    (tmp_path / "d" / "figures.csv").mkdir(parents=True)
    with pytest.raises(UsageError, match="'log_dir'.*where figures.csv is a directory"):
        Logger(str(tmp_path / "d"), progress_every=None)
    for empty in ("", 0):            # "" was taken as no log_dir: nothing written, no word
        with pytest.raises(UsageError, match="'log_dir'"):
            Logger(empty, progress_every=None)


def test_a_bytes_log_dir_is_a_path(tmp_path):
    """A bytes log_dir made its directory, then failed joining str file names to it."""
    log = Logger(str(tmp_path / "b").encode(), progress_every=None)
    log.write({"env_steps": 1.0, "x": 2.0})
    log.close()
    assert (tmp_path / "b" / "figures.csv").read_text().splitlines()[0] == "env_steps,x"


def test_progress_line_shows_each_actors_param_lag_and_queue_depth():
    from rlflow.logging import format_progress

    row = {"env_steps": 1000, "param_lag": 4.0, "param_lag_0": 1.0, "param_lag_1": 4.0, "param_lag_2": 2.0,
           "queue_depth": 63.0, "queue_depth_0": 30.0, "queue_depth_1": 33.0, "queue_depth_2": 0.0}
    line = format_progress(row)
    assert "param lag 4 (1/4/2)" in line and "queue 63 (30/33/0)" in line
    one = format_progress({"param_lag": 3.0, "param_lag_0": 3.0, "queue_depth": 5.0, "queue_depth_0": 5.0})
    assert one == "param lag 3 | queue 5"        # one actor: nothing to split


def test_tensorboard_purges_what_figures_csv_dropped(tmp_path, monkeypatch):
    """A resumed run's TensorBoard showed the abandoned points past its checkpoint beside the new
    ones (learner steps at one env step twice); a fresh run into a used log_dir showed two runs as
    one series, while figures.csv was silently replaced."""
    tbx = pytest.importorskip("tensorboardX")
    made = []

    class Recorder:
        def __init__(self, logdir=None, purge_step=None, **kw):
            made.append(purge_step)

        def add_scalar(self, *a):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tbx, "SummaryWriter", Recorder)
    d = str(tmp_path)
    first = Logger(directory=d, progress_every=None)
    for step in (100, 200, 300):
        first.write({"env_steps": step, "x": 1.0})
    first.close()
    resumed = Logger(directory=d, progress_every=None, keep_rows_upto=200)    # a checkpoint at 200
    resumed.close()
    with pytest.warns(UserWarning, match="earlier run's figures"):
        Logger(directory=d, progress_every=None).close()                       # afresh, same dir
    assert made == [None, 201, 0]
