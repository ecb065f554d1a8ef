"""Bad input across the public API: a UsageError / SpecError naming the argument, never a bare
TypeError / AttributeError / AssertionError from inside, and nothing silently accepted."""

import os

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
    (lambda: rate_limiters.MinSize("10"), "min_size_to_sample"),
    (lambda: rate_limiters.MinSize(True), "min_size_to_sample"),
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
