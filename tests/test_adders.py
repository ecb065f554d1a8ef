"""Every adder against a slow, obviously-right reference (plain Python per row, per episode lists),
on random schedules from `rlflow.testing.FakeVectorEnv`: terminations, truncations, agents that wait
or die early (alive masks), pool-mode subsets of env_ids, nested observations.

The adders' items are compared with the reference's as multisets: both are sorted by their first
observation (which names row, episode and step) and then compared field by field."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import rlflow as rf
from rlflow import adders
from rlflow.errors import SpecError, UsageError
from rlflow.specs import flatten
from rlflow.testing import FakePolicy, FakeVectorEnv


# ------------------------------------------------------------------------------------------------
# the reference: record every row's stream of transitions with plain Python
# ------------------------------------------------------------------------------------------------
def _row(tree, i):
    return {k: np.array(np.asarray(v)[i]) for k, v in flatten(tree, "obs").items()}


def _row_flat(flat, i):
    return {k: np.array(np.asarray(v)[i]) for k, v in flat.items()}


class Recorder:
    """Applies the row rule of rf.Step, one row at a time, and keeps each row's transitions:
    dicts with obs, action, extras, reward, terminated, truncated, next_obs, next_extras."""

    def add_first(self, step):
        self.cur, self.open, self.awaiting = {}, {}, {}
        self.streams = {int(r): [] for r in step.env_ids}
        for i, r in enumerate(step.env_ids):
            if step.alive is None or step.alive[i]:
                self.cur[int(r)] = _row(step.obs, i)
        self.prev = step

    def add(self, actions, step, extras):
        extras = flatten(extras or {}, "")
        prev = self.prev
        for i, r in enumerate(prev.env_ids):
            r = int(r)
            if r in self.awaiting:
                self.awaiting.pop(r)["next_extras"] = _row_flat(extras, i)
            if prev.alive is None or prev.alive[i]:
                self.open[r] = {"obs": self.cur[r], "action": np.asarray(actions)[i],
                                "extras": _row_flat(extras, i)}
        for i, r in enumerate(step.env_ids):
            r = int(r)
            alive = step.alive is None or bool(step.alive[i])
            done = bool(step.terminated[i] or step.truncated[i])
            if r in self.open and (alive or done):
                tr = self.open.pop(r)
                tr.update(reward=float(step.reward[i]), terminated=bool(step.terminated[i]),
                          truncated=bool(step.truncated[i]), next_obs=_row(step.final_obs, i))
                self.streams[r].append(tr)
                self.awaiting[r] = tr
            if alive:
                self.cur[r] = _row(step.obs, i)
        self.prev = step

    def episodes(self, row):
        """The row's episodes: (list of transitions, ended?)."""
        out, ep = [], []
        for tr in self.streams[row]:
            ep.append(tr)
            if tr["terminated"] or tr["truncated"]:
                out.append((ep, True))
                ep = []
        if ep:
            out.append((ep, False))
        return out


def _transition_item(tr):
    item = dict(tr["obs"])
    item["action"] = tr["action"]
    item.update(tr["extras"])
    return item


def ref_nstep(rec, n, gamma):
    items = []
    for row in rec.streams:
        for ep, ended in rec.episodes(row):
            for i in range(len(ep)):
                if i + n > len(ep) and not ended:
                    continue                      # window not complete yet
                window = ep[i:i + n]
                item = _transition_item(ep[i])
                item["reward"] = sum(gamma ** k * tr["reward"] for k, tr in enumerate(window))
                terminated = any(tr["terminated"] for tr in window)
                item["discount"] = 0.0 if terminated else gamma ** len(window)
                item.update({"next_" + k: v for k, v in window[-1]["next_obs"].items()})
                items.append(item)
    return items


def _with_first(rec, row, continuing):
    """Segments of the row's stream as (list of (transition, is_first), ended?): one per episode,
    or the whole stream as one segment when `continuing`."""
    segs = [([(tr, i == 0) for i, tr in enumerate(ep)], ended) for ep, ended in rec.episodes(row)]
    if continuing:
        return [([x for seg, _ in segs for x in seg], False)]
    return segs


def _step_item(tr, first, gamma):
    d = _transition_item(tr)
    d["reward"] = tr["reward"]
    d["discount"] = 0.0 if tr["terminated"] else gamma
    d["mask"] = True
    d["is_first"] = first
    d.update({"next_" + k: v for k, v in tr["next_obs"].items()})
    return d


