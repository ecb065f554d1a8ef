import re

import numpy as np
import pytest

from rlflow.errors import UsageError
from rlflow.sync import ParamClient, ParamStore


def test_reader_gets_a_copy_and_versions_increase():
    store = ParamStore()
    params = [np.zeros(3), {"w": np.ones((2, 2))}]
    store.publish(params, 0)
    params[0][:] = 7                               # the publisher keeps mutating its arrays
    version, got = store.read()
    assert version == 0 and np.all(got[0] == 0)
    with pytest.raises(UsageError, match="version"):
        store.publish(params, 0)


def test_client_pulls_at_most_every_k_learner_steps():
    store, now = ParamStore(), [0.0]
    client = ParamClient(store, every_learner_steps=5, every_seconds=None, clock=lambda: now[0])
    store.publish([np.zeros(1)], 0)
    assert client.poll()[0] == 0                  # the first version is always taken
    seen = []
    for v in range(1, 23):
        store.publish([np.full(1, v)], v)
        got = client.poll()
        if got is not None:
            assert np.all(got[1][0] == got[0])
            seen.append(got[0])
    assert seen == [5, 10, 15, 20]
    assert client.lag() == 2


def test_client_pulls_after_t_seconds_even_when_fewer_steps():
    store, now = ParamStore(), [0.0]
    client = ParamClient(store, every_learner_steps=100, every_seconds=1.0, clock=lambda: now[0])
    store.publish([np.zeros(1)], 0)
    client.poll()
    store.publish([np.ones(1)], 1)
    assert client.poll() is None
    now[0] = 1.5
    assert client.poll()[0] == 1
    assert client.poll() is None                  # nothing newer


@pytest.mark.parametrize("shared", [False, True])
def test_a_learner_without_params_is_followed_by_version_only(shared):
    if shared:
        from rlflow.runtime.params import SharedParamStore
        store = SharedParamStore(None)
    else:
        store = ParamStore()
    client = ParamClient(store, every_learner_steps=1)
    try:
        for v in range(5):
            store.publish(None, v)
            assert client.poll() is None          # nothing to hand to set_params
            assert client.version == v and client.lag() == 0
    finally:
        if shared:
            store.close()


def test_the_shared_store_never_narrows_a_leaf_and_names_it_by_key():
    """The shared store's slots keep the first publication's dtypes. A later int64 2**40 in an int32
    slot read back as 0, a float64 1e300 in a float32 one as inf; now it is a SpecError naming the
    user's key, while casts that keep every value (int32 -> int64 slots) still go through."""
    from rlflow.errors import SpecError
    from rlflow.runtime.params import SharedParamStore

    store = SharedParamStore({"w": np.zeros(2, np.float32), "nc": np.zeros(2, np.int64)})
    try:
        store.publish({"w": np.ones(2, np.float32), "nc": np.array([1, 2], np.int32)}, 0)
        assert store.read()[1]["nc"].tolist() == [1, 2]
        with pytest.raises(SpecError, match=r"params\['w'\]'.*float32.*got dtype float64"):
            store.publish({"w": np.array([1e300, 0.1]), "nc": np.zeros(2, np.int64)}, 1)
        with pytest.raises(SpecError, match=r"params\['nc'\]'.*shape \(2,\)"):
            store.publish({"w": np.ones(2, np.float32), "nc": np.zeros(3, np.int64)}, 1)
        assert store.read()[0] == 0                   # nothing half-published
    finally:
        store.close()


def _stores():
    from rlflow.runtime.params import SharedParamStore

    return [("local", lambda first: ParamStore()), ("shared", SharedParamStore)]


@pytest.mark.parametrize("kind", ["local", "shared"])
def test_both_stores_keep_the_first_publications_layout(kind):
    """The in-process store (backend="local") took any later structure, shape or dtype while the
    shared one (backend="process") refused it: the same learner ran on one backend and failed on
    the other. Both now keep the first publication's layout, name the leaf, and hand out the
    first publication's dtypes (an int32 after an int64 is read as int64 on both)."""
    from rlflow.errors import SpecError

    first = {"w": np.zeros(2, np.float32), "n": np.zeros(2, np.int64)}
    store = dict(_stores())[kind](first)
    try:
        store.publish(first, 0)
        store.publish({"w": np.ones(2, np.float32), "n": np.array([1, 2], np.int32)}, 1)
        version, got = store.read()
        assert version == 1 and got["n"].dtype == np.int64 and got["n"].tolist() == [1, 2]
        with pytest.raises(SpecError, match=r"params\['w'\]'.*shape \(2,\)"):
            store.publish({"w": np.ones(3, np.float32), "n": np.zeros(2, np.int64)}, 2)
        with pytest.raises(SpecError, match=r"params\['w'\]'.*dtype float32"):
            store.publish({"w": np.ones(2, np.float64), "n": np.zeros(2, np.int64)}, 2)
        with pytest.raises(SpecError, match="'structure'"):
            store.publish([np.ones(2, np.float32)], 2)
        # a key added or dropped mid-run is named (the message said only "a different nesting")
        with pytest.raises(SpecError, match=r"new \[params\['bias'\]\], missing \[\]"):
            store.publish(dict(first, bias=np.zeros(1)), 2)
        with pytest.raises(SpecError, match=r"new \[\], missing \[params\['n'\]\]"):
            store.publish({"w": first["w"]}, 2)

        assert store.read()[0] == 1
    finally:
        if kind == "shared":
            store.close()


