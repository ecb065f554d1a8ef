"""Serial vector env: the one stepping implementation, checked against single envs stepped by hand."""

import re

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from hypothesis import given, settings, strategies as st

import rlflow as rf
from rlflow.errors import ClosedError, SpecError, UsageError


class Scripted(gym.Env):
    """obs = [tag, episode, t, last action]; the episode length is drawn at reset from the seeded
    generator; even episodes terminate at their end, odd ones are truncated."""

    observation_space = spaces.Box(-1e9, 1e9, (4,), np.float32)
    action_space = spaces.Discrete(5)

    def __init__(self, tag=0, max_len=6):
        self.tag = tag
        self.max_len = max_len
        self.episode = -1

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        self.length = int(self.np_random.integers(1, self.max_len + 1))
        return self._obs(0), {}

    def _obs(self, a):
        return np.array([self.tag, self.episode, self.t, a], np.float32)

    def step(self, action):
        assert self.action_space.contains(action), action
        self.t += 1
        end = self.t >= self.length
        term = end and self.episode % 2 == 0
        trunc = end and not term
        return self._obs(int(action)), float(self.t + 10 * int(action)), term, trunc, {}


def reference(envs, seed, actions):
    """Step single envs by hand: list of per-step (obs, reward, term, trunc, final_obs)."""
    out = []
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)])
    for acts in actions:
        o, r, te, tr, fo = [], [], [], [], []
        for e, a in zip(envs, acts):
            x, rew, t1, t2, _ = e.step(int(a))
            fo.append(x)
            if t1 or t2:
                x = e.reset()[0]
            o.append(x), r.append(rew), te.append(t1), tr.append(t2)
        out.append((np.stack(o), np.array(r, np.float32), np.array(te), np.array(tr), np.stack(fo)))
    return obs, out


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 1000), steps=st.integers(1, 25), data=st.data())
def test_serial_matches_reference(n, seed, steps, data):
    actions = data.draw(st.lists(st.lists(st.integers(0, 4), min_size=n, max_size=n),
                                 min_size=steps, max_size=steps))
    ref_first, ref = reference([Scripted(i) for i in range(n)], seed, actions)
    tags = iter(range(n))
    with rf.envs.make(lambda: Scripted(next(tags)), n) as venv:
        step = venv.reset(seed=seed)
        np.testing.assert_array_equal(step.obs, ref_first)
        np.testing.assert_array_equal(step.final_obs, ref_first)
        assert not step.done.any() and (step.reward == 0).all()
        ret, length = np.zeros(n), np.zeros(n, np.int64)          # episode statistics, by hand
        for acts, (o, r, te, tr, fo) in zip(actions, ref):
            step = venv.step(np.array(acts))
            ret, length = ret + r, length + 1
            np.testing.assert_array_equal(step.info["episode_return"], ret.astype(np.float32))
            np.testing.assert_array_equal(step.info["episode_length"], length)
            ret[te | tr], length[te | tr] = 0, 0
            np.testing.assert_array_equal(step.obs, o)
            np.testing.assert_array_equal(step.reward, r)
            np.testing.assert_array_equal(step.terminated, te)
            np.testing.assert_array_equal(step.truncated, tr)
            np.testing.assert_array_equal(step.final_obs, fo)
            np.testing.assert_array_equal(step.env_ids, np.arange(n))
            assert step.reward.dtype == np.float32 and step.terminated.dtype == bool
            assert step.alive is None


def test_final_obs_on_termination_and_truncation():
    with rf.envs.make(lambda: Scripted(0, max_len=1), 1) as venv:
        venv.reset(seed=0)
        s = venv.step([3])                        # episode 0 ends at t=1: terminated
        assert s.terminated[0] and not s.truncated[0]
        np.testing.assert_array_equal(s.final_obs[0], [0, 0, 1, 3])   # true last obs
        np.testing.assert_array_equal(s.obs[0], [0, 1, 0, 0])         # next episode's first obs
        s = venv.step([2])                        # episode 1 ends: truncated
        assert s.truncated[0] and not s.terminated[0]
        np.testing.assert_array_equal(s.final_obs[0], [0, 1, 1, 2])
        np.testing.assert_array_equal(s.obs[0], [0, 2, 0, 0])
        assert s.info["episode_return"][0] == 21 and s.info["episode_length"][0] == 1


