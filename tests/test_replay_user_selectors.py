"""Selectors of the user's (DESIGN: "user may add one"): the table checks what they return, undoes an
insert one of them refuses, and its checkpoints say clearly what they cannot hold."""

import sys

import numpy as np
import pytest

import rlflow as rf
from rlflow.errors import UsageError


class ListSelector(rf.Selector):
    """Uniform over the ids it holds (a plain list: an obviously-right user selector)."""

    def __init__(self, seed=0):
        self.ids, self.rng, self.seed = [], np.random.default_rng(seed), seed

    def add(self, ids, priorities):
        self.ids.extend(np.asarray(ids).tolist())

    def sample(self, n):
        pool = np.array(self.ids, np.int64)
        return pool[self.rng.integers(0, len(pool), n)], np.full(n, 1.0 / len(pool))

    def remove(self, ids):
        for i in np.asarray(ids).tolist():
            self.ids.remove(i)

    def __len__(self):
        return len(self.ids)

    def config(self):
        return {"seed": self.seed}

    def state_dict(self):
        return {"ids": np.array(self.ids, np.int64)}

    def load_state_dict(self, state):
        self.ids = [int(i) for i in state["ids"]]


class Short(ListSelector):
    def sample(self, n):
        ids, p = super().sample(n)
        return ids[:-1], p[:-1]


class BadProbabilities(ListSelector):
    def sample(self, n):
        ids, p = super().sample(n)
        return ids, -p


class FreeSlot(ListSelector):
    def sample(self, n):
        return np.full(n, 7, np.int64), np.full(n, 0.5)


class Repeats(ListSelector):          # a remover that says it draws distinct ids, and repeats one
    with_replacement = False

    def sample(self, n):
        return np.full(n, self.ids[0], np.int64), np.ones(n)


def table(sampler, remover=None, capacity=4):
    return rf.Table(capacity=capacity, sampler=sampler, remover=rf.selectors.Fifo() if remover is None else remover,
                    rate_limiter=rf.rate_limiters.MinSize(1))


def items(n, start=0):
    return {"x": np.arange(start, start + n, dtype=np.int64)}


@pytest.mark.parametrize("sampler, expected", [
    (Short(), r"sampler Short.sample\(4\)': expected 4 integer ids, shape \(4,\), got shape \(3,\)"),
    (BadProbabilities(), r"sampler BadProbabilities.sample\(4\)': expected 4 probabilities in \(0, 1\]"),
    (FreeSlot(), r"sampler FreeSlot.sample\(4\)': expected ids of items in the table.*got id 7")])
def test_what_a_user_sampler_returns_is_checked(sampler, expected):
    """A short draw gave a 3-row sample, negative probabilities reached the learner, a free slot's
    id gave key -1 with stale data: each is now an error naming the sampler."""
    t = table(sampler, capacity=8)
    t.insert(items(3))
    with pytest.raises(UsageError, match=expected):
        t.sample(4)


def test_a_user_remover_that_repeats_an_id_evicts_it_once():
    """It declared distinct draws and repeated one: the table's counts went apart (KeyError, then
    len 4 against sampler 2 and remover 3). Repeats are taken once now."""
    t = table(rf.selectors.Uniform(seed=0), Repeats(), capacity=4)
    t.insert(items(4))
    t.insert(items(2, start=4))
    assert len(t) == len(t.sampler) == len(t.remover) == 4
    assert sorted(set(np.concatenate([t.sample(4)["x"] for _ in range(30)]).tolist())) == [2, 3, 4, 5]


class RefusesThird(ListSelector):
    def add(self, ids, priorities):
        if len(self.ids) == 2 and not getattr(self, "refused", False):
            self.refused = True
            raise ValueError("refused")
        super().add(ids, priorities)


