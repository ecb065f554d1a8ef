"""Bad input across the public API: a UsageError / SpecError naming the argument, never a bare
TypeError / AttributeError / AssertionError from inside, and nothing silently accepted."""

import os

import gymnasium as gym
import numpy as np
import pytest

import rlflow as rf
from rlflow.errors import SpecError, UsageError
from rlflow.replay import Table, importance_weights, rate_limiters, selectors


@pytest.mark.parametrize("make,field", [
    (lambda: rf.adders.Transition(discount=None), "discount"),
    (lambda: rf.adders.NStepTransition(3, discount="0.9"), "discount"),
    (lambda: rf.adders.Sequence(4, 2, discount=None), "discount"),
    (lambda: rf.adders.Episode(10, discount=[0.9]), "discount"),
    (lambda: rf.adders.Rollout(8, 0.99, gae_lambda=None), "gae_lambda"),
    (lambda: selectors.Prioritized(alpha=None), "alpha"),
    (lambda: selectors.Prioritized(alpha="0.5"), "alpha"),
    (lambda: selectors.Prioritized(alpha=True), "alpha"),
    (lambda: selectors.Uniform(seed="x"), "seed"),
    (lambda: selectors.Uniform(seed=1.5), "seed"),
    (lambda: selectors.Prioritized(seed=-1), "seed"),
    (lambda: rate_limiters.MinSize("10"), "min_size"),
    (lambda: rate_limiters.MinSize(True), "min_size"),
    (lambda: rate_limiters.SampleToInsertRatio("2", 5), "samples_per_insert"),
    (lambda: Table(4).can_sample(-1), "'n'"),
    (lambda: Table(4).can_insert(None), "'n'"),
    (lambda: Table(4).can_sample(3.0), "'n'"),
    (lambda: Table.load(3), "directory"),
    (lambda: rf.adders.Transition(0.9).add_first(None), "step"),
    (lambda: rf.adders.Transition(0.9).item_specs(None), "env_spec"),
    (lambda: rf.evaluate(None, rf.envs.make("CartPole-v1", 1), 2), "policy"),
])
def test_bad_arguments_are_named(make, field):
    with pytest.raises(UsageError, match=field):
        make()


def test_numpy_scalars_are_accepted_where_numbers_go():
    rate_limiters.SampleToInsertRatio(np.float32(2.0), np.int64(5), np.float64(4.0))
    selectors.Uniform(seed=np.int64(3))
    selectors.Prioritized(alpha=np.float32(0.5), seed=np.random.default_rng(0))
    rf.adders.NStepTransition(np.int64(3), discount=np.float32(0.9))
    assert Table(4).can_insert(np.int64(2))


def test_a_numpy_seed_runs():
    """Experiment accepts numpy ints as seed; the run seeded Python's random with it and failed."""
    class P(rf.Policy):
        def act(self, obs):
            return np.zeros(len(obs), np.int64)

    class L(rf.Learner):
        def step(self, batch):
            return {}

    exp = rf.Experiment(env="CartPole-v1", policy=P(), learner=L(), adder=rf.adders.Transition(0.9),
                        table=lambda specs: Table(1000, specs=specs), batch_size=8, seed=np.int64(1))
    assert rf.run(exp, max_env_steps=50, progress=False).figures["env_steps"] >= 50


def test_save_never_replaces_what_is_not_a_table_checkpoint(tmp_path, monkeypatch):
    """Table.save moved its target aside and deleted it, whatever it was: save('') deleted the
    working directory's contents, save('notes.txt') a file."""
    t = Table(8)
    t.insert({"x": np.arange(3.0)})
    keep = tmp_path / "precious.txt"
    keep.write_text("mine")
    with pytest.raises(UsageError, match=r"Table.save 'directory'.*holding other files"):
        t.save(tmp_path)
    with pytest.raises(UsageError, match=r"Table.save 'directory'.*a file"):
        t.save(keep)
    sandbox = tmp_path / "sandbox"                  # save("") names the working directory
    sandbox.mkdir()
    (sandbox / "mine.txt").write_text("mine")
    monkeypatch.chdir(sandbox)
    with pytest.raises(UsageError, match=r"Table.save 'directory': expected a path"):
        t.save("")
    assert (sandbox / "mine.txt").read_text() == "mine"
    assert keep.read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    t.save(empty)                                   # an empty directory is fine
    t.insert({"x": np.arange(2.0)})
    t.save(empty)                                   # and so is replacing a table checkpoint
    assert len(Table.load(empty)) == 5
    assert sorted(os.listdir(tmp_path)) == ["empty", "precious.txt", "sandbox"]