def test_time_limit_wrapper_truncates_with_final_obs():
    venv = rf.envs.make("CartPole-v1", 2, max_episode_steps=5)
    venv.reset(seed=1)
    for t in range(5):
        s = venv.step(np.zeros(2, np.int64))
    assert s.done.all()
    assert not np.array_equal(s.obs, s.final_obs)
    venv.close()


def test_same_seed_same_episodes():
    runs = []
    for _ in range(2):
        with rf.envs.make("CartPole-v1", 3) as venv:
            rng = np.random.default_rng(0)
            obs = [venv.reset(seed=7).obs]
            for _ in range(60):
                obs.append(venv.step(rng.integers(0, 2, 3)).obs)
            runs.append(np.stack(obs))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_dict_observations():
    class DictEnv(Scripted):
        observation_space = spaces.Dict({"a": spaces.Box(-1e9, 1e9, (4,), np.float32),
                                         "b": spaces.Discrete(3)})

        def _obs(self, a):
            return {"a": super()._obs(a), "b": self.t % 3}

    with rf.envs.make(DictEnv, 2) as venv:
        s = venv.reset(seed=0)
        assert set(s.obs) == {"a", "b"} and s.obs["a"].shape == (2, 4) and s.obs["b"].shape == (2,)
        s = venv.step([1, 1])
        np.testing.assert_array_equal(s.final_obs["b"], [1, 1])


def test_errors():
    venv = rf.envs.make("CartPole-v1", 2)
    venv.reset()
    with pytest.raises(SpecError, match="actions.*expected shape \\(2,\\).*got shape \\(3,\\)"):
        venv.step(np.zeros(3, np.int64))
    with pytest.raises(SpecError, match="actions.*dtype"):
        venv.step(np.zeros(2, np.float32))
    venv.close()
    assert venv.closed
    with pytest.raises(ClosedError):
        venv.step(np.zeros(2, np.int64))
    with pytest.raises(UsageError, match="backend"):
        rf.envs.make("CartPole-v1", 2, backend="threads")
    with pytest.raises(UsageError, match="num_envs"):
        rf.envs.make("CartPole-v1", 0)
    with pytest.raises(UsageError, match="env"):
        rf.envs.make(42, 1)


def test_env_instance_and_wrappers():
    env = gym.wrappers.RecordEpisodeStatistics(gym.make("CartPole-v1"))
    with rf.envs.make(env, 3) as venv:
        assert venv.envs[0] is env and venv.envs[1] is not env
        s = venv.reset(seed=0)
        assert s.obs.shape == (3, 4)
        venv.step(np.ones(3, np.int64))


