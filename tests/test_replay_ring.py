"""Ring mode (Uniform sampler, Fifo remover, no max_times_sampled) against the general path and a
plain-Python reference: same keys, samples (same seed), priorities, contents and counters, across
the switch out of ring mode and across checkpoints."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlflow.errors import SpecError, UsageError
from rlflow.replay import Table, rate_limiters, selectors
from rlflow.specs import ArraySpec


def items(keys_from, n):
    i = np.arange(keys_from, keys_from + n)
    return {"obs": np.stack([i, -i, 2 * i], 1).astype(np.float32), "action": i.astype(np.int64),
            "flag": (i % 2).astype(bool), "big": np.repeat(i[:, None], 20, 1).astype(np.float32)}


def contents(key):
    return {k: v[0] for k, v in items(key, 1).items()}


class Reference:
    """Uniform over an order of keys (the order rules of selectors.Uniform), Fifo eviction."""

    def __init__(self, capacity, seed):
        self.capacity, self.rng = capacity, np.random.default_rng(seed)
        self.order, self.born, self.prio, self.next_key = [], [], {}, 0
        self.stats = {"inserts": 0, "samples": 0, "deletes": 0, "evictions": 0, "expired": 0}

    def _remove(self, keys):
        keys = set(keys)
        k = len(keys)
        if not k:
            return
        if set(self.order[:k]) == keys:
            self.order = self.order[k:]
        else:
            end = len(self.order) - k
            movers = [x for x in self.order[end:] if x not in keys]
            holes = [j for j in range(end) if self.order[j] in keys]
            for j, m in zip(holes, movers):
                self.order[j] = m
            self.order = self.order[:end]
        self.born = [x for x in self.born if x not in keys]
        for x in keys:
            del self.prio[x]

    def insert(self, n, p):
        over = len(self.born) + n - self.capacity
        if over > 0:
            self._remove(self.born[:over])
            self.stats["evictions"] += over
        keys = list(range(self.next_key, self.next_key + n))
        self.next_key += n
        self.order += keys
        self.born += keys
        for k, pk in zip(keys, [1.0] * n if p is None else p):
            self.prio[k] = float(pk)
        self.stats["inserts"] += n
        return keys

    def sample(self, n):
        idx = self.rng.integers(0, len(self.order), n)
        self.stats["samples"] += n
        return [self.order[i] for i in idx], 1.0 / len(self.order)

    def delete(self, keys):
        live = sorted(set(k for k in keys if k in self.prio))
        self._remove(live)
        self.stats["deletes"] += len(live)
        return len(live)

    def update(self, keys, p):
        for k, pk in zip(keys, p):
            if k in self.prio:
                self.prio[k] = float(pk)


def check_sample(s, ref_keys, ref_p):
    assert s.keys.tolist() == ref_keys
    np.testing.assert_array_equal(s.probabilities, np.full(len(ref_keys), ref_p))
    for k, v in s.data.items():
        expect = np.stack([contents(key)[k] for key in ref_keys])
        np.testing.assert_array_equal(v, expect)


def files(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


OPS = st.lists(st.tuples(st.sampled_from(["insert", "insert", "insert_p", "insert1", "sample", "update",
                                          "delete", "priorities", "bad", "checkpoint"]),
                         st.integers(1, 12), st.integers(0, 2**31)), max_size=30)


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 9), seed=st.integers(0, 1000), ops=OPS, given_specs=st.booleans())
def test_ring_mode_equals_general_path_and_reference(tmp_path_factory, capacity, seed, ops, given_specs):
    specs = {k: ArraySpec(v.shape[1:], v.dtype) for k, v in items(0, 1).items()} if given_specs else None

    def make():
        return Table(capacity, sampler=selectors.Uniform(seed=seed), remover=selectors.Fifo(),
                     rate_limiter=rate_limiters.MinSize(1), specs=specs)
    ring, general = make(), make()
    with general._lock:
        general._leave_ring()
    assert ring._ring_mode and not general._ring_mode
    ref = Reference(capacity, seed)
    tables = [ring, general]
    for step, (op, k, s) in enumerate(ops):
        r = np.random.default_rng(s)
        if op in ("insert", "insert_p", "insert1"):
            n = 1 if op == "insert1" else min(k, capacity)
            p = (r.random(n) * 3).round(1) if op == "insert_p" else None
            b = items(ref.next_key, n)
            if r.random() < 0.3:
                b["obs"] = b["obs"].astype(np.float64)  # cast on the general validation path
            if r.random() < 0.3:
                b["big"] = np.asfortranarray(b["big"])  # not C-contiguous
            expect = ref.insert(n, p)
            for t in tables:
                assert t.insert(b, priorities=p).tolist() == expect
        elif op == "sample":
            if not ref.order:
                continue
            n = min(k, capacity)
            ref_keys, ref_p = ref.sample(n)
            for t in tables:
                check_sample(t.sample(n), ref_keys, ref_p)
        elif op in ("update", "priorities", "delete"):
            if ref.next_key == 0:
                continue
            keys = r.integers(0, ref.next_key, k)
            if op == "update":
                p = r.random(k).round(2)
                ref.update(keys.tolist(), p.tolist())
                for t in tables:
                    t.update_priorities(keys, p)
            elif op == "delete":
                expect = ref.delete(keys.tolist())
                for t in tables:
                    assert t.delete(keys) == expect
            expect = [ref.prio.get(kk, np.nan) for kk in keys.tolist()]
            for t in tables:
                np.testing.assert_array_equal(t.priorities(keys), expect)
        elif op == "bad":
            if ring.specs is None:
                continue
            b = items(0, min(k, capacity))
            b["action"] = b["action"].astype(np.float32) if r.random() < 0.5 else b["action"][:, None]
            for t in tables:
                before = (len(t), dict(t._stats), t._next_key)
                with pytest.raises(SpecError, match="'action'"):
                    t.insert(b)
                assert (len(t), dict(t._stats), t._next_key) == before
        elif op == "checkpoint":
            d = tmp_path_factory.mktemp("ck")
            loaded = []
            for i, t in enumerate(tables):
                t.save(d / f"t{i}")
                t2 = Table.load(d / f"t{i}")
                t2.save(d / f"u{i}")
                assert files(d / f"t{i}") == files(d / f"u{i}")
                assert t2._ring_mode == t._ring_mode
                loaded.append(t2)
            tables = loaded
        for t in tables:
            assert len(t) == len(ref.order)
            assert t.stats() == dict(ref.stats, size=len(ref.order), capacity=capacity)
        # ring mode lasts until the first delete that removes an item
        assert tables[0]._ring_mode == (ref.stats["deletes"] == 0)
        assert not tables[1]._ring_mode


def test_ring_mode_holds_for_the_common_config_and_survives_checkpoints(tmp_path):
    t = Table(100)
    assert t._ring_mode
    for i in range(30):
        t.insert(items(7 * i, 7))  # wraps the ring twice
    t.insert(items(210, 1), priorities=[5.0])
    s = t.sample(16)
    t.update_priorities(s.keys, np.arange(16.0))
    assert t._ring_mode and len(t) == 100 and t.stats()["evictions"] == 111
    t.save(tmp_path / "a")
    t2 = Table.load(tmp_path / "a")
    assert t2._ring_mode
    for tt in (t, t2):
        assert tt.insert(items(211, 3)).tolist() == [211, 212, 213]
        assert tt.delete([150]) == 1 and not tt._ring_mode
    assert files_equal(t, t2, tmp_path)


def files_equal(a, b, tmp_path):
    a.save(tmp_path / "x")
    b.save(tmp_path / "y")
    return files(tmp_path / "x") == files(tmp_path / "y")


def test_fast_insert_refuses_what_it_does_not_handle():
    t = Table(8, specs={"x": ArraySpec((2,), np.float32), "y": ArraySpec((), np.int64)})
    ok = {"x": np.zeros((1, 2), np.float32), "y": np.zeros(1, np.int64)}
    assert t._fast_insert(ok) is not None
    for bad in ({"x": ok["x"]}, {**ok, "z": ok["y"]}, {**ok, "y": np.zeros(1, np.int32)},
                {**ok, "x": np.zeros((1, 2, 1), np.float32)}, {**ok, "y": np.zeros(2, np.int64)},
                {**ok, "y": [0]}, [1, 2], {**ok, "x": np.zeros((0, 2), np.float32), "y": np.zeros(0, np.int64)}):
        assert t._fast_insert(bad) is None
    with pytest.raises(UsageError):
        t.insert([1, 2])


@pytest.mark.parametrize("limiter", [lambda: rate_limiters.SampleToInsertRatio(1.0, 2, error_buffer=2.0),
                                     lambda: rate_limiters.RateLimiter(1.0, 2, -np.inf, 5.0)])
def test_ring_fast_insert_keeps_the_rate_limiter_rules(limiter):
    from rlflow.errors import Timeout
    ref = limiter()
    t = Table(50, rate_limiter=limiter())
    assert t._ring_mode
    for step in range(40):
        n = 1 + step % 3
        if ref.can_insert(n):
            assert t.insert(items(0, n), timeout=0).shape == (n,)
            ref.on_insert(n)
        else:
            with pytest.raises(Timeout):
                t.insert(items(0, n), timeout=0)
        if step % 2 and ref.can_sample(1):
            t.sample(1, timeout=0)
            ref.on_sample(1)
        assert t.rate_limiter.state_dict() == ref.state_dict()
    assert t._ring_mode
