"""Table: insert/sample shapes, keys, eviction, max_times_sampled, presets, bad input, checkpoints."""

import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rlflow as rf
from rlflow.errors import ClosedError, SpecError, Timeout, UsageError
from rlflow.replay import Table, importance_weights, rate_limiters, selectors
from rlflow.specs import ArraySpec


def batch(n, start=0):
    i = np.arange(start, start + n)
    return {"obs": np.stack([i, -i], 1).astype(np.float32), "action": i.astype(np.int64),
            "reward": (i * 0.5).astype(np.float32)}


SPECS = {"obs": ArraySpec((2,), np.float32), "action": ArraySpec((), np.int64),
         "reward": ArraySpec((), np.float32)}


def snapshot(t):
    """Everything observable about a table, to check that a failed call changed nothing."""
    with t._lock:
        return (len(t), dict(t._stats), t._next_key, t.rate_limiter.state_dict(),
                {k: v.copy() for k, v in t._storage.items()}, t._slot_key.copy(), t._prio.copy(),
                repr(t.sampler.state_dict()), repr(t.remover.state_dict()))


def same(a, b):
    return repr(a) == repr(b)


# ---- basics ------------------------------------------------------------------------------------------
def test_insert_sample_shapes_and_keys():
    t = Table(10)
    assert t.specs is None
    k1 = t.insert(batch(3))
    k2 = t.insert(batch(1, 3))
    assert k1.dtype == np.int64 and k1.tolist() == [0, 1, 2] and k2.tolist() == [3]
    assert t.specs == SPECS and len(t) == 4 and t.capacity == 10
    s = t.sample(5)
    assert isinstance(s, rf.Sample) and len(s) == 5
    assert s.keys.dtype == np.int64 and s.probabilities.dtype == np.float64
    assert s["obs"].shape == (5, 2) and s["obs"].dtype == np.float32
    assert s["action"].shape == (5,) and s["reward"].shape == (5,)
    np.testing.assert_allclose(s.probabilities, 0.25)
    assert (s["action"] == s.keys).all()  # data belongs to its key
    s["obs"][:] = 99  # samples are copies
    assert (t.sample(4)["obs"] != 99).all()
    assert t.stats()["inserts"] == 4 and t.stats()["samples"] == 9 and t.stats()["size"] == 4


def test_specs_given_up_front_and_dtype_cast():
    t = Table(4, specs=SPECS)
    assert t.specs == SPECS
    b = batch(2)
    b["reward"] = b["reward"].astype(np.float64)  # same kind: stored as float32
    t.insert(b)
    assert t.sample(1)["reward"].dtype == np.float32


def test_full_table_evicts_with_remover_fifo():
    t = Table(5, sampler=selectors.Fifo(), remover=selectors.Fifo())
    t.insert(batch(4))
    t.insert(batch(3, 4))  # evicts keys 0, 1
    assert len(t) == 5 and t.stats()["evictions"] == 2
    assert t.sample(5)["action"].tolist() == [2, 3, 4, 5, 6]
    for i in range(7, 12):
        t.insert(batch(1, i))
    assert t.sample(5)["action"].tolist() == [7, 8, 9, 10, 11]


def test_eviction_by_min_heap_remover_removes_lowest_priority():
    t = Table(3, sampler=selectors.Uniform(seed=0), remover=selectors.MinHeap())
    t.insert(batch(3), priorities=[5.0, 1.0, 3.0])
    t.insert(batch(1, 3), priorities=[4.0])  # evicts key 1 (priority 1)
    assert sorted(set(sum((t.sample(3)["action"].tolist() for _ in range(60)), []))) == [0, 2, 3]
    t.update_priorities([0], [0.5])
    t.insert(batch(1, 4), priorities=[9.0])  # now key 0 is lowest
    assert sorted(set(sum((t.sample(3)["action"].tolist() for _ in range(60)), []))) == [2, 3, 4]


def test_keys_of_removed_items_are_ignored_never_issued_raise():
    t = Table(2, sampler=selectors.Prioritized(1.0, seed=0), remover=selectors.Fifo())
    t.insert(batch(2))
    t.insert(batch(1, 2))  # key 0 evicted; its slot now holds key 2
    t.update_priorities([0], [100.0])  # ignored: must not touch key 2 in key 0's old slot
    np.testing.assert_array_equal(t.priorities([0, 1, 2]), [np.nan, 1.0, 1.0])
    assert t.delete([0]) == 0 and len(t) == 2
    for bad in ([3], [-1], [10**12]):
        before = snapshot(t)
        with pytest.raises(UsageError, match="never issued"):
            t.update_priorities(bad, [1.0])
        with pytest.raises(UsageError, match="never issued"):
            t.delete(bad)
        assert same(before, snapshot(t))
    assert t.delete([1, 1, 2]) == 2 and len(t) == 0


def test_keys_stay_valid_long_after_ring_wraps():
    # A long-lived item (MaxHeap remover never evicts the top priority... use MinHeap so the
    # high-priority key 0 survives) must stay addressable after many newer keys.
    t = Table(4, sampler=selectors.Uniform(seed=0), remover=selectors.MinHeap())
    t.insert(batch(1), priorities=[1e9])
    for i in range(1, 500):
        t.insert(batch(1, i), priorities=[float(i)])
    np.testing.assert_array_equal(t.priorities([0]), [1e9])
    t.update_priorities([0], [2e9])
    np.testing.assert_array_equal(t.priorities([0, 1]), [2e9, np.nan])
    assert t.delete([0]) == 1