def test_envs_made_from_an_id_leave_out_only_the_checking_wrappers():
    """Env 0 keeps gymnasium's full stack (env checker, order enforcer, TimeLimit); envs 1..N-1 leave
    the checkers out and their time limit to the vector env, and step exactly like fully wrapped
    envs: same seeds and actions, same rows, same time limit."""
    def stack(e):
        names = []
        while hasattr(e, "env"):
            names.append(type(e).__name__)
            e = e.env
        return names

    n, rng = 4, np.random.default_rng(3)
    with rf.envs.make("CartPole-v1", n, max_episode_steps=9) as venv:
        assert stack(venv.envs[0]) == ["TimeLimit", "OrderEnforcing", "PassiveEnvChecker"]
        assert all(stack(e) == [] and e.rlflow_time_limit == 9 == e.spec.max_episode_steps for e in venv.envs[1:])
        refs = [gym.make("CartPole-v1", max_episode_steps=9) for _ in range(n)]
        step = venv.reset(seed=5)
        expected = np.stack([e.reset(seed=5 + i)[0] for i, e in enumerate(refs)])
        np.testing.assert_array_equal(step.obs, expected)
        truncations = 0
        for _ in range(40):
            actions = rng.integers(0, 2, n)
            step = venv.step(actions)
            for i, (e, a) in enumerate(zip(refs, actions)):
                o, r, te, tr, _ = e.step(a)
                np.testing.assert_array_equal(step.final_obs[i], o)
                assert (step.reward[i], step.terminated[i], step.truncated[i]) == (r, te, tr)
                truncations += tr
                np.testing.assert_array_equal(step.obs[i], e.reset()[0] if te or tr else o)
        assert truncations > 0
    with rf.envs.make("CartPole-v1", 2, disable_env_checker=False) as venv:   # the user's word wins
        assert stack(venv.envs[1]) == ["PassiveEnvChecker"] and venv.envs[1].rlflow_time_limit == 500


@pytest.mark.parametrize("backend", ["serial", "process", "pool"])
def test_native_time_limits_truncate_exactly_as_the_time_limit_wrapper(backend):
    """Envs 1..N-1 of an id carry their time limit (no TimeLimit wrapper); the vector env truncates
    them at the same steps as gymnasium's wrapper, through terminations, autoresets and a new
    reset(seed), with env 0 (wrapped) beside them, in pool mode too (each env's rows checked as they
    come back). Random CartPole episodes last ~10-40 steps: with a limit of 15, truncations and
    terminations both come often."""
    n, limit = 8, 15
    refs = [gym.make("CartPole-v1", max_episode_steps=limit) for _ in range(n)]
    kw = {"serial": {}, "process": {"workers": 2}, "pool": {"workers": 2, "batch_size": 4}}[backend]
    with rf.envs.make("CartPole-v1", n, backend=backend, max_episode_steps=limit, **kw) as venv:
        rng = np.random.default_rng(0)
        counts = np.zeros(2, int)
        for seed in (1, 100):
            step = venv.reset(seed=seed)
            np.testing.assert_array_equal(step.obs, np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(refs)]))
            sent = {}                       # env id -> the action it was sent (pool: it returns later)
            for _ in range(80):
                actions = rng.integers(0, 2, len(step))
                sent.update(zip(step.env_ids.tolist(), actions.tolist()))
                step = venv.step(actions)
                for i, env_id in enumerate(step.env_ids.tolist()):
                    o, r, te, tr, _ = refs[env_id].step(sent.pop(env_id))
                    assert (step.reward[i], step.terminated[i], step.truncated[i]) == (r, te, tr), (env_id, seed)
                    np.testing.assert_array_equal(step.final_obs[i], o)
                    np.testing.assert_array_equal(step.obs[i], refs[env_id].reset()[0] if te or tr else o)
                    counts += (te, tr)
        assert counts.min() > 5, counts
    with rf.envs.make("CartPole-v1", 3, max_episode_steps=-1) as venv:      # -1: no time limit at all
        assert not any(hasattr(e, "rlflow_time_limit") for e in venv.envs)
        assert venv.envs[1].unwrapped is venv.envs[1]


VALUES = st.one_of(st.integers(-2**40, 2**40), st.integers(-3, 9).map(np.int64), st.integers(-3, 9).map(np.int32),
                   st.integers(0, 9).map(np.uint8), st.integers(-3, 9).map(lambda v: np.array(v)),
                   st.integers(-3, 9).map(lambda v: np.array([v])), st.floats(-3, 9), st.booleans().map(np.bool_),
                   st.just("1"), st.just(None))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 6), start=st.integers(-4, 4), dtype=st.sampled_from([np.int64, np.int32, np.int8]),
       x=VALUES)
