"""Examples run as a user runs them, with a tiny budget (learning is measured in benchmarks/)."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytest.importorskip("torch", reason="the examples use PyTorch (pip install -e '.[torch]')")


def run_example(name, log_dir, *options):
    """Runs examples/<name>.py as a user does (with --log-dir); checks it exits 0 and prints its
    final evaluation; returns (stderr, figures.csv header, figures.csv last row as a dict)."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *options, "--log-dir", str(log_dir)],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final evaluation: mean return" in out.stdout
    rows = (log_dir / "figures.csv").read_text().splitlines()
    header = rows[0].split(",")
    return out.stderr, header, dict(zip(header, rows[-1].split(",")))


@pytest.mark.slow
def test_dqn_example_runs_and_reports(tmp_path):
    err, header, _ = run_example("dqn", tmp_path, "--total-steps", "1500", "--learning-starts", "200",
                                 "--eval-every", "1000", "--eval-episodes", "3", "--hidden", "32")
    assert "env steps" in err                             # live progress lines
    assert "env_steps" in header and "loss" in header


@pytest.mark.slow
def test_ppo_example_runs_and_reports(tmp_path):
    err, header, last = run_example("ppo", tmp_path, "--total-steps", "1024", "--epochs", "2",
                                    "--eval-every", "512", "--eval-episodes", "3", "--hidden", "16")
    assert "env steps" in err
    assert "policy_loss" in header and "value_loss" in header
    # on-policy: every fragment is read once (Table.queue): one sample per insert, nothing left over
    assert float(last["samples_per_insert"]) == 1.0
    # one learner step per rollout of 8 x 32 steps; the 4th closes with the last step and is emitted
    # by the adder at the next act (its bootstrap value comes then), after the run's last step
    assert float(last["learner_steps"]) == 3


@pytest.mark.slow
def test_sac_example_runs_and_reports(tmp_path):
    _, header, last = run_example("sac", tmp_path, "--total-steps", "600", "--learning-starts", "300",
                                  "--eval-every", "400", "--eval-episodes", "2", "--hidden", "16")
    assert "q_loss" in header and "alpha" in header
    assert float(last["env_steps"]) == 600 and float(last["learner_steps"]) > 0


def test_dqn_epsilon_follows_the_learner_so_a_resume_carries_it_on():
    """The example's epsilon was a count kept in the policy: a resumed run (or a restarted actor)
    explored from 1.0 again. It follows the learner's published steps now."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import dqn
    finally:
        sys.path.remove(str(ROOT / "examples"))
    import rlflow as rf

    spec = rf.envs.make("CartPole-v1", 1).spec
    args = dqn.Args(hidden=8, eps_steps=2_000, learning_starts=1_000, batch_size=64, samples_per_insert=32.0)
    policy = dqn.EpsilonGreedy(spec, args)
    assert policy.epsilon() == 1.0
    policy.act(np.zeros((4, 4), np.float32))                 # warm-up: the actor's own count
    assert policy.epsilon() == pytest.approx(1.0 - 0.96 * 4 / 2_000)
    learner = dqn.DQN(spec, args)
    saved = dict(learner.state_dict(), steps=250)           # a checkpoint at 250 learner steps
    resumed = dqn.DQN(spec, args)
    resumed.load_state_dict(saved)
    fresh = dqn.EpsilonGreedy(spec, args)                   # the resumed run's new policy
    fresh.set_params(resumed.get_params())
    assert fresh.epsilon() == pytest.approx(1.0 - 0.96 * (1_000 + 250 * 2) / 2_000)
    fresh.set_params(dict(resumed.get_params(), learner_steps=np.array([600])))
    assert fresh.epsilon() == pytest.approx(0.04)