def _stack(steps, length):
    pad = {k: np.zeros_like(np.asarray(v)) for k, v in steps[0].items()}
    steps = steps + [pad] * (length - len(steps))
    return {k: np.stack([np.asarray(s[k]) for s in steps]) for k in steps[0]}


def ref_sequence(rec, length, period, gamma, end_behavior):
    items = []
    for row in rec.streams:
        for seg, ended in _with_first(rec, row, end_behavior == "continue"):
            steps = [_step_item(tr, first, gamma) for tr, first in seg]
            for s in range(0, len(steps), period):
                if s + length <= len(steps):
                    items.append(_stack(steps[s:s + length], length))
                else:
                    if ended and end_behavior == "pad":
                        items.append(_stack(steps[s:], length))
                    break
    return items


def ref_episode(rec, max_length, gamma):
    items = []
    for row in rec.streams:
        for ep, ended in rec.episodes(row):
            if ended:
                steps = [_step_item(tr, False, gamma) for tr in ep]
                for st_ in steps:
                    del st_["is_first"]
                items.append(_stack(steps, max_length))
    return items


def ref_rollout(rec, length, gamma, lam):
    items = []
    for row, stream in rec.streams.items():
        for s in range(0, len(stream) - length + 1, length):
            frag = stream[s:s + length]
            if "next_extras" not in frag[-1]:
                continue                          # V' after the last step not given yet
            adv = [0.0] * length
            a = 0.0
            for t in reversed(range(length)):
                tr = frag[t]
                v = float(tr["extras"]["value"])
                v_next = float(tr["next_extras"]["final_value"])
                delta = tr["reward"] + gamma * v_next * (not tr["terminated"]) - v
                done = tr["terminated"] or tr["truncated"]
                a = delta + gamma * lam * (not done) * a
                adv[t] = a
            steps = []
            for t, tr in enumerate(frag):
                d = _transition_item(tr)
                del d["final_value"]
                d.update(reward=tr["reward"], terminated=tr["terminated"], truncated=tr["truncated"],
                         advantage=adv[t], **{"return": adv[t] + float(tr["extras"]["value"])})
                steps.append(d)
            items.append(_stack(steps, length))
    return items


# ------------------------------------------------------------------------------------------------
# running and comparing
# ------------------------------------------------------------------------------------------------
def run(adder, env, policy, steps, seed=0, switch_at=None):
    """Drive adder and reference side by side. At step `switch_at` the env turns into a pool-mode
    multi-agent env (the adders leave their full-batch fast path with state in flight)."""
    rec = Recorder()
    step = env.reset(seed=seed)
    adder.add_first(step)
    rec.add_first(step)
    got = []
    for i in range(steps):
        if i == switch_at:
            env.pool = env.multi_agent = True
        actions, extras = policy.act_step(step)
        step = env.step(actions)
        out = adder.add(actions, step, extras)
        got.append(out)
        rec.add(actions, step, extras)
    if not got:
        return {}, rec
    specs = adder._specs
    for out in got:   # every call returns the same fields, with zero rows when nothing is ready
        assert set(out) == set(specs), (sorted(out), sorted(specs))
        for k, s in specs.items():
            assert out[k].shape[1:] == s.shape and out[k].dtype == s.dtype, (k, out[k].shape, out[k].dtype, s)
    merged = {k: np.concatenate([o[k] for o in got]) for k in specs}
    return merged, rec


def _key(item):
    keys = sorted(k for k in item if k == "obs" or k.startswith("obs/"))
    return tuple(np.concatenate([np.asarray(item[k], np.float64).ravel() for k in keys]).tolist())


def assert_same_items(got: dict, expected: list[dict]):
    n = len(next(iter(got.values()))) if got else 0
    assert n == len(expected), f"{n} items, expected {len(expected)}"
    got_items = [{k: v[i] for k, v in got.items()} for i in range(n)]
    got_items.sort(key=_key)
    expected = sorted(expected, key=_key)
    for g, e in zip(got_items, expected):
        assert set(g) == set(e), (sorted(g), sorted(e))
        for k in e:
            np.testing.assert_allclose(np.asarray(g[k], np.float64), np.asarray(e[k], np.float64),
                                       rtol=1e-5, atol=1e-5, err_msg=f"field {k}")