def test_fast_discrete_answers_as_discrete(n, start, dtype, x):
    """The fast `contains` of lean envs' Discrete action spaces gives gymnasium's answer for every input."""
    from rlflow.envs.make import FastDiscrete, fast_discrete

    ref = spaces.Discrete(n, start=start, dtype=dtype)
    fast = spaces.Discrete(n, start=start, dtype=dtype)
    fast_discrete(fast)
    assert type(fast) is FastDiscrete and fast == ref and repr(fast) == repr(ref)
    assert fast.contains(x) == ref.contains(x)
    built = FastDiscrete(n, start=start, dtype=dtype)            # made directly, not converted
    assert built.contains(x) == ref.contains(x) and built == ref
    for v in range(start - 2, start + n + 2):                 # the space's own scalar type
        assert fast.contains(ref.dtype.type(v)) == ref.contains(ref.dtype.type(v)) == (start <= v < start + n)


def test_lean_envs_check_actions_fast_and_the_same():
    import copy
    import pickle

    from rlflow.envs.make import FastDiscrete

    with rf.envs.make("CartPole-v1", 3) as venv:
        assert type(venv.envs[0].unwrapped.action_space) is spaces.Discrete      # env 0: as gymnasium makes it
        for e in venv.envs[1:]:
            space = e.unwrapped.action_space
            assert type(space) is FastDiscrete and space == spaces.Discrete(2)
            for clone in (pickle.loads(pickle.dumps(space)), copy.deepcopy(space)):
                assert type(clone) is FastDiscrete and clone.contains(np.int64(1)) and not clone.contains(np.int64(2))
        venv.reset(seed=0)
        with pytest.raises(AssertionError):                    # an out-of-range action still fails the env's check
            venv.envs[1].step(np.int64(2))
    with rf.envs.make("Pendulum-v1", 2) as venv:               # other spaces are left alone
        assert type(venv.envs[1].unwrapped.action_space) is spaces.Box


class WrongShape(gym.Env):
    """A Box(4) env whose observations have the shape `shape` from env index `bad` on."""

    observation_space = spaces.Box(-1e9, 1e9, (4,), np.float32)
    action_space = spaces.MultiBinary(3)

    def __init__(self, shape=(4,), at="step", keep=None):
        self.shape, self.at, self.keep = shape, at, keep

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.full(self.shape if self.at == "reset" else (4,), 7, np.float32), {}

    def step(self, action):
        if self.keep is not None:
            self.keep.append(action)
        return np.full(self.shape, 7, np.float32), 0.0, False, False, {}


@pytest.mark.parametrize("shape", [(1,), (), (3,), (1, 4)])
@pytest.mark.parametrize("at", ["reset", "step"])
@pytest.mark.parametrize("which", ["all", "one"])
def test_observations_of_the_wrong_shape_are_an_error_never_broadcast(shape, at, which):
    fns = [(lambda s=shape: WrongShape(s, at)) if which == "all" or i == 2 else WrongShape for i in range(4)]
    from rlflow.envs.vector import SerialVectorEnv

    venv = SerialVectorEnv(fns)
    bad = 0 if which == "all" else 2
    with pytest.raises(SpecError, match=rf"env 'obs': expected shape \(4,\).*got shape {re.escape(str(shape))} "
                                        rf"from row {bad}") as info:
        venv.reset(seed=0)
        venv.step(np.zeros((4, 3), np.int8))
    assert getattr(info.value, "rlflow_env_index", None) == bad
    venv.close()


def test_int_actions_that_would_wrap_in_a_narrower_dtype_are_refused():
    kept = []
    with rf.envs.make(lambda: WrongShape(keep=kept), 1) as venv:
        venv.reset(seed=0)
        venv.step(np.array([[1, 0, 1]], np.int64))                # fits int8: cast
        assert kept[-1].dtype == np.int8 and kept[-1].tolist() == [1, 0, 1]
        with pytest.raises(SpecError, match=r"argument 'actions': expected dtype int8 \(values in "
                                            r"\[-128, 127\]\), got dtype int64 with values in \[0, 257\]"):
            venv.step(np.array([[1, 0, 257]], np.int64))
        assert len(kept) == 1


