"""Runs whose actors step a pool-mode vector env (Experiment(env_backend="pool")): each step hands
back the env_batch_size envs that finished first, and every env's stream stays straight."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import rlflow as rf
from rlflow.errors import UsageError


class Tagged(gym.Env):
    """obs = [episode tag, t]: a tag drawn at each reset, so an item whose obs and next_obs come
    from two envs (or two episodes) shows. Episodes end after 3..9 steps, terminated or truncated."""

    observation_space = spaces.Box(0, 1e9, (2,), np.float64)
    action_space = spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.tag = float(self.np_random.integers(1, 10**9))
        self.length = int(self.np_random.integers(3, 10))
        self.t = 0
        return np.array([self.tag, 0.0]), {}

    def step(self, action):
        self.t += 1
        end = self.t >= self.length
        return np.array([self.tag, float(self.t)]), 1.0, end and self.length % 2 == 0, end and self.length % 2 == 1, {}


class Random(rf.Policy):
    def __init__(self, spec):
        self.rng = np.random.default_rng(0)

    def act(self, obs):
        return self.rng.integers(0, 2, len(obs))


class Nothing(rf.Learner):
    def __init__(self, spec):
        pass

    def step(self, batch):
        return {}


def big_table(specs):
    return rf.Table(capacity=100_000, sampler=rf.selectors.Uniform(seed=0), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.MinSize(1), specs=specs)


@pytest.mark.parametrize("backend", ["local", "process"])
def test_a_pool_env_backend_keeps_every_envs_stream_straight(backend):
    exp = rf.Experiment(env=Tagged, policy=Random, learner=Nothing, adder=rf.adders.Transition(discount=0.5),
                        table=big_table, batch_size=8, num_envs=8, env_backend="pool", env_batch_size=4,
                        env_workers=2, warmup_steps=50)
    r = rf.run(exp, backend=backend, max_env_steps=3_000, progress=False)
    assert r.figures["env_steps"] >= 3_000
    table = r.table
    n = len(table)
    # an item an env step, but for the steps still out in the pool when the run stopped (sent, their
    # results not handed back: at most num_envs - env_batch_size)
    assert 0 <= r.figures["env_steps"] - r.figures.get("items_in_flight", 0) - n <= 8 - 4
    data = table.sample(n, timeout=1.0).data if n else {}
    obs, nxt, disc = data["obs"], data["next_obs"], data["discount"]
    assert (obs[:, 0] == nxt[:, 0]).all()                       # one episode's obs and next_obs
    assert (nxt[:, 1] == obs[:, 1] + 1).all()                   # one step apart
    ends = nxt[:, 1] >= 3
    lengths = nxt[:, 1]
    # terminated (even lengths) at their last step: discount 0; truncated ones keep 0.5
    assert set(np.unique(disc).tolist()) <= {0.0, 0.5}
    assert (disc[disc == 0.0] == 0.0).all() and (lengths[disc == 0.0] % 2 == 0).all() and ends[disc == 0.0].all()


def test_env_batch_size_is_checked_with_the_backend():
    base = dict(env=Tagged, policy=Random, learner=Nothing, adder=rf.adders.Transition(0.99), table=big_table,
                num_envs=4)
    with pytest.raises(UsageError, match="'env_batch_size'.*\\[1, num_envs - 1 = 3\\].*got None"):
        rf.Experiment(**base, env_backend="pool")
    with pytest.raises(UsageError, match="'env_batch_size'.*got 4"):
        rf.Experiment(**base, env_backend="pool", env_batch_size=4)
    with pytest.raises(UsageError, match="'env_batch_size'.*None unless env_backend='pool'"):
        rf.Experiment(**base, env_backend="process", env_batch_size=2)
    with pytest.raises(UsageError, match="'env_backend'.*'pool'"):
        rf.Experiment(**base, env_backend="threads")