@pytest.mark.parametrize("backend,kw", [("serial", {}),
                                        pytest.param("process", {"workers": 1}, marks=pytest.mark.multiprocess)])
def test_a_discrete_action_out_of_range_is_a_spec_error_and_the_env_goes_on(backend, kw):
    with rf.envs.make("CartPole-v1", 4, backend=backend, **kw) as venv:
        venv.reset(seed=0)
        with pytest.raises(SpecError, match=r"actions\[2\]': expected an action of Discrete\(2\) \(in \[0, 1\]\), got 5"):
            venv.step(np.array([0, 1, 5, 0]))
        with pytest.raises(SpecError, match=r"actions\[1\]': expected an action of Discrete\(2\) \(in \[0, 1\]\), got -1"):
            venv.step(np.array([0, -1, 1, 0]))                  # negative: not an index from the end
        assert len(venv.step(np.array([0, 1, 1, 0]))) == 4      # nothing was sent: it goes on


def test_clip_grad_norm_checks_max_norm():
    torch = pytest.importorskip("torch")
    from rlflow.torch_utils import clip_grad_norm

    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    for bad in (None, float("nan"), "1", 0, -1):
        with pytest.raises(UsageError, match="max_norm"):
            clip_grad_norm([w], bad)
    clip_grad_norm([w], np.float32(1.0))


class _LateBad(gym.Env):
    """Plays well for two steps, then returns `bad` for `field` (reward / terminated)."""
    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, field="reward", bad=None):
        self.field, self.bad, self.t = field, bad, 0

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        out = {"reward": 1.0, "terminated": False}
        if self.t == 3:
            out[self.field] = self.bad
        return np.zeros(2, np.float32), out["reward"], out["terminated"], False, {}


@pytest.mark.parametrize("backend", ["serial", "process"])
@pytest.mark.parametrize("field,bad", [("reward", None), ("terminated", "False"), ("terminated", 2),
                                       ("reward", np.array([1.0, 2.0])), ("terminated", np.array([True, False]))])
def test_bad_env_outputs_after_the_first_step_are_named(backend, field, bad):
    """Only the first step's reward and flags were checked: later a None reward became NaN and a
    "False" or 2 flag became True, ending the episode silently."""
    venv = rf.envs.make(lambda: _LateBad(field, bad), 2, backend=backend)
    venv.reset(seed=0)
    venv.step(np.zeros(2, np.int64))
    venv.step(np.zeros(2, np.int64))
    with pytest.raises((SpecError, rf.errors.WorkerError)) as info:
        venv.step(np.zeros(2, np.int64))
    text = str(info.value) + getattr(info.value, "remote_traceback", "")
    assert field in text and (repr(bad) in text or "shape (2,)" in text)
    venv.close()


def test_zero_one_int_flags_still_pass_after_the_first_step():
    venv = rf.envs.make(lambda: _LateBad("terminated", 1), 2)
    venv.reset(seed=0)
    for _ in range(2):
        venv.step(np.zeros(2, np.int64))
    assert venv.step(np.zeros(2, np.int64)).terminated.all()


class _OldApi(_LateBad):
    def step(self, action):
        return np.zeros(2, np.float32), 1.0, False, {}


class _OldReset(_LateBad):
    def reset(self, seed=None, options=None):
        return np.zeros(2, np.float32)


class _ListApi(_LateBad):
    """reset and step return lists: accepted, as before the old-API check."""

    def reset(self, seed=None, options=None):
        return [np.zeros(2, np.float32), {}]

    def step(self, action):
        return list(super().step(action))


def test_an_env_returning_lists_is_taken():
    venv = rf.envs.make(_ListApi, 2)
    venv.reset(seed=0)
    assert venv.step(np.zeros(2, np.int64)).reward.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("cls,what", [(_OldApi, "step()"), (_OldReset, "reset()")])