def test_a_step_after_an_env_raised_asks_for_a_reset():
    """An env that raises mid-step leaves the envs before it stepped and the others not: the next
    step says to reset (naming the env and the error) instead of going on from mixed states; a
    reset makes the vector env usable again."""
    class Faulty(Scripted):
        def step(self, action):
            if action == 4:
                raise ValueError("bad luck")
            return super().step(action)

    venv = rf.envs.make(lambda: Faulty(), num_envs=3)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="bad luck"):
        venv.step(np.array([0, 4, 0]))
    with pytest.raises(UsageError, match=r"reset\(\) after an env raised.*env 1's ValueError"):
        venv.step(np.array([0, 0, 0]))
    venv.reset(seed=0)
    assert venv.step(np.array([1, 1, 1])).reward.tolist() == [11.0, 11.0, 11.0]
    venv.close()


@pytest.mark.parametrize("backend", ["serial", pytest.param("process", marks=pytest.mark.multiprocess)])
def test_copies_of_an_instance_that_was_reset_play_their_own_episodes(backend):
    """A deep copy of an env reset already carried its seeded generator: N copies played N identical
    episodes. Each copy now draws its own."""
    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    venv = rf.envs.make(env, 4, backend=backend)
    try:
        obs = venv.reset().obs
        assert len({tuple(o) for o in obs.tolist()}) == 4, obs
    finally:
        venv.close()


class BadOutputs(Scripted):
    def __init__(self, what):
        super().__init__()
        self.what = what

    def step(self, action):
        obs, r, te, tr, info = super().step(action)
        if self.what == "reward None":
            r = None
        elif self.what == "flag str":
            te = "False"
        elif self.what == "reward (1,)" and self.t > 1:
            r = np.array([1.0])
        return obs, r, te, tr, info


@pytest.mark.parametrize("what, expected", [
    ("reward None", r"'reward': expected a real number, got None \(NoneType\) from env 1"),
    ("flag str", r"'terminated': expected a bool, got 'False' \(str\) from env 1"),
    ("reward (1,)", r"'reward': expected a real number, got array\(\[1.\]\) \(ndarray, shape \(1,\)\) from env 1")])
def test_env_outputs_that_are_not_numbers_or_flags_are_errors_naming_the_field(what, expected):
    """A None reward became NaN and a "False" flag True, silently; a (1,) reward was numpy's
    'setting an array element with a sequence'."""
    made = []

    def factory():                          # env 0 is fine, env 1 is not
        made.append(1)
        return Scripted() if len(made) == 1 else BadOutputs(what)

    venv = rf.envs.make(factory, 2)
    venv.reset(seed=0)
    with pytest.raises(SpecError, match=expected):
        for _ in range(3):
            venv.step(np.zeros(2, np.int64))



def test_a_dict_observation_without_a_key_names_it():
    class Missing(gym.Env):
        observation_space = spaces.Dict({"a": spaces.Box(-1, 1, (2,)), "b": spaces.Discrete(3)})
        action_space = spaces.Discrete(2)

        def reset(self, seed=None, options=None):
            return {"a": np.zeros(2, np.float32), "b": 0}, {}

        def step(self, action):
            return {"a": np.zeros(2, np.float32)}, 0.0, False, False, {}

    venv = rf.envs.make(Missing, 2)
    venv.reset(seed=0)
    with pytest.raises(SpecError, match=r"obs\['b'\]'.*without it"):
        venv.step(np.zeros(2, np.int64))


@pytest.mark.parametrize("kwargs, field", [({"workers": True}, "workers"), ({"inline": "yes"}, "inline"),
                                           ({"backend": "pool", "batch_size": 4}, "batch_size"),
                                           ({"seed": "x"}, "seed"), ({"seed": -1}, "seed"),
                                           ({"seed": 2**63 - 2}, "seed")])
