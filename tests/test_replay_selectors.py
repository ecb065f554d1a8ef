"""Selectors and the sum tree, each against a slow, obviously-right reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlflow.errors import UsageError
from rlflow.replay import selectors
from rlflow.replay.sumtree import SumTree, _numba_kernels


def chi_square(counts, expected):
    counts = np.asarray(counts, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(((counts - expected) ** 2 / expected).sum())


# Critical values far in the tail (p ~ 1e-6) for the degrees of freedom used below: generous on
# purpose, with fixed seeds, so the tests neither flake nor miss a wrong distribution.
CHI2_CRIT = {19: 60.0}


# ---- distributions --------------------------------------------------------------------------------
def test_uniform_distribution_chi_square():
    sel = selectors.Uniform(seed=1)
    sel.add(np.arange(20) * 3, np.ones(20))  # ids need not be dense
    sel.remove([9, 30])
    sel.add([100, 101])
    ids = np.array(sorted(set((np.arange(20) * 3).tolist()) - {9, 30} | {100, 101}))
    n = 40_000
    drawn, p = sel.sample(n)
    assert np.allclose(p, 1 / 20)
    counts = np.array([(drawn == i).sum() for i in ids])
    assert counts.sum() == n
    assert chi_square(counts, np.full(20, n / 20)) < CHI2_CRIT[19]


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_prioritized_distribution_chi_square(alpha):
    sel = selectors.Prioritized(alpha=alpha, seed=2)
    prio = np.arange(1, 21, dtype=np.float64)
    sel.add(np.arange(20), prio)
    sel.add([20], [0.0])  # a zero priority is never drawn
    expected_p = np.append(prio ** alpha / (prio ** alpha).sum(), 0.0)
    n = 40_000
    counts = np.zeros(21)
    for _ in range(n // 256 + 1):
        ids, p = sel.sample(256)
        np.testing.assert_allclose(p, expected_p[ids], rtol=1e-12)
        np.add.at(counts, ids, 1)
    assert counts[20] == 0
    total = counts.sum()
    assert chi_square(counts[:20], expected_p[:20] * total) < CHI2_CRIT[19]


def test_prioritized_updates_and_all_zero_priorities():
    sel = selectors.Prioritized(alpha=1.0, seed=0)
    sel.add([0, 1, 2], [1.0, 1.0, 1.0])
    sel.update_priorities([0, 1], [0.0, 0.0])
    ids, p = sel.sample(100)
    assert (ids == 2).all() and np.allclose(p, 1.0)
    sel.update_priorities([2], [0.0])  # every priority 0: uniform over the present ids
    ids, p = sel.sample(3000)
    assert set(ids.tolist()) == {0, 1, 2} and np.allclose(p, 1 / 3)
    with pytest.raises(UsageError):
        sel.update_priorities([0], [np.nan])
    with pytest.raises(UsageError):
        sel.update_priorities([0], [-1.0])
    with pytest.raises(UsageError):
        sel.update_priorities([7], [1.0])  # absent


def test_prioritized_importance_probabilities_match_tree():
    sel = selectors.Prioritized(alpha=0.5, seed=3)
    rng = np.random.default_rng(0)
    prio = rng.random(1000) + 0.01
    sel.add(np.arange(1000), prio)
    ids, p = sel.sample(512)
    expected = prio ** 0.5 / (prio ** 0.5).sum()
    np.testing.assert_allclose(p, expected[ids], rtol=1e-12)


# ---- deterministic selectors vs a list reference -------------------------------------------------
class RefOrder:
    """Reference for Fifo / Lifo / heaps: a plain list of (id, priority, insertion seq)."""

    def __init__(self, kind):
        self.kind, self.items, self.seq = kind, [], 0

    def add(self, ids, prios):
        for i, p in zip(ids, prios):
            self.items.append([i, p, self.seq])
            self.seq += 1

    def remove(self, ids):
        self.items = [e for e in self.items if e[0] not in set(ids)]

    def update(self, ids, prios):
        for i, p in zip(ids, prios):
            for e in self.items:
                if e[0] == i:
                    e[1] = p

    def sample(self, n):
        if self.kind == "fifo":
            order = sorted(self.items, key=lambda e: e[2])
        elif self.kind == "lifo":
            order = sorted(self.items, key=lambda e: -e[2])
        elif self.kind == "max":
            order = sorted(self.items, key=lambda e: (-e[1], e[2]))
        else:
            order = sorted(self.items, key=lambda e: (e[1], e[2]))
        return [e[0] for e in order[:n]]


KINDS = {"fifo": selectors.Fifo, "lifo": selectors.Lifo, "max": selectors.MaxHeap, "min": selectors.MinHeap}


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "remove", "update", "sample"]),
                              st.integers(1, 6), st.integers(0, 2**31)), max_size=40))
def test_deterministic_selectors_match_reference(kind, ops):
    sel, ref = KINDS[kind](), RefOrder(kind)
    rng_ids = 0
    for op, k, seed in ops:
        r = np.random.default_rng(seed)
        present = [e[0] for e in ref.items]
        if op == "add":
            ids = list(range(rng_ids, rng_ids + k))
            rng_ids += k
            prios = r.integers(0, 4, k).astype(float).tolist()  # many ties
            sel.add(np.array(ids), np.array(prios))
            ref.add(ids, prios)
        elif op == "remove" and present:
            ids = r.choice(present, size=min(k, len(present)), replace=False).tolist()
            sel.remove(np.array(ids))
            ref.remove(ids)
        elif op == "update" and present:
            ids = r.choice(present, size=min(k, len(present)), replace=False).tolist()
            prios = r.integers(0, 4, len(ids)).astype(float).tolist()
            sel.update_priorities(np.array(ids), np.array(prios))
            ref.update(ids, prios)
        elif op == "sample" and present:
            n = min(k, len(present))
            got, p = sel.sample(n)
            assert got.tolist() == ref.sample(n)
            assert (p == 1).all()
        assert len(sel) == len(ref.items)
    if ref.items:
        n = len(ref.items)
        assert sel.sample(n)[0].tolist() == ref.sample(n)
        with pytest.raises(UsageError):
            sel.sample(n + 1)  # distinct draws: no more than present


def test_fifo_compacts_holes_and_keeps_order():
    sel = selectors.Fifo()
    sel.reserve(8)
    order = []
    nxt = 0
    for step in range(2000):  # far more adds than the buffer holds: forces compaction
        if len(order) < 8:
            sel.add([nxt % 8 + 8 * (nxt % 3)])
            order.append(nxt % 8 + 8 * (nxt % 3))
            nxt += 1
        else:
            victim = order[step % len(order)]
            sel.remove([victim])
            order.remove(victim)
        if order:
            assert sel.sample(len(order))[0].tolist() == order


def test_selector_misuse_raises():
    for cls in (selectors.Uniform, selectors.Fifo, selectors.Prioritized, selectors.MaxHeap):
        sel = cls()
        sel.add([1, 2])
        with pytest.raises(UsageError):
            sel.add([2])  # already present
        with pytest.raises(UsageError):
            sel.remove([5])  # absent


# ---- sum tree ----------------------------------------------------------------------------------------
def _ref_find(values, u):
    """Smallest i with values[0] + ... + values[i] > u (exact for integer-valued floats)."""
    acc = 0.0
    for i, v in enumerate(values):
        acc += v
        if acc > u:
            return i
    raise AssertionError("u beyond total")


@settings(max_examples=60, deadline=None)
@given(cap=st.integers(1, 70),
       updates=st.lists(st.tuples(st.integers(0, 69), st.integers(0, 50)), min_size=1, max_size=60),
       fractions=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=20),
       numba=st.booleans())
def test_sumtree_matches_reference(cap, updates, fractions, numba):
    if numba and _numba_kernels() is None:
        numba = False
    tree = SumTree(cap, use_numba=numba)
    values = [0.0] * cap
    ids = np.array([i % cap for i, _ in updates])
    vals = np.array([float(v) for _, v in updates])
    tree.update(ids, vals)  # batched, repeated ids: the last wins
    for i, v in zip(ids.tolist(), vals.tolist()):
        values[i] = v
    assert tree.total == sum(values)
    np.testing.assert_array_equal(tree.values(np.arange(cap)), values)
    if tree.total > 0:
        us = np.floor(np.array(fractions) * tree.total)  # integers: exact comparisons
        got = tree.find(us)
        assert got.tolist() == [_ref_find(values, u) for u in us]
        assert all(values[i] > 0 for i in got)


class RefWideTree:
    """Slow reference of the 8-ary tree in plain Python floats: levels as lists, each node the
    left-to-right sum of its 8 children (missing children are 0), lookups by the rule in
    sumtree.py's docstring, one path at a time."""

    def __init__(self, values):
        self.levels = [list(values)]
        while len(self.levels[0]) > 1 or len(self.levels) == 1:
            below = self.levels[0]
            up = []
            for j in range(-(-len(below) // 8)):
                s = 0.0
                for m in range(8):
                    v = below[8 * j + m] if 8 * j + m < len(below) else 0.0
                    s = v if m == 0 else s + v
                up.append(s)
            self.levels.insert(0, up)

    def find(self, u):
        j = 0
        for below in self.levels[1:]:
            kids = [below[8 * j + m] if 8 * j + m < len(below) else 0.0 for m in range(8)]
            pick, last, ulast = None, 0, u
            for m, v in enumerate(kids):
                if u < v:
                    pick = m
                    break
                if v > 0:
                    last, ulast = m, u
                u -= v
            if pick is None:
                pick, u = last, ulast
            j = 8 * j + pick
        return j


@settings(max_examples=40, deadline=None)
@given(cap=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1), zero_frac=st.floats(0, 0.9),
       numba=st.booleans())
def test_sumtree_matches_wide_reference_bitwise(cap, seed, zero_frac, numba):
    """Float values (not exact sums): every node and every lookup equals the slow reference bit
    for bit, including u just below the total, where rounding would carry past every child."""
    if numba and _numba_kernels() is None:
        numba = False
    rng = np.random.default_rng(seed)
    values = rng.random(cap) ** 3 * 10.0 ** rng.integers(-3, 4, cap)
    values[rng.random(cap) < zero_frac] = 0.0
    tree = SumTree(cap, use_numba=numba)
    half = cap // 2
    tree.update(np.arange(half), values[:half])  # two batches, then a batch of repeats
    tree.update(np.arange(half, cap)[::-1], values[half:][::-1])
    rep = rng.integers(0, cap, 20)
    tree.update(np.concatenate([rep, rep]), np.concatenate([rng.random(20), values[rep]]))
    ref = RefWideTree(values.tolist())
    assert tree.total == ref.levels[0][0]
    for lvl, nodes in enumerate(ref.levels):
        got = tree.tree[tree.offs[lvl]:tree.offs[lvl] + len(nodes)]
        assert got.tolist() == nodes
    np.testing.assert_array_equal(tree.leaves, values)
    if tree.total > 0:
        us = np.sort(rng.random(200)) * tree.total
        us[-1] = np.nextafter(tree.total, 0.0)
        ids, vals = tree.find(us, with_values=True)
        assert ids.tolist() == [ref.find(u) for u in us.tolist()]
        assert (vals > 0).all() and np.array_equal(vals, values[ids])
    other = SumTree(cap, use_numba=numba)  # rebuild from the leaves: the same tree
    other.leaves[:] = values
    other.rebuild()
    assert np.array_equal(other.tree, tree.tree)


@pytest.mark.skipif(_numba_kernels() is None, reason="numba not installed")
def test_sumtree_numba_and_numpy_identical():
    rng = np.random.default_rng(5)
    a, b = SumTree(1000, use_numba=True), SumTree(1000, use_numba=False)
    for _ in range(20):
        ids = rng.integers(0, 1000, 300)
        v = rng.random(300) ** 3
        a.update(ids, v)
        b.update(ids, v)
        assert np.array_equal(a.tree, b.tree)
        u = np.sort(rng.random(500)) * a.total
        assert np.array_equal(a.find(u), b.find(u))
    c = SumTree(1000, use_numba=False)
    c.tree[c.base:] = a.tree[a.base:]
    c.rebuild()
    assert np.array_equal(a.tree, c.tree)


def test_prioritized_numba_and_numpy_same_samples():
    if _numba_kernels() is None:
        pytest.skip("numba not installed")
    out = []
    for use in (True, False):
        sel = selectors.Prioritized(0.7, seed=11, use_numba=use)
        rng = np.random.default_rng(0)
        sel.add(np.arange(5000), rng.random(5000))
        draws = []
        for _ in range(10):
            ids, p = sel.sample(128)
            sel.update_priorities(ids, rng.random(128))
            draws.append((ids, p))
        out.append(draws)
    for (i1, p1), (i2, p2) in zip(*out):
        assert np.array_equal(i1, i2) and np.array_equal(p1, p2)


@pytest.mark.parametrize("make", [selectors.Uniform, selectors.Fifo, selectors.Lifo,
                                  lambda: selectors.Prioritized(0.6), selectors.MaxHeap, selectors.MinHeap])
def test_negative_or_float_ids_are_refused_not_read_from_the_end(make):
    """Selectors used alone: id -1 is absent (numpy would index the last id), an id 2.9 is no id."""
    sel = make()
    sel.add(np.array([3, 7, 15]), np.array([1.0, 2.0, 3.0]))
    before = repr(sel.state_dict())
    for call in (lambda: sel.remove(np.array([-1])), lambda: sel.add(np.array([-5])),
                 lambda: sel.add(np.array([2.9]))):
        with pytest.raises(UsageError):
            call()
    if isinstance(sel, (selectors.Prioritized, selectors.MaxHeap, selectors.MinHeap)):
        with pytest.raises(UsageError):
            sel.update_priorities(np.array([-1]), np.array([100.0]))
    assert repr(sel.state_dict()) == before
    ids, probs = sel.sample(0)
    assert len(ids) == 0 and len(probs) == 0
    ids, probs = sel.sample(3)
    assert set(ids.tolist()) <= {3, 7, 15} and np.all(probs <= 1.0)


@pytest.mark.parametrize("make", [selectors.Uniform, selectors.Fifo, selectors.Lifo])
def test_selectors_that_ignore_priorities_still_check_updates(make):
    """The module's promise: updating an absent id is a UsageError, and no selector takes a NaN or
    negative priority (Uniform, Fifo and Lifo inherited a do-nothing update_priorities)."""
    s = make()
    s.add(np.arange(4), np.ones(4))
    s.update_priorities(np.array([1, 3]), np.array([0.0, 2.5]))          # fine: nothing changes
    for ids, p, what in (([5], [1.0], "not present"), ([1], [np.nan], "finite"), ([1], [-1.0], "finite"),
                         ([1, 2], [1.0], r"shape \(2,\)")):
        with pytest.raises(UsageError, match=what):
            s.update_priorities(np.array(ids), np.array(p))
    with pytest.raises(UsageError, match="finite"):
        s.add(np.array([7]), np.array([np.inf]))
    assert len(s) == 4


@pytest.mark.parametrize("alpha, priorities", [(1.0, [1e308, 1e308]), (2.0, [1e200, 1.0])])
def test_priorities_whose_powers_overflow_are_refused_before_anything_changes(alpha, priorities):
    """Finite priorities whose p ** alpha sum overflows made the tree's total inf: draws then landed
    on empty leaves (key -1, probability 0). The table and the selector alone refuse them; the
    table stays as it was."""
    import rlflow as rf

    t = rf.Table(10, sampler=rf.selectors.Prioritized(alpha=alpha, seed=0))
    t.insert({"x": np.array([1, 2], np.int64)}, priorities=np.array([1.0, 1.0]))
    with pytest.raises(UsageError, match="finite float64"):
        t.insert({"x": np.array([10, 11], np.int64)}, priorities=np.array(priorities))
    with pytest.raises(UsageError, match="finite float64"):
        t.update_priorities([0, 1], np.array(priorities))
    assert len(t) == 2
    s = t.sample(8)
    assert set(s.keys.tolist()) == {0, 1} and (s.probabilities == 0.5).all()
    alone = selectors.Prioritized(alpha=alpha, seed=0)
    with pytest.raises(UsageError, match="finite float64"):
        alone.add(np.array([0, 1]), np.array(priorities))
    assert len(alone) == 0
    t.update_priorities([0], [3.0])                     # replacing a value: checked against the new total
    alone.add(np.array([0]), np.array([1e150 if alpha == 2.0 else 1e307]))
    alone.update_priorities(np.array([0]), np.array([1e150 if alpha == 2.0 else 1e307]))
