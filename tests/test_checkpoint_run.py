"""Whole-run checkpoints: counters, learner and table continue exactly on resume; writes are atomic."""

import json
import os
import pathlib
import random
import time

import gymnasium
import numpy as np
import pytest

import rlflow as rf
from rlflow.errors import UsageError
from rlflow.runtime import checkpoint as ckpt

from test_process_runtime import CountingLearner, RandomPolicy, minsize_table, wait_for_markers


def big_table(specs):
    return rf.Table(capacity=20_000, sampler=rf.selectors.Uniform(seed=2), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.SampleToInsertRatio(
                        samples_per_insert=2.0, min_size_to_sample=64, error_buffer=64.0), specs=specs)


def experiment(seed=0):
    return rf.Experiment(env="CartPole-v1", policy=RandomPolicy, learner=CountingLearner,
                         adder=rf.adders.Transition(discount=0.99), table=big_table, num_envs=4,
                         batch_size=16, warmup_steps=100, seed=seed)


def by_key(d):
    """(keys, field -> rows, next key) of a saved table, sorted by key (the replay checkpoint format)."""
    d = pathlib.Path(d)
    meta = json.loads((d / "table.json").read_text())
    slot_keys = np.load(d / "slot_keys.npy")
    keys = slot_keys[slot_keys >= 0]
    order = np.argsort(keys)
    data = {name: np.load(d / f"field_{i}.npy")[order] for i, name in enumerate(meta["fields"])}
    return keys[order], data, meta["next_key"]


def files(d):
    d = pathlib.Path(d)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """Saves the table exactly as a resumed run receives it, before the run touches it."""
    seen = {}
    original = ckpt.load_run

    def load_run(directory):
        state = original(directory)
        state.table.save(str(tmp_path / "at-resume"))
        seen["counters"] = dict(state.counters)
        seen["path"] = state.path
        return state

    monkeypatch.setattr(ckpt, "load_run", load_run)
    seen["dir"] = tmp_path / "at-resume"
    seen["load"] = original
    return seen


MP = pytest.mark.multiprocess


@pytest.mark.parametrize("first,second", [("local", "local"), pytest.param("process", "process", marks=MP),
                                          pytest.param("process", "local", marks=MP)])
def test_resume_continues_counters_and_table_exactly(tmp_path, captured, first, second):
    d = str(tmp_path / "ckpt")
    a = rf.run(experiment(), backend=first, max_env_steps=1_500, progress=False, checkpoint_dir=d,
               checkpoint_every=100)
    latest = ckpt.find(d)
    # the final checkpoint is the table the run returned, byte for byte
    a.table.save(str(tmp_path / "returned"))
    assert files(os.path.join(latest, "table")) == files(tmp_path / "returned")
    saved = captured["load"](d).counters
    assert saved["env_steps"] == a.figures["env_steps"] and saved["learner_steps"] == a.learner.steps
    assert saved["episodes"] == a.figures["episodes"] and saved["param_version"] <= a.learner.steps
    assert len([n for n in os.listdir(d) if n.startswith("ckpt-")]) == ckpt.KEEP

    b = rf.run(experiment(), backend=second, max_env_steps=2_500, progress=False, checkpoint_dir=d, resume=d)
    # the table at resume equals the saved one, byte for byte
    assert captured["path"] == latest
    assert files(captured["dir"]) == files(os.path.join(latest, "table"))
    # counters continue from the checkpoint
    assert b.figures["env_steps"] >= 2_500 and b.figures["env_steps"] < 2_500 + 4 * 2 + 64
    assert b.learner.steps > saved["learner_steps"]
    assert b.figures["episodes"] > saved["episodes"]
    # keys continue: the old items are still there (no eviction at this capacity), new ones follow
    sa, sb = a.table.stats(), b.table.stats()
    assert sb["inserts"] > sa["inserts"] and sb["samples"] > sa["samples"]
    b.table.save(str(tmp_path / "resumed"))
    old_keys, old_data, old_next = by_key(os.path.join(latest, "table"))
    new_keys, new_data, new_next = by_key(tmp_path / "resumed")
    kept = np.isin(new_keys, old_keys)
    assert np.array_equal(new_keys[kept], old_keys)
    for name in old_data:
        assert np.array_equal(new_data[name][kept], old_data[name])
    assert new_next == old_next + (sb["inserts"] - sa["inserts"])
    assert not np.isnan(b.table.priorities(old_keys)).any()
    # and the run after that resumes from the newest checkpoint
    assert captured["load"](d).counters["resumes"] == 1