def test_max_times_sampled_removes_after_k_samples():
    for sampler in (selectors.Uniform(seed=1), selectors.Fifo(), selectors.Prioritized(0.6, seed=2)):
        t = Table(50, sampler=sampler, max_times_sampled=3)
        t.insert(batch(20))
        seen = {}
        while len(t):
            n = min(7, len(t)) if isinstance(sampler, selectors.Fifo) else 7
            if not t.can_sample(n):
                n = 1
            s = t.sample(n, timeout=0)
            for k in s.keys.tolist():
                seen[k] = seen.get(k, 0) + 1
                assert seen[k] <= 3
        assert seen == {k: 3 for k in range(20)}
        assert t.stats()["expired"] == 20
        with pytest.raises(Timeout):
            t.sample(1, timeout=0.01)


def test_queue_and_stack_presets():
    q = Table.queue(4)
    q.insert(batch(3))
    q.insert(batch(1, 3))
    assert not q.can_insert(1)
    with pytest.raises(Timeout, match="max_diff"):
        q.insert(batch(1, 4), timeout=0.02)
    assert q.sample(2)["action"].tolist() == [0, 1]
    q.insert(batch(2, 4))
    assert q.sample(4)["action"].tolist() == [2, 3, 4, 5]
    assert len(q) == 0
    with pytest.raises(Timeout):
        q.sample(1, timeout=0.02)
    s = Table.stack(4)
    s.insert(batch(3))
    assert s.sample(2)["action"].tolist() == [2, 1]
    s.insert(batch(2, 3))
    assert s.sample(3)["action"].tolist() == [4, 3, 0]
    assert isinstance(q.rate_limiter, rate_limiters.Queue) and q.max_times_sampled == 1


def test_timeouts_say_what_they_waited_for():
    t = Table(200, rate_limiter=rate_limiters.MinSize(100))
    t.insert(batch(3))
    with pytest.raises(Timeout, match=r"table holds 3 items, sampling needs 100 \(min_size_to_sample\)"):
        t.sample(10, timeout=0.02)
    f = Table(10, sampler=selectors.Fifo())
    f.insert(batch(2))
    with pytest.raises(Timeout, match="draws 5 distinct"):
        f.sample(5, timeout=0.01)


def test_close_wakes_blocked_callers():
    t = Table(10, rate_limiter=rate_limiters.MinSize(5))
    errors = []

    def waiter():
        try:
            t.sample(1)  # timeout None: waits until closed
        except ClosedError as e:
            errors.append(e)
    th = threading.Thread(target=waiter)
    th.start()
    t.close()
    th.join(5)
    assert not th.is_alive() and len(errors) == 1
    with pytest.raises(ClosedError):
        t.insert(batch(1))


def test_sample_larger_than_capacity_fails_at_once():
    t = Table(8)
    with pytest.raises(UsageError, match="capacity"):
        t.sample(9)  # no timeout given: must not wait
    t.insert(batch(2))
    with pytest.raises(UsageError, match="capacity"):
        t.sample(100, timeout=None)
    with pytest.raises(UsageError):
        t.sample(0)


# ---- bad input ---------------------------------------------------------------------------------------
BAD_ITEMS = [
    ("obs", lambda b: b.update(obs=np.zeros((2, 3), np.float32)), "shape"),
    ("obs", lambda b: b.update(obs=np.zeros((2, 2), np.int32)), "dtype"),
    ("action", lambda b: b.update(action=np.zeros((2, 1), np.int64)), "shape"),
    ("reward", lambda b: b.update(reward=np.zeros(3, np.float32)), "batch size"),
    ("reward", lambda b: b.pop("reward"), "missing"),
    ("extra", lambda b: b.update(extra=np.zeros(2)), "unknown"),
    ("action", lambda b: b.update(action=np.int64(3)), "shape"),
    # a narrower dtype of the same kind is taken only if its values fit (here a float32 overflow)
    ("reward", lambda b: b.update(reward=np.full(len(b["reward"]), 1e300)), "finite value of 1e+300"),
]


@pytest.mark.parametrize("field,mutate,what", BAD_ITEMS)
@pytest.mark.parametrize("n", [1, 2])
def test_bad_batches_name_the_field_and_change_nothing(field, mutate, what, n):
    t = Table(10)
    t.insert(batch(3))
    b = batch(2)
    if n == 1:
        b = {k: v[:1] for k, v in b.items()}
    mutate(b)
    before = snapshot(t)
    with pytest.raises(SpecError) as e:
        t.insert(b)
    assert f"'{field}'" in str(e.value) and what in str(e.value)
    assert same(before, snapshot(t))


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("sampler", [selectors.Uniform, selectors.Fifo, lambda: selectors.Prioritized(0.6)])
def test_ints_that_would_wrap_are_refused_and_change_nothing(tmp_path, n, sampler):
    """int64 values for an int32 field: taken when they fit (stored exactly), refused naming the
    field when they would wrap, with the table as it was (a full table evicts nothing)."""
    t = Table(2, sampler=sampler(), remover=selectors.Fifo(), specs={"a": ArraySpec((), np.int32)})
    t.insert({"a": np.array([7, -7], np.int64)})
    def stored():                                  # the live items' values, through a checkpoint
        t.save(tmp_path / "ck")
        return sorted(np.load(tmp_path / "ck" / "field_0.npy").tolist())

    assert stored() == [-7, 7]
    before = snapshot(t)
    with pytest.raises(SpecError, match=r"field 'a': expected dtype int32 \(values in .*got dtype int64"):
        t.insert({"a": np.array([2 ** 33] * n, np.int64)})
    assert same(before, snapshot(t))
    t.insert({"a": np.array([2 ** 31 - 1] * n, np.int64)})
    assert stored() == ([-7, 2 ** 31 - 1] if n == 1 else [2 ** 31 - 1] * 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0])
