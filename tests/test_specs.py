import numpy as np
import pytest
from gymnasium import spaces

import rlflow as rf
from rlflow.errors import SpecError
from rlflow.specs import ArraySpec, flatten, from_extras, from_space, unflatten, validate_batch


@pytest.mark.parametrize("space, expected", [
    (spaces.Box(-1, 1, (3, 2), np.float32), ArraySpec((3, 2), np.float32)),
    (spaces.Box(0, 255, (84, 84), np.uint8), ArraySpec((84, 84), np.uint8)),
    (spaces.Discrete(5), ArraySpec((), np.int64)),
    (spaces.MultiDiscrete([3, 4, 5]), ArraySpec((3,), np.int64)),
    (spaces.MultiDiscrete([[2, 3], [4, 5]]), ArraySpec((2, 2), np.int64)),
    (spaces.MultiBinary(6), ArraySpec((6,), np.int8)),
    (spaces.MultiBinary([2, 3]), ArraySpec((2, 3), np.int8)),
])
def test_spec_of_every_leaf_space(space, expected):
    spec = from_space(space)
    assert spec == expected
    sample = np.asarray(space.sample())
    assert sample.shape == spec.shape and sample.dtype == spec.dtype


def test_dict_and_tuple_spaces_become_named_fields():
    space = spaces.Dict({"pos": spaces.Box(-1, 1, (2,)), "inner": spaces.Tuple((spaces.Discrete(3),
                                                                             spaces.MultiBinary(4)))})
    spec = from_space(space)
    assert spec == {"pos": ArraySpec((2,), np.float32),
                    "inner": {"0": ArraySpec((), np.int64), "1": ArraySpec((4,), np.int8)}}
    flat = flatten(spec, "obs")
    assert flat == {"obs/pos": ArraySpec((2,), np.float32), "obs/inner/0": ArraySpec((), np.int64),
                    "obs/inner/1": ArraySpec((4,), np.int8)}
    batch = {k: s.zeros((5,)) for k, s in flat.items()}
    nested = unflatten(batch, "obs")
    assert nested["pos"].shape == (5, 2) and nested["inner"]["1"].shape == (5, 4)


@pytest.mark.parametrize("space", [spaces.Text(10), spaces.Graph(spaces.Box(0, 1, (2,)), None)])
def test_spaces_without_array_spec_raise(space):
    with pytest.raises(SpecError, match=type(space).__name__):
        from_space(space)


def test_extras_specs_drop_the_batch_axis():
    extras = {"log_prob": np.zeros(8, np.float32), "state": {"h": np.zeros((8, 16), np.float32)}}
    assert from_extras(extras) == {"log_prob": ArraySpec((), np.float32),
                                   "state/h": ArraySpec((16,), np.float32)}


def test_validate_names_field_expected_and_actual():
    specs = {"obs": ArraySpec((4,), np.float32), "action": ArraySpec((), np.int64)}
    ok = {"obs": np.zeros((3, 4), np.float32), "action": np.zeros(3, np.int64)}
    assert set(validate_batch(ok, specs)) == {"obs", "action"}
    with pytest.raises(SpecError, match=r"'obs'.*\(B, 4\).*\(3, 5\)"):
        validate_batch({**ok, "obs": np.zeros((3, 5), np.float32)}, specs)
    with pytest.raises(SpecError, match=r"'action'.*int64.*float32"):
        validate_batch({**ok, "action": np.zeros(3, np.float32)}, specs)
    with pytest.raises(SpecError, match="missing"):
        validate_batch({"obs": ok["obs"]}, specs)
    with pytest.raises(SpecError, match="batch size"):
        validate_batch({**ok, "action": np.zeros(2, np.int64)}, specs)


def test_env_spec_from_spaces():
    spec = rf.EnvSpec.from_spaces(spaces.Box(-1, 1, (4,)), spaces.Discrete(2), 8)
    assert spec.num_envs == 8 and spec.action == ArraySpec((), np.int64)


def test_ints_of_either_signedness_are_taken_when_they_fit():
    spec = ArraySpec((2,), np.int32)
    assert spec.validate(np.array([[1, 2]], np.uint8), "x").dtype == np.uint8        # fits: taken
    u8 = ArraySpec((2,), np.uint8)
    u8.validate([[1, 255]], "img")                                                   # a Python list
    with pytest.raises(SpecError, match=r"'img': expected dtype uint8 \(values in \[0, 255\]\)"):
        u8.validate([[1, 256]], "img")
    with pytest.raises(SpecError, match=r"'img': expected dtype uint8 \(values in \[0, 255\]\)"):
        u8.validate(np.array([[-1, 0]], np.int8), "img")
    with pytest.raises(SpecError, match="dtype int32"):
        spec.validate(np.array([[1.0, 2.0]]), "x")                                   # floats: no