@pytest.mark.parametrize("as_sampler", [True, False])
def test_an_insert_a_user_selector_refuses_is_undone(as_sampler):
    """The selector's error reaches the caller, and the item is gone from everything: it stayed
    stored under a live key that no selector knew, so it was never sampled nor evicted (capacity
    lost for good)."""
    sel = RefusesThird()
    t = table(sel, ListSelector()) if as_sampler else table(rf.selectors.Uniform(seed=0), sel)
    t.insert(items(2))
    with pytest.raises(ValueError, match="refused"):
        t.insert(items(1, start=2))
    assert len(t) == len(t.sampler) == len(t.remover) == 2
    for k in range(3, 9):                          # fills and evicts through every slot
        t.insert(items(1, start=k))
        assert len(t) == len(t.sampler) == len(t.remover) == min(4, k)
    drawn = np.concatenate([t.sample(4)["x"] for _ in range(50)])
    assert len(set(drawn.tolist())) == 4 and 2 not in drawn


def test_priorities_that_are_not_numbers_name_the_argument():
    t = table(rf.selectors.Uniform(seed=0))
    keys = t.insert(items(2))
    with pytest.raises(UsageError, match="argument 'priorities': expected numbers"):
        t.update_priorities(keys, ["a", "b"])


class SetState(ListSelector):
    def state_dict(self):
        return {"ids": np.array(self.ids, np.int64), "present": set(self.ids)}


def test_a_state_that_is_neither_an_array_nor_json_is_named_on_save(tmp_path):
    t = table(SetState())
    t.insert(items(2))
    with pytest.raises(UsageError, match=r"sampler SetState.state_dict\(\)\['present'\]': expected a numpy "
                                         r"array or a JSON value.*got set"):
        t.save(tmp_path / "t")
    assert not list(tmp_path.iterdir())            # nothing half-written is left


def test_a_selector_class_that_is_not_importable_at_load_is_named_as_such(tmp_path, monkeypatch):
    """A table saved by a script whose selector class lived in that script: its load read 'damaged
    file: AttributeError ...'; the file is fine, the class is not importable."""
    (tmp_path / "mysel_mod.py").write_text(
        "from test_replay_user_selectors import ListSelector\n\nclass Mine(ListSelector):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mysel_mod

    t = table(mysel_mod.Mine())
    t.insert(items(3))
    t.save(tmp_path / "t")
    (tmp_path / "mysel_mod.py").unlink()
    monkeypatch.delitem(sys.modules, "mysel_mod")
    with pytest.raises(UsageError, match=r"'sampler class': expected mysel_mod:Mine importable in this program"):
        rf.Table.load(tmp_path / "t")


class PlainList(rf.Selector):
    """A user selector without config(): the checkpoint pickles the object itself."""

    def __init__(self):
        self.ids = []

    def add(self, ids, priorities):
        self.ids.extend(np.asarray(ids).tolist())

    def sample(self, n):
        return np.array(self.ids[:n], np.int64), np.full(n, 1.0 / len(self.ids))

    def remove(self, ids):
        for i in np.asarray(ids).tolist():
            self.ids.remove(i)

    def __len__(self):
        return len(self.ids)

    def state_dict(self):
        return {"ids": np.array(self.ids, np.int64)}

    def load_state_dict(self, state):
        self.ids = [int(i) for i in state["ids"]]


class CountingLimiter(rf.core.RateLimiter):
    """A user rate limiter without config()."""
    samples_per_insert = None

    def __init__(self):
        self.inserted = 0

    def can_insert(self, n=1):
        return True

    def can_sample(self, n=1):
        return self.inserted >= n

    def on_insert(self, n):
        self.inserted += n

    def on_sample(self, n):
        pass

    def on_delete(self, n):
        pass

    def state_dict(self):
        return {"inserted": self.inserted}

    def load_state_dict(self, state):
        self.inserted = int(state["inserted"])


def test_a_table_with_pickled_user_selectors_and_limiter_loads(tmp_path):
    """Saved, such a table could never be loaded: the unpickled objects carried the saved table's
    mark and contents, and the new table refused them ('already belongs to a table')."""
    t = rf.Table(8, sampler=PlainList(), rate_limiter=CountingLimiter())
    t.insert(items(5))
    t.save(tmp_path / "t")
    loaded = rf.Table.load(tmp_path / "t")
    assert len(loaded) == 5 and loaded.sampler.ids == t.sampler.ids
    assert loaded.rate_limiter.inserted == 5
    assert np.array_equal(loaded.sample(2, timeout=1).keys, t.sample(2, timeout=1).keys)
    with pytest.raises(UsageError, match="already belongs to a table"):     # still one table each
        rf.Table(8, sampler=loaded.sampler)
