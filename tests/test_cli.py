"""The `rlflow` command, run as a user runs it: a subprocess on an experiment file."""

import importlib.metadata
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

EXPERIMENT_FILE = textwrap.dedent('''
    import numpy as np
    import rlflow as rf


    class RandomPolicy(rf.Policy):
        def __init__(self, spec):
            self.rng = np.random.default_rng(0)

        def act(self, obs):
            return self.rng.integers(0, 2, size=len(obs))


    class CountingLearner(rf.Learner):
        def __init__(self, spec):
            self.steps = 0

        def step(self, sample):
            self.steps += 1
            return {"batch": float(len(sample.keys))}

        def get_params(self):
            return [np.full(3, float(self.steps))]

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]


    def table(specs):
        return rf.Table(capacity=2_000, sampler=rf.selectors.Uniform(seed=0), remover=rf.selectors.Fifo(),
                        rate_limiter=rf.rate_limiters.MinSize(64), specs=specs)


    def experiment():
        return rf.Experiment(env="CartPole-v1", policy=RandomPolicy, learner=CountingLearner,
                             adder=rf.adders.Transition(discount=0.99), table=table, batch_size=16,
                             num_envs=2)


    ready = experiment()
    not_an_experiment = 42
''')


def rlflow_cmd(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "rlflow.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.fixture
def exp_file(tmp_path):
    path = tmp_path / "cli_exp_fixture.py"
    path.write_text(EXPERIMENT_FILE)
    return path


def test_console_script_points_at_the_cli():
    eps = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "rlflow"]
    assert eps, "the package declares no `rlflow` command"
    assert eps[0].value == "rlflow.cli:main"
    assert callable(eps[0].load())


@pytest.mark.parametrize("name", ["experiment", "ready", ""])
def test_run_a_file_locally(exp_file, tmp_path, name):
    target = f"{exp_file}:{name}" if name else str(exp_file)      # "" -> the default NAME, experiment
    out = rlflow_cmd("run", target, "--max-env-steps", "300", "--quiet", "--log-dir", str(tmp_path / "log"),
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "local: 300 env steps" in out.stdout, out.stdout
    assert "env_steps" in (tmp_path / "log" / "figures.csv").read_text().splitlines()[0]


def test_checkpoint_then_resume_from_the_command_line(exp_file, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = rlflow_cmd("run", str(exp_file), "--max-env-steps", "300", "--quiet", "--checkpoint-dir", str(ckpt),
                     "--checkpoint-every", "20", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "local: 300 env steps" in out.stdout and any(ckpt.iterdir())
    out = rlflow_cmd("run", str(exp_file), "--max-env-steps", "600", "--quiet", "--resume", str(ckpt),
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "local: 600 env steps" in out.stdout, out.stdout           # counters carried on from 300
    out = rlflow_cmd("run", str(exp_file), "--max-env-steps", "600", "--checkpoint-every", "20", cwd=tmp_path)
    assert out.returncode == 2 and "checkpoint_every" in out.stderr and "checkpoint_dir" in out.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_run_a_file_on_the_process_backend(exp_file, tmp_path):
    # the actor process is spawned: it must import the file's factories by the module name
    out = rlflow_cmd("run", f"{exp_file}:experiment", "--backend", "process", "--max-learner-steps", "50",
                     "--quiet", cwd=ROOT, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "process:" in out.stdout and " 50 learner steps" in out.stdout, out.stdout


@pytest.mark.parametrize("target, expected", [
    ("no_such_file.py:experiment", "no_such_file.py"),
    ("{file}:missing", "'missing'"),
    ("{file}:not_an_experiment", "int"),
    ("no_such_module_xyz:experiment", "no_such_module_xyz"),
    ("json:dumps", "a callable that takes no arguments, got dumps(obj"),
])
def test_bad_targets_are_clear_errors(exp_file, tmp_path, target, expected):
    out = rlflow_cmd("run", target.format(file=exp_file), "--max-env-steps", "10", cwd=tmp_path)
    assert out.returncode != 0
    assert expected in out.stderr, out.stderr[-2000:]
    assert "TARGET" in out.stderr and "Traceback" not in out.stderr


def test_bad_option_values_name_the_option(exp_file, tmp_path):
    out = rlflow_cmd("run", str(exp_file), "--max-env-steps", "-5", cwd=tmp_path)
    assert out.returncode == 2
    assert "--max-env-steps" in out.stderr and "-5" in out.stderr


def test_info_lists_versions(tmp_path):
    out = rlflow_cmd("info", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("rlflow ")
    assert "numpy" in out.stdout and "gymnasium" in out.stdout


def test_the_installed_command_imports_a_module_from_the_current_directory(exp_file, tmp_path):
    """`rlflow run MODULE:NAME` from the folder that holds MODULE, as `python -m` would find it (the
    console script's sys.path starts with its own bin folder, not the current one)."""
    script = pathlib.Path(sys.executable).parent / "rlflow"
    assert script.exists(), f"no rlflow command beside {sys.executable}"
    out = subprocess.run([str(script), "run", "cli_exp_fixture:experiment", "--max-env-steps", "100",
                          "--quiet"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "local: 100 env steps" in out.stdout, out.stdout


@pytest.mark.parametrize("args, expected", [
    (["run", ":experiment", "--max-env-steps", "10"], "got ':experiment'"),
    (["run", "{file}", "--max-env-steps", "1.5"], "--max-env-steps: expected an int > 0, got '1.5'"),
    (["run", "{file}", "--max-seconds", "nan"], "--max-seconds: expected a number > 0, got 'nan'"),
    (["run", "{file}", "--max-env-steps", "10", "--log-dir", "{file}"], "'log_dir'"),
    (["run", "{file}", "--max-env-steps", "10", "--checkpoint-dir", "{file}/ckpt"], "'checkpoint_dir'"),
])
def test_bad_command_lines_are_one_line_errors(exp_file, tmp_path, args, expected):
    out = rlflow_cmd(*[a.format(file=exp_file) for a in args], cwd=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert expected in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