def test_bad_priorities_raise_and_change_nothing(bad):
    t = Table(10, sampler=selectors.Prioritized(0.6, seed=0))
    keys = t.insert(batch(3))
    before = snapshot(t)
    with pytest.raises(UsageError, match="priorities"):
        t.insert(batch(2), priorities=[1.0, bad])
    with pytest.raises(UsageError, match="priorities"):
        t.insert(batch(1), priorities=[bad])
    with pytest.raises(UsageError, match="priorities"):
        t.update_priorities(keys, [1.0, bad, 1.0])
    with pytest.raises(UsageError, match="priorities"):
        t.update_priorities(keys, [1.0, 1.0])  # wrong length
    assert same(before, snapshot(t))


def test_bad_arguments():
    with pytest.raises(UsageError):
        Table(0)
    with pytest.raises(UsageError):
        Table(10, max_times_sampled=-1)
    with pytest.raises(UsageError):
        Table(10, sampler="uniform")
    sel = selectors.Fifo()
    with pytest.raises(UsageError, match="both"):
        Table(10, sampler=sel, remover=sel)
    Table(10, sampler=sel)
    with pytest.raises(UsageError, match="already belongs"):
        Table(10, sampler=sel)
    t = Table(10)
    with pytest.raises(UsageError):
        t.insert([1, 2, 3])
    with pytest.raises(UsageError):
        t.insert(batch(11))  # more than the capacity


def test_deadlock_configurations_refused():
    with pytest.raises(UsageError, match="min_size_to_sample=20 > capacity=10"):
        Table(10, rate_limiter=rate_limiters.MinSize(20))
    with pytest.raises(UsageError, match="max_diff"):
        rate_limiters.RateLimiter(1.0, 1, min_diff=5, max_diff=3)
    with pytest.raises(UsageError, match="error_buffer"):
        rate_limiters.SampleToInsertRatio(4.0, 10, error_buffer=2.0)
    with pytest.raises(UsageError, match="deadlock"):
        rate_limiters.RateLimiter(0.3, 1, min_diff=0, max_diff=1)  # error 0.9 blocks both
    with pytest.raises(UsageError, match="deadlock"):
        rate_limiters.RateLimiter(1.0, 10, min_diff=10, max_diff=10.5)  # stuck right after stage 1
    for bad in (0, 1.5, "3", True):           # the argument the user typed is named
        with pytest.raises(UsageError, match="'min_size'"):
            rate_limiters.MinSize(bad)
    with pytest.raises(UsageError):
        rate_limiters.Queue(0)
    # a queue longer than the table: inserts would evict items never read (the process runtime's
    # rings then fed such a table 64 items past its 32 and 32 were pushed out unread, silently)
    with pytest.raises(UsageError, match=r"'rate_limiter': expected a Queue of size <= capacity = 32.*"
                                         r"got Queue\(size=64\)"):
        Table(32, selectors.Fifo(), selectors.Fifo(), rate_limiters.Queue(64), max_times_sampled=1)
    Table(32, selectors.Fifo(), selectors.Fifo(), rate_limiters.Queue(32), max_times_sampled=1)
    # accepted: Reverb's presets and a tight integer band
    rate_limiters.Queue(1)
    rate_limiters.SampleToInsertRatio(4.0, 10, error_buffer=4.0)
    rate_limiters.SampleToInsertRatio(0.25, 10, error_buffer=1.0)
    rate_limiters.RateLimiter(2.0, 1, min_diff=0, max_diff=2)


def _deadlocks(spi, min_size, lo, hi, bound=80):
    """The slow reference: walk every (inserts, samples) state the limiter's own rules let the
    counts reach (one item at a time, exact fractions); True if one admits neither call."""
    from fractions import Fraction as F

    spi, lo, hi = F(spi), F(lo), F(hi)
    seen, todo = {(0, 0)}, [(0, 0)]
    while todo:
        i, s = todo.pop()
        e = i * spi - s
        can_insert = i + 1 <= min_size or e + spi <= hi
        can_sample = i >= min_size and e - 1 >= lo
        if not can_insert and not can_sample:
            return True
        for nxt, ok in (((i + 1, s), can_insert and i < bound), ((i, s + 1), can_sample)):
            if ok and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def test_a_rate_limiter_is_refused_exactly_when_some_reachable_state_deadlocks():
    """Against a walk of the reachable states, on random configurations with fractional ratios
    and bounds: refused iff a state lets neither call go ahead (RateLimiter(0.5, 1, -1, 0) was
    refused though its error only takes multiples of 0.5, none inside its blocked band)."""
    import random

    rng = random.Random(0)
    for _ in range(600):
        spi = rng.choice([0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3])
        m = rng.randint(1, 4)
        lo = rng.randint(-12, 12) / 4
        hi = lo + rng.randint(0, 24) / 4
        try:
            rate_limiters.RateLimiter(spi, m, lo, hi)
            refused = False
        except UsageError as e:
            refused = True
            assert "deadlock" in str(e)
        assert refused == _deadlocks(spi, m, lo, hi), (spi, m, lo, hi)
    rate_limiters.RateLimiter(0.5, 1, -1, 0)
    with pytest.raises(UsageError, match=r"at an error of -0.5 .*max_diff=-0.25.*min_diff=-1"):
        rate_limiters.RateLimiter(0.5, 1, -1, -0.25)
    # a ratio that is no exact float fraction needs a band samples_per_insert + 1 wide; those run
    for args in ((0.1, 1, 5.0, 6.2), (1 / 3, 2, 0, 1.5)):
        limiter = rate_limiters.RateLimiter(*args)
        for _ in range(2_000):
            if limiter.can_insert(1):
                limiter.on_insert(1)
            else:
                assert limiter.can_sample(1), args
                limiter.on_sample(1)
    with pytest.raises(UsageError, match="deadlock"):
        rate_limiters.RateLimiter(0.3, 1, min_diff=0, max_diff=1)      # 0.9 blocks both


def test_sample_to_insert_ratio_names_reverbs_buffer_rule():
    with pytest.raises(UsageError, match=r"SampleToInsertRatio 'error_buffer': expected a buffer of at "
                                         r"least max\(1, samples_per_insert\) = 2 .*got 1, which gives \[19, 21\]"):
        rate_limiters.SampleToInsertRatio(2, 10, 1)