def test_an_old_gym_api_env_is_named(cls, what):
    venv = rf.envs.make(cls, 2)
    with pytest.raises(SpecError, match=r"Gymnasium API") as info:
        venv.reset(seed=0)
        venv.step(np.zeros(2, np.int64))
    assert what in str(info.value)


@pytest.mark.parametrize("backend", ["serial", "process"])
@pytest.mark.parametrize("space,good,bad", [
    (gym.spaces.MultiDiscrete([3, 4]), [2, 3], [1, 4]),
    (gym.spaces.MultiDiscrete([3, 4], start=[1, -1]), [3, 2], [0, 0]),
    (gym.spaces.MultiBinary(3), [1, 0, 1], [0, 2, 0]),
])
def test_multi_discrete_and_binary_actions_out_of_range_are_named(backend, space, good, bad):
    """Only Discrete actions were range-checked: an out-of-range MultiDiscrete action was the env's
    bare AssertionError (on the process backend a WorkerError that closed the vector env) and a
    MultiBinary 2 reached the env."""
    class E(_LateBad):
        action_space = space

    venv = rf.envs.make(E, 2, backend=backend)
    venv.reset(seed=0)
    venv.step(np.array([good, good], space.dtype))
    with pytest.raises(SpecError, match=r"actions\[1\]"):
        venv.step(np.array([good, bad], space.dtype))
    assert not venv.closed
    venv.step(np.array([good, good], space.dtype))          # still usable
    venv.close()


def test_make_closes_the_envs_it_built_when_their_spaces_are_refused():
    closed = []

    class Odd(_LateBad):
        def __init__(self, shape):
            super().__init__()
            self.observation_space = gym.spaces.Box(-1, 1, shape, np.float32)

        def close(self):
            closed.append(self)

    shapes = iter([(2,), (2,), (3,), (2,)])
    with pytest.raises(UsageError, match="env 2"):
        rf.envs.make(lambda: Odd(next(shapes)), 4)
    assert len(closed) == 4

    class Text(_LateBad):
        observation_space = gym.spaces.Text(5)

        def close(self):
            closed.append(self)

    closed.clear()
    for backend in ("serial", "process"):
        with pytest.raises(SpecError, match="Text"):
            rf.envs.make(Text, 2, backend=backend)
    assert len(closed) == 3          # serial: both envs; process: the probe (nothing else was built)


@pytest.mark.parametrize("make", [lambda: rf.adders.Transition(0.9), lambda: rf.adders.Sequence(1, 1),
                                  lambda: rf.adders.Episode(3)])
def test_adders_refuse_int_actions_that_would_wrap(make):
    """int64 actions 300 / -129 for an int8 action spec were stored as 44 / 127 (extras and
    observations were already refused)."""
    from rlflow.core import Step
    from rlflow.specs import EnvSpec

    def step():
        o = np.zeros((2, 3), np.float32)
        return Step(obs=o, reward=np.zeros(2, np.float32), terminated=np.ones(2, bool),
                    truncated=np.zeros(2, bool), final_obs=o, env_ids=np.arange(2))

    spec = EnvSpec.from_spaces(gym.spaces.Box(-1e3, 1e3, (3,), np.float32),
                               gym.spaces.Box(-100, 100, (), np.int8), 2)
    adder = make()
    adder.item_specs(spec)
    adder.add_first(step())
    with pytest.raises(SpecError, match=r"action.*int8.*300"):
        adder.add(np.array([300, -129], np.int64), step())
    adder = make()
    adder.item_specs(spec)
    adder.add_first(step())
    items = adder.add(np.array([100, -100], np.int64), step())        # values that fit are cast
    assert items["action"].dtype == np.int8 and {-100, 100} <= set(items["action"].ravel().tolist())


class _ZeroPolicy(rf.Policy):
    def act(self, obs):
        return np.zeros(len(obs), np.int64)


class _MetricsLearner(rf.Learner):
    """Returns `metrics` from every step."""
    metrics = None

    def step(self, batch):
        return self.metrics