@pytest.mark.parametrize("kind", ["local", "shared"])
def test_params_that_appear_after_none_are_refused_alike_and_say_why(kind):
    from rlflow.errors import SpecError

    store = dict(_stores())[kind](None)
    try:
        store.publish(None, 0)
        with pytest.raises(SpecError, match=r"returned None at first.*learner's __init__"):
            store.publish([np.zeros(2)], 1)
    finally:
        if kind == "shared":
            store.close()


@pytest.mark.parametrize("kind", ["local", "shared"])
def test_a_dict_with_its_keys_in_another_order_is_the_same_layout(kind):
    store = dict(_stores())[kind]({"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)})
    try:
        store.publish({"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}, 0)
        store.publish({"b": np.full(1, 2, np.float32), "w": np.ones(2, np.float32)}, 1)
        version, got = store.read()
        assert version == 1 and got["w"].tolist() == [1, 1] and got["b"].tolist() == [2]
    finally:
        if kind == "shared":
            store.close()


def test_a_container_that_changes_kind_is_named_where():
    from rlflow.errors import SpecError
    from rlflow.sync import ParamLayout

    layout = ParamLayout({"w": np.zeros(2), "layers": [np.zeros(1), np.zeros(1)]})
    with pytest.raises(SpecError, match=r"params\['layers'\] is a tuple \(first: a list\)"):
        layout.leaves({"w": np.zeros(2), "layers": (np.zeros(1), np.zeros(1))})


@pytest.mark.parametrize("kind", ["local", "shared"])
@pytest.mark.parametrize("leaf,why", [({"a", "b"}, "numpy dtype object"), (np.array([1, "x"], dtype=object),
                                      "numpy dtype object"), (object(), "numpy dtype object")])
def test_a_leaf_that_is_not_numbers_is_refused_naming_it(kind, leaf, why):
    """An object array holds pointers: the shared store copied them into the actors' memory and
    every actor died of SIGSEGV (restarted, then 'died (signal SIGSEGV)', no word of the cause),
    while the local store passed the object along. Both refuse it now, naming the entry."""
    from rlflow.errors import SpecError

    params = {"w": np.zeros(3, np.float32), "name": np.array("text"), "tags": leaf}   # (strings are bytes)
    with pytest.raises(SpecError, match=r"params\['tags'\]': expected a numpy array of numbers or bools.*" + why):
        store = dict(_stores())[kind](params)
        try:
            store.publish(params, 0)
        finally:
            if kind == "shared":
                store.close()


def test_a_torch_tensor_that_requires_grad_is_named():
    import torch

    from rlflow.errors import SpecError

    params = [np.zeros(2, np.float32), torch.zeros(2, requires_grad=True)]
    with pytest.raises(SpecError, match=r"'params\[1\]': expected a numpy array.*detach\(\).cpu\(\).numpy\(\).*"
                                        r"got Tensor \(RuntimeError"):
        ParamStore().publish(params, 0)


@pytest.mark.parametrize("kwargs, field", [
    ({"every_learner_steps": None, "every_seconds": None}, "every_learner_steps / every_seconds"),
    ({"every_learner_steps": 2.5}, "every_learner_steps"),
    ({"every_learner_steps": True}, "every_learner_steps"),
    ({"every_learner_steps": -1}, "every_learner_steps"),
    ({"every_learner_steps": None, "every_seconds": float("nan")}, "every_seconds"),
    ({"every_learner_steps": None, "every_seconds": float("inf")}, "every_learner_steps / every_seconds"),
    ({"every_seconds": "1"}, "every_seconds"),
])
def test_param_client_refuses_pacing_that_would_freeze_or_is_no_count(kwargs, field):
    """None for both froze the parameters after the first pull, NaN seconds too; 2.5 and True
    steps were taken."""
    with pytest.raises(UsageError, match=f"'{re.escape(field)}': expected"):
        ParamClient(ParamStore(), **kwargs)
