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