def _metrics_run(metrics):
    learner = _MetricsLearner()
    learner.metrics = metrics
    exp = rf.Experiment(env="CartPole-v1", policy=_ZeroPolicy(), learner=learner, adder=rf.adders.Transition(0.9),
                        table=lambda specs: Table(1000, specs=specs), batch_size=8, warmup_steps=16)
    return rf.run(exp, max_env_steps=64, progress=False)


@pytest.mark.parametrize("metrics", [0.5, 0.0, (1.0, 2.0), "loss", np.array([1.0, 2.0]), [("loss", 1.0)]])
def test_learner_metrics_that_are_not_a_dict_are_named(metrics):
    """step() must return a dict (or None): a float was 'float object is not iterable', 0.0 passed
    (falsy), an array was numpy's ambiguous truth value."""
    with pytest.raises(UsageError, match=r"learner 'step\(\) result': expected a dict"):
        _metrics_run(metrics)


def test_learner_metrics_scalars_of_any_kind_are_figures():
    torch = pytest.importorskip("torch")
    w = torch.ones(1, requires_grad=True)
    import decimal
    import fractions

    from rlflow.runtime import common

    common._SKIPPED_METRICS.clear()
    with pytest.warns(RuntimeWarning) as seen:
        r = _metrics_run({"a": 1, "b": np.float32(2.5), "c": np.array([3.0]), "d": (w * 4).sum(),
                          "e": np.arange(3), "f": "text", "g": decimal.Decimal("1.5"), "h": fractions.Fraction(1, 4),
                          "i": np.timedelta64(3, "s"), "j": 10 ** 400})
    row = r.history[-1]
    assert (row["a"], row["b"], row["c"], row["d"], row["g"], row["h"]) == (1.0, 2.5, 3.0, 4.0, 1.5, 0.25)
    # the rest is left out, each named once (a huge int raised OverflowError out of the run)
    left_out = [str(w.message) for w in seen if "is not a real scalar" in str(w.message)]
    assert sorted(m.split("'")[1] for m in left_out) == ["e", "f", "i", "j"], left_out
    assert "learner metric 'e' (ndarray of shape (3,))" in " ".join(left_out)
    assert not {"e", "f", "i", "j"} & set(row)
    assert _metrics_run(None).figures["learner_steps"] > 0


def test_learner_metric_names_that_are_not_str_are_named():
    """{0: 1.0} crashed the first figures row with "'int' object has no attribute 'startswith'"."""
    with pytest.raises(UsageError, match=r"learner metrics 'name': expected a str.*got 0 \(int\)"):
        _metrics_run({"loss": 1.0, 0: 1.0})
    assert _metrics_run({np.str_("loss"): 2.0}).history[-1]["loss"] == 2.0      # str subclasses are names


def test_nested_data_or_specs_for_a_flat_table_point_at_flatten():
    """A dict given for a flat field read 'got shape ()'; nested specs did not say how to flatten."""
    t = Table(10, specs={"obs": rf.specs.ArraySpec((3,), np.float32)})
    with pytest.raises(SpecError, match=r"field 'obs'.*got a dict with keys \['a'\].*rf.specs.flatten"):
        t.insert({"obs": {"a": np.zeros((2, 3), np.float32)}})
    nested = rf.specs.from_space(gym.spaces.Dict({"a": gym.spaces.Box(0, 1, (2,))}))
    with pytest.raises(UsageError, match=r"spec 'obs'.*rf.specs.flatten"):
        Table(10, specs={"obs": nested})
    flat = Table(10, specs=rf.specs.flatten({"obs": nested}))
    flat.insert({"obs/a": np.zeros((1, 2), np.float32)})
    assert len(flat) == 1


def test_an_impossible_pool_experiment_names_its_own_fields():
    """One pool worker (no inline slice) returns all its envs at once, so no env_batch_size fits:
    the error named rf.envs.make's 'batch_size' and asked for a value that cannot exist."""
    exp = rf.Experiment(env="CartPole-v1", policy=_ZeroPolicy(), learner=_MetricsLearner(),
                        adder=rf.adders.Transition(0.9), table=lambda specs: Table(1000, specs=specs),
                        batch_size=8, num_envs=8, env_backend="pool", env_batch_size=4, env_workers=1)
    with pytest.raises(UsageError, match=r"Experiment env_workers .*'workers': expected at least 2 slices"):
        rf.run(exp, max_env_steps=16, progress=False)