def test_rate_limiter_rules_match_reverb():
    rl = rate_limiters.SampleToInsertRatio(2.0, 3, error_buffer=4.0)  # band [2, 10]
    assert rl.samples_per_insert == 2.0 and rate_limiters.MinSize(3).samples_per_insert is None
    assert rl.can_insert(3) and not rl.can_sample(1)
    rl.on_insert(3)  # error 6, size 3
    assert rl.can_sample(4) and not rl.can_sample(5)  # 6 - 4 >= 2; 6 - 5 < 2
    assert rl.can_insert(2) and not rl.can_insert(3)  # 6 + 4 <= 10; 6 + 6 > 10
    rl.on_sample(4)
    assert rl.diff == 2 and not rl.can_sample(1)
    rl.on_delete(1)  # size 2 < 3: stage 1 again
    assert rl.can_insert(1) and not rl.can_sample(1)


def test_sample_that_the_limiter_can_never_allow_is_refused():
    t = Table(1000, rate_limiter=rate_limiters.SampleToInsertRatio(1.0, 10, error_buffer=5.0))
    with pytest.raises(UsageError, match="never"):
        t.sample(100)


# ---- threads -----------------------------------------------------------------------------------------
class RecordingLimiter(rate_limiters.SampleToInsertRatio):
    """Checks the error bound every time the table (holding its lock) commits a call."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.violations = []
        self.seen = []

    def on_insert(self, n):
        super().on_insert(n)
        self.seen.append(self.diff)
        if self.diff > self.max_diff:
            self.violations.append(("insert", self.diff))

    def on_sample(self, n):
        super().on_sample(n)
        self.seen.append(self.diff)
        if self.diff < self.min_diff:
            self.violations.append(("sample", self.diff))


def test_rate_limiter_bounds_under_threads():
    rl = RecordingLimiter(2.0, 20, error_buffer=16.0)
    t = Table(10_000, rate_limiter=rl)
    per_inserter = 300
    target_samples = 4 * per_inserter * 2 - 40
    samples = [0]
    lock = threading.Lock()
    errors = []

    def inserter(j):
        try:
            for i in range(per_inserter):
                t.insert(batch(1, j * per_inserter + i), timeout=10)
        except ClosedError:
            pass
        except Exception as e:  # pragma: no cover
            errors.append(e)

    def sampler():
        try:
            while True:
                with lock:
                    if samples[0] >= target_samples:
                        return
                    samples[0] += 3
                t.sample(3, timeout=10)
        except ClosedError:
            pass
        except Exception as e:  # pragma: no cover
            errors.append(e)
    threads = [threading.Thread(target=inserter, args=(j,)) for j in range(4)]
    threads += [threading.Thread(target=sampler) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads[4:]:
        th.join(60)
    t.close()
    for th in threads:
        th.join(60)
    assert not errors and not rl.violations
    assert max(rl.seen) <= rl.max_diff and min(rl.seen[40:]) >= rl.min_diff - 2 * 20
    assert t.stats()["samples"] >= target_samples


def test_queue_under_threads_loses_and_duplicates_nothing():
    q = Table.queue(16)
    n_per = 250
    got = []
    got_lock = threading.Lock()
    errors = []

    def producer(j):
        for i in range(n_per):
            q.insert(batch(1, j * n_per + i), timeout=20)

    def consumer():
        try:
            while True:
                s = q.sample(1, timeout=20)
                with got_lock:
                    got.extend(s["action"].tolist())
        except ClosedError:
            pass
        except Exception as e:  # pragma: no cover
            errors.append(e)
    prods = [threading.Thread(target=producer, args=(j,)) for j in range(4)]
    cons = [threading.Thread(target=consumer) for _ in range(4)]
    for th in prods + cons:
        th.start()
    for th in prods:
        th.join(60)
    import time
    deadline = time.monotonic() + 30
    while len(got) < 4 * n_per and time.monotonic() < deadline:
        time.sleep(0.01)
    q.close()
    for th in cons:
        th.join(30)
    assert not errors
    assert sorted(got) == list(range(4 * n_per))


# ---- importance weights ------------------------------------------------------------------------------
def test_importance_weights():
    p = np.array([0.1, 0.2, 0.4, 0.3])
    w = importance_weights(p, 4, 0.5)
    ref = (4 * p) ** -0.5
    np.testing.assert_allclose(w, ref / ref.max(), rtol=1e-6)
    assert w.dtype == np.float32 and w.max() == 1.0
    np.testing.assert_array_equal(importance_weights(p, 4, 0.0), 1.0)
    with pytest.raises(UsageError):
        importance_weights([0.0, 0.5], 2, 0.4)
    with pytest.raises(UsageError):
        importance_weights([0.5], 0, 0.4)


# ---- checkpoints -------------------------------------------------------------------------------------
COMBOS = [
    ("uniform-fifo", lambda: (selectors.Uniform(seed=3), selectors.Fifo())),
    ("prio-minheap", lambda: (selectors.Prioritized(0.6, seed=4), selectors.MinHeap())),
    ("lifo-uniform", lambda: (selectors.Lifo(), selectors.Uniform(seed=5))),
    ("maxheap-prio", lambda: (selectors.MaxHeap(), selectors.Prioritized(1.0, seed=6))),
]


def _files(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


@pytest.mark.parametrize("name,make", COMBOS)
def test_checkpoint_round_trip_byte_identical(tmp_path, name, make):
    sampler, remover = make()
    t = Table(32, sampler=sampler, remover=remover, max_times_sampled=4,
              rate_limiter=rate_limiters.SampleToInsertRatio(2.0, 4, error_buffer=100.0))
    rng = np.random.default_rng(0)
    for i in range(12):
        keys = t.insert(batch(5, 5 * i), priorities=rng.random(5) + 0.1)
        if t.can_sample(3):
            s = t.sample(3)
            t.update_priorities(s.keys, rng.random(3))
        if i % 4 == 0:
            t.delete(keys[:1])
    t.save(tmp_path / "a")
    t2 = Table.load(tmp_path / "a")
    t2.save(tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert t2.stats() == t.stats() and len(t2) == len(t) and t2.specs == t.specs
    for _ in range(5):  # same future: samples, evictions, priorities
        s1, s2 = t.sample(2), t2.sample(2)
        assert np.array_equal(s1.keys, s2.keys) and np.array_equal(s1.probabilities, s2.probabilities)
        for k in s1.data:
            assert np.array_equal(s1[k], s2[k])
        k1, k2 = t.insert(batch(3, 1000)), t2.insert(batch(3, 1000))
        assert np.array_equal(k1, k2)
        t.update_priorities(s1.keys, [0.5, 2.0])
        t2.update_priorities(s2.keys, [0.5, 2.0])
    t.save(tmp_path / "c")
    t2.save(tmp_path / "d")
    assert _files(tmp_path / "c") == _files(tmp_path / "d")


def test_checkpoint_replaces_atomically(tmp_path, monkeypatch):
    t = Table(8)
    t.insert(batch(3))
    t.save(tmp_path / "ck")
    good = _files(tmp_path / "ck")
    t.insert(batch(2, 3))
    from rlflow.replay import checkpoint

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "_fsync_dir_files", boom)
    with pytest.raises(OSError):
        t.save(tmp_path / "ck")
    assert _files(tmp_path / "ck") == good  # the good checkpoint is untouched
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary left behind
    monkeypatch.undo()
    t.save(tmp_path / "ck")
    assert len(Table.load(tmp_path / "ck")) == 5
    with pytest.raises(UsageError):
        Table.load(tmp_path / "nothing")


def test_saves_that_died_between_their_renames_never_hide_the_newest_checkpoint(tmp_path, monkeypatch):
    """A save moves the old checkpoint aside, then renames the new one in. Dying between the two
    leaves only the moved-aside copy: load takes it (the newest, if several), and the next good save
    removes every such copy."""
    from rlflow.replay import checkpoint

    real = os.replace

    def die_between_renames():
        calls = []

        def replace(a, b):
            calls.append(a)
            if len(calls) == 2:
                raise KeyboardInterrupt("killed between the renames")
            return real(a, b)
        monkeypatch.setattr(checkpoint.os, "replace", replace)

    t = Table(16)
    t.insert(batch(3))
    d = tmp_path / "ck"
    t.save(d)
    die_between_renames()
    with pytest.raises(KeyboardInterrupt):
        t.save(d)
    monkeypatch.undo()
    assert len(Table.load(d)) == 3
    t.insert(batch(2, 3))
    t.save(d)
    assert sorted(os.listdir(tmp_path)) == ["ck"]      # the moved-aside copy is gone
    t.insert(batch(4, 5))
    t.save(d)                                          # 9 items
    die_between_renames()
    with pytest.raises(KeyboardInterrupt):
        t.save(d)
    monkeypatch.undo()
    assert len(Table.load(d)) == 9


def test_a_save_killed_midway_leaves_no_copy_behind_after_the_next_save(tmp_path):
    """A process killed while it wrote a checkpoint leaves its half-written folder; the next good
    save removes it (they piled up, each as large as the table). A save still running in a live
    process keeps its folder."""
    import subprocess
    import sys
    import textwrap

    d = tmp_path / "ck"
    code = textwrap.dedent(f"""
        import os, signal, numpy as np
        import rlflow as rf
        from rlflow.replay import checkpoint
        t = rf.Table(64)
        t.insert({{"x": np.arange(8.0)}})
        real = checkpoint._fsync_dir_files
        def die(path):                       # the files are written: die before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint._fsync_dir_files = die
        t.save({str(d)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == -9
    left = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert len(left) == 1 and not d.exists()
    live = tmp_path / f".ck.tmp-{os.getppid()}-0123abcd"        # a live process's save in progress
    live.mkdir()
    t = Table(16)
    t.insert(batch(3))
    t.save(d)
    assert sorted(os.listdir(tmp_path)) == sorted(["ck", live.name])
    assert len(Table.load(d)) == 3


def test_empty_table_checkpoint(tmp_path):
    t = Table(5, sampler=selectors.Prioritized(0.5, seed=0))
    t.save(tmp_path / "e")
    t2 = Table.load(tmp_path / "e")
    assert t2.specs is None and len(t2) == 0
    t2.insert(batch(2))
    assert len(t2.sample(4)) == 4


def test_update_priorities_of_a_sample_after_its_items_moved_on():
    """The last sample's slots are a shortcut only where each key still lives in its slot."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        t = Table(6, sampler=selectors.Prioritized(1.0, seed=int(rng.integers(1000))), remover=selectors.Fifo())
        t.insert(batch(6), priorities=rng.random(6) + 0.1)
        s = t.sample(4)
        keys = s.keys.copy()
        k = int(rng.integers(0, 5))
        if k:
            t.insert(batch(k, 6), priorities=np.ones(k))  # evicts keys 0 .. k-1; slots reused
        if rng.random() < 0.5:
            keys[0] = int(rng.integers(0, 6 + k))  # the caller changed its keys
        new = rng.random(4) + 0.1
        t.update_priorities(keys, new)
        ref = {}
        for key, p in zip(keys.tolist(), new.tolist()):
            if key >= k:
                ref[key] = p  # the last of a repeated key wins; evicted keys are ignored
        got = t.priorities(np.arange(6 + k))
        for key in range(6 + k):
            if key < k:
                assert np.isnan(got[key])
            elif key in ref:
                assert got[key] == ref[key]
            else:
                assert got[key] != 0 and not np.isnan(got[key])
        with pytest.raises(UsageError, match="never issued"):
            t.update_priorities(np.array([6 + k, 0, 0, 0]), new)


# ---- the sample gather (numba kernel for packed rows, numpy take otherwise) ------------------------
GATHER_DTYPES = [np.uint8, np.bool_, np.int16, np.float32, np.int64, np.float64]


@pytest.mark.parametrize("numba_gather", [True, False])
@settings(max_examples=25, deadline=None)
@given(fields=st.lists(st.tuples(st.sampled_from(range(len(GATHER_DTYPES))),
                                 st.lists(st.integers(0, 5), max_size=2)), min_size=1, max_size=5),
       big=st.booleans(), cap=st.integers(1, 40), n_ins=st.integers(1, 80), seed=st.integers(0, 2**31))
def test_sample_data_equals_inserted_items(numba_gather, fields, big, cap, n_ins, seed):
    """Every sampled field equals the item inserted under its key (a dict of copies: the
    reference), for any mix of dtypes and shapes (small fields share packed rows)."""
    import rlflow.replay.table as table_mod
    saved = table_mod._GATHER
    if not numba_gather:
        table_mod._GATHER = False  # the numpy path, as without numba
    try:
        _check_sample_data(specs_of(fields, big), cap, n_ins, seed, numba_gather)
    finally:
        table_mod._GATHER = saved


def specs_of(fields, big):
    specs = {f"f{i}": ArraySpec(tuple(shape), GATHER_DTYPES[d]) for i, (d, shape) in enumerate(fields)}
    if big:  # one under and two over the size where large rows are copied by memcpy (numba)
        specs["img"] = ArraySpec((9, 11), np.uint8)
        specs["frame"] = ArraySpec((40, 40), np.uint8)
        specs["depth"] = ArraySpec((17, 19), np.float32)
    return specs


def _check_sample_data(specs, cap, n_ins, seed, numba_gather):
    import rlflow.replay.table as table_mod
    rng = np.random.default_rng(seed)
    t = Table(cap, sampler=selectors.Prioritized(0.7, seed=seed) if seed % 2 else selectors.Uniform(seed=seed),
              specs=specs)
    if not numba_gather:
        assert t._gather_rows is None and t._gather_big is None
    elif "frame" in specs and table_mod._gather_big_kernel() is not None:
        assert t._gather_big is not None and len(t._gather_big[1]) == 2
    ref = {}
    key = 0
    while key < n_ins:
        n = int(rng.integers(1, min(cap, 4) + 1))
        items = {k: (rng.integers(0, 200, (n,) + s.shape) if s.dtype != np.bool_
                     else rng.random((n,) + s.shape) < 0.5).astype(s.dtype) for k, s in specs.items()}
        keys = t.insert(items)
        for j, kk in enumerate(keys.tolist()):
            ref[kk] = {k: v[j].copy() for k, v in items.items()}
        key += n
    for _ in range(3):
        s = t.sample(int(rng.integers(1, cap + 1)))
        for k, spec in specs.items():
            got = s.data[k]
            assert got.dtype == spec.dtype and got.shape == (len(s.keys),) + spec.shape
            assert got.flags.c_contiguous and got.flags.writeable
            expect = np.stack([ref[kk][k] for kk in s.keys.tolist()])
            np.testing.assert_array_equal(got, expect)


def test_numpy_gather_touches_only_the_sampled_rows(monkeypatch):
    """Without numba, sampling packed small fields allocates about the sample, not the capacity
    (np.take of a strided field view would copy the whole field on every sample)."""
    import tracemalloc

    import rlflow.replay.table as table_module
    monkeypatch.setattr(table_module, "_GATHER", False)        # as if numba were missing
    specs = {"obs": ArraySpec((4,), np.float32), "action": ArraySpec((), np.int64),
             "reward": ArraySpec((), np.float32), "next_obs": ArraySpec((4,), np.float32)}
    t = rf.Table(capacity=1_000_000, sampler=rf.selectors.Uniform(seed=0), remover=rf.selectors.Fifo(),
                 specs=specs)
    rng = np.random.default_rng(0)
    n = 5_000
    items = {"obs": rng.standard_normal((n, 4)).astype(np.float32), "action": rng.integers(0, 9, n),
             "reward": rng.standard_normal(n).astype(np.float32),
             "next_obs": rng.standard_normal((n, 4)).astype(np.float32)}
    t.insert(items)
    assert t._gather_rows is None and t._packed_rows is not None   # the numpy path, packed rows
    tracemalloc.start()
    try:
        s = t.sample(64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"one sample of 64 allocated {peak:,} bytes at its peak"   # a field is 16 MB
    for k, v in items.items():                                  # and the data is right
        np.testing.assert_array_equal(s.data[k], v[s.keys])


@pytest.mark.parametrize("sampler", ["uniform", "prioritized"])
@pytest.mark.parametrize("numba_gather", [True, False])
def test_warm_up_compiles_the_kernels_and_changes_nothing(sampler, numba_gather, monkeypatch):
    """warm_up() (called by the runtimes before their clock starts) leaves the table as it was:
    the same snapshot and the same draws as a twin table that was not warmed up. With numba the
    gather kernel then holds a compiled signature for the table's row words."""
    import rlflow.replay.table as table_mod
    if not numba_gather:
        monkeypatch.setattr(table_mod, "_GATHER", False)

    def make():
        s = selectors.Prioritized(0.6, seed=3) if sampler == "prioritized" else selectors.Uniform(seed=3)
        t = Table(50, sampler=s, remover=selectors.Fifo(), specs=SPECS)
        t.insert(batch(20), priorities=np.arange(1, 21, dtype=np.float64))
        return t

    warm, cold = make(), make()
    before = snapshot(warm)
    warm.warm_up()
    assert same(snapshot(warm), before)
    a, b = warm.sample(16), cold.sample(16)
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    for k in SPECS:
        np.testing.assert_array_equal(a.data[k], b.data[k])
    if not numba_gather or table_mod._gather_kernel() is None:
        assert warm._gather_rows is None
        return
    # in a fresh interpreter: nothing compiled before warm_up, this table's kernels after it
    code = (
        "import numpy as np, rlflow as rf\n"
        "from rlflow.specs import ArraySpec\n"
        "specs = {'obs': ArraySpec((2,), np.float32), 'action': ArraySpec((), np.int64)}\n"
        f"sel = rf.selectors.{'Prioritized(0.6)' if sampler == 'prioritized' else 'Uniform()'}\n"
        "t = rf.Table(10, sampler=sel, remover=rf.selectors.Fifo(), specs=specs)\n"
        "kernels = [t._gather_rows[0]] + ([sel._tree._kernels[0], sel._tree._kernels[1]]\n"
        "                                 if hasattr(sel, '_tree') else [])\n"
        "assert not any(k.signatures for k in kernels), 'compiled before warm_up'\n"
        "t.warm_up()\n"
        "assert all(k.signatures for k in kernels), [k.signatures for k in kernels]\n"
        "print('ok')\n")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("op", ["sample", "insert"])
def test_a_wait_no_other_thread_could_end_is_an_error_not_a_hang(op):
    """Without a timeout, a sample from an empty table (or an insert into a full queue) waits for
    another thread; with no other thread in the process it would wait forever: a UsageError that
    says why, at once. With a thread that inserts, the same call waits and goes ahead."""
    t = Table.queue(2)
    if op == "insert":
        t.insert(batch(2))
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="no other thread.*pass timeout="):
        t.sample(1) if op == "sample" else t.insert(batch(1))
    assert time.monotonic() - t0 < 1.0
    assert len(t) == (2 if op == "insert" else 0)
    other = threading.Timer(0.2, (lambda: t.insert(batch(1))) if op == "sample" else (lambda: t.sample(1)))
    other.start()
    if op == "sample":
        assert len(t.sample(1)) == 1
    else:
        t.insert(batch(1))
    other.join()


def test_warm_up_before_the_specs_are_known_and_declared_specs():
    t = Table(100, sampler=selectors.Prioritized(0.6), remover=selectors.Fifo())
    t.warm_up()                              # no specs yet: the selectors' kernels only
    t.declare_specs(SPECS)
    assert t.specs == SPECS
    t.warm_up()
    t.insert(batch(3))
    with pytest.raises(SpecError, match="'obs'"):
        t.insert({**batch(1), "obs": np.zeros((1, 3), np.float32)})
    t.declare_specs({"other": ArraySpec((), np.float32)})    # a table with specs keeps them
    assert t.specs == SPECS


@pytest.mark.parametrize("sampler", [selectors.Uniform, selectors.Fifo, selectors.Lifo,
                                     lambda: selectors.Prioritized(0.6), selectors.MaxHeap, selectors.MinHeap])
@pytest.mark.parametrize("remover", [selectors.Fifo, selectors.Lifo, selectors.MinHeap, selectors.Uniform])
@pytest.mark.parametrize("capacity", [1, 4, 7])
def test_every_live_key_stays_reachable_against_a_reference(sampler, remover, capacity):
    """A plain dict of the live keys against random inserts, deletes, priority updates and samples
    (many keys issued while few stay live: the key -> slot index wraps many times): every live key
    has its priority, takes updates and is deleted; removed keys are refused or ignored."""
    rng = np.random.default_rng(capacity)
    t = Table(capacity, sampler=sampler(), remover=remover())
    live = {}                                            # key -> priority
    for step in range(600):
        op = rng.integers(4)
        if op == 0 or not live:
            n = int(rng.integers(1, capacity + 1))
            keys = t.insert({"x": rng.standard_normal((n, 1)).astype(np.float32)})
            for k in keys.tolist():
                live[k] = 1.0
            while len(live) > capacity:                  # the remover evicted some: find which
                present = set(live)
                for k in list(present):
                    if np.isnan(t.priorities(np.array([k]))[0]):
                        del live[k]
                assert len(live) <= capacity
        elif op == 1:
            k = int(rng.choice(list(live)))
            assert t.delete(np.array([k])) == 1, (step, k)
            del live[k]
        elif op == 2:
            k = int(rng.choice(list(live)))
            live[k] = float(rng.uniform(0.1, 5))
            t.update_priorities(np.array([k]), np.array([live[k]]))
        else:
            s = t.sample(1, timeout=1.0)
            assert int(s.keys[0]) in live
        assert len(t) == len(live)
        keys = np.array(sorted(live), dtype=np.int64)
        np.testing.assert_allclose(t.priorities(keys), [live[k] for k in keys.tolist()])


@pytest.mark.parametrize("op", ["sample", "insert"])
def test_a_wait_whose_other_thread_ends_becomes_the_usage_error(op):
    """A wait without a timeout that began while another thread ran (a producer) checked for
    other threads only before it slept: when that thread ended without inserting, it waited for
    ever. It notices within a fraction of a second now."""
    t = Table.queue(2)
    if op == "insert":
        t.insert(batch(2))
    other = threading.Timer(0.3, lambda: None)        # runs, then ends without touching the table
    other.start()
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="no other thread"):
        t.sample(1) if op == "sample" else t.insert(batch(1))
    assert 0.25 < time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "soon", True, [1]])