schedules = st.fixed_dictionaries({
    "switch_at": st.one_of(st.none(), st.integers(0, 30)),
    "num_envs": st.integers(1, 6),
    "seed": st.integers(0, 2**31 - 1),
    "multi_agent": st.booleans(),
    "pool": st.booleans(),
    "dict_obs": st.booleans(),
    "p_terminate": st.sampled_from([0.0, 0.05, 0.2, 0.5]),
    "p_truncate": st.sampled_from([0.0, 0.05, 0.2]),
})
SETTINGS = settings(max_examples=int(os.environ.get("RLFLOW_HYPOTHESIS_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(sched):
    sched = dict(sched)
    seed = sched.pop("seed")
    switch_at = sched.pop("switch_at")
    env = FakeVectorEnv(seed=seed, **sched)
    return env, FakePolicy(env.spec, seed=seed + 1), seed, switch_at


# ------------------------------------------------------------------------------------------------
# transitions
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(sched=schedules, n=st.integers(1, 4), gamma=st.sampled_from([0.0, 0.5, 0.99, 1.0]),
       steps=st.integers(0, 40))
def test_nstep_matches_reference(sched, n, gamma, steps):
    env, policy, seed, switch_at = make(sched)
    adder = adders.NStepTransition(n, gamma)
    got, rec = run(adder, env, policy, steps, seed, switch_at)
    assert_same_items(got, ref_nstep(rec, n, gamma))


def test_transition_is_one_step():
    env = FakeVectorEnv(3, seed=1, p_terminate=0.2, p_truncate=0.2)
    a = adders.Transition(0.9)
    got, rec = run(a, env, FakePolicy(env.spec, seed=2), 50, seed=1)
    assert_same_items(got, ref_nstep(rec, 1, 0.9))
    # truncation bootstraps, termination does not
    term = np.array([tr["terminated"] for s in rec.streams.values() for tr in s])
    trunc = np.array([tr["truncated"] for s in rec.streams.values() for tr in s])
    assert term.any() and trunc.any()
    assert set(np.unique(got["discount"]).tolist()) == {0.0, np.float32(0.9)}


class ActionsOnly:
    """Random actions and no extras: the policy of the Transition adder's short path."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def act_step(self, step):
        return self.rng.integers(0, 3, len(step)), {}


def _drive_transitions(env, a, seed, steps, resets, switch_at, pool, feed):
    """Random actions into `env`; each step goes to `feed(actions, step)` (which feeds adder `a`)
    and to the reference; `resets` restart every row (add_first drops open transitions), and at
    `switch_at` the env turns multi-agent (pool mode if `pool`). Returns the reference's items."""
    policy, rec, expected = ActionsOnly(seed + 1), Recorder(), []
    step = env.reset(seed=seed)
    a.add_first(step)
    rec.add_first(step)
    for i in range(steps):
        if i in resets:
            expected += ref_nstep(rec, 1, 0.9)
            step, rec = env.reset(), Recorder()
            a.add_first(step)
            rec.add_first(step)
        if i == switch_at:
            env.pool, env.multi_agent = pool, True
        actions, _ = policy.act_step(step)
        step = env.step(actions)
        feed(actions, step)
        rec.add(actions, step, {})
    return expected + ref_nstep(rec, 1, 0.9)


@SETTINGS
@given(num_envs=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), switch_at=st.one_of(st.none(), st.integers(0, 30)),
       pool=st.booleans(), resets=st.lists(st.integers(1, 40), max_size=2), steps=st.integers(1, 60))
def test_transition_short_path_matches_reference(num_envs, seed, switch_at, pool, resets, steps):
    """Full steps that share the vector env's read-only env_ids array (as rlflow's vector envs hand
    them out) take the adder's short path; with resets in between and a switch to multi-agent steps
    (rows not alive, with the same env_ids array or, in pool mode, others), the items are still the
    reference's."""
    env = FakeVectorEnv(num_envs, seed=seed, p_terminate=0.2, p_truncate=0.1)
    a, got = adders.Transition(0.9), []
    expected = _drive_transitions(env, a, seed, steps, resets, switch_at, pool,
                                  lambda actions, step: got.append(a.add(actions, step, {})))
    merged = {k: np.concatenate([o[k] for o in got]) for k in got[0]}
    assert_same_items(merged, expected)
    if switch_at is None or switch_at >= steps:
        assert a._fast is not None and a._fast[0] is env._all_ids    # the short path was in use


class LendingSink:
    """A sink that lends buffers, as a process actor's ring does: `reserve` hands out arrays full
    of a stale marker (a field left unwritten would show) and refuses now and then (None: the
    caller then writes the adder's items); `commit` keeps a copy of what was written."""

    def __init__(self, specs, seed, refuse=0.2):
        self.specs, self.rng, self.refuse = specs, np.random.default_rng(seed), refuse
        self.items, self.lent, self.commits, self.cancels = [], None, 0, 0

    def reserve(self, n):
        if self.rng.random() < self.refuse:
            return None
        self.lent = {k: np.full((n,) + s.shape, 77, s.dtype) for k, s in self.specs.items()}
        return self.lent

    def commit(self, n):
        assert all(len(v) == n for v in self.lent.values())
        self.items.append({k: v.copy() for k, v in self.lent.items()})
        self.lent = None
        self.commits += 1

    def cancel(self):
        self.lent = None
        self.cancels += 1

    def __call__(self, items):
        self.items.append(items)


@SETTINGS
@given(num_envs=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), switch_at=st.one_of(st.none(), st.integers(0, 30)),
       pool=st.booleans(), resets=st.lists(st.integers(1, 40), max_size=2), steps=st.integers(1, 60),
       refuse=st.sampled_from([0.0, 0.3]))
def test_transition_add_into_a_lending_sink_matches_reference(num_envs, seed, switch_at, pool, resets, steps, refuse):
    """`add_into` writes the usual steps' items straight into the sink's buffers; the steps it does
    not take (None: multi-agent or pool steps, a refused reserve) go through `add`. Together they
    are the reference's items, with resets in between."""
    env = FakeVectorEnv(num_envs, seed=seed, p_terminate=0.2, p_truncate=0.1)
    a = adders.Transition(0.9)
    sink = LendingSink(a.item_specs(env.spec), seed, refuse)

    def feed(actions, step):
        if a.add_into(actions, step, {}, sink) is None:
            sink(a.add(actions, step, {}))
    expected = _drive_transitions(env, a, seed, steps, resets, switch_at, pool, feed)
    merged = {k: np.concatenate([o[k] for o in sink.items]) for k in sink.items[0]}
    for k, s in a._specs.items():
        assert merged[k].dtype == s.dtype and merged[k].shape[1:] == s.shape, k
    assert_same_items(merged, expected)
    if refuse == 0.0 and (switch_at is None or switch_at >= steps) and steps >= 3 and not resets:
        assert sink.commits >= steps - 2          # every full step after the first two went straight in


def _armed_transition():
    """A Transition adder on a 3-row FakeVectorEnv after three usual steps (its short path armed,
    items written into a LendingSink): (env, adder, sink, actions)."""
    env = FakeVectorEnv(3, seed=0)
    a = adders.Transition(0.9)
    sink = LendingSink(a.item_specs(env.spec), 0, refuse=0.0)
    a.add_first(env.reset())
    actions = np.zeros(3, np.int64)
    for _ in range(3):
        step = env.step(actions)
        if a.add_into(actions, step, {}, sink) is None:
            sink(a.add(actions, step, {}))
    assert sink.commits >= 1
    return env, a, sink, actions


def test_transition_add_into_takes_only_the_usual_steps():
    """add_into leaves alone (None, nothing consumed) what `add` must check or handle: extras, wrong
    action dtypes, multi-agent steps, other adders; a failing write gives the slot back."""
    env, a, sink, actions = _armed_transition()
    step = env.step(actions)
    assert a.add_into(actions.astype(np.int32), step, {}, sink) is None
    assert a.add_into(actions, step, {"v": np.zeros(3, np.float32)}, sink) is None
    assert a.add_into(actions, rf.Step(**{**vars(step), "obs": step.obs[:, :3]}), {}, sink) is None
    assert a.add_into(actions, rf.Step(**{**vars(step), "terminated": step.terminated.astype(np.int8)}), {},
                      sink) is None
    with pytest.raises(SpecError, match="step 'terminated'"):    # add then checks it, as before
        a.add(actions, rf.Step(**{**vars(step), "terminated": step.terminated.astype(np.int8)}), {})
    n = sink.commits

    class Broken(LendingSink):       # lends a buffer of the wrong shape: the write fails
        def reserve(self, n):
            return {k: np.zeros((n + 1,) + s.shape, s.dtype) for k, s in self.specs.items()}
    broken = Broken(a.item_specs(env.spec), 0)
    with pytest.raises(ValueError):
        a.add_into(actions, step, {}, broken)
    assert broken.cancels == 1 and broken.commits == 0 and sink.commits == n
    nstep = adders.NStepTransition(2, 0.9)
    nstep.add_first(env.reset())
    for _ in range(3):
        assert nstep.add_into(actions, env.step(actions), {}, sink) is None


def test_transition_short_path_checks_like_the_general_one():
    env = FakeVectorEnv(3, seed=0)
    a = adders.Transition(0.9)
    step = env.reset()
    a.add_first(step)
    for _ in range(3):
        actions = np.zeros(3, np.int64)
        step = env.step(actions)
        a.add(actions, step, {})
    assert a._fast is not None
    good = env.step(actions)
    bad_obs = rf.Step(**{**vars(good), "obs": good.obs[:, :3]})
    with pytest.raises(SpecError, match=r"observation 'obs': expected shape \(3, 4\)"):
        a.add(actions, bad_obs, {})
    bad_final = rf.Step(**{**vars(good), "final_obs": good.final_obs.astype(np.int64)})
    with pytest.raises(SpecError, match="final observation 'obs': expected dtype float32"):
        a.add(actions, bad_final, {})
    bad_flag = rf.Step(**{**vars(good), "terminated": good.terminated.astype(np.int8)})
    with pytest.raises(SpecError, match="step 'terminated'"):
        a.add(actions, bad_flag, {})
    with pytest.raises(SpecError, match=r"action 'action': expected shape \(3,\)"):
        a.add(actions[:2], good, {})
    a.add(actions, good, {})                  # the good step still goes in
    a.reset()
    with pytest.raises(UsageError, match="add_first"):
        a.add(actions, env.step(actions), {})


EXTRAS_SPECS = {"value": rf.ArraySpec((), np.float32), "final_value": rf.ArraySpec((), np.float32),
                "log_prob": rf.ArraySpec((), np.float32), "state": rf.ArraySpec((2,), np.float32)}


def test_item_specs_nstep_nested():
    env = FakeVectorEnv(2, seed=0, dict_obs=True)
    specs = adders.NStepTransition(3, 0.99).item_specs(env.spec, EXTRAS_SPECS)
    assert set(specs) == {"obs/pos", "obs/t", "action", "reward", "discount", "next_obs/pos", "next_obs/t",
                          "value", "final_value", "log_prob", "state"}
    assert specs["obs/pos"] == rf.ArraySpec((4,), np.float32) and specs["action"] == rf.ArraySpec((), np.int64)


@pytest.mark.parametrize("make_adder", [
    lambda: adders.Transition(0.9), lambda: adders.NStepTransition(3, 0.9),
    lambda: adders.Sequence(4, 2), lambda: adders.Sequence(3, 1, end_behavior="continue"),
    lambda: adders.Episode(80), lambda: adders.Rollout(4, 0.99, 0.95)])
@pytest.mark.parametrize("dict_obs", [False, True])
def test_item_specs_match_items(make_adder, dict_obs):
    """item_specs, known before any data, describe exactly what add returns (a table can be built first)."""
    env = FakeVectorEnv(3, seed=0, dict_obs=dict_obs, p_terminate=0.3)
    a = make_adder()
    specs = a.item_specs(env.spec, EXTRAS_SPECS)
    got, _ = run(a, env, FakePolicy(env.spec, seed=0), 30)
    assert list(got) == list(specs)
    assert len(got["reward"]) > 0
    for k, s in specs.items():
        assert got[k].shape[1:] == s.shape and got[k].dtype == s.dtype, (k, got[k].shape, s)


@pytest.mark.parametrize("make_adder", [lambda: adders.Transition(0.9), lambda: adders.NStepTransition(2, 0.9),
                                        lambda: adders.NStepTransition(3, 0.9)])
@pytest.mark.parametrize("subset", [False, True])
def test_items_keep_the_spec_dtypes_when_the_env_gives_wider_ones(make_adder, subset):
    """An env whose observations are float64 under a float32 spec (accepted: same kind): next_obs
    is cast to the spec like obs, on every path (all rows, pool-mode subsets, n > 1)."""
    from gymnasium import spaces

    spec = rf.EnvSpec.from_spaces(spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(2), 3)

    def step(t, ids=(0, 1, 2), done=()):
        o = np.full((len(ids), 3), t, np.float64)
        return rf.Step(obs=o, reward=np.ones(len(ids)), terminated=np.isin(ids, done),
                       truncated=np.zeros(len(ids), bool), final_obs=o, env_ids=np.array(ids, np.int64))

    a = make_adder()
    specs = a.item_specs(spec)
    a.add_first(step(0))
    emitted, prev = 0, (0, 1, 2)
    for t in range(1, 7):
        ids = (0, 2) if subset and t % 2 else (0, 1, 2)
        # actions belong to the previous step's rows
        items = a.add(np.zeros(len(prev), np.int64), step(t, ids, done=(2,) if t == 4 else ()))
        prev = ids
        for k, s in specs.items():
            assert items[k].dtype == s.dtype, (k, items[k].dtype, s.dtype)
        emitted += len(items["reward"])
    assert emitted > 0


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
ALL_ADDERS = [lambda: adders.Transition(0.9), lambda: adders.NStepTransition(3, 0.9),
              lambda: adders.Sequence(4, 2), lambda: adders.Sequence(3, 1, end_behavior="continue"),
              lambda: adders.Episode(50), lambda: adders.Rollout(4, 0.99, 0.95)]


@pytest.mark.parametrize("make_adder", ALL_ADDERS)
def test_errors_name_the_field(make_adder):
    env = FakeVectorEnv(3, seed=0)
    policy = FakePolicy(env.spec, seed=0)
    a = make_adder()
    step = env.reset()
    actions, extras = policy.act_step(step)
    nxt = env.step(actions)
    with pytest.raises(UsageError, match="add_first"):
        a.add(actions, nxt, extras)
    a.add_first(step)
    with pytest.raises(SpecError, match=r"action 'action': expected shape \(3,\)"):
        a.add(actions[:2], nxt, extras)
    with pytest.raises(SpecError, match="action 'action': expected dtype"):
        a.add(actions.astype(np.float32) + 0.5, nxt, extras)
    a.add(actions, nxt, extras)
    actions, extras = policy.act_step(nxt)
    nxt2 = env.step(actions)
    with pytest.raises(SpecError, match="extras field 'bogus'"):
        a.add(actions, nxt2, dict(extras, bogus=np.zeros(3, np.float32)))
    with pytest.raises(SpecError, match="extras field 'value'"):
        a.add(actions, nxt2, {k: v for k, v in extras.items() if k != "value"})
    with pytest.raises(SpecError, match="extras field 'state': expected shape"):
        a.add(actions, nxt2, dict(extras, state=np.zeros((3, 3), np.float32)))
    a.reset()
    with pytest.raises(UsageError, match="add_first"):
        a.add(actions, nxt2, extras)


@pytest.mark.parametrize("make_adder", ALL_ADDERS)
def test_repeated_env_ids_are_refused(make_adder):
    """A step that names one env twice (a hand-made Step; rlflow's envs never do) is an error naming
    env_ids, not two items of one stream."""
    env = FakeVectorEnv(3, seed=0)
    policy = FakePolicy(env.spec, seed=0)
    a = make_adder()
    step = env.reset()
    a.add_first(step)
    actions, extras = policy.act_step(step)
    nxt = env.step(actions)
    twice = rf.Step(obs=nxt.obs[[1, 1]], reward=nxt.reward[[1, 1]], terminated=nxt.terminated[[1, 1]],
                    truncated=nxt.truncated[[1, 1]], final_obs=nxt.final_obs[[1, 1]],
                    env_ids=np.array([1, 1]))
    with pytest.raises(SpecError, match=r"step 'env_ids': expected distinct ids.*got \[1, 1\]"):
        a.add(actions, twice, extras)        # the actions of the previous (full) step's rows


def test_declared_specs_are_enforced():
    env = FakeVectorEnv(2, seed=0)
    a = adders.Transition(0.9)
    a.item_specs(env.spec, {"value": rf.ArraySpec((), np.float32)})
    step = env.reset()
    a.add_first(step)
    with pytest.raises(SpecError, match="extras field 'log_prob'"):
        a.add(np.zeros(2, np.int64), env.step(np.zeros(2, np.int64)),
              {"value": np.zeros(2, np.float32), "log_prob": np.zeros(2, np.float32)})


def test_constructor_validation():
    with pytest.raises(UsageError, match="'n'"):
        adders.NStepTransition(0, 0.9)
    with pytest.raises(UsageError, match="'discount'"):
        adders.Transition(1.5)


# ------------------------------------------------------------------------------------------------
# sequences, episodes, rollouts
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(sched=schedules, length=st.integers(1, 5), period=st.integers(1, 5),
       end_behavior=st.sampled_from(["pad", "truncate", "continue"]), gamma=st.sampled_from([0.5, 1.0]),
       steps=st.integers(0, 40))
def test_sequence_matches_reference(sched, length, period, end_behavior, gamma, steps):
    env, policy, seed, switch_at = make(sched)
    adder = adders.Sequence(length, period, discount=gamma, end_behavior=end_behavior)
    got, rec = run(adder, env, policy, steps, seed, switch_at)
    assert_same_items(got, ref_sequence(rec, length, period, gamma, end_behavior))


@SETTINGS
@given(sched=schedules, gamma=st.sampled_from([0.5, 1.0]), steps=st.integers(0, 40))
def test_episode_matches_reference(sched, gamma, steps):
    env, policy, seed, switch_at = make(sched)
    adder = adders.Episode(max_length=41, discount=gamma)
    got, rec = run(adder, env, policy, steps, seed, switch_at)
    assert_same_items(got, ref_episode(rec, 41, gamma))


@SETTINGS
@given(sched=schedules, length=st.integers(1, 6), gamma=st.sampled_from([0.0, 0.9, 1.0]),
       lam=st.sampled_from([0.0, 0.95, 1.0]), steps=st.integers(0, 40))
def test_rollout_matches_reference(sched, length, gamma, lam, steps):
    env, policy, seed, switch_at = make(sched)
    adder = adders.Rollout(length, discount=gamma, gae_lambda=lam)
    got, rec = run(adder, env, policy, steps, seed, switch_at)
    assert_same_items(got, ref_rollout(rec, length, gamma, lam))


def test_episode_longer_than_max_length_raises():
    env = FakeVectorEnv(2, seed=0, p_terminate=0.0, p_truncate=0.0)
    a = adders.Episode(max_length=3)
    with pytest.raises(UsageError, match="max_length"):
        run(a, env, FakePolicy(env.spec, seed=0), 10)


def test_rollout_needs_values():
    env = FakeVectorEnv(2, seed=0)
    with pytest.raises(SpecError, match="final_value"):
        adders.Rollout(4, 0.99).item_specs(env.spec, {"value": rf.ArraySpec((), np.float32)})
    a = adders.Rollout(4, 0.99)
    step = env.reset()
    a.add_first(step)
    actions = FakePolicy(env.spec, seed=0, extras=False).act_step(step)
    with pytest.raises(SpecError, match="extras field 'value'"):
        a.add(actions, env.step(actions), {"log_prob": np.zeros(2, np.float32)})


def test_sequence_truncation_bootstraps_inside_continue_window():
    """A truncated step inside a "continue" window keeps its discount and its true final obs."""
    env = FakeVectorEnv(1, seed=5, p_terminate=0.0, p_truncate=0.3)
    got, rec = run(adders.Sequence(6, 6, discount=0.9, end_behavior="continue"), env,
                   FakePolicy(env.spec, seed=5), 60, seed=5)
    first = got["is_first"]
    assert first[:, 1:].any()
    w, t = np.nonzero(first[:, 1:])           # step t ends an episode inside window w
    assert np.all(got["discount"][w, t] == np.float32(0.9))
    assert np.all(got["next_obs"][w, t, 3] == 1.0)          # is_final: the true final observation
    assert np.all(got["obs"][w, t + 1, 2] == 0.0)           # the next step starts an episode


class InPlaceEnv:
    """Hands out every step in the same arrays, overwritten in place (like a shared-memory env)."""

    def __init__(self, env):
        self.env, self.spec = env, env.spec
        n = env.num_envs
        self.bufs = {"obs": np.zeros((n, 4), np.float32), "final_obs": np.zeros((n, 4), np.float32),
                     "reward": np.zeros(n, np.float32), "terminated": np.zeros(n, bool),
                     "truncated": np.zeros(n, bool), "env_ids": np.arange(n)}

    def _wrap(self, step):
        for k, b in self.bufs.items():
            b[...] = getattr(step, k)
        return rf.Step(alive=step.alive, **self.bufs)

    def reset(self, seed=None):
        return self._wrap(self.env.reset(seed))

    def step(self, actions):
        return self._wrap(self.env.step(actions))


@pytest.mark.parametrize("make_adder,reference", [
    (lambda: adders.NStepTransition(3, 0.9), lambda rec: ref_nstep(rec, 3, 0.9)),
    (lambda: adders.Sequence(4, 2, 0.9), lambda rec: ref_sequence(rec, 4, 2, 0.9, "pad")),
    (lambda: adders.Episode(100, 0.9), lambda rec: ref_episode(rec, 100, 0.9)),
    (lambda: adders.Rollout(4, 0.9, 0.9), lambda rec: ref_rollout(rec, 4, 0.9, 0.9))])
def test_env_buffers_reused_in_place(make_adder, reference):
    env = InPlaceEnv(FakeVectorEnv(4, seed=7, p_terminate=0.2, p_truncate=0.1))
    got, rec = run(make_adder(), env, FakePolicy(env.spec, seed=7), 60, seed=7)
    assert_same_items(got, reference(rec))


@SETTINGS
@given(sched=schedules, n=st.integers(2, 4), steps=st.integers(5, 40))
def test_nstep_items_of_each_env_come_out_in_step_order(sched, n, steps):
    """At an episode's end the last n - 1 windows close at once; they came out in the ring's slot
    order ((1, 6), (1, 4), (1, 5)), so a FIFO table or a queue handed a learner one env's steps out
    of order. Each env's items are now emitted in the order of its steps, on every path."""
    env, policy, seed, switch_at = make(sched)
    got, rec = run(adders.NStepTransition(n, 0.9), env, policy, steps, seed, switch_at)
    where = {}                                  # item key -> (env row, its place in that row's stream)
    for row in rec.streams:
        one = Recorder.__new__(Recorder)
        one.streams = {row: rec.streams[row]}
        for i, item in enumerate(ref_nstep(one, n, 0.9)):
            where[_key(item)] = (row, i)
    count = len(next(iter(got.values()))) if got else 0
    order = [where[_key({k: v[i] for k, v in got.items()})] for i in range(count)]
    for row in rec.streams:
        places = [i for r, i in order if r == row]
        assert places == sorted(places), (row, places)


@pytest.mark.parametrize("make_adder", [lambda: adders.Transition(0.9), lambda: adders.NStepTransition(3, 0.9),
                                        lambda: adders.Sequence(4, 2), lambda: adders.Episode(50)])
def test_extras_that_would_wrap_or_overflow_in_their_spec_dtype_are_refused(make_adder):
    """The first call fixes an extras field's dtype; a later int64 300 for an int8 field was stored
    as 44, a float64 1e39 for a float32 one as inf. Narrower-dtype values that fit still pass."""
    env = FakeVectorEnv(2, seed=0)
    a = make_adder()
    step = env.reset()
    a.add_first(step)
    acts = np.zeros(2, np.int64)
    a.add(acts, env.step(acts), {"w": np.zeros(2, np.int8), "f": np.zeros(2, np.float32)})
    a.add(acts, env.step(acts), {"w": np.array([5, -7]), "f": np.array([0.5, 1e30])})       # fit
    with pytest.raises(SpecError, match=r"extras field 'w'.*int8.*\[300, 300\]"):
        a.add(acts, env.step(acts), {"w": np.array([300, 300]), "f": np.zeros(2, np.float32)})
    with pytest.raises(SpecError, match=r"extras field 'f'.*float32.*1e\+39"):
        a.add(acts, env.step(acts), {"w": np.zeros(2, np.int8), "f": np.array([1e39, 0.0])})


def test_the_usual_steps_short_path_checks_values_as_the_general_path_does():
    """A step of the usual shape whose obs, final_obs or reward has another dtype of the same kind
    (float64 obs for a float32 spec, float64 rewards) takes the general path, which refuses values
    the cast would change (1e39 into float32 is inf) and takes the others; add_into leaves it."""
    env, a, sink, actions = _armed_transition()
    for field in ("obs", "final_obs", "reward"):
        step = env.step(actions)
        big = getattr(step, field).astype(np.float64)
        big[1] = 1e39
        bad = rf.Step(**{**vars(step), field: big})
        assert a.add_into(actions, bad, {}, sink) is None
        with pytest.raises(SpecError, match="'(obs|reward)'"):
            a.add(actions, bad, {})
        fine = rf.Step(**{**vars(step), field: getattr(step, field).astype(np.float64)})
        assert a.add_into(actions, fine, {}, sink) is None           # checked by add: it goes on
        items = a.add(actions, fine, {})
        key = {"obs": "next_obs", "final_obs": "next_obs", "reward": "reward"}[field]
        np.testing.assert_array_equal(items[key], getattr(step, field if field != "obs" else "final_obs"))
