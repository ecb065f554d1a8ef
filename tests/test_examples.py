"""Examples run as a user runs them, with a tiny budget (learning is measured in benchmarks/)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytest.importorskip("torch", reason="the examples use PyTorch (pip install -e '.[torch]')")


@pytest.mark.slow
def test_dqn_example_runs_and_reports(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dqn.py"), "--total-steps", "1500", "--learning-starts", "200",
         "--eval-every", "1000", "--eval-episodes", "3", "--hidden", "32", "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final evaluation: mean return" in out.stdout
    assert "env steps" in out.stderr                      # live progress lines
    header = (tmp_path / "figures.csv").read_text().splitlines()[0]
    assert "env_steps" in header and "loss" in header


@pytest.mark.slow
def test_ppo_example_runs_and_reports(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ppo.py"), "--total-steps", "1024", "--epochs", "2",
         "--eval-every", "512", "--eval-episodes", "3", "--hidden", "16", "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final evaluation: mean return" in out.stdout
    assert "env steps" in out.stderr
    rows = (tmp_path / "figures.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "policy_loss" in header and "value_loss" in header
    # on-policy: every fragment is read once (Table.queue): one sample per insert, nothing left over
    last = dict(zip(header, rows[-1].split(",")))
    assert float(last["samples_per_insert"]) == 1.0
    # one learner step per rollout of 8 x 32 steps; the 4th closes with the last step and is emitted
    # by the adder at the next act (its bootstrap value comes then), after the run's last step
    assert float(last["learner_steps"]) == 3


@pytest.mark.slow
def test_sac_example_runs_and_reports(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sac.py"), "--total-steps", "600", "--learning-starts", "300",
         "--eval-every", "400", "--eval-episodes", "2", "--hidden", "16", "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final evaluation: mean return" in out.stdout
    rows = (tmp_path / "figures.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "q_loss" in header and "alpha" in header
    last = dict(zip(header, rows[-1].split(",")))
    assert float(last["env_steps"]) == 600 and float(last["learner_steps"]) > 0