def test_a_bad_timeout_is_refused_whether_or_not_the_call_waits(bad):
    t = Table(10, sampler=selectors.Uniform(), remover=selectors.Fifo(), rate_limiter=rate_limiters.MinSize(1))
    t.insert(batch(2))                     # neither call needs to wait
    with pytest.raises(UsageError, match="'timeout'"):
        t.sample(1, timeout=bad)
    with pytest.raises(UsageError, match="'timeout'"):
        t.insert(batch(1), timeout=bad)
    assert len(t) == 2


def test_an_infinite_timeout_waits():
    """timeout=float('inf') raised OverflowError from the condition wait."""
    t = Table(10, sampler=selectors.Uniform(), remover=selectors.Fifo(), rate_limiter=rate_limiters.MinSize(2))
    t.insert(batch(1))
    other = threading.Timer(0.2, lambda: t.insert(batch(1)))
    other.start()
    assert len(t.sample(1, timeout=float("inf"))) == 1
    other.join()


def test_storage_beyond_the_machines_memory_is_refused_before_it_is_touched(monkeypatch):
    """capacity x item bytes over the physical memory: a UsageError naming capacity (the table
    touches its storage up front: it would swap, or be killed); over what is available now: a
    RuntimeWarning (shown by default), and the table is made."""
    from rlflow.replay import table as table_mod

    monkeypatch.setattr(table_mod, "_memory_bytes", lambda: (100 * 2**20, 10 * 2**20))
    specs = {"obs": rf.specs.ArraySpec((1000,), np.uint8), "r": rf.specs.ArraySpec((), np.float32)}
    with pytest.raises(rf.errors.UsageError, match=r"'capacity'.*at most 104,439 items of 1,004 bytes.*got "
                                                   r"200,000 items \(0.2 GiB"):
        rf.Table(capacity=200_000, specs=specs)
    with pytest.warns(RuntimeWarning, match="capacity 20,000 items of 1,004 bytes"):
        t = rf.Table(capacity=20_000, specs=specs)
    assert t.capacity == 20_000
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rf.Table(capacity=5_000, specs=specs)


