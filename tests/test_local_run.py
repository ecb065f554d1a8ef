"""The local runtime: deterministic for a seed, rate-limited learning, clear errors."""

import time

import gymnasium as gym
import numpy as np
import pytest

import rlflow as rf
from rlflow.errors import UsageError


class LinearQPolicy(rf.Policy):
    """Epsilon-greedy over a linear Q function, numpy only (uses the global numpy RNG, which the
    runtime seeds)."""

    def __init__(self, spec):
        self.w = np.zeros((int(np.prod(spec.observation.shape)), int(spec.action_space.n)), np.float32)

    def act(self, obs):
        greedy = np.argmax(obs @ self.w, axis=1)
        explore = np.random.random(len(obs)) < 0.2
        return np.where(explore, np.random.randint(self.w.shape[1], size=len(obs)), greedy)

    def set_params(self, params):
        self.w = params[0].copy()


class LinearQLearner(rf.Learner):
    def __init__(self, spec):
        self.w = np.zeros((int(np.prod(spec.observation.shape)), int(spec.action_space.n)), np.float32)
        self.steps = 0
        self.seen = []

    def step(self, batch):
        obs, a = batch["obs"], batch["action"]
        target = batch["reward"] + batch["discount"] * (batch["next_obs"] @ self.w).max(1)
        q = (obs @ self.w)[np.arange(len(a)), a]
        err = target - q
        for i in range(len(a)):
            self.w[:, a[i]] += 0.01 * err[i] * obs[i]
        self.steps += 1
        self.seen.append(batch.keys.copy())
        return {"loss": float(np.mean(err ** 2))}

    def get_params(self):
        return [self.w]


def uniform_table(specs):
    return rf.Table(capacity=500, sampler=rf.selectors.Uniform(), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.SampleToInsertRatio(
                        samples_per_insert=4.0, min_size_to_sample=64, error_buffer=64.0), specs=specs)


def experiment(seed=0, table=uniform_table, num_envs=4):
    return rf.Experiment(env="CartPole-v1", policy=LinearQPolicy, learner=LinearQLearner,
                         adder=rf.adders.Transition(discount=0.99), table=table, batch_size=16,
                         num_envs=num_envs, warmup_steps=100, seed=seed)