def test_bad_make_arguments_name_the_argument(kwargs, field):
    kwargs = dict({"backend": "process"}, **kwargs)
    with pytest.raises(UsageError, match=f"'{field}'"):
        rf.envs.make("CartPole-v1", 4, **kwargs)


@pytest.mark.parametrize("seed", [-1, 2**63, np.uint64(2**63 + 1)])
def test_a_seed_out_of_range_is_the_same_error_on_every_backend(seed):
    for backend in ("serial", "process"):
        with rf.envs.make("CartPole-v1", 4, **({} if backend == "serial" else {"backend": backend})) as venv:
            with pytest.raises(UsageError, match="'seed': expected an int in"):
                venv.reset(seed=seed)
            venv.reset(seed=3)                  # still usable


class _Emits(gym.Env):
    """One observation leaf of `space`, returning `value` (as it is: any dtype) at every reset and step."""

    def __init__(self, space, value):
        self.observation_space = spaces.Dict({"x": space})
        self.action_space = spaces.Discrete(2)
        self.value = value

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return {"x": self.value}, {}

    def step(self, action):
        return {"x": self.value}, 0.0, False, False, {}


_U8 = spaces.Box(0, 255, (2,), np.uint8)
_I32 = spaces.Box(-10, 10, (2,), np.int32)
_F32 = spaces.Box(-np.inf, np.inf, (2,), np.float32)
_B = spaces.Box(0, 1, (2,), bool)


@pytest.mark.parametrize("space, value, why", [
    (_U8, np.array([300.7, 1.0]), "not integers"),          # was stored as 44
    (_U8, np.array([256, 1]), r"outside \[0, 255\]"),        # was 0
    (_I32, np.array([1e12, 0.0]), "outside"),                # was -2147483648
    (_B, np.array([7, 0]), "other than 0 and 1"),            # was True
    (_F32, np.array([1e300, 0.0]), "beyond"),                # was inf
    (_F32, [1e300, 0.0], "beyond"),                          # a list: was inf
    (_U8, [300, 1], r"outside \[0, 255\]"),                  # was numpy's OverflowError, naming nothing
    (_I32, [1.5, 0.0], "not integers"),                       # was 1
])
@pytest.mark.parametrize("backend", ["serial", "process"])
def test_observations_numpy_would_change_in_the_spaces_dtype_are_spec_errors(space, value, why, backend):
    """Observations were cast into the space's dtype by numpy's unsafe cast: silently wrapped,
    truncated or made True. Values that keep their value in it still pass (float 3.0 into uint8)."""
    kw = {} if backend == "serial" else {"workers": 1, "start_method": "fork"}
    with pytest.raises((SpecError, rf.errors.WorkerError), match=rf"obs\['x'\].*dtype.*{why}"):
        with rf.envs.make(lambda: _Emits(space, value), 2, backend=backend, **kw) as venv:
            venv.reset(seed=0)
            venv.step(np.zeros(2, np.int64))


@pytest.mark.parametrize("space, value", [
    (_U8, np.array([3.0, 255.0])), (_I32, np.array([-10, 10], np.int64)), (_B, np.array([1, 0])),
    (_F32, np.array([1e30, -2.5])), (_F32, np.array([1, 2], np.int64)), (_U8, [7, 8]),
])
def test_observations_that_keep_their_values_in_the_spaces_dtype_pass(space, value):
    with rf.envs.make(lambda: _Emits(space, value), 2) as venv:
        venv.reset(seed=0)
        step = venv.step(np.zeros(2, np.int64))
    assert step.obs["x"].dtype == space.dtype
    assert (step.obs["x"][1] == np.asarray(value).astype(space.dtype)).all()