def test_can_insert_says_no_to_more_than_the_capacity():
    t = Table(4)
    assert t.can_insert(4) and not t.can_insert(5)
    with pytest.raises(UsageError, match="capacity"):
        t.insert(batch(5))


def _save_many(path, n, value, errors):
    import rlflow as _rf
    t = _rf.Table(64)
    t.insert({"x": np.full(8, value, np.float64)})
    try:
        for _ in range(n):
            t.save(path)
            loaded = _rf.Table.load(path)
            assert len(loaded) == 8
    except Exception as exc:       # noqa: BLE001 - reported to the test
        errors.append(repr(exc))


def test_concurrent_saves_to_one_directory_never_fail(tmp_path):
    """Saves from several threads (and a load between them) to one path failed with raw
    FileNotFoundError / ENOTEMPTY from each other's renames; their renames now take turns."""
    import threading

    path = str(tmp_path / "t")
    errors = []
    threads = [threading.Thread(target=_save_many, args=(path, 30, float(i), errors)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert errors == []
    assert len(Table.load(path)) == 8
    assert sorted(os.listdir(tmp_path)) == ["t"]          # nothing half-written or moved aside is left


def test_save_and_load_go_on_where_the_directory_lock_is_refused(tmp_path, monkeypatch):
    """The lock opens the checkpoint's parent for reading: a parent this user may write but not
    read (mode 0733), or a file system without flock, made every save and load fail."""
    from rlflow.replay import checkpoint

    real_open = os.open
    parent = str(tmp_path / "p")

    def refusing_open(path, flags, *a, **k):
        if os.path.abspath(os.fspath(path)) == parent:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *a, **k)

    real_glob = checkpoint.glob.glob

    def unlisted_glob(pattern, *a, **k):           # a parent that cannot be listed (mode 0333)
        return [] if os.path.dirname(pattern) == parent else real_glob(pattern, *a, **k)

    t = Table(8)
    t.insert({"x": np.arange(3.0)})
    os.makedirs(parent)
    monkeypatch.setattr(checkpoint.os, "open", refusing_open)
    monkeypatch.setattr(checkpoint.glob, "glob", unlisted_glob)
    t.save(os.path.join(parent, "t"))
    t.save(os.path.join(parent, "t"))                      # and replaces it
    assert len(Table.load(os.path.join(parent, "t"))) == 3
    monkeypatch.undo()
    assert os.listdir(parent) == ["t"]                     # the replaced one is gone, found by name


def test_a_queue_emptied_by_delete_takes_batches_again():
    """Items deleted unread still counted as waiting: an emptied Table.queue(4) refused every
    batch for ever ('6 > max_diff = 4; waiting for samples') with nothing left to sample."""
    t = Table.queue(4, specs={"x": rf.specs.ArraySpec((), np.float32)})
    keys = t.insert({"x": np.arange(4, dtype=np.float32)})
    assert t.delete(keys) == 4 and len(t) == 0
    t.insert({"x": np.arange(4, dtype=np.float32)}, timeout=0)       # a whole batch again
    assert t.sample(2, timeout=0)["x"].tolist() == [0.0, 1.0]
    t.delete(t.insert({"x": np.zeros(2, np.float32)}, timeout=0))      # read ones stay read
    assert not t.can_insert(3) and t.can_insert(2)


def test_fewer_reads_per_item_than_samples_per_insert_is_refused():
    """max_times_sampled=1 with 2 samples per insert must deadlock (the reads can never keep up);
    it was accepted, and a run of batched inserts hung after 6 steps."""
    with pytest.raises(UsageError, match="'max_times_sampled': expected >= the rate limiter's samples_per_insert = 2"):
        Table(100, rate_limiter=rate_limiters.SampleToInsertRatio(2.0, 4, error_buffer=4.0), max_times_sampled=1)
    Table(100, rate_limiter=rate_limiters.SampleToInsertRatio(2.0, 4, error_buffer=4.0), max_times_sampled=2)
    # inserts that never block cannot deadlock, whatever the ratio
    Table(100, rate_limiter=rate_limiters.RateLimiter(4.0, 1, -float("inf"), float("inf")), max_times_sampled=1)