def snapshot(tmp_path, table, name):
    d = tmp_path / name
    table.save(str(d))
    return {p.name: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_same_table_contents(tmp_path):
    a = rf.run(experiment(seed=3), max_env_steps=1_500, progress=False)
    b = rf.run(experiment(seed=3), max_env_steps=1_500, progress=False)
    c = rf.run(experiment(seed=4), max_env_steps=1_500, progress=False)
    assert a.figures["env_steps"] == b.figures["env_steps"] >= 1_500
    sa, sb, sc = (snapshot(tmp_path, r.table, n) for r, n in ((a, "a"), (b, "b"), (c, "c")))
    assert sa == sb
    assert sa != sc
    assert np.array_equal(a.learner.w, b.learner.w)
    assert all(np.array_equal(x, y) for x, y in zip(a.learner.seen, b.learner.seen))


def test_samples_per_insert_follows_the_rate_limiter():
    r = rf.run(experiment(), max_env_steps=2_000, progress=False)
    stats = r.table.stats()
    # SampleToInsertRatio(4, min_size 64, error_buffer 64): samples stay within the buffer of
    # 4 * (inserts - 64)
    expected = 4.0 * (stats["inserts"] - 64)
    assert abs(stats["samples"] - expected) <= 64 + 16
    assert r.figures["learner_steps"] == stats["samples"] // 16


def test_truncation_reaches_the_table_with_discount():
    # CartPole truncates at 500 steps; with a short TimeLimit many episodes are cut, not ended.
    import gymnasium as gym

    def short():
        return gym.wrappers.TimeLimit(gym.make("CartPole-v1").unwrapped, max_episode_steps=5)

    def table(specs):
        return rf.Table(capacity=1_000, rate_limiter=rf.rate_limiters.MinSize(64), specs=specs)

    exp = experiment(table=table)
    exp.env = short
    r = rf.run(exp, max_env_steps=400, progress=False)
    s = r.table.sample(len(r.table), timeout=1.0)
    assert np.any(s["discount"] == np.float32(0.99))      # truncated and ordinary steps bootstrap
    terminal = s["discount"] == 0
    # every item with discount 0 ends in a terminal CartPole state (pole down or cart out)
    x, theta = s["next_obs"][terminal, 0], s["next_obs"][terminal, 2]
    assert np.all((np.abs(x) > 2.4) | (np.abs(theta) > 0.2095))


def test_a_deadlocking_limiter_is_reported():
    def queue_table(specs):
        return rf.Table(capacity=8, sampler=rf.selectors.Fifo(), remover=rf.selectors.Fifo(),
                        rate_limiter=rf.rate_limiters.Queue(8), max_times_sampled=1, specs=specs)

    exp = experiment(table=queue_table, num_envs=4)
    exp.batch_size = 16                     # a queue of 8 can never hold a batch of 16: said up front
    with pytest.raises(UsageError, match=r"local run: a sample of 16 items is more than the table's "
                                         r"capacity \(8\) \(the experiment's batch_size\)"):
        rf.run(exp, max_env_steps=1_000, progress=False)


def test_more_items_at_once_than_the_table_holds_is_an_error_not_a_hang():
    """16 envs hand over 16 transitions a step; a table of 8 can never take them: said naming the
    capacity and the adder's batch, not a wait for room that never comes."""
    def small_table(specs):
        return rf.Table(capacity=8, specs=specs)

    exp = experiment(table=small_table, num_envs=16)
    exp.batch_size = 4
    with pytest.raises(UsageError, match=r"local run: an insert of 16 items is more than the table's "
                                         r"capacity \(8\); the adder handed over 16 items at once"):
        rf.run(exp, max_env_steps=1_000, progress=False)


def test_run_needs_a_limit():
    with pytest.raises(UsageError, match="max_env_steps"):
        rf.run(experiment())
    with pytest.raises(UsageError, match="backend"):
        rf.run(experiment(), backend="threads", max_env_steps=10)


def test_unknown_backend_options_are_named():
    with pytest.raises(UsageError, match="start_method"):
        rf.run(experiment(), backend="local", max_env_steps=10, start_method="fork")
    with pytest.raises(UsageError, match="prefetch_batches"):
        rf.run(experiment(), backend="process", max_env_steps=10, prefetch_batches=2)


@pytest.mark.parametrize("kwargs,field", [
    ({"max_env_steps": 0}, "max_env_steps"), ({"max_env_steps": -10}, "max_env_steps"),
    ({"max_learner_steps": -5}, "max_learner_steps"), ({"max_env_steps": 2.5}, "max_env_steps"),
    ({"max_seconds": -1}, "max_seconds"), ({"max_seconds": 0}, "max_seconds"),
    ({"max_seconds": "10"}, "max_seconds")])
@pytest.mark.parametrize("backend", ["local", "process"])
def test_bad_limits_are_refused_naming_the_field(backend, kwargs, field):
    with pytest.raises(UsageError, match=f"'{field}'.*got"):
        rf.run(experiment(), backend=backend, progress=False, **kwargs)


@pytest.mark.parametrize("field,value,expected", [
    ("param_sync_seconds", -1.0, ">= 0"), ("param_sync_seconds", "1", ">= 0"),
    ("env_backend", "bogus", "'serial', 'process' or 'pool'"), ("seed", "a", "an int"), ("seed", 1.5, "an int"), ("seed", -1, r"an int in \[0, 2\*\*62\]"),
    ("target_return", "475", "a number"), ("target_return", float("nan"), "a number"),
    ("eval_policy", 5, r"an rf.Policy or a factory"), ("policy", "greedy", r"an rf.Policy or a factory"),
    ("learner", 3.0, r"an rf.Learner or a factory")])
def test_bad_experiment_fields_are_refused_naming_the_field(field, value, expected):
    exp = experiment()
    kwargs = {f: getattr(exp, f) for f in ("env", "policy", "learner", "adder", "table")}
    kwargs.pop(field, None)
    if field == "target_return":
        kwargs["eval_every"] = 100
    with pytest.raises(UsageError, match=f"Experiment '{field}': expected .*{expected}.*got"):
        rf.Experiment(**kwargs, **{field: value})


class StepCounting(gym.Wrapper):
    """Counts the steps taken through it (a copy counts its own)."""

    def __init__(self, env):
        super().__init__(env)
        self.steps = 0

    def step(self, action):
        self.steps += 1
        return self.env.step(action)


def test_evaluations_do_not_step_an_env_given_as_an_instance():
    """An env instance is the acting vector env's env 0; the evaluations ran on it too (mid-episode:
    its episodes were cut short and their truncation never came). They get a copy now."""
    env = StepCounting(gym.make("CartPole-v1"))
    exp = experiment(num_envs=1)
    exp.env, exp.eval_every, exp.eval_episodes = env, 200, 3
    r = rf.run(exp, max_env_steps=1_000, progress=False)
    assert len(r.evals) >= 4
    assert env.steps == r.figures["env_steps"] == 1_000


class PullRecordingPolicy(LinearQPolicy):
    """Appends the time of every parameter set it is given to `log`."""

    log: list = []

    def set_params(self, params):
        super().set_params(params)
        PullRecordingPolicy.log.append(time.monotonic())


def test_param_sync_seconds_brings_newer_parameters_on_time():
    """param_sync_steps far beyond the run's learner steps: only the seconds rule can bring the
    actors new parameters; the learner publishes on time for it, every ~0.1 s."""
    PullRecordingPolicy.log = []
    exp = experiment()
    exp.policy = PullRecordingPolicy
    exp.param_sync_steps = 10**9
    exp.param_sync_seconds = 0.1
    r = rf.run(exp, max_seconds=1.2, progress=False)
    pulls = PullRecordingPolicy.log
    assert r.learner.steps > 100
    assert len(pulls) >= 6, f"{len(pulls)} parameter sets in 1.2 s"
    gaps = np.diff(pulls[1:])
    assert np.all(gaps >= 0.1 - 0.01), gaps


@pytest.mark.parametrize("backend", ["local", pytest.param("process", marks=pytest.mark.multiprocess)])
def test_a_table_given_as_an_object_without_specs_runs(backend):
    """Experiment.table may be a Table (not a factory) made without specs, as README's taste makes
    one: the runtime declares the adder's item specs on it and warms it up before the clock starts."""
    exp = experiment()
    exp.table = rf.Table(capacity=5_000, sampler=rf.selectors.Uniform(), remover=rf.selectors.Fifo(),
                         rate_limiter=rf.rate_limiters.MinSize(64))
    r = rf.run(exp, backend=backend, max_env_steps=600, progress=False)
    assert r.table is exp.table and len(r.table) > 0 and r.learner.steps > 0
    assert set(r.table.specs) == {"obs", "action", "reward", "discount", "next_obs"}


def test_local_rows_count_from_the_run_clock(tmp_path):
    """The last row (what figures.csv holds) and the final figures agree on the clock: wall time and
    rates count from when the actor starts acting, not from before the table's warm-up."""
    r = rf.run(experiment(), max_env_steps=2_000, progress=False, log_dir=str(tmp_path))
    last = r.history[-1]
    assert abs(last["wall_time"] - r.figures["wall_time"]) < 0.05
    assert last["env_steps"] == r.figures["env_steps"]


@pytest.mark.parametrize("backend", ["local", "process"])
@pytest.mark.parametrize("value", [-1, "x", 1.5])
def test_max_restarts_is_checked_on_every_backend(backend, value):
    with pytest.raises(UsageError, match="'max_restarts': expected an int >= 0"):
        rf.run(experiment(), backend=backend, max_env_steps=10, max_restarts=value, progress=False)


class MetricNamesLikeFigures(LinearQLearner):
    """Returns metrics named like run figures."""

    def step(self, batch):
        super().step(batch)
        return {"learner_steps": -1.0, "env_steps": -2.0, "param_lag": -3.0, "eval_seconds": -4.0,
                "param_lag_0": -5.0, "loss": 0.5}


@pytest.mark.parametrize("backend", ["local", pytest.param("process", marks=pytest.mark.multiprocess)])
def test_learner_metrics_never_hide_the_run_figures(backend):
    exp = experiment()
    exp.learner = MetricNamesLikeFigures
    r = rf.run(exp, backend=backend, max_learner_steps=200, progress=False)
    f = r.figures
    assert f["learner_steps"] == 200 and f["env_steps"] >= 100 and f["param_lag"] >= 0
    assert f["eval_seconds"] >= 0 and f["loss"] == 0.5
    assert (f["learner/learner_steps"], f["learner/env_steps"], f["learner/param_lag"],
            f["learner/eval_seconds"]) == (-1.0, -2.0, -3.0, -4.0)
    assert all(row["learner_steps"] >= 0 and row["env_steps"] >= 0 for row in r.history)
    assert f["learner/param_lag_0"] == -5.0        # a per-actor figure's name, on every backend


def test_progress_prints_a_line_for_every_row_with_a_log_dir(tmp_path, capsys):
    """The runtime decides when a row is due; the logger printed only some of them (its own clock,
    read after the CSV write, came out a few ms short of progress_every)."""
    r = rf.run(experiment(), max_seconds=2.0, progress=True, progress_every=0.1, log_dir=str(tmp_path))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("env steps")]
    assert len(r.history) >= 5 and len(lines) == len(r.history)