def test_a_list_of_numbers_in_extras_is_one_field():
    from rlflow.specs import from_extras

    assert from_extras({"value": [0.1, 0.2, 0.3]}) == {"value": ArraySpec((), np.float64)}
    specs = from_extras({"state": (np.zeros((3, 2), np.float32), np.ones((3, 2), np.float32))})
    assert set(specs) == {"state/0", "state/1"}                  # a tuple of arrays stays nested


@pytest.mark.parametrize("shape", [(-1,), (2.5,), (True,), "ab", 3])
def test_array_spec_refuses_shapes_that_are_not_ints_ge_0(shape):
    with pytest.raises(SpecError, match="ArraySpec 'shape': expected a tuple of ints >= 0"):
        ArraySpec(shape)


def test_a_space_without_an_array_spec_is_named_by_where_it_sits():
    space = spaces.Dict({"inner": spaces.Dict({"caption": spaces.Text(8)}), "x": spaces.Discrete(2)})
    with pytest.raises(SpecError, match="at 'inner/caption'"):
        from_space(space)


def test_a_policy_may_define_act_step_alone():
    """Policy's docstring: a policy that wants the whole step record defines act_step instead
    (act was abstract, so such a class could not be instantiated)."""
    class Masked(rf.Policy):
        def act_step(self, step):
            return np.zeros(len(step.obs), np.int64)

    p = Masked()
    with rf.envs.make("CartPole-v1", 2) as venv:
        assert p.act_step(venv.reset(seed=0)).tolist() == [0, 0]
    with pytest.raises(NotImplementedError, match="act_step"):
        p.act(np.zeros((2, 4)))

    class Neither(rf.Policy):
        pass

    with pytest.raises(TypeError, match="abstract method act"):
        Neither()


def _step(obs, reward=None):
    n = len(obs)
    return rf.Step(obs=obs, reward=np.zeros(n, np.float32) if reward is None else reward,
                   terminated=np.zeros(n, bool), truncated=np.zeros(n, bool), final_obs=obs, env_ids=np.arange(n))


@pytest.mark.parametrize("dtype, big", [(np.int32, np.int64(2**40)), (np.float32, 1e300)])
@pytest.mark.parametrize("make", [lambda: rf.adders.Transition(0.9), lambda: rf.adders.NStepTransition(2, 0.9)])
def test_adders_refuse_observations_and_rewards_that_do_not_fit(dtype, big, make):
    """A hand-written env's int64 2**40 for an int32 Box was stored as 0, a float64 1e300 for a
    float32 one as inf; a float64 1e300 reward as inf, a string reward raised numpy's error."""
    adder = make()
    adder.item_specs(rf.EnvSpec.from_spaces(spaces.Box(-1, 1, (1,), dtype), spaces.Discrete(2), 2))
    adder.add_first(_step(np.zeros((2, 1), dtype)))
    acts = np.zeros(2, np.int64)
    adder.add(acts, _step(np.full((2, 1), 1, np.int64 if dtype == np.int32 else np.float64)))    # fits
    with pytest.raises(SpecError, match="'obs': expected dtype"):
        adder.add(acts, _step(np.full((2, 1), big)))
    adder.add_first(_step(np.zeros((2, 1), dtype)))
    with pytest.raises(SpecError, match=r"'reward': expected dtype float32.*1e\+300"):
        adder.add(acts, _step(np.zeros((2, 1), dtype), reward=np.array([1e300, 0.0])))
    with pytest.raises(SpecError, match="'reward': expected real numbers"):
        adder.add(acts, _step(np.zeros((2, 1), dtype), reward=np.array(["a", "b"])))


def test_fake_vector_env_counts_a_rows_episodes_one_by_one():
    from rlflow.testing import FakeVectorEnv

    env = FakeVectorEnv(3, seed=4, multi_agent=True, p_terminate=0.3, p_die=0.5, p_revive=0.5)
    step = env.reset()
    seen = {r: [0] for r in range(3)}
    for _ in range(300):
        step = env.step(np.zeros(len(step), np.int64))
        for i, r in enumerate(step.env_ids):
            if step.alive[i] and int(step.obs[i, 1]) != seen[int(r)][-1]:
                seen[int(r)].append(int(step.obs[i, 1]))
    for r, eps in seen.items():
        assert eps == list(range(len(eps))) and len(eps) > 3, (r, eps)