def test_a_failed_write_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    d = str(tmp_path / "ckpt")
    rf.run(experiment(), max_env_steps=600, progress=False, checkpoint_dir=d)
    good = ckpt.find(d)
    good_files = files(good)

    def broken_save(self, directory):
        os.makedirs(directory)
        pathlib.Path(directory, "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(rf.Table, "save", broken_save)
    with pytest.raises(OSError, match="disk full") as info:
        rf.run(experiment(), max_env_steps=1_200, progress=False, checkpoint_dir=d, resume=d)
    # the error says what was being written, where, and which checkpoint is kept
    msg = "\n".join(getattr(info.value, "__notes__", []))
    assert "writing checkpoint ckpt-" in msg and d in msg and os.path.basename(good) in msg and "free" in msg
    assert ckpt.find(d) == good and files(good) == good_files
    assert not [n for n in os.listdir(d) if n.startswith(".tmp")]
    monkeypatch.undo()
    r = rf.run(experiment(), max_env_steps=1_200, progress=False, resume=d)
    assert r.figures["env_steps"] >= 1_200


def test_rng_states_round_trip():
    rng = np.random.default_rng(5)
    state = ckpt.capture_rng(rng)
    a = (random.random(), np.random.random(), rng.random())
    random.random(), np.random.random(), rng.random()
    ckpt.restore_rng(state, rng)
    assert (random.random(), np.random.random(), rng.random()) == a


def test_bad_checkpoint_options_are_refused(tmp_path):
    with pytest.raises(UsageError, match="checkpoint_every"):
        rf.run(experiment(), max_env_steps=10, progress=False, checkpoint_every=10)
    with pytest.raises(UsageError, match="checkpoint_every"):
        rf.run(experiment(), max_env_steps=10, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=0)
    with pytest.raises(UsageError, match="resume"):
        rf.run(experiment(), max_env_steps=10, progress=False, resume=str(tmp_path))


@pytest.mark.parametrize("backend", ["local", pytest.param("process", marks=MP)])
def test_resuming_a_run_at_its_limit_takes_no_step(tmp_path, backend):
    """A run resumed with the limit it already reached changes nothing: no env step, no learner
    step (the process runtime's sampler draws batches ahead: none of them is learned from either),
    no item; its figures are the checkpoint's counters."""
    d = str(tmp_path / "ckpt")
    a = rf.run(experiment(), backend=backend, max_env_steps=1_000, progress=False, checkpoint_dir=d)
    saved = ckpt.load_run(d)
    inserts = saved.table.stats()["inserts"]
    b = rf.run(experiment(), backend=backend, max_env_steps=saved.counters["env_steps"], progress=False,
               resume=d)
    assert b.figures["env_steps"] == saved.counters["env_steps"] == a.figures["env_steps"]
    assert b.learner.steps == saved.counters["learner_steps"] == a.learner.steps
    assert b.figures["learner_steps"] == a.learner.steps and b.figures["episodes"] == a.figures["episodes"]
    assert b.table.stats()["inserts"] == inserts and len(b.table) == len(saved.table)
    c = rf.run(experiment(), backend=backend, max_learner_steps=a.learner.steps, progress=False, resume=d)
    assert c.learner.steps == a.learner.steps and c.figures["env_steps"] == a.figures["env_steps"]


@pytest.mark.parametrize("options", [{}, pytest.param({"receiver": "thread", "prefetch": 3}, marks=MP)])
def test_checkpoints_count_only_batches_the_learner_learned_from(tmp_path, options):
    """In a checkpointing run nothing draws ahead: each checkpoint's table has counted exactly the
    batches its learner stepped on (samples = learner steps x batch size)."""
    d = str(tmp_path / "ckpt")
    backend = "process" if options else "local"
    exp = experiment()
    exp.table = minsize_table             # the learner runs free: a sampler thread would draw ahead
    rf.run(exp, backend=backend, max_learner_steps=450, progress=False, checkpoint_dir=d,
           checkpoint_every=100, **options)
    for name in sorted(n for n in os.listdir(d) if n.startswith("ckpt-")):
        state = ckpt.load_run(os.path.join(d, name))
        assert state.table.stats()["samples"] == 16 * state.counters["learner_steps"], name


@pytest.mark.parametrize("backend", ["local", pytest.param("process", marks=MP)])
def test_the_final_checkpoint_replaces_a_periodic_one_at_the_same_step(tmp_path, backend):
    """max_learner_steps=300, a checkpoint every 100: the run ends on a periodic checkpoint's step,
    and its final one replaces that one, so the two kept are distinct steps (200 and 300)."""
    d = str(tmp_path / "ckpt")
    rf.run(experiment(), backend=backend, max_learner_steps=300, progress=False, checkpoint_dir=d,
           checkpoint_every=100)
    names = sorted(n for n in os.listdir(d) if n.startswith("ckpt-"))
    steps = [ckpt.load_run(os.path.join(d, n)).counters["learner_steps"] for n in names]
    assert steps == [200, 300], (names, steps)
    assert ckpt.find(d) == os.path.join(d, names[-1])


@MP
def test_actor_items_continue_after_a_resume_with_another_actor_count(tmp_path):
    d = str(tmp_path / "ckpt")
    exp = rf.Experiment(env="CartPole-v1", policy=RandomPolicy, learner=CountingLearner,
                        adder=rf.adders.Transition(discount=0.99), table=minsize_table, num_envs=2,
                        batch_size=16)
    a = rf.run(exp, backend="process", num_actors=2, max_env_steps=1_000, progress=False, checkpoint_dir=d)
    assert a.figures["actor_items"] == a.figures["env_steps"]
    b = rf.run(exp, backend="process", num_actors=3, max_env_steps=2_000, progress=False, resume=d)
    assert b.figures["actor_items"] == b.figures["env_steps"] == b.table.stats()["inserts"]


def test_resuming_with_another_table_is_refused_naming_what_differs(tmp_path):
    ck = str(tmp_path / "ck")
    rf.run(experiment(), max_env_steps=400, progress=False, checkpoint_dir=ck)
    other = experiment()

    def limiter():
        return rf.rate_limiters.SampleToInsertRatio(samples_per_insert=2.0, min_size_to_sample=64,
                                                    error_buffer=64.0)
    other.table = lambda specs: rf.Table(capacity=5_000, sampler=rf.selectors.Uniform(seed=2),
                                         remover=rf.selectors.Fifo(), specs=specs, rate_limiter=limiter())
    with pytest.raises(UsageError, match="'table capacity': expected 20000 as in the checkpoint.*got 5000"):
        rf.run(other, max_env_steps=800, progress=False, resume=ck)
    other.table = lambda specs: rf.Table(capacity=20_000, sampler=rf.selectors.Lifo(), specs=specs,
                                         remover=rf.selectors.Fifo(), rate_limiter=limiter())
    with pytest.raises(UsageError, match="'table sampler': expected Uniform().*got Lifo()"):
        rf.run(other, max_env_steps=800, progress=False, resume=ck)
    again = experiment(seed=5)                     # the same table (its seed aside) resumes
    assert rf.run(again, max_env_steps=800, progress=False, resume=ck).figures["env_steps"] == 800


@pytest.mark.parametrize("damage", ["learner.pkl", "run.pkl", "table/table.json", "table/field_0.npy",
                                    "table/priorities.npy"])
@pytest.mark.parametrize("how", ["truncate", "remove"])
def test_a_damaged_checkpoint_file_is_an_error_naming_it(tmp_path, damage, how):
    ck = tmp_path / "ck"
    rf.run(experiment(), max_env_steps=300, progress=False, checkpoint_dir=str(ck))
    path = pathlib.Path(ckpt.find(ck)) / damage
    if how == "remove":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    if damage == "run.pkl" and how == "remove":
        expected = r"which is incomplete \(no run.pkl\)"    # LATEST names no complete checkpoint
    elif damage == "table/table.json" and how == "remove":
        expected = r"no table checkpoint in .*table.json is missing"
    else:
        expected = f"{os.path.basename(damage)}'?: expected a complete, readable file"
    with pytest.raises(UsageError, match=expected):
        rf.run(experiment(), max_env_steps=600, progress=False, resume=str(ck))


def test_a_good_save_removes_what_killed_saves_left(tmp_path):
    """A save killed before its rename leaves .tmp-ckpt-* (a table-sized copy) and maybe a LATEST
    pointer file; the next good save removes them."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / ".tmp-ckpt-000007-deadbeef" / "table").mkdir(parents=True)
    (ck / ".tmp-ckpt-000007-deadbeef" / "learner.pkl").write_bytes(b"x" * 100)
    (ck / ".LATEST.cafe").write_text("ckpt-000007\n")
    rf.run(experiment(), max_env_steps=300, progress=False, checkpoint_dir=str(ck))
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "ckpt-000001"]


@pytest.mark.parametrize("receiver", ["thread", "inline"])
def test_a_checkpoint_never_counts_fewer_env_steps_than_its_table_holds(tmp_path, monkeypatch, receiver):
    """With receiver threads the table went on filling while a checkpoint read the actors' counters
    (and the actors counted a step only after publishing its items): checkpoints held up to ~1,300
    more items than their env steps, and a resumed run counted from the lower number."""
    seen = []
    real = ckpt.save_run

    def checking(directory, *, learner, table, counters, **kw):
        seen.append((counters["env_steps"], sum(a["items"] for a in counters["actors"]),
                     table.stats()["inserts"]))
        return real(directory, learner=learner, table=table, counters=counters, **kw)

    monkeypatch.setattr(ckpt, "save_run", checking)
    exp = experiment()
    exp.table = minsize_table
    rf.run(exp, backend="process", num_actors=2, max_learner_steps=400, progress=False, receiver=receiver,
           checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=10)
    assert len(seen) >= 20
    for env_steps, items, inserts in seen:      # Transition: one item per env step
        assert inserts <= min(items, env_steps), seen


@pytest.mark.parametrize("backend", ["local", pytest.param("process", marks=pytest.mark.multiprocess)])
def test_resuming_with_another_adder_is_refused_naming_both(tmp_path, backend):
    """The table holds the checkpoint's adder's items: an n-step adder (or another discount) would
    put items of another meaning beside them, with the same specs. It went through silently."""
    ck = str(tmp_path / "ck")
    rf.run(experiment(), backend=backend, max_env_steps=400, progress=False, checkpoint_dir=ck)
    for adder, shown in ((rf.adders.NStepTransition(n=3, discount=0.99), r"NStepTransition\(n=3, discount=0.99\)"),
                         (rf.adders.Transition(discount=0.9), r"Transition\(discount=0.9\)")):
        other = experiment()
        other.adder = adder
        with pytest.raises(UsageError, match=r"'adder': expected Transition\(discount=0.99\) as in the "
                                             r"checkpoint.*got " + shown):
            rf.run(other, backend=backend, max_env_steps=800, progress=False, resume=ck)
    assert rf.run(experiment(), backend=backend, max_env_steps=800, progress=False,
                  resume=ck).figures["env_steps"] == 800


def test_a_latest_that_is_not_text_is_an_error_naming_it_and_never_costs_a_save(tmp_path):
    """A LATEST of binary garbage: resume said UnicodeDecodeError; a run writing into the directory
    failed at its first save. Now resume names LATEST, and a save takes the next free number."""
    ck = tmp_path / "ck"
    rf.run(experiment(), max_env_steps=300, progress=False, checkpoint_dir=str(ck))
    (ck / "LATEST").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError, match=r"LATEST -> None, which is not a checkpoint name"):
        rf.run(experiment(), max_env_steps=600, progress=False, resume=str(ck))
    rf.run(experiment(), max_env_steps=300, progress=False, checkpoint_dir=str(ck))
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "ckpt-000001", "ckpt-000002"]
    assert (ck / "LATEST").read_text().strip() == "ckpt-000002"


def test_an_interrupted_prune_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Old checkpoints are renamed away in one step before they are deleted: Ctrl-C in the middle of
    a deletion left a 'ckpt-*' missing some of its files."""
    ck = tmp_path / "ck"
    rf.run(experiment(), max_env_steps=300, progress=False, checkpoint_dir=str(ck))
    real = ckpt.shutil.rmtree

    def interrupted(path, *a, **k):     # the run's final save replaces ckpt-000001 (same learner step)
        os.remove(os.path.join(path, "learner.pkl"))          # part of the way...
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rf.run(experiment(), max_env_steps=300, progress=False, checkpoint_dir=str(ck))
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    names = sorted(p.name for p in ck.iterdir())
    assert [n for n in names if n.startswith("ckpt-")] == ["ckpt-000002"]
    assert (ck / "ckpt-000002" / "learner.pkl").exists() and (ck / "ckpt-000002" / "run.pkl").exists()
    assert [n for n in names if n.startswith(".tmp-ckpt-000001-")]      # what is left is garbage by name
    rf.run(experiment(), max_env_steps=300, progress=False, checkpoint_dir=str(ck))
    assert not [n for n in os.listdir(ck) if n.startswith(".tmp-")]


@pytest.mark.parametrize("backend", ["local", "process"])
def test_a_resume_that_is_not_a_path_is_named(backend):
    exp = rf.Experiment(env="CartPole-v1", policy=RandomPolicy, learner=CountingLearner,
                        adder=rf.adders.Transition(0.99), table=minsize_table, num_envs=2, batch_size=8)
    with pytest.raises(UsageError, match=r"run 'resume': expected a checkpoint directory .*got 123"):
        rf.run(exp, backend=backend, max_env_steps=100, progress=False, resume=123)


def test_a_checkpoint_dir_that_is_one_checkpoint_is_refused(tmp_path):
    """checkpoint_dir=<one ckpt-* folder> wrote new checkpoints inside it, and a later resume= of
    it found its own run.pkl first and silently loaded the old state."""
    d = str(tmp_path / "ckpt")
    rf.run(experiment(), max_env_steps=300, progress=False, checkpoint_dir=d)
    one = ckpt.find(d)
    with pytest.raises(UsageError, match="checkpoint_dir") as info:
        rf.run(experiment(), max_env_steps=600, progress=False, checkpoint_dir=one, resume=one)
    assert "run.pkl" in str(info.value) and d in str(info.value)
    assert sorted(os.listdir(one)) == sorted(os.listdir(ckpt.find(d)))      # nothing written inside


class StampEnv(gymnasium.Env):
    """Observations (pid, instance, t): every env step of every actor process is a distinct row."""
    observation_space = gymnasium.spaces.Box(0, 2**40, (3,), np.int64)
    action_space = gymnasium.spaces.Discrete(2)
    made = 0

    def __init__(self):
        StampEnv.made += 1
        self.instance = StampEnv.made
        self.t = 0

    def _obs(self):
        return np.array([os.getpid(), self.instance, self.t], np.int64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t += 1
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 1.0, self.t % 37 == 0, False, {}


class SlowLearner(rf.Learner):
    def __init__(self, spec):
        self.steps = 0

    def step(self, batch):
        self.steps += 1
        time.sleep(0.002)
        return {}


def held_back_table(specs):
    """Far more samples than inserts: the learner is the slow side, so the actors' rings fill."""
    return rf.Table(capacity=50_000, sampler=rf.selectors.Uniform(seed=2), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.SampleToInsertRatio(
                        samples_per_insert=8.0, min_size_to_sample=64, error_buffer=64.0), specs=specs)


def stamp_experiment():
    return rf.Experiment(env=StampEnv, policy=RandomPolicy, learner=SlowLearner,
                         adder=rf.adders.Transition(discount=0.99), table=held_back_table, num_envs=4,
                         batch_size=16, warmup_steps=0, seed=0)


def rows_of(items_list, field="obs"):
    return [tuple(r) for items in items_list for r in np.asarray(items[field]).tolist()]


@MP
@pytest.mark.parametrize("receiver", ["inline", "thread"])
def test_a_checkpoint_holds_the_items_in_the_actors_rings_and_a_resume_inserts_them_first(tmp_path, receiver):
    """The items actors had published and the table had not taken yet were left out of checkpoints
    (up to a ring per actor): a resumed run never had them. Now the checkpoint holds them, once,
    and the resumed run inserts them before any new item."""
    d = str(tmp_path / "ck")
    # (a run that ends at max_env_steps learns all its limiter allows first, and the rings drain)
    a = rf.run(stamp_experiment(), backend="process", num_actors=2, max_learner_steps=150, progress=False,
               checkpoint_dir=d, receiver=receiver)
    state = ckpt.load_run(d)
    held = state.in_flight
    n_held = sum(len(items["obs"]) for items in held)
    assert n_held > 0, "the rate limiter held nothing back: the test proves nothing"
    assert state.counters["items_in_flight"] == n_held
    # every item the actors published is in the table or in flight (rows of a step an actor could
    # not publish at the stop are counted by the figures, not saved)
    assert state.table.stats()["inserts"] + n_held <= a.figures["actor_items"]
    assert a.figures["items_in_flight"] >= n_held
    assert a.figures["actor_items"] == state.table.stats()["inserts"] + a.figures["items_in_flight"]
    # what the checkpoint holds neither in its table nor in flight (a step an actor was still
    # publishing, or could not publish at the stop) is counted lost in it, out of the actors' items
    assert sum(x["items"] for x in state.counters["actors"]) == state.table.stats()["inserts"] + n_held
    assert state.counters["env_steps"] == state.table.stats()["inserts"] + n_held + state.counters["items_lost"]
    saved_keys, saved, saved_next = by_key(os.path.join(state.path, "table"))
    before = [tuple(r) for r in saved["obs"].tolist()]
    assert not set(before) & set(rows_of(held))

    b = rf.run(stamp_experiment(), backend="process", num_actors=2, max_learner_steps=300, progress=False,
               checkpoint_dir=d, resume=d, receiver=receiver)
    # the actors' items leave out what was lost (also what the checkpoint counted lost); env steps do not
    assert b.figures["actor_items"] == b.table.stats()["inserts"] + b.figures["items_in_flight"]
    assert b.figures["env_steps"] == (b.table.stats()["inserts"] + b.figures["items_in_flight"]
                                      + b.figures["items_lost"])
    b.table.save(str(tmp_path / "after"))
    keys, data, _ = by_key(tmp_path / "after")
    after = [tuple(r) for r in data["obs"].tolist()]
    assert len(after) == len(set(after))                       # nothing doubled
    assert set(before) | set(rows_of(held)) <= set(after)      # nothing lost
    # the held items went in first, in their order
    assert after[len(before):len(before) + n_held] == rows_of(held)
    assert np.array_equal(keys[keys >= saved_next][:n_held], np.arange(saved_next, saved_next + n_held))


@MP
def test_a_local_run_inserts_the_items_a_process_checkpoint_held(tmp_path):
    """A process run's checkpoint resumed on the local backend: the in-flight items go in first."""
    d = str(tmp_path / "ck")
    rf.run(stamp_experiment(), backend="process", num_actors=1, max_learner_steps=100, progress=False,
           checkpoint_dir=d)
    state = ckpt.load_run(d)
    held = rows_of(state.in_flight)
    _, saved, saved_next = by_key(os.path.join(state.path, "table"))
    b = rf.run(stamp_experiment(), backend="local", max_learner_steps=200, progress=False, resume=d)
    b.table.save(str(tmp_path / "after"))
    keys, data, _ = by_key(tmp_path / "after")
    after = [tuple(r) for r in data["obs"].tolist()]
    assert len(after) == len(set(after))
    assert after[len(saved["obs"]):len(saved["obs"]) + len(held)] == held


@MP
def test_a_local_resume_of_held_items_stops_at_max_learner_steps_and_keeps_the_rest(tmp_path):
    """Inserting a process checkpoint's in-flight items on local learned while the limiter refused
    them, past max_learner_steps (limit 101: 285-301 learner steps). It stops at the limit now, and
    the items it could not insert stay in its own checkpoint."""
    d = str(tmp_path / "ck")
    rf.run(stamp_experiment(), backend="process", num_actors=2, max_learner_steps=100, progress=False,
           checkpoint_dir=d)
    first = ckpt.load_run(d)
    held = rows_of(first.in_flight)
    assert held
    limit = first.counters["learner_steps"] + 1
    b = rf.run(stamp_experiment(), backend="local", max_learner_steps=limit, progress=False, resume=d,
               checkpoint_dir=d)
    assert b.figures["learner_steps"] == limit
    after = ckpt.load_run(d)
    _, data, _ = by_key(os.path.join(after.path, "table"))
    inserted = [tuple(r) for r in data["obs"].tolist()]
    # every held item is in the table or still held, once, in order
    assert inserted[len(inserted) - len(held) + len(rows_of(after.in_flight)):] + rows_of(after.in_flight) == held


@MP
def test_resumed_actors_wait_until_the_held_items_are_in(tmp_path):
    """The actors of a resumed run filled fresh rings while the checkpoint's held items still
    waited for the rate limiter: each short resumed run held a ring per actor more (204 -> 312 ->
    548 -> 656 -> 764 items). They now hold until those items are in."""
    d = str(tmp_path / "ck")
    rf.run(stamp_experiment(), backend="process", num_actors=2, max_learner_steps=60, progress=False,
           checkpoint_dir=d)
    held = [len(rows_of(ckpt.load_run(d).in_flight))]
    for limit in (70, 80):
        rf.run(stamp_experiment(), backend="process", num_actors=2, max_learner_steps=limit, progress=False,
               checkpoint_dir=d, resume=d)
        held.append(len(rows_of(ckpt.load_run(d).in_flight)))
    assert held[0] > 0 and held[2] <= held[1] <= held[0], held


def test_two_runs_never_write_checkpoints_into_one_directory(tmp_path):
    """Two runs given one checkpoint_dir pruned each other's checkpoints and failed with errors of
    damaged files or a full disk. The second is refused, naming the process that writes there."""
    d = tmp_path / "ck"
    d.mkdir()
    with ckpt.claimed(str(d)):          # as a running run holds it
        with pytest.raises(UsageError, match=rf"'checkpoint_dir'.*where process {os.getpid()} does"):
            rf.run(experiment(), max_env_steps=200, progress=False, checkpoint_dir=str(d))
    rf.run(experiment(), max_env_steps=200, progress=False, checkpoint_dir=str(d))     # free again
    assert sorted(p.name for p in d.iterdir()) == ["LATEST", "ckpt-000001"]       # no lock file left


def test_a_checkpoint_pruned_while_read_says_so(tmp_path, monkeypatch):
    d = str(tmp_path / "ck")
    rf.run(experiment(), max_env_steps=200, progress=False, checkpoint_dir=d)
    from rlflow.replay import Table

    def vanish(path):                   # another run pruned it under the reader
        import shutil
        shutil.rmtree(os.path.dirname(path))
        raise FileNotFoundError(path)

    monkeypatch.setattr(Table, "load", staticmethod(vanish))
    with pytest.raises(UsageError, match="'resume'.*was removed while it was read"):
        ckpt.load_run(d)


def test_a_local_resume_carries_the_lost_count_on(tmp_path):
    """A process checkpoint's items_lost (rows counted and never published) was dropped by a local
    resume's checkpoint: a later process resume's figures said 0 lost."""
    import pickle

    d, d2 = str(tmp_path / "a"), str(tmp_path / "b")
    rf.run(experiment(), max_env_steps=200, progress=False, checkpoint_dir=d)
    run_pkl = os.path.join(ckpt.find(d), "run.pkl")
    with open(run_pkl, "rb") as f:
        meta = pickle.load(f)
    meta["counters"]["items_lost"] = 5          # as a process run that lost 5 rows would have saved
    with open(run_pkl, "wb") as f:
        pickle.dump(meta, f)
    rf.run(experiment(), max_env_steps=400, progress=False, checkpoint_dir=d2, resume=d)
    assert ckpt.load_run(d2).counters["items_lost"] == 5


def fifo_minsize_table(specs):
    return rf.Table(capacity=100_000, sampler=rf.selectors.Fifo(), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.MinSize(1), specs=specs)


@pytest.mark.slow
def test_every_periodic_checkpoint_of_a_process_run_counts_exactly_what_it_holds(tmp_path):
    """One env, Transition items: an item per env step, so every checkpoint must hold table inserts
    + items in flight + items lost == env steps. The counters were read before the rings: items
    published meanwhile were saved in flight but counted nowhere (4 runs in 10 had a checkpoint
    holding more items than env steps; a resume then held items its counters did not count)."""
    exp = rf.Experiment(env="CartPole-v1", policy=RandomPolicy, learner=CountingLearner,
                        adder=rf.adders.Transition(discount=0.99), table=fifo_minsize_table, num_envs=1,
                        batch_size=8)
    seen = 0
    for trial in range(4):
        d = tmp_path / f"run{trial}"
        rf.run(exp, backend="process", num_actors=1, max_env_steps=3_000, checkpoint_dir=str(d),
               checkpoint_every=100, progress=False)
        for name in sorted(n for n in os.listdir(d) if n.startswith("ckpt-")):
            c = json.loads((d / name / "run.json").read_text())["counters"]
            inserts = rf.Table.load(str(d / name / "table")).stats()["inserts"]
            held = inserts + c["items_in_flight"] + c["items_lost"]
            assert held == c["env_steps"], (trial, name, inserts, c)
            # the actor's items leave out what is lost, as a restart's and a stop's count do
            assert c["actors"][0]["items"] == inserts + c["items_in_flight"], (trial, name, inserts, c)
            seen += 1
    assert seen >= 4


class _NoStateLearner(rf.Learner):
    def __init__(self, spec):
        pass

    def step(self, batch):
        return {}


@pytest.mark.parametrize("backend", ["local", "process"])
def test_checkpoints_of_a_learner_without_state_dict_warn(tmp_path, backend):
    """rf.Learner's state_dict is empty: checkpoints of a learner that keeps it hold no learner, and a
    resume built it afresh without a word."""
    exp = rf.Experiment(env="CartPole-v1", policy=RandomPolicy, learner=_NoStateLearner,
                        adder=rf.adders.Transition(discount=0.99), table=minsize_table, batch_size=8)
    with pytest.warns(RuntimeWarning, match="_NoStateLearner does not define state_dict"):
        rf.run(exp, backend=backend, max_env_steps=300, checkpoint_dir=str(tmp_path / "c"), progress=False)
    import warnings as w
    with w.catch_warnings():
        w.simplefilter("error", RuntimeWarning)      # no checkpoints: nothing to say
        rf.run(exp, backend=backend, max_env_steps=300, progress=False)


def test_an_adder_class_given_for_an_adder_says_so():
    with pytest.raises(UsageError, match=r"'adder'.*got the class Transition itself \(make one: Transition\(...\)\)"):
        rf.Experiment(env="CartPole-v1", policy=RandomPolicy, learner=CountingLearner, adder=rf.adders.Transition,
                      table=minsize_table, batch_size=8)


_HELD_STOP = r"""
import os, sys
import numpy as np
import rlflow as rf

class Policy(rf.Policy):
    def __init__(self, spec):
        self.calls = 0
    def act(self, obs):
        self.calls += 1
        if self.calls == 200:
            open(os.environ["READY_FILE"] + str(os.getpid()), "w").close()
        return np.random.randint(2, size=len(obs))

class Learner(rf.Learner):
    def __init__(self, spec):
        self.steps = 0
    def step(self, batch):
        self.steps += 1
        return {}
    def state_dict(self):
        return {"steps": self.steps}
    def load_state_dict(self, state):
        self.steps = state["steps"]

def table(specs):
    return rf.Table(capacity=100_000, rate_limiter=rf.rate_limiters.MinSize(10), specs=specs)

if __name__ == "__main__":
    backend = sys.argv[1]
    exp = rf.Experiment(env="CartPole-v1", policy=Policy, learner=Learner,
                        adder=rf.adders.Transition(discount=0.99), table=table, num_envs=2,
                        env_backend="process" if backend == "local-process-envs" else "serial")
    kw = {"num_actors": 2, "max_restarts": 0} if backend == "process" else {}
    r = rf.run(exp, backend=backend.split("-")[0], max_seconds=120, progress=False, checkpoint_dir=sys.argv[2],
               **kw)
    print("RUN COMPLETED", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend,sig,code,group", [
    ("local", "SIGINT", None, False), ("process", "SIGINT", None, False), ("local", "SIGTERM", 143, False),
    ("process", "SIGTERM", 143, False), ("process", "SIGTERM", 143, True), ("local-process-envs", "SIGTERM", 143, True)])
def test_a_signal_to_a_run_writing_checkpoints_writes_one_first(tmp_path, backend, sig, code, group):
    """A run with a checkpoint_dir and no checkpoint_every, stopped by Ctrl-C or SIGTERM (a cluster's
    preemption), wrote no checkpoint: nothing to resume from. It now stops at its next turn, writes
    one, then raises the signal's exception (exit 143 for SIGTERM; a KeyboardInterrupt for
    Ctrl-C); a resume carries on from there. `group`: SIGTERM to the whole process group (a cluster's
    preemption): the actors (or env workers) exit 143 too, which is the stop, not a death to restart
    (the process run failed with max_restarts=0, or restarted them during the stop)."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_HELD_STOP)
    d = tmp_path / "ckpt"
    env = dict(os.environ, READY_FILE=str(tmp_path / "ready-"))
    proc = subprocess.Popen([sys.executable, str(script), backend, str(d)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=group)
    try:
        wait_for_markers(proc, tmp_path, "ready-*")
        time.sleep(0.5)
        t = time.monotonic()
        if group:
            os.killpg(proc.pid, getattr(signal, sig))
        else:
            proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - t < 10, "the run took too long to stop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "RUN COMPLETED" not in out
    assert "writing a checkpoint" in err, err[-2000:]
    if code is not None:
        assert proc.returncode == code, err[-2000:]
    else:
        assert "KeyboardInterrupt" in err and proc.returncode != 0, err[-2000:]
    assert (d / "LATEST").exists(), err[-2000:]
    c = json.loads((d / (d / "LATEST").read_text().strip() / "run.json").read_text())["counters"]
    assert c["env_steps"] >= 400 and c["learner_steps"] > 0, c


def test_held_stop_holds_only_while_armed_and_raises_what_it_held(tmp_path):
    """HeldStop (the local runtime's): unarmed (start-up, close after the last checkpoint) a Ctrl-C
    raises at once (one during the envs' close after the checkpoint was held and then dropped:
    the run returned as if never stopped); armed, the first is held, raise_held raises it."""
    import signal

    from rlflow.runtime.common import HeldStop

    with HeldStop(str(tmp_path)) as held:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        held.arm()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        assert held.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            held.raise_held()
        with pytest.raises(KeyboardInterrupt):      # disarmed by raise_held: at once again
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class _SignalInCatchUpLearner(CountingLearner):
    """Once the process run catches it up (at max_env_steps under a ratio limiter), it sends this
    process SIGINT, and from then on takes 0.2 s a step."""

    def __init__(self, spec):
        super().__init__(spec)
        self.sent_at = None

    def step(self, batch):
        import signal
        import sys

        if self.sent_at is None:
            f = sys._getframe(1)
            while f is not None and f.f_code.co_name != "_catch_up":
                f = f.f_back
            if f is not None:
                self.sent_at = time.monotonic()
                os.kill(os.getpid(), signal.SIGINT)
        if self.sent_at is not None:
            time.sleep(0.2)
        return super().step(batch)

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def _ratio_table(specs):
    return rf.Table(capacity=100_000, specs=specs,
                    rate_limiter=rf.rate_limiters.SampleToInsertRatio(8.0, 100, 2_000.0))


@pytest.mark.slow
def test_a_held_signal_stops_the_final_catch_up(tmp_path):
    """A Ctrl-C held while the process run caught the learner up at max_env_steps was not looked at
    until the catch-up's 10 s give-up: the run learned on, then wrote its checkpoint."""
    exp = rf.Experiment(env="CartPole-v1", policy=RandomPolicy, learner=_SignalInCatchUpLearner,
                        adder=rf.adders.Transition(discount=0.99), table=_ratio_table, num_envs=4,
                        batch_size=16, warmup_steps=0)
    holder = {}
    orig = exp.learner

    def learner(spec):
        holder["l"] = orig(spec)
        return holder["l"]
    exp.learner = learner
    with pytest.raises(KeyboardInterrupt):
        rf.run(exp, backend="process", num_actors=1, max_env_steps=3_000, progress=False,
               checkpoint_dir=str(tmp_path / "c"))
    sent = holder["l"].sent_at
    assert sent is not None, "the learner was never caught up"
    assert time.monotonic() - sent < 5.0
    assert (tmp_path / "c" / "LATEST").exists()


class _SlowItems(dict):
    """Items whose first read by the ring writer takes 0.3 s: the actor has counted the step (its
    counters go first) and publishes its items late."""

    def __getitem__(self, k):
        if not getattr(self, "waited", False):
            self.waited = True
            time.sleep(0.3)
        return dict.__getitem__(self, k)


class _LastItemsLate(rf.adders.Transition):
    """Publishes the items of its `late_at`-th call late (a subclass with its own add: the actor
    hands its items to the ring's write)."""

    def __init__(self, discount, late_at):
        super().__init__(discount)
        self.late_at, self.calls = late_at, 0

    def add(self, actions, step, extras=None):
        items = super().add(actions, step, extras)
        self.calls += 1
        return _SlowItems(items) if self.calls == self.late_at else items


@MP
def test_the_end_of_a_run_learns_from_the_items_of_its_last_step_published_late(tmp_path):
    """The env steps are done when the actor counts its last step; its items may still be on
    their way into the ring. The learner's last steps (the catch-up the rate limiter allows) take
    them too: the run's final checkpoint leaves no step to the run that resumes it (which took one
    more, 121 after 120, when the catch-up ended before the last items came)."""
    d = str(tmp_path / "ckpt")
    exp = rf.Experiment(env="CartPole-v1", policy=RandomPolicy, learner=CountingLearner,
                        adder=_LastItemsLate(0.99, late_at=250), table=big_table, num_envs=4,
                        batch_size=16, warmup_steps=100, seed=0)
    a = rf.run(exp, backend="process", max_env_steps=1_000, progress=False, checkpoint_dir=d)
    saved = ckpt.load_run(d)
    assert saved.counters["env_steps"] == a.figures["env_steps"] == 1_000
    b = rf.run(exp, backend="process", max_env_steps=1_000, progress=False, resume=d)
    assert b.learner.steps == saved.counters["learner_steps"] == a.learner.steps