def test_param_lag_counts_learner_steps_behind_the_learner():
    """param_lag: learner steps between the learner's parameters and those the actor acts with
    (it read 0 whatever param_sync_steps was: lag behind the latest *published* version)."""
    exp = experiment()
    exp.param_sync_steps = 50
    r = rf.run(exp, max_learner_steps=1_000, progress=False, progress_every=0.01)
    lags = [(row["learner_steps"], row["param_lag"]) for row in r.history]
    # published every 50 steps; the actor pulls at its next step, and learning may cross one more 50
    assert all(lag in (steps % 50, steps % 50 + 50) for steps, lag in lags), lags
    assert any(lag > 0 for _, lag in lags)


def test_a_resumed_run_keeps_the_first_runs_rows_in_its_log_dir(tmp_path):
    import csv

    log, ck = str(tmp_path / "log"), str(tmp_path / "ck")
    rf.run(experiment(), max_env_steps=1_000, progress=False, progress_every=0.01, log_dir=log,
           checkpoint_dir=ck)
    with open(tmp_path / "log" / "figures.csv") as f:
        first = [float(row["env_steps"]) for row in csv.DictReader(f)]
    rf.run(experiment(), max_env_steps=2_000, progress=False, progress_every=0.01, log_dir=log, resume=ck)
    with open(tmp_path / "log" / "figures.csv") as f:
        both = [float(row["env_steps"]) for row in csv.DictReader(f)]
    assert len(first) > 2 and both[:len(first)] == first and both[-1] == 2_000
    assert all(a < b for a, b in zip(both, both[1:])), both


