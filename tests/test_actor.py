"""The Actor's episode statistics against a per-row reference that counts every step by hand."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import rlflow as rf
from rlflow.actor import EpisodeStats
from rlflow.core import Step
from rlflow.errors import UsageError


def _reference_episodes(venv, steps, seed):
    """Per row: sum rewards and count steps from the reset on, in plain Python; the episodes that
    ended, in order, as (row, return, length), plus the Steps seen."""
    rng = np.random.default_rng(seed)
    step = venv.reset(seed=seed)
    ret = [0.0] * venv.num_envs
    length = [0] * venv.num_envs
    ended, seen = [], []
    for _ in range(steps):
        n = len(step)
        step = venv.step(rng.integers(2, size=n))
        seen.append(step)
        for i, r in enumerate(step.env_ids.tolist()):
            ret[r] += float(step.reward[i])
            length[r] += 1
            if step.terminated[i] or step.truncated[i]:
                ended.append((r, ret[r], length[r]))
                ret[r], length[r] = 0.0, 0
    return ended, seen


@pytest.mark.parametrize("backend,kw", [("serial", {}), ("process", {"workers": 2}),
                                        ("pool", {"workers": 2, "batch_size": 2}),
                                        ("pool", {"workers": 1, "batch_size": 2, "inline": True})])
def test_env_episode_totals_match_a_step_count(backend, kw):
    with rf.envs.make("CartPole-v1", 4, backend=backend, max_episode_steps=30, **kw) as venv:
        ended, seen = _reference_episodes(venv, 300, seed=3)
        got = []
        for s in seen:
            for i in np.flatnonzero(s.done):
                got.append((int(s.env_ids[i]), float(s.info["episode_return"][i]),
                            int(s.info["episode_length"][i])))
        assert len(ended) > 20
        assert got == ended


def test_episode_stats_from_env_totals_equal_summed_rewards():
    with rf.envs.make("CartPole-v1", 8, max_episode_steps=40) as venv:
        ended, seen = _reference_episodes(venv, 2000, seed=5)
    with_info, summed = EpisodeStats(window=7), EpisodeStats(window=7)
    with_info.reset(8)
    summed.reset(8)
    got = []
    for s in seen:
        bare = Step(s.obs, s.reward, s.terminated, s.truncated, s.final_obs, s.env_ids)   # no info
        a, b = with_info.update(s), summed.update(bare)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        got.extend(zip(a[0].tolist(), a[1].tolist(), a[2].tolist()))
        if summed.finished:
            assert with_info.mean_return() == pytest.approx(np.mean(summed.finished), abs=1e-9)
    assert got == ended
    assert with_info.episodes == summed.episodes == len(ended)
    assert list(with_info.finished) == [e[1] for e in ended[-7:]]


def test_actions_reach_the_adder_as_the_env_applied_them():
    """A greedy CartPole policy that returns bools (obs[:, 2] > 0): the vector env takes them as
    int64, and so does the adder (its items carry the actions the envs applied, in the spec's dtype)."""
    class Greedy(rf.Policy):
        def act(self, obs):
            return obs[:, 2] > 0

    venv = rf.envs.make("CartPole-v1", 3)
    adder = rf.adders.Transition(0.99)
    specs = adder.item_specs(venv.spec)
    got = []
    actor = rf.Actor(Greedy(), venv, adder, sink=got.append, seed=0)
    actor.reset()
    for _ in range(5):
        actor.step()
    venv.close()
    assert got and all(items["action"].dtype == specs["action"].dtype == np.int64 for items in got)


class _Lending:
    """A sink that lends buffers (reserve/commit/cancel), keeping what was written or handed over."""

    def __init__(self, specs):
        self.specs, self.got, self.commits = specs, [], 0

    def reserve(self, n):
        self.lent = {k: np.full((n,) + s.shape, -7, s.dtype) for k, s in self.specs.items()}
        return self.lent

    def commit(self, n):
        self.got.append(self.lent)
        self.commits += 1

    def cancel(self):
        raise AssertionError("no write failed")

    def __call__(self, items):
        self.got.append(items)


def test_a_sink_that_lends_buffers_gets_the_items_a_plain_sink_gets():
    """A sink with reserve/commit (a process actor's ring) takes the Transition adder's items
    straight into its buffers: the same items, in the same order, as a sink handed item arrays,
    through terminations, truncations and a warm-up."""
    class Random(rf.Policy):
        def __init__(self):
            self.rng = np.random.default_rng(1)

        def act(self, obs):
            return self.rng.integers(2, size=len(obs))

    runs = []
    for lend in (False, True):
        venv = rf.envs.make("CartPole-v1", 5, max_episode_steps=25)
        adder = rf.adders.Transition(0.99)
        sink = _Lending(adder.item_specs(venv.spec)) if lend else []
        actor = rf.Actor(Random(), venv, adder, sink=sink if lend else sink.append, warmup_steps=40, seed=3)
        actor.reset()
        for _ in range(200):
            actor.step()
        venv.close()
        got = sink.got if lend else sink
        runs.append(({k: np.concatenate([g[k] for g in got]) for k in got[0]}, actor.items_added))
        if lend:
            assert sink.commits >= 190
    (plain, n_plain), (lent, n_lent) = runs
    assert n_plain == n_lent == len(plain["obs"]) == 5 * 200
    for k in plain:
        assert lent[k].dtype == plain[k].dtype
        np.testing.assert_array_equal(lent[k], plain[k], err_msg=k)
    assert (plain["discount"] == 0).any()          # terminations were among them


class _ZeroPolicy(rf.Policy):
    def act(self, obs):
        return np.zeros(len(obs), np.int64)


class _TenfoldRewards(rf.adders.Transition):
    def add(self, actions, step, extras=None):
        items = super().add(actions, step, extras)
        if items:
            items["reward"] = items["reward"] * 10
        return items


class _WithStepCount(rf.adders.Transition):
    def _item_fields(self):
        return {**super()._item_fields(), "k": rf.specs.ArraySpec((), np.int64)}

    def _full_add(self, *args):
        items = super()._full_add(*args)
        if items is not None:
            items["k"] = np.full(len(items["obs"]), 5, np.int64)
        return items

    def add(self, actions, step, extras=None):
        items = super().add(actions, step, extras)
        if "k" not in items:
            items["k"] = np.full(len(items["obs"]), 5, np.int64)
        return items


@pytest.mark.parametrize("make_adder", [_TenfoldRewards, _WithStepCount])
def test_an_adder_subclass_that_makes_its_items_otherwise_is_fed_through_add(make_adder):
    """A Transition subclass with its own add / fields: a lending sink gets its items, not the
    ones the base class would write into the buffers."""
    venv = rf.envs.make("CartPole-v1", 3)
    adder = make_adder(0.99)
    sink = _Lending(adder.item_specs(venv.spec))
    actor = rf.Actor(_ZeroPolicy(), venv, adder, sink=sink)
    actor.reset()
    for _ in range(20):
        actor.step()
    venv.close()
    assert sink.commits == 0 and len(sink.got) == 20
    if make_adder is _TenfoldRewards:
        assert all((g["reward"] == 10.0).all() for g in sink.got)
    else:
        assert all((g["k"] == 5).all() for g in sink.got)


def test_replacing_the_actors_sink_or_adder_takes_effect_at_the_next_step():
    venv = rf.envs.make("CartPole-v1", 3)
    adder = rf.adders.Transition(0.99)
    lending = _Lending(adder.item_specs(venv.spec))
    actor = rf.Actor(_ZeroPolicy(), venv, adder, sink=lending)
    actor.reset()
    for _ in range(5):
        actor.step()
    assert lending.commits >= 3
    plain, lent = [], lending.commits
    actor.sink = plain.append                   # a plain callable now: handed item arrays
    for _ in range(5):
        actor.step()
    assert len(plain) == 5 and lending.commits == lent
    other = rf.adders.Transition(0.5)
    other.item_specs(venv.spec)
    actor.adder = other
    actor.reset()
    actor.sink = lending
    before = lending.commits
    for _ in range(5):
        actor.step()
    venv.close()
    assert lending.commits > before
    assert all(np.isin(g["discount"], [0.0, 0.5]).all() for g in lending.got[-3:])    # the new adder's


@pytest.mark.parametrize("episodes", [2.5, None, "3", True, 0])
def test_evaluate_checks_episodes(episodes):
    with rf.envs.make("CartPole-v1", 2) as venv:
        with pytest.raises(UsageError, match="'episodes': expected an int >= 1"):
            rf.evaluate(RandomPolicyForEval(), venv, episodes)


class RandomPolicyForEval(rf.Policy):
    def act(self, obs):
        return np.zeros(len(obs), np.int64)


def _small_table(specs):
    return rf.Table(capacity=1_000, sampler=rf.selectors.Uniform(), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.MinSize(8), specs=specs)


def _learner_with(params):
    """A learner class that learns nothing and publishes `params`."""
    class Learner(rf.Learner):
        def step(self, batch):
            return {}

        def get_params(self):
            return params

    return Learner


def test_an_uncopyable_policy_probed_for_its_extras_is_a_warning():
    """The extras probe calls a copy of the policy; one that cannot be copied is called itself,
    before the run, which a recurrent policy's first stored state shows: that is now said."""
    import threading

    class Locked(rf.Policy):
        def __init__(self, spec):
            self.lock = threading.Lock()

        def act(self, obs):
            return np.zeros(len(obs), np.int64), {"v": np.zeros(len(obs), np.float32)}

    table = _small_table
    Learner = _learner_with(None)

    with rf.envs.make("CartPole-v1", 2) as venv:
        policy = Locked(venv.spec)
    exp = rf.Experiment(env="CartPole-v1", policy=policy, learner=lambda spec: Learner(),
                        adder=rf.adders.Transition(0.99), table=table, num_envs=2, batch_size=4)
    with pytest.warns(RuntimeWarning, match="cannot be copied.*extras_specs"):
        rf.run(exp, max_env_steps=20, progress=False)


@pytest.mark.parametrize("space", [
    spaces.Box(np.array([2.0, -np.inf], np.float32), np.array([np.inf, -2.0], np.float32)),   # one bound each
    spaces.Box(np.array([0.5, -np.inf]), np.array([np.inf, np.inf]), dtype=np.float64),
    spaces.Box(-np.finfo(np.float64).max, np.finfo(np.float64).max, (2,), np.float64),         # high - low = inf
    spaces.Box(-1.0, 1.0, (3,), np.float32),
    spaces.Box(0, 1, (3,), bool),
    spaces.Box(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (2,), np.int64),
    spaces.Box(0, np.iinfo(np.uint64).max, (2,), np.uint64),
])
def test_random_warm_up_actions_lie_in_any_box(space):
    """A Box bounded on one side only gave uniform(low, 1) with low >= 1 (numpy's 'high - low < 0'),
    the float64 range gave OverflowError, and a bool Box was True almost always. Now each element is
    drawn as gymnasium's Box.sample draws it, and every action lies in the space."""
    from rlflow.actor import random_actions

    a = random_actions(space, 4000, np.random.default_rng(0))
    assert a.shape == (4000,) + space.shape and a.dtype == space.dtype
    assert all(space.contains(x) for x in a)
    low = np.broadcast_to(space.low, space.shape).astype(np.float64)
    high = np.broadcast_to(space.high, space.shape).astype(np.float64)
    with np.errstate(over="ignore"):
        mean = a.astype(np.float64).mean(axis=0)
    for j in range(space.shape[0]):
        lo, hi = low[j], high[j]
        if np.isfinite(lo) and np.isfinite(hi) and hi < 1e6 and lo > -1e6:                    # uniform
            assert abs(mean[j] - (lo + hi) / 2) < 0.05 * (hi - lo) + 0.05
        elif np.isfinite(lo) and not np.isfinite(hi):                                  # low + Exp(1)
            assert abs(mean[j] - (lo + 1.0)) < 0.1
        elif np.isfinite(hi) and not np.isfinite(lo):                                  # high - Exp(1)
            assert abs(mean[j] - (hi - 1.0)) < 0.1


def test_warm_up_on_a_half_bounded_box_runs():
    class Pusher(gym.Env):
        observation_space = spaces.Box(-1, 1, (1,), np.float32)
        action_space = spaces.Box(np.array([2.0, -np.inf], np.float32), np.array([np.inf, -2.0], np.float32))

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(1, np.float32), {}

        def step(self, action):
            assert self.action_space.contains(action), action
            return np.zeros(1, np.float32), 0.0, False, False, {}

    class Fixed(rf.Policy):
        def __init__(self, spec):
            pass

        def act(self, obs):
            return np.tile(np.array([3.0, -3.0], np.float32), (len(obs), 1))

    class Nothing(rf.Learner):
        def __init__(self, spec):
            pass

        def step(self, batch):
            return {}

    exp = rf.Experiment(env=Pusher, policy=Fixed, learner=Nothing, adder=rf.adders.Transition(0.99),
                        table=lambda specs: rf.Table(100, specs=specs), batch_size=4, warmup_steps=20)
    r = rf.run(exp, backend="local", max_env_steps=40, progress=False)
    assert r.figures["env_steps"] == 40


def test_extras_that_are_not_a_dict_are_named():
    class Bad(rf.Policy):
        def act(self, obs):
            return np.zeros(len(obs), np.int64), 5

    venv = rf.envs.make("CartPole-v1", num_envs=2)
    actor = rf.actor.Actor(Bad(), venv, rf.adders.Transition(0.9))
    with pytest.raises(UsageError, match=r"policy output 'extras': expected a dict .*got int 5"):
        actor.step()
    venv.close()


class NeedsParamsPolicy(rf.Policy):
    """Acts only once it has parameters."""

    def __init__(self, spec):
        self.w = None

    def act(self, obs):
        if self.w is None:
            raise RuntimeError("act before set_params")
        return np.zeros(len(obs), np.int64)

    def set_params(self, params):
        self.w = params


class NeedsParamsPolicyWithSpecs(NeedsParamsPolicy):
    def extras_specs(self, env_spec):
        return {}


def test_the_extras_probe_before_any_parameters_says_so_and_extras_specs_skips_it():
    """A policy that cannot act before set_params failed at start-up with its own error, in a
    call nothing had mentioned: the error now says what the call was and how to skip it."""
    table = _small_table
    Learner = _learner_with([np.ones(2, np.float32)])

    def exp(policy):
        return rf.Experiment(env="CartPole-v1", policy=policy, learner=lambda spec: Learner(),
                             adder=rf.adders.Transition(0.99), table=table, num_envs=2, batch_size=4)

    with pytest.raises(RuntimeError, match="act before set_params") as info:
        rf.run(exp(NeedsParamsPolicy), max_env_steps=20, progress=False)
    assert any("before any parameters were set" in n and "extras_specs(env_spec)" in n
               for n in getattr(info.value, "__notes__", []))
    r = rf.run(exp(NeedsParamsPolicyWithSpecs), max_env_steps=20, progress=False)
    assert r.figures["env_steps"] >= 20