def test_an_action_space_without_an_array_spec_is_named_as_the_action_space():
    """A Text action space was reported as "space 'Text'", the same words as a Text observation space."""
    class TextActions(gym.Env):
        observation_space = spaces.Box(0, 1, (2,), np.float32)
        action_space = spaces.Text(5)

    with pytest.raises(UsageError, match="'action_space'.*Text"):
        rf.envs.make(TextActions, 2)


class _Mixed(gym.Env):
    """Env 1 of two returns float64 1e300 where env 0 returns float32: one row the cast would change."""

    observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, index):
        self.index = index

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        obs = np.array([1e300, 0.0]) if self.index == 1 else np.zeros(2, np.float32)
        return obs, 0.0, False, False, {}


def test_a_lossy_row_among_good_rows_is_caught_and_named():
    """Only env 0's dtype was looked at: env 1's float64 1e300 went into the float32 row as inf."""
    venv = rf.envs.vector.SerialVectorEnv([lambda: _Mixed(0), lambda: _Mixed(1)])
    venv.reset(seed=0)
    with pytest.raises(SpecError, match=r"'obs'.*beyond.*from row 1(.|\n)*env 1"):
        venv.step(np.zeros(2, np.int64))
    venv.close()


@pytest.mark.parametrize("backend", ["serial", pytest.param("process", marks=pytest.mark.multiprocess),
                                     pytest.param("pool", marks=pytest.mark.multiprocess)])
def test_a_step_before_any_reset_or_after_a_failed_reset_asks_for_a_reset(backend):
    """No step of envs never reset (the env's own error, or a worker torn down, was all one got),
    and none after a reset that raised part-way (the serial backend had reset env 0 but not 2 and
    3, and stepped on from the mixed states)."""
    class FailingReset(Scripted):
        def reset(self, seed=None, options=None):
            if seed == 9:
                raise RuntimeError("reset refused")
            return super().reset(seed=seed, options=options)

    kw = {"batch_size": 2, "workers": 2} if backend == "pool" else {}
    venv = rf.envs.make(lambda: FailingReset(), num_envs=4, backend=backend, **kw)
    try:
        with pytest.raises(UsageError, match=r"reset.*before the first reset\(\)"):
            venv.step(np.zeros(4, np.int64))
        assert not venv.closed
        if backend == "serial":           # the process backends close themselves on an env's error
            with pytest.raises(RuntimeError, match="reset refused"):
                venv.reset(seed=8)        # env 1 gets seed 9
            with pytest.raises(UsageError, match=r"after a reset\(\) that raised"):
                venv.step(np.zeros(4, np.int64))
        step = venv.reset(seed=20)
        assert len(venv.step(np.zeros(len(step), np.int64))) == (2 if backend == "pool" else 4)
    finally:
        venv.close()


def test_dict_keys_that_join_into_one_leaf_name_are_an_error():
    """Leaves are stored under their keys joined with '/': {'a/b': ..., 'a': {'b': ...}} would share
    one array (a['b'] came back holding 'a/b''s values), so the space is refused, naming both."""
    class Slashed(gym.Env):
        observation_space = spaces.Dict({"a/b": spaces.Box(0, 9, (1,)),
                                         "a": spaces.Dict({"b": spaces.Box(0, 9, (1,))})})
        action_space = spaces.Discrete(2)

        def reset(self, seed=None, options=None):
            return {"a/b": np.ones(1, np.float32), "a": {"b": np.full(1, 2, np.float32)}}, {}

    with pytest.raises(SpecError, match=r"observation_space.*'obs/a/b'") as err:
        rf.envs.make(Slashed, num_envs=2)
    assert "('a/b',)" in str(err.value) and "('a', 'b')" in str(err.value)


class _DiscreteOf(gym.Env):
    """A one-step env whose Discrete action space is given (n, start, dtype)."""

    observation_space = spaces.Box(-1, 1, (2,), np.float32)

    def __init__(self, n=2, start=0, dtype=np.int64):
        self.action_space = spaces.Discrete(n, start=start, dtype=dtype)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, False, False, {}


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 6), start=st.sampled_from([0, 0, 0, -2, 3]),
       space_dtype=st.sampled_from([np.int64, np.int32, np.int8, np.uint8]),
       given_dtype=st.sampled_from([np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint64]),
       values=st.lists(st.integers(-300, 300) | st.sampled_from([-1, 0, 1, 2, 5, -2**31]), min_size=1, max_size=6))