@pytest.mark.parametrize("backend", ["local", pytest.param("process", marks=pytest.mark.multiprocess)])
def test_an_unusable_checkpoint_dir_is_refused_before_the_run(tmp_path, backend):
    (tmp_path / "file").write_text("x")
    t = time.monotonic()
    with pytest.raises(UsageError, match="'checkpoint_dir'"):
        rf.run(experiment(), backend=backend, max_seconds=30, checkpoint_dir=str(tmp_path / "file" / "ck"),
               progress=False)
    assert time.monotonic() - t < 10


class CountingEpsilonPolicy(LinearQPolicy):
    def __init__(self, spec):
        super().__init__(spec)
        self.versions, self.acts = [], 0

    def act(self, obs):
        self.acts += 1
        return super().act(obs)

    def set_params(self, params):
        self.versions.append(float(params[0].sum()))
        super().set_params(params)


def test_evaluations_use_a_copy_of_an_acting_policy_given_as_an_object():
    """With eval_policy None and the policy an object, evaluations set the learner's parameters on
    the acting policy itself (past the policy delayer) and stepped its act() counter and RNG."""
    exp = experiment()
    probe = rf.envs.make("CartPole-v1", 4)
    exp.policy = policy = CountingEpsilonPolicy(probe.spec)
    probe.close()
    exp.param_sync_steps = 10**6               # the actor takes only the first parameters
    exp.eval_every, exp.eval_episodes = 200, 2
    rf.run(exp, max_env_steps=1_000, progress=False)
    assert len(policy.versions) == 1
    assert policy.acts == 1_000 // 4           # one act per vector step: none by the evaluations


@pytest.mark.parametrize("field, value", [("env_workers", 0), ("env_workers", "two"), ("batch_size", True),
                                          ("warmup_steps", True)])
def test_more_bad_experiment_fields(field, value):
    exp = experiment()
    kwargs = {f: getattr(exp, f) for f in ("env", "policy", "learner", "adder", "table")}
    with pytest.raises(UsageError, match=f"Experiment '{field}'"):
        rf.Experiment(**kwargs, **{field: value}, **({"env_backend": "process"} if field == "env_workers" else {}))
    with pytest.raises(UsageError, match="'env_workers': expected None with env_backend='serial'"):
        rf.Experiment(**kwargs, env_workers=2)


@pytest.mark.parametrize("value", ["x", -1.0, float("nan"), 0])
def test_progress_every_is_checked_up_front(value):
    with pytest.raises(UsageError, match="'progress_every'"):
        rf.run(experiment(), max_env_steps=100, progress_every=value)


class _SlowConsumer(rf.Learner):
    def step(self, batch):
        time.sleep(0.02)
        return {}


class _ZerosPolicy(rf.Policy):
    def act(self, obs):
        return np.zeros(len(obs), np.int64)


def test_max_seconds_holds_between_the_learner_steps_of_one_vector_step():
    """A high samples-per-insert ratio with many envs gives hundreds of learner steps per vector
    step; the local loop checked the clock only between vector steps (max_seconds=1 ran 9.8 s)."""
    def table(specs):
        return rf.Table(capacity=100_000, specs=specs,
                        rate_limiter=rf.rate_limiters.SampleToInsertRatio(32.0, 64, 32 * 256 + 64))

    exp = rf.Experiment(env="CartPole-v1", policy=_ZerosPolicy(), learner=_SlowConsumer(),
                        adder=rf.adders.Transition(0.99), table=table, num_envs=256, batch_size=32)
    r = rf.run(exp, max_seconds=0.5, progress=False)
    assert r.figures["wall_time"] < 1.5, r.figures["wall_time"]
    assert r.figures["learner_steps"] > 0


def test_an_adder_used_by_hand_runs_as_a_fresh_one(tmp_path):
    """An adder fed a 4-env vector env by hand (as README's first example does), then given to an
    Experiment of 2 envs, failed the run with "add_first 'env_ids': expected 4 rows". The
    Experiment's adder is a template: the run starts from it as built (the same run, byte for byte)."""
    used = rf.adders.NStepTransition(n=3, discount=0.99)
    with rf.envs.make("CartPole-v1", num_envs=4) as venv:
        used.add_first(venv.reset(seed=0))
        used.add(np.zeros(4, np.int64), venv.step(np.zeros(4, np.int64)))

    def run(adder, name):
        exp = experiment(num_envs=2)
        exp.adder = adder
        rf.run(exp, max_env_steps=300, progress=False).table.save(str(tmp_path / name))
        return {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}

    assert run(used, "used") == run(rf.adders.NStepTransition(n=3, discount=0.99), "fresh")