def test_discrete_actions_are_checked_as_a_per_element_reference_says(n, start, space_dtype, given_dtype, values):
    """check_actions (one take() on arange(n) for [0, n) int spaces, min / max otherwise) accepts
    exactly the actions that a per-element check accepts, returns them in the space's dtype, and
    names the first action out of range."""
    if space_dtype is np.uint8 and start < 0:
        return
    info = np.iinfo(given_dtype)
    values = [v for v in values if info.min <= v <= info.max] or [max(start, 0)]
    a = np.array(values, given_dtype)
    with rf.envs.make(_DiscreteOf, len(a), n=n, start=start, dtype=space_dtype) as venv:
        ok = [start <= int(v) < start + n for v in a]
        if all(ok):
            got = venv.check_actions(a, len(a))
            assert got.dtype == np.dtype(space_dtype) and got.tolist() == a.tolist()
            return
        with pytest.raises(SpecError) as err:
            venv.check_actions(a, len(a))
        space_info = np.iinfo(space_dtype)
        if all(space_info.min <= int(v) <= space_info.max for v in a):      # else the cast check speaks
            assert f"actions[{ok.index(False)}]" in str(err.value)


def test_serial_step_rows_calls_stepped_once_the_rows_are_written_and_before_the_autoresets():
    """`stepped` (the process backend's first reply) sees every row's reward, flags and final_obs,
    and the obs of the rows that go on; the rows that ended still hold their last obs until reset."""
    from test_envs_process import Tagged

    with rf.envs.make(Tagged, 3) as venv:
        venv.reset(seed=0)
        seen = []

        def stepped():
            seen.append({k: venv.arrays[k].copy() for k in ("obs", "final_obs", "terminated", "truncated")})

        for _ in range(12):
            venv.step_rows(np.array([1, 2, 3]), stepped)
            assert len(seen) == 1
            at = seen.pop()
            done = venv.arrays["terminated"] | venv.arrays["truncated"]
            np.testing.assert_array_equal(at["terminated"], venv.arrays["terminated"])
            np.testing.assert_array_equal(at["final_obs"], venv.arrays["final_obs"])
            np.testing.assert_array_equal(at["obs"], at["final_obs"])            # no row reset yet
            np.testing.assert_array_equal(at["obs"][~done], venv.arrays["obs"][~done])
            assert (venv.arrays["obs"][done, 2] == 0).all()                      # reset since: t = 0


def test_a_subclass_that_sets_a_flag_itself_sees_it_cleared_at_the_next_step():
    """step_rows skips writing an all-False flag array that it left all False; a subclass whose own
    step_rows sets a flag (its own time limit) must not have that True kept for later steps."""
    from rlflow.envs.vector import SerialVectorEnv

    class CutAt3(SerialVectorEnv):
        n = 0

        def step_rows(self, actions):
            super().step_rows(actions)
            self.n += 1
            if self.n == 3:                          # row 0 is cut here and starts over
                self.arrays["truncated"][0] = True
                self._obs.write(0, self.envs[0].reset()[0])

    tags = iter(range(2))
    with CutAt3([lambda: Scripted(next(tags), max_len=50)] * 2) as venv:
        venv.reset(seed=0)
        flags, lengths = [], []
        for _ in range(6):
            s = venv.step(np.zeros(2, np.int64))
            flags.append(s.truncated.tolist())
            lengths.append(int(s.info["episode_length"][0]))
    assert flags == [[False, False]] * 2 + [[True, False]] + [[False, False]] * 3
    assert lengths == [1, 2, 3, 1, 2, 3]
