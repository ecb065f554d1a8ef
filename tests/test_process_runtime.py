"""The process runtime: the same Experiment as the local runtime, actors in processes.

Checked here: the shared-memory param store never gives a torn or older version (raw store, across
processes, against a writer whose every element equals the version); the ring transport against a
reference (every item arrives once, in order, with backpressure); a run completes with the limiter's
samples per insert; a SIGKILLed actor is restarted; user exceptions come back with their traceback;
SIGINT / SIGTERM leave no process and no /dev/shm/rlflow_* segment behind.
"""

import contextlib
import io
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import gymnasium as gym
import numpy as np
import pytest

import rlflow as rf
from rlflow.errors import SpecError, UsageError, WorkerError
from rlflow.runtime.params import SharedParamStore
from rlflow.runtime.threads import THREAD_VARS
from rlflow.runtime.transport import Ring, RingWriter
from rlflow.specs import ArraySpec

pytestmark = pytest.mark.multiprocess

SPAWN = mp.get_context("spawn")


# --------------------------------------------------------------------------------------------------
# picklable pieces of an experiment (module level: spawn imports them by name)
# --------------------------------------------------------------------------------------------------
class RandomPolicy(rf.Policy):
    def __init__(self, spec):
        self.n = int(spec.action_space.n)

    def act(self, obs):
        return np.random.randint(self.n, size=len(obs))


class CountingLearner(rf.Learner):
    """Consumes batches; its parameters are arrays whose every element equals its step count."""

    def __init__(self, spec, sleep=0.0):
        self.steps = 0
        self.sleep = sleep
        self.keys = []

    def step(self, batch):
        self.steps += 1
        self.keys.append(batch.keys.copy())
        if self.sleep:
            time.sleep(self.sleep)
        return {"loss": float(batch["reward"].mean())}

    def get_params(self):
        v = float(self.steps)
        return [np.full((32, 256), v), {"b": np.full(1000, v, np.float32), "c": (np.full(3, v),)}]

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


class SlowLearner(CountingLearner):
    def __init__(self, spec):
        super().__init__(spec, sleep=0.002)


class VersionCheckingPolicy(RandomPolicy):
    """Raises (-> the run fails) if a parameter set is torn or older than the last one."""

    def __init__(self, spec):
        super().__init__(spec)
        self.last = -1.0
        self.pulls = 0

    def set_params(self, params):
        leaves = [params[0], params[1]["b"], params[1]["c"][0]]
        v = float(leaves[0].flat[0])
        for leaf in leaves:
            if not np.all(leaf == v):
                raise AssertionError(f"torn parameters: values {np.unique(leaf)[:5]} in one set")
        if v <= self.last:
            raise AssertionError(f"parameter version went from {self.last} to {v}")
        self.last = v
        self.pulls += 1


def ratio_table(specs):
    return rf.Table(capacity=5_000, sampler=rf.selectors.Uniform(seed=1), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.SampleToInsertRatio(
                        samples_per_insert=4.0, min_size_to_sample=64, error_buffer=64.0), specs=specs)


def minsize_table(specs):
    return rf.Table(capacity=5_000, sampler=rf.selectors.Uniform(seed=1), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.MinSize(64), specs=specs)


def experiment(policy=RandomPolicy, learner=CountingLearner, table=ratio_table, **kw):
    kw.setdefault("num_envs", 4)
    kw.setdefault("batch_size", 16)
    return rf.Experiment(env="CartPole-v1", policy=policy, learner=learner,
                         adder=rf.adders.Transition(discount=0.99), table=table, **kw)


class KillSelfPolicy(RandomPolicy):
    """SIGKILLs its own process after 200 acts, once per marker file (or always)."""

    def __init__(self, spec, marker=None, always=False):
        super().__init__(spec)
        self.marker, self.always, self.calls = marker, always, 0

    def act(self, obs):
        self.calls += 1
        if self.calls == 200 and (self.always or self._claim_marker()):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().act(obs)

    def _claim_marker(self):
        """True for the one process that creates the marker (atomic: two actors reach their 200th
        act together, and a check-then-create let both kill themselves)."""
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False


class KillSelfFactory:
    def __init__(self, marker=None, always=False):
        self.marker, self.always = marker, always

    def __call__(self, spec):
        return KillSelfPolicy(spec, self.marker, self.always)


class RaisingPolicy(RandomPolicy):
    def act(self, obs):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 50:
            raise ValueError("boom in the user's policy")
        return super().act(obs)


class RaisingLearner(CountingLearner):
    def step(self, batch):
        if self.steps == 10:
            raise KeyError("boom in the user's learner")
        return super().step(batch)


def raising_env():
    import gymnasium as gym

    class Exploding(gym.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.n = 0

        def step(self, action):
            self.n += 1
            if self.n == 30:
                raise RuntimeError("boom in the user's env")
            return self.env.step(action)

    return Exploding(gym.make("CartPole-v1"))


# --------------------------------------------------------------------------------------------------
# the shared-memory param store
# --------------------------------------------------------------------------------------------------
def _template(v):
    return {"w": np.full((64, 512), float(v)), "layers": [np.full(4096, float(v), np.float32),
                                                          (np.full((3, 3), int(v), np.int64),)]}


def _reader(store, seconds, conn):
    """Reads as fast as it can; reports (reads, retries, problems)."""
    problems, last, reads = [], -1, 0
    client = rf.sync.ParamClient(store, every_learner_steps=1)
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        version, params = store.read()                         # the raw store
        leaves = [params["w"], params["layers"][0], params["layers"][1][0]]
        if any(not np.all(leaf == version) for leaf in leaves):
            problems.append(f"torn read at version {version}")
        if version < last:
            problems.append(f"version went back from {last} to {version}")
        last = version
        got = client.poll()                                     # and through a ParamClient
        if got is not None and not np.all(got[1]["w"] == got[0]):
            problems.append(f"torn ParamClient read at version {got[0]}")
        reads += 1
    conn.send((reads, store.retries, problems[:5]))


def test_param_store_never_torn_never_older_across_processes():
    store = SharedParamStore(_template(0))
    try:
        store.publish(_template(0), 0)
        conns, procs = [], []
        for _ in range(2):
            a, b = SPAWN.Pipe(duplex=False)
            p = SPAWN.Process(target=_reader, args=(store, 2.0, b), daemon=True)
            p.start()
            conns.append(a)
            procs.append(p)
        v = 0
        t_end = time.monotonic() + 4.0
        while any(p.is_alive() for p in procs) and time.monotonic() < t_end:
            v += 1
            store.publish(_template(v), v)                       # as fast as the writer can
        results = [c.recv() for c in conns]
        for p in procs:
            p.join(5)
        assert v > 100
        for reads, retries, problems in results:
            assert problems == []
            assert reads > 20
    finally:
        store.close()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"rlflow_{os.getpid()}_")]


def _big_reader(store, reads, conn):
    store.for_reader(0)
    t0, out = time.monotonic(), []
    for _ in range(reads):
        version, params = store.read()
        out.append(bool(np.all(params["w"] == version)))
    conn.send((time.monotonic() - t0, store.retries, out))


def test_large_params_are_read_while_the_learner_publishes_without_pause():
    """A copy of large parameters outlasted two publications, so every read was retried: with
    200 MB and a learner publishing every step, actors read for tens of seconds and stopped acting.
    A reader now pins the buffer it copies and the writer defers that publication."""
    big = {"w": np.zeros(6_000_000)}                      # 48 MB: a copy takes tens of ms
    store = SharedParamStore(big, readers=1)
    try:
        store.publish(big, 0)
        a, b = SPAWN.Pipe(duplex=False)
        p = SPAWN.Process(target=_big_reader, args=(store, 10, b), daemon=True)
        p.start()
        v, published = 0, 0
        t_end = time.monotonic() + 60
        while not a.poll() and time.monotonic() < t_end:
            v += 1
            big["w"][:] = v
            published += store.publish(big, v)            # as fast as the writer can
        seconds, retries, ok = a.recv()
        p.join(5)
        assert ok == [True] * 10                          # never torn
        assert retries <= 3 and store.deferred > 0 and published > 0
    finally:
        store.close()


def test_a_pinned_buffer_defers_a_publication_until_unpinned_or_stale(monkeypatch):
    from rlflow.runtime import params as P

    store = SharedParamStore(_template(0), readers=2)
    try:
        assert store.publish(_template(0), 0)
        reader = pickle.loads(pickle.dumps(store)).for_reader(1)
        target = 1 - int(store._header[0])                # the buffer the next publication writes
        reader._pins[1] = (target + 1, time.monotonic_ns())
        assert store.publish(_template(1), 1) is False and store.latest_version() == 0
        assert reader.read()[0] == 0
        store._copies.extend([int(12e9), int(0.01e9)])    # one slow copy (fresh pages, a busy moment)
        reader._pins[1] = (target + 1, time.monotonic_ns() - int(1.5e9))  # a reader stopped for 1.5 s
        assert store.publish(_template(1), 1) and store.latest_version() == 1
        assert reader.read()[0] == 1 and reader._pins[1][0] == 0          # a read unpins
        with pytest.raises(UsageError, match="slot"):
            reader.for_reader(2)
        reader.close()
    finally:
        store.close()


def test_param_store_matches_sync_paramstore_semantics():
    ref = rf.sync.ParamStore()
    store = SharedParamStore(_template(0))
    try:
        assert store.latest_version() == ref.latest_version() == -1
        for v in (0, 3, 7):
            ref.publish(_template(v), v)
            store.publish(_template(v), v)
            (va, pa), (vb, pb) = ref.read(), store.read()
            assert va == vb == v == store.latest_version()
            assert np.array_equal(pa["w"], pb["w"]) and pb["layers"][1][0].dtype == np.int64
            assert isinstance(pb["layers"][1], tuple)
        with pytest.raises(UsageError, match="version"):
            store.publish(_template(7), 7)
        bad = _template(8)
        bad["w"] = np.zeros((64, 511))
        with pytest.raises(SpecError, match="shape"):
            store.publish(bad, 8)
        assert store.latest_version() == 7
    finally:
        store.close()


# --------------------------------------------------------------------------------------------------
# the ring transport against a reference: every item once, in order; backpressure
# --------------------------------------------------------------------------------------------------
def _producer(args, batches):
    w = RingWriter(args)
    for i, n in enumerate(batches):
        first = sum(batches[:i])
        w.write({"x": np.arange(first, first + n, dtype=np.int64),
                 "y": np.repeat(np.arange(first, first + n, dtype=np.float32)[:, None], 3, axis=1)})


def test_ring_delivers_every_item_once_in_order_with_backpressure():
    specs = {"x": ArraySpec((), np.int64), "y": ArraySpec((3,), np.float32)}
    rng = np.random.default_rng(0)
    batches = [int(n) for n in rng.integers(0, 12, size=300)]   # some larger than a slot: split
    ring = Ring(specs, slot_rows=5, slots=3, ctx=SPAWN)
    try:
        p = SPAWN.Process(target=_producer, args=(ring.writer_args(), batches), daemon=True)
        p.start()
        reader = ring.reader()
        got = []
        deadline = time.monotonic() + 30             # a spawned process starts in 0.3-2 s here
        while ring.depth() < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert ring.depth() == 3                     # the producer filled the 3 slots and blocks
        while sum(len(g) for g in got) < sum(batches):
            items = reader.get(timeout=10)
            assert items is not None
            assert np.array_equal(items["y"], np.repeat(items["x"].astype(np.float32)[:, None], 3, axis=1))
            got.append(items["x"].copy())
            reader.release()
        p.join(5)
        assert p.exitcode == 0
        assert np.array_equal(np.concatenate(got), np.arange(sum(batches)))   # reference: 0, 1, 2, ...
        assert ring.depth() == 0
    finally:
        ring.close()


def test_ring_pump_inserts_every_item_once_in_order():
    """pump() (receiver="inline") with a table that now and then refuses: every item once, in
    order, nothing lost at the ring's end or in partial slots."""
    specs = {"x": ArraySpec((), np.int64), "y": ArraySpec((3,), np.float32)}
    rng = np.random.default_rng(1)
    batches = [int(n) for n in rng.integers(0, 9, size=400)]
    ring = Ring(specs, slot_rows=4, slots=8, ctx=SPAWN)
    try:
        p = SPAWN.Process(target=_producer, args=(ring.writer_args(), batches), daemon=True)
        p.start()
        reader = ring.reader()
        got, refused = [], [0]

        def insert(items):
            if rng.random() < 0.2:      # the limiter says no
                refused[0] += 1
                return False
            assert np.array_equal(items["y"], np.repeat(items["x"].astype(np.float32)[:, None], 3, axis=1))
            got.append(items["x"].copy())
            return True

        deadline = time.monotonic() + 30
        while sum(len(g) for g in got) < sum(batches) and time.monotonic() < deadline:
            if not reader.pump(insert):
                time.sleep(0.001)
        p.join(5)
        assert p.exitcode == 0
        assert np.array_equal(np.concatenate(got), np.arange(sum(batches)))   # reference: 0, 1, 2, ...
        assert ring.depth() == 0 and refused[0] > 0
    finally:
        ring.close()


def test_ring_writer_refuses_a_wrong_shape():
    ring = Ring({"x": ArraySpec((2,), np.float32)}, slot_rows=4, slots=2, ctx=SPAWN)
    try:
        w = RingWriter(ring.writer_args())
        with pytest.raises(SpecError, match="'x'"):
            w.write({"x": np.zeros((3, 1), np.float32)})     # would broadcast silently
        with pytest.raises(SpecError, match="'z'"):
            w.write({"z": np.zeros((3, 2), np.float32)})
    finally:
        ring.close()


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"receiver": "thread", "prefetch": 2}])
def test_same_experiment_runs_on_both_backends_and_respects_samples_per_insert(options):
    exp = experiment(policy=VersionCheckingPolicy, num_envs=4)
    local = rf.run(exp, backend="local", max_env_steps=3_000, progress=False)
    proc = rf.run(exp, backend="process", num_actors=2, max_env_steps=6_000, progress=False, **options)
    for r in (local, proc):
        stats = r.table.stats()
        # the limiter keeps inserts * 4 - samples within [4*64 - 64, 4*64 + 64]
        assert 4 * 64 - 64 <= stats["inserts"] * 4 - stats["samples"] <= 4 * 64 + 64
        assert r.learner.steps * 16 <= stats["samples"]
    f = proc.figures
    assert f["env_steps"] >= 6_000 and f["actor_restarts"] == 0
    assert f["actor_items"] == proc.table.stats()["inserts"] + f["items_in_flight"]   # nothing dropped
    for k in ("env_steps_per_s", "learner_steps_per_s", "samples_per_insert", "queue_depth",
              "queue_depth_0", "queue_depth_1", "param_lag_0", "param_lag_1", "prefetch_depth"):
        assert k in f, k


@pytest.mark.parametrize("start_method", ["forkserver", "fork"])
def test_every_start_method_runs(start_method):
    """An actor started by the fork server has the server for its parent, not the learner: it
    must still act (and stop with the learner)."""
    exp = experiment(num_envs=4)
    r = rf.run(exp, backend="process", max_env_steps=2_000, progress=False, start_method=start_method,
               max_restarts=0)
    assert r.figures["env_steps"] >= 2_000 and r.figures["actor_restarts"] == 0
    assert r.learner.steps > 0


@pytest.mark.slow
def test_backpressure_slow_learner_blocks_actors_and_loses_nothing(tmp_path):
    exp = experiment(learner=SlowLearner, num_envs=2)
    r = rf.run(exp, backend="process", num_actors=1, max_learner_steps=300, progress=False,
               log_dir=str(tmp_path), queue_slots=4)
    f = r.figures
    assert r.learner.steps == 300
    assert f["actor_blocked_s"] > 0.1                   # the ring filled and the actor waited
    assert f["actor_items"] == r.table.stats()["inserts"] + f["items_in_flight"]
    assert f["items_in_flight"] <= 4 * 2                 # at most the ring's slots
    header = (tmp_path / "figures.csv").read_text().splitlines()[0].split(",")
    for k in ("queue_depth", "param_lag_0", "samples_per_insert", "env_steps_per_s"):
        assert k in header


@pytest.mark.slow
@pytest.mark.parametrize("receiver", ["inline", "thread"])
def test_sigkilled_actor_is_restarted_and_the_run_completes(tmp_path, receiver):
    marker = str(tmp_path / "killed-once")
    exp = experiment(policy=KillSelfFactory(marker), table=minsize_table, num_envs=2)
    r = rf.run(exp, backend="process", num_actors=2, max_env_steps=4_000, progress=False, receiver=receiver)
    assert os.path.exists(marker)
    assert r.figures["actor_restarts"] == 1
    assert r.figures["env_steps"] >= 4_000
    assert r.learner.steps > 0


def _rlflow_mappings() -> set:
    """Names of rlflow's shared-memory segments this process maps now."""
    with open("/proc/self/maps") as f:
        return {line.split("/dev/shm/")[1].split()[0] for line in f if "/dev/shm/rlflow_" in line}


class MappingsLearner(CountingLearner):
    """Records the most rlflow segments this (the learner's) process mapped at once."""

    def __init__(self, spec=None):
        super().__init__(spec)
        self.most = 0

    def step(self, batch):
        if self.steps % 20 == 0:
            self.most = max(self.most, len(_rlflow_mappings()))
        return super().step(batch)


@pytest.mark.slow
def test_the_rings_of_dead_actors_are_unmapped_once_drained_and_all_when_the_run_ends():
    """Each restart gets a new ring; the dead incarnation's ring stayed mapped in the learner's
    process until the run ended (one more ring of memory per restart), and every ring after
    rf.run returned, until a garbage collection."""
    learner = MappingsLearner()
    exp = experiment(policy=KillSelfFactory(always=True), table=minsize_table, num_envs=2, learner=learner)
    with pytest.raises(WorkerError, match="max_restarts=5"):
        rf.run(exp, backend="process", num_actors=1, max_env_steps=1_000_000, progress=False, max_restarts=5)
    assert learner.steps > 100
    assert learner.most <= 4            # store, control, the ring and at most one dead one not yet drained
    assert _rlflow_mappings() == set()  # nothing mapped once the run is over, with no gc.collect()


class VerySlowLearner(CountingLearner):
    def __init__(self, spec):
        super().__init__(spec, sleep=0.05)


@pytest.mark.slow
def test_an_actor_killed_by_the_stop_while_publishing_reports_its_lost_rows():
    """An actor frozen (SIGSTOP) while it waits for ring space, still frozen when the run ends: the
    stop kills it, and the rows of the step it was publishing are counted in items_lost (they
    were in no figure: env steps exceeded inserts + in flight + lost)."""
    import multiprocessing as mp
    import threading

    def freeze():
        time.sleep(3.0)
        for p in mp.active_children():
            if p.name.startswith("rlflow-actor"):
                os.kill(p.pid, signal.SIGSTOP)

    exp = experiment(learner=VerySlowLearner, table=lambda specs: rf.Table.queue(16, specs=specs), num_envs=4,
                     batch_size=4)
    threading.Thread(target=freeze, daemon=True).start()
    r = rf.run(exp, backend="process", num_actors=1, max_seconds=5, progress=False)
    f = r.figures
    inserts = r.table.stats()["inserts"]
    assert f["env_steps"] == inserts + f["items_in_flight"] + f["items_lost"]    # one item per env step
    assert f["actor_items"] == inserts + f["items_in_flight"]


@pytest.mark.slow
def test_an_actor_that_keeps_dying_stops_the_run_after_max_restarts():
    exp = experiment(policy=KillSelfFactory(always=True), table=minsize_table, num_envs=2)
    with pytest.raises(WorkerError, match="max_restarts=1") as info:
        rf.run(exp, backend="process", num_actors=1, max_env_steps=100_000, progress=False, max_restarts=1)
    assert "SIGKILL" in str(info.value)


@pytest.mark.parametrize("policy,env,text,where", [
    (RaisingPolicy, "CartPole-v1", "boom in the user's policy", "in act"),
    (RandomPolicy, raising_env, "boom in the user's env", "in step"),
])
def test_user_exception_in_an_actor_shows_its_traceback(policy, env, text, where):
    exp = rf.Experiment(env=env, policy=policy, learner=CountingLearner,
                        adder=rf.adders.Transition(discount=0.99), table=minsize_table, num_envs=2,
                        batch_size=16)
    with pytest.raises(WorkerError, match=text) as info:
        rf.run(exp, backend="process", num_actors=1, max_env_steps=100_000, progress=False)
    assert where in info.value.remote_traceback and text in info.value.remote_traceback
    assert "actor 0" in info.value.where


class LongMessagePolicy(RandomPolicy):
    """Raises with a 200 KB message: more than a pipe holds."""

    def act(self, obs):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 20:
            raise ValueError("boom with a long message " + "x" * 200_000 + " its end")
        return super().act(obs)


class _BadStr(Exception):
    def __str__(self):
        raise TypeError("no str")


class BadStrPolicy(RandomPolicy):
    def act(self, obs):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 20:
            raise _BadStr("x")
        return super().act(obs)


class LongWideMessagePolicy(RandomPolicy):
    """Raises with 20,000 four-byte characters: 80 KB, more than a pipe holds, though fewer
    characters than the report keeps."""

    def act(self, obs):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 20:
            raise ValueError("boom with a long message " + "\U0001F600" * 20_000 + " its end")
        return super().act(obs)


@pytest.mark.parametrize("policy,text", [(LongMessagePolicy, "boom with a long message"),
                                         (LongWideMessagePolicy, "boom with a long message"),
                                         (BadStrPolicy, "_BadStr")])
def test_an_actor_error_with_a_long_or_unprintable_message_shows_its_traceback(policy, text):
    """An actor's report of a 100 KB message filled its pipe: the actor blocked in the send, the
    learner read the pipe only once the actor had exited, and after actor_timeout the actor was
    killed as hung and restarted, the traceback lost. An exception whose str() raises lost its
    report too (the actor exited 1, "died", restarted). Reports are now clipped, str() guarded."""
    exp = rf.Experiment(env="CartPole-v1", policy=policy, learner=CountingLearner,
                        adder=rf.adders.Transition(discount=0.99), table=minsize_table, num_envs=2,
                        batch_size=16)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=text) as info:
        rf.run(exp, backend="process", num_actors=1, max_env_steps=100_000, progress=False,
               actor_timeout=60, max_restarts=0)
    assert time.monotonic() - t0 < 30
    tb = info.value.remote_traceback
    assert "in act" in tb and __file__.rsplit("/", 1)[-1] in tb
    if policy is not BadStrPolicy:
        assert "bytes of this report cut" in tb and tb.rstrip().endswith("its end")
        assert len(str(info.value)) < 30_000


def test_learner_exception_propagates_as_it_is():
    exp = experiment(learner=RaisingLearner, table=minsize_table)
    with pytest.raises(KeyError, match="boom in the user's learner"):
        rf.run(exp, backend="process", num_actors=1, max_env_steps=100_000, progress=False)


@pytest.mark.parametrize("num_actors", [1, 2])
def test_max_env_steps_is_not_overshot_by_more_than_a_vector_step_per_actor(num_actors):
    exp = experiment(table=minsize_table)
    r = rf.run(exp, backend="process", num_actors=num_actors, max_env_steps=3_001, progress=False)
    assert 3_001 <= r.figures["env_steps"] < 3_001 + num_actors * exp.num_envs


class BrokenLearner(CountingLearner):
    def __init__(self, spec):
        raise ValueError("boom in the user's learner constructor")


@pytest.mark.parametrize("num_actors", [1, 2])
def test_evaluations_happen_at_their_env_step(num_actors):
    """The actors wait at each evaluation's env step until the learner has evaluated, so the
    evaluated policy is that of exactly eval_every * k env steps (one actor; K actors overshoot by
    less than a vector step each), however far ahead of the learner the actors could run."""
    exp = experiment(learner=SlowLearner, table=minsize_table, eval_every=400, eval_episodes=2)
    r = rf.run(exp, backend="process", num_actors=num_actors, max_env_steps=2_400, progress=False)
    at = [e[0] for e in r.evals]
    assert len(at) >= 5, at
    for k, steps in enumerate(at[:5], start=1):
        if num_actors == 1:
            assert steps == 400 * k, at
        else:
            assert 400 * k <= steps < 400 * k + num_actors * exp.num_envs, at
    assert r.figures["env_steps"] >= 2_400 and r.learner.steps > 0


class StepsAtEvalPolicy(RandomPolicy):
    """Evaluation policy (built in the learner's process): records the learner steps each set of
    parameters it is handed carries (CountingLearner's elements equal its step count)."""

    seen: list = []

    def set_params(self, params):
        StepsAtEvalPolicy.seen.append(int(params[0].flat[0]))


def test_learner_catches_up_before_each_evaluation_as_in_the_local_runtime():
    """With a ratio limiter the process runtime's learner is the slower side, so the actors run
    ahead of it by the ring and the error buffer. At an evaluation it first takes every step the
    limiter allows on what the actors published, as the local runtime's learner has at that env
    step: the same learner steps at every evaluation on both runtimes."""
    exp = experiment(learner=SlowLearner, eval_policy=StepsAtEvalPolicy, eval_every=400, eval_episodes=2)
    steps = {}
    for backend in ("local", "process"):
        StepsAtEvalPolicy.seen = []
        r = rf.run(exp, backend=backend, max_env_steps=2_400, progress=False)
        assert [e[0] for e in r.evals][:5] == [400, 800, 1200, 1600, 2000], r.evals
        steps[backend] = StepsAtEvalPolicy.seen[:5]
    assert len(steps["local"]) == 5 and steps["local"][0] > 0, steps
    assert steps["process"] == steps["local"], steps


def _filled_ratio_table(items, error_buffer):
    specs = {"reward": ArraySpec((), np.float32)}
    t = rf.Table(capacity=5_000, sampler=rf.selectors.Uniform(seed=3), remover=rf.selectors.Fifo(),
                 rate_limiter=rf.rate_limiters.SampleToInsertRatio(
                     samples_per_insert=4.0, min_size_to_sample=64, error_buffer=error_buffer), specs=specs)
    t.insert({"reward": np.arange(items, dtype=np.float32)})
    return t


def test_inline_sampler_draws_batches_ahead_as_one_sample():
    """The learner's thread draws up to `depth` batches with one table.sample and hands them out
    one per call: the same items as one draw of depth * batch_size from a twin table, the limiter
    charged at the draw, never past `limit`, and fewer when the limiter admits fewer."""
    from rlflow.runtime.process import _InlineSampler

    table, twin = _filled_ratio_table(200, 1000.0), _filled_ratio_table(200, 1000.0)
    s = _InlineSampler(table, 16, limit=6, depth=4)
    first = s.get_nowait()
    assert table.stats()["samples"] == 64 and len(s.ahead) == 3
    batches = [first] + [s.get_nowait() for _ in range(3)]
    assert table.stats()["samples"] == 64                  # handed out, not drawn again
    ref = twin.sample(64)
    assert np.array_equal(np.concatenate([b.keys for b in batches]), ref.keys)
    assert np.array_equal(np.concatenate([b["reward"] for b in batches]), ref["reward"])
    assert all(len(b) == 16 and b["reward"].shape == (16,) for b in batches)
    more = [s.get_nowait(), s.get_nowait()]                 # the limit leaves room for 2 more
    assert table.stats()["samples"] == 96 and all(len(b) == 16 for b in more)
    with pytest.raises(__import__("queue").Empty):
        s.get_nowait()
    # a limiter that admits 2 batches now: 2 are drawn, not 4
    small = _filled_ratio_table(64, 32.0)      # samples allowed: 64 * 4 - (64 * 4 - 32) = 32
    s = _InlineSampler(small, 16, limit=None, depth=4)
    assert s.get_nowait() is not None and small.stats()["samples"] == 32 and len(s.ahead) == 1


def test_inline_draw_ahead_stops_at_max_learner_steps_and_loses_no_batch():
    """No batch is drawn past max_learner_steps, and a run that stops on env steps learns from
    every batch it drew: the table's samples are the learner's steps times the batch size."""
    r = rf.run(experiment(), backend="process", max_learner_steps=301, progress=False)
    assert r.learner.steps == 301
    assert r.table.stats()["samples"] == 301 * 16          # no batch drawn past the limit
    assert all(len(k) == 16 for k in r.learner.keys)
    r1 = rf.run(experiment(), backend="process", max_learner_steps=50, progress=False, prefetch=1)
    assert r1.learner.steps == 50 and r1.table.stats()["samples"] == 50 * 16
    r2 = rf.run(experiment(), backend="process", max_env_steps=1_500, progress=False)
    assert r2.learner.steps > 0 and r2.table.stats()["samples"] == r2.learner.steps * 16


def test_learner_constructor_error_after_actors_started_leaves_nothing():
    """Actors start while the learner is built; a learner that cannot be built stops them all."""
    import multiprocessing

    exp = experiment(learner=BrokenLearner, table=minsize_table)
    with pytest.raises(ValueError, match="learner constructor"):
        rf.run(exp, backend="process", num_actors=2, max_env_steps=1_000, progress=False)
    assert multiprocessing.active_children() == []
    mine = [n for n in os.listdir("/dev/shm") if n.startswith(f"rlflow_{os.getpid()}_")]
    assert mine == []


def test_unpicklable_experiment_is_refused_up_front():
    exp = experiment(policy=lambda spec: RandomPolicy(spec))
    with pytest.raises(UsageError, match="'policy'"):
        rf.run(exp, backend="process", max_env_steps=100, progress=False)


class ThreadsRecordingPolicy(RandomPolicy):
    """Writes what its process's environment says about math-library threads (actor processes
    only: the probe policy built in the learner's process writes nothing)."""

    def __init__(self, spec, path=None):
        super().__init__(spec)
        if mp.parent_process() is not None:
            with open(path, "w") as f:
                f.write(",".join(os.environ.get(v, "-") for v in THREAD_VARS))


class ThreadsRecordingFactory:
    def __init__(self, path):
        self.path = path

    def __call__(self, spec):
        return ThreadsRecordingPolicy(spec, self.path)


@pytest.mark.parametrize("actor_threads, user_env, expected", [
    (1, None, "1,1,1"), (2, None, "2,2,2"), (None, None, "-,-,-"), (1, "3", "3,-,-")])
def test_actor_processes_get_one_math_library_thread_unless_told(tmp_path, monkeypatch, actor_threads,
                                                                 user_env, expected):
    # a user who set one variable chose the threads: no other is set (torch read MKL_NUM_THREADS=1 over
    # the user's OMP_NUM_THREADS=3)
    for v in THREAD_VARS:
        monkeypatch.delenv(v, raising=False)
    if user_env is not None:                    # the user's own setting wins
        monkeypatch.setenv("OMP_NUM_THREADS", user_env)
    path = str(tmp_path / "threads.txt")
    rf.run(experiment(policy=ThreadsRecordingFactory(path)), backend="process", max_env_steps=200,
           progress=False, actor_threads=actor_threads)
    with open(path) as f:
        assert f.read() == expected
    # the learner's process keeps its environment as it was
    assert [os.environ.get(v) for v in THREAD_VARS] == [user_env, None, None]


class SlowStartPolicy(RandomPolicy):
    """Takes 2 s to build in an actor process (a slow import, say); at once in the learner's."""

    def __init__(self, spec):
        super().__init__(spec)
        if mp.parent_process() is not None:
            time.sleep(2.0)


def test_the_clock_starts_when_the_first_actor_acts():
    """wall_time (and so solved_time and the rates) leaves out the actors' start-up, as a
    single-process library's clock leaves out its constructor; startup_seconds holds it."""
    result = rf.run(experiment(policy=SlowStartPolicy), backend="process", max_env_steps=400,
                    progress=False)
    f = result.figures
    assert f["startup_seconds"] >= 2.0
    assert f["wall_time"] < 2.0
    assert all(row["wall_time"] <= f["wall_time"] for row in result.history)
    local = rf.run(experiment(), backend="local", max_env_steps=400, progress=False).figures
    assert 0.0 <= local["startup_seconds"] < 5.0


def test_unknown_or_bad_options_are_refused():
    with pytest.raises(UsageError, match="max_restarts"):
        rf.run(experiment(), backend="process", max_env_steps=100, progress=False, max_restarts=-1)
    with pytest.raises(UsageError, match="prefetch"):
        rf.run(experiment(), backend="process", max_env_steps=100, progress=False, prefetch=-1)
    with pytest.raises(UsageError, match="start_method"):
        rf.run(experiment(), backend="process", max_env_steps=100, progress=False, start_method="thread")
    with pytest.raises(UsageError, match="actor_threads"):
        rf.run(experiment(), backend="process", max_env_steps=100, progress=False, actor_threads=0)


# --------------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM: nothing left behind
# --------------------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import ctypes, multiprocessing as mp, os, signal, sys, time
    import numpy as np
    import rlflow as rf

    class Policy(rf.Policy):
        def __init__(self, spec):
            self.n = int(spec.action_space.n)
            if os.environ.get("STARTING_FILE") and mp.parent_process() is not None:
                open(os.environ["STARTING_FILE"] + str(os.getpid()), "w").close()
                time.sleep(60)          # an actor that takes long to start (an import, say)
        def act(self, obs):
            if os.environ.get("READY_FILE"):
                open(os.environ["READY_FILE"] + str(os.getpid()), "w").close()
            return np.random.randint(self.n, size=len(obs))

    def signal_in_a_callback(name):
        # the handler's exception is raised inside the callback, where Python prints and drops it
        # (as when numba loads its compiled kernels at start-up)
        def callback():
            os.kill(os.getpid(), getattr(signal, name))
            for _ in range(100_000):
                pass
        ctypes.CFUNCTYPE(None)(callback)()

    class Learner(rf.Learner):
        def __init__(self, spec):
            if os.environ.get("SIGNAL_IN_CALLBACK"):
                signal_in_a_callback(os.environ["SIGNAL_IN_CALLBACK"])
                print("LEARNER BUILT", flush=True)
        def step(self, batch):
            return {}

    def table(specs):
        return rf.Table(capacity=1000, rate_limiter=rf.rate_limiters.MinSize(10), specs=specs)

    if __name__ == "__main__":
        exp = rf.Experiment(env="CartPole-v1", policy=Policy, learner=Learner,
                            adder=rf.adders.Transition(discount=0.99), table=table, num_envs=2,
                            env_backend=sys.argv[1])
        rf.run(exp, backend="process", num_actors=2, max_seconds=120, progress=False)
        print("RUN COMPLETED", flush=True)
""")


def wait_for_markers(proc, folder, pattern, count=1, what="the run did not start", poll=0.1, seconds=60):
    """Wait until `count` files matching `pattern` are in `folder` (a subprocess run's processes
    write them when they reach a point), failing with the subprocess's stderr if it exits first."""
    deadline = time.monotonic() + seconds
    while len(list(folder.glob(pattern))) < count:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, what
        time.sleep(poll)


def _family(marker):
    """pids of live processes whose environment holds the marker."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    with open(f"/proc/{pid}/stat") as s:
                        if s.read().split(")")[-1].split()[0] != "Z":
                            out.append(int(pid))
        except OSError:
            continue
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig,env_backend,phase", [(signal.SIGINT, "serial", "acting"),
                                                   (signal.SIGTERM, "process", "acting"),
                                                   (signal.SIGTERM, "process", "group"),
                                                   (signal.SIGINT, "serial", "starting")])
def test_signal_stops_the_run_and_leaves_nothing_behind(tmp_path, sig, env_backend, phase):
    """phase "starting": the signal comes while both actors are still being built, before the
    run's clock starts (the learner waits for the first actor then). "group": to the whole
    process group, as Slurm, systemd or a container stop send it (the env workers, forked from the
    actors with their handler, reported the signal as an env's error: a false warning per actor)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    marker = f"RLFLOW_TEST_MARKER={uuid.uuid4().hex}"
    env = dict(os.environ, READY_FILE=str(tmp_path / "ready-"), RLFLOW_TEST_MARKER=marker.split("=")[1])
    if phase == "starting":
        env["STARTING_FILE"] = str(tmp_path / "starting-")
    proc = subprocess.Popen([sys.executable, str(script), env_backend], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=phase == "group")
    try:
        wait_for_markers(proc, tmp_path, "starting-*" if phase == "starting" else "ready-*", 2,
                         "actors did not start")
        family = set(_family(marker))
        assert proc.pid in family and len(family) >= 3
        time.sleep(0.3)
        t = time.monotonic()
        if phase == "group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
        assert time.monotonic() - t < 10, "the run took too long to stop"
        assert "raised an exception" not in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    left = [p for p in _family(marker)]
    deadline = time.monotonic() + 5
    while left and time.monotonic() < deadline:        # reaped orphans may take a moment
        time.sleep(0.1)
        left = _family(marker)
    assert left == [], f"processes left behind: {left}"
    segments = [n for n in os.listdir("/dev/shm") if n.startswith("rlflow_")
                and int(n.split("_")[1]) in family]
    assert segments == [], f"shared memory left behind: {segments}"


class PullTimesPolicy(VersionCheckingPolicy):
    """VersionCheckingPolicy that appends each parameter set's version and time to the file named
    by $PULL_LOG (one per actor process)."""

    def set_params(self, params):
        super().set_params(params)
        with open(f"{os.environ['PULL_LOG']}-{os.getpid()}", "a") as f:
            f.write(f"{self.last} {time.monotonic()}\n")


def test_param_sync_seconds_brings_newer_parameters_on_time(tmp_path, monkeypatch):
    """param_sync_steps far beyond the run's learner steps: only the seconds rule brings an actor
    new parameters, every ~0.2 s, each a newer version, never torn."""
    monkeypatch.setenv("PULL_LOG", str(tmp_path / "pulls"))
    exp = experiment(policy=PullTimesPolicy, table=minsize_table, param_sync_steps=10**9,
                     param_sync_seconds=0.2)
    r = rf.run(exp, backend="process", max_seconds=2.5, progress=False)
    assert r.learner.steps > 100
    [log] = list(tmp_path.glob("pulls-*"))
    rows = np.loadtxt(log, ndmin=2)
    versions, times = rows[:, 0], rows[:, 1]
    assert len(versions) >= 5, rows
    assert np.all(np.diff(versions) > 0)
    assert np.all(np.diff(times[1:]) >= 0.2 - 0.02), np.diff(times)


def test_no_named_semaphore_is_left_after_a_run_ends_or_fails():
    """Under "spawn" every multiprocessing semaphore has a /dev/shm name (sem.mp-*) for as long as
    the object lives; a run unlinks its own when it ends, and when it fails (while its exception,
    which holds the run's frames, is still alive)."""
    def ours():
        return {n for n in os.listdir("/dev/shm") if n.startswith("sem.mp-")}

    before = ours()
    rf.run(experiment(), backend="process", num_actors=2, max_learner_steps=50, progress=False)
    assert ours() - before == set()
    with pytest.raises(WorkerError) as info:
        rf.run(experiment(policy=RaisingPolicy), backend="process", max_env_steps=10_000, progress=False)
    assert info.value is not None and ours() - before == set()


def test_the_last_row_counts_what_the_final_figures_count(tmp_path):
    """Stopped by max_seconds, the actors step on until they see the stop: the last figures row
    (history and CSV) is written once they stopped, so it counts what result.figures counts; what
    they published by then went into the table (a MinSize table takes all of it)."""
    r = rf.run(experiment(table=minsize_table), backend="process", num_actors=2, max_seconds=1.5,
               progress=False, log_dir=str(tmp_path))
    last = r.history[-1]
    for k in ("env_steps", "learner_steps", "episodes"):
        assert last[k] == r.figures[k], k
    import csv
    with open(tmp_path / "figures.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["env_steps"]) == r.figures["env_steps"]
    assert r.figures["items_in_flight"] == 0
    assert r.table.stats()["inserts"] == r.figures["actor_items"]


@pytest.mark.parametrize("sig,code", [("SIGTERM", 128 + signal.SIGTERM), ("SIGINT", None)])
def test_a_signal_whose_exception_was_dropped_still_stops_the_run(tmp_path, sig, code):
    """A signal that arrives while the learner's process is inside a ctypes callback (numba's
    kernel loading at start-up) raises where Python drops the exception; the run must still stop
    within seconds, not run on to max_seconds."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    t = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), "serial"], capture_output=True, text=True, timeout=50,
                          env=dict(os.environ, SIGNAL_IN_CALLBACK=sig))
    assert time.monotonic() - t < 30
    assert "LEARNER BUILT" in proc.stdout and "RUN COMPLETED" not in proc.stdout, proc.stdout + proc.stderr
    assert "ctypes callback" in proc.stderr            # the exception was dropped there
    if code is not None:
        assert proc.returncode == code, proc.stderr[-2000:]
    else:
        assert "KeyboardInterrupt" in proc.stderr and proc.returncode != 0, proc.stderr[-2000:]


class KillEnvWorkerPolicy(RandomPolicy):
    """SIGKILLs one env worker of its own actor process after 200 acts, once per marker file."""

    def __init__(self, spec, marker):
        super().__init__(spec)
        self.marker, self.calls = marker, 0

    def act(self, obs):
        self.calls += 1
        if self.calls == 200 and KillSelfPolicy._claim_marker(self):
            me = str(os.getpid())
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if pid.isdigit() and f.read().rsplit(")", 1)[1].split()[1] == me:
                            os.kill(int(pid), signal.SIGKILL)      # a child: an env worker
                            break
                except OSError:
                    continue
        return super().act(obs)


class KillEnvWorkerFactory:
    def __init__(self, marker):
        self.marker = marker

    def __call__(self, spec):
        return KillEnvWorkerPolicy(spec, self.marker)


@pytest.mark.slow
def test_an_actor_whose_env_worker_died_is_restarted_and_the_run_completes(tmp_path):
    """A process-backed vector env inside an actor: one of its env workers is SIGKILLed. That is
    a process fault, not the env's code raising: the actor dies with it and is restarted."""
    marker = str(tmp_path / "killed-once")
    exp = experiment(policy=KillEnvWorkerFactory(marker), table=minsize_table, num_envs=2,
                     env_backend="process", env_workers=2)
    r = rf.run(exp, backend="process", num_actors=1, max_env_steps=3_000, progress=False)
    assert os.path.exists(marker)
    assert r.figures["actor_restarts"] == 1
    assert r.figures["env_steps"] >= 3_000


@pytest.mark.parametrize("limit", [{"max_env_steps": 3_000}, {"max_seconds": 1.5}])
def test_every_batch_the_prefetching_thread_drew_is_learned_from(limit):
    """receiver="thread" with prefetch: when the run stops, the batches the sampler thread had drawn
    (and the limiter counted) are learned from, as with the inline sampler."""
    r = rf.run(experiment(table=minsize_table), backend="process", progress=False, receiver="thread",
               prefetch=4, **limit)
    assert r.table.stats()["samples"] == 16 * r.learner.steps > 0


@pytest.mark.parametrize("case,expected", [
    ("batch", r"a sample of 4 items is more than the table's capacity \(2\).*batch_size"),
    ("rows", r"an insert of 8 items is more than the table's capacity \(4\)")])
@pytest.mark.parametrize("backend", ["local", "process"])
def test_a_table_that_can_never_admit_the_run_is_an_error_not_a_hang(case, expected, backend):
    """Table.queue(2) with batch_size 4, or Table.queue(4) under 8-row vector steps: nothing could
    ever be learned. Both runtimes say so up front for the batch (the local one named Table.sample's
    argument 'n', which the user never wrote); for the rows, both at the first insert the table can
    never take (the local runtime called it a deadlock), instead of waiting for ever."""
    table = (lambda specs: rf.Table.queue(2)) if case == "batch" else (lambda specs: rf.Table.queue(4))
    exp = experiment(table=table, num_envs=8 if case == "rows" else 2, batch_size=4 if case == "batch" else 2)
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=f"{backend} run: " + expected):
        rf.run(exp, backend=backend, max_env_steps=100_000, progress=False)
    assert time.monotonic() - t0 < 30


class StepCountingPolicy(RandomPolicy):
    """Its extras carry how many times act was called before (a recurrent state's stand-in)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.calls = 0

    def act(self, obs):
        out = super().act(obs), {"state": np.full(len(obs), self.calls, np.float32)}
        self.calls += 1
        return out


@pytest.mark.parametrize("backend", ["local", "process"])
@pytest.mark.parametrize("given", ["factory", "instance"])
def test_the_extras_probe_leaves_the_acting_policy_as_it_was(backend, given):
    """Without extras_specs the runtime learns the extras' specs from one probe call: made on a copy,
    so the first stored state is the policy's first (0), on both backends, and a policy given as an
    object is not changed by the run's set-up."""
    def seq_table(specs):
        return rf.Table(capacity=10_000, remover=rf.selectors.Fifo(), rate_limiter=rf.rate_limiters.MinSize(1),
                        sampler=rf.selectors.Fifo(), specs=specs)

    policy = None
    exp = rf.Experiment(env="CartPole-v1", policy=StepCountingPolicy, learner=CountingLearner,
                        adder=rf.adders.Sequence(4, 4, end_behavior="continue"), table=seq_table, num_envs=1,
                        batch_size=1)
    if given == "instance":
        spec = rf.envs.make("CartPole-v1", 1).spec
        exp.policy = policy = StepCountingPolicy(spec)
    r = rf.run(exp, backend=backend, max_env_steps=40, progress=False)
    assert len(r.table) > 0
    states = r.table.sample(len(r.table), timeout=1.0)["state"]      # Fifo: every item, in order
    assert states.shape[1:] == (4,)
    starts = sorted(states[:, 0].tolist())
    assert starts[0] == 0.0, starts
    if given == "instance" and backend == "process":
        assert policy.calls == 0


def _stalling_table(specs):
    # 3-row inserts, samples of 4: after 15 inserts the error is 3.75; an insert would take it to
    # 4.5 (> 4) and a sample to -0.25 (< 0): neither can ever go ahead again
    return rf.Table(capacity=1_000, sampler=rf.selectors.Uniform(seed=1), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.SampleToInsertRatio(
                        samples_per_insert=0.25, min_size_to_sample=8, error_buffer=2.0), specs=specs)


@pytest.mark.parametrize("receiver", ["inline", "thread"])
def test_a_limiter_that_deadlocks_mid_run_is_reported_as_the_local_runtime_does(receiver):
    """Such a state is reachable only mid-run, so no up-front check catches it; the local runtime
    raises when it gets there and the process runtime waited for ever."""
    exp = experiment(table=_stalling_table, num_envs=3, batch_size=4)
    for backend, opts in (("local", {}), ("process", {"receiver": receiver})):
        t0 = time.monotonic()
        with pytest.raises(UsageError, match="admits neither an insert of 3 items nor a sample of 4"):
            rf.run(exp, backend=backend, max_seconds=60, progress=False, **opts)
        assert time.monotonic() - t0 < 30, backend


@pytest.mark.slow
def test_a_step_whose_write_the_stop_cut_short_is_counted_and_in_flight():
    """A vector step's items spanning several ring slots: a stop that came after some were published
    left the step uncounted (env_steps and actor_items) while the table held part of it. Now the
    step counts and its unpublished rows are in items_in_flight: inserts + in flight = items."""
    exp = experiment(learner=SlowLearner, table=minsize_table, num_envs=3)
    for _ in range(3):
        r = rf.run(exp, backend="process", num_actors=2, max_env_steps=600, progress=False,
                   queue_slots=1, slot_rows=1)
        f = r.figures
        assert f["env_steps"] == f["actor_items"]                 # one Transition item per env step
        assert f["actor_items"] == r.table.stats()["inserts"] + f["items_in_flight"], f


def _small_expiring_table(specs):
    return rf.Table(capacity=64, sampler=rf.selectors.Prioritized(seed=1), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.MinSize(16), max_times_sampled=2, specs=specs)


@pytest.mark.slow
def test_the_inline_receiver_leaves_the_learner_its_share_when_actors_outpace_inserts():
    """A free-running limiter and actors that publish faster than the learner's thread inserts: the
    inline pump emptied the rings before each draw, which never happened, and the learner made a few
    steps a second. It now inserts for about as long as a learner step takes, then learns."""
    exp = experiment(table=_small_expiring_table, num_envs=2, batch_size=8)
    r = rf.run(exp, backend="process", num_actors=2, max_learner_steps=300, max_seconds=30, progress=False)
    assert r.figures["learner_steps"] == 300
    assert r.figures["wall_time"] < 10, r.figures["wall_time"]


def test_ring_pump_stops_at_a_ring_s_worth_or_its_deadline():
    import multiprocessing as mp

    ring = Ring({"x": rf.ArraySpec((), np.int64)}, slot_rows=1, slots=4, ctx=mp.get_context("fork"))
    try:
        writer, reader = RingWriter(ring.writer_args()), ring.reader()
        got = []
        for i in range(4):
            writer.write({"x": np.array([i])})
        assert reader.pump(lambda items: got.append(int(items["x"][0])) or True, until=0.0) == 1
        assert reader.pump(lambda items: got.append(int(items["x"][0])) or True) == 3
        assert got == [0, 1, 2, 3]
    finally:
        ring.close()


THREAD_RUNS = textwrap.dedent("""
    import signal, sys, threading, time
    sys.path.insert(0, "tests")
    import rlflow as rf
    from test_process_runtime import experiment, minsize_table

    def exp():
        return experiment(table=minsize_table, num_envs=2)

    if __name__ == "__main__":
        if sys.argv[1] == "stale":
            timer = threading.Timer(1.5, lambda: signal.raise_signal(signal.SIGINT))
            timer.start()
            try:
                rf.run(exp(), backend="process", max_seconds=30, progress=False)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            timer.join()
            box = {}
            def body():
                try:
                    box["r"] = rf.run(exp(), backend="process", max_env_steps=400, progress=False)
                except BaseException as e:
                    box["e"] = e
            t = threading.Thread(target=body)
            t.start()
            t.join(120)
            print("later run:", repr(box.get("e")) if "e" in box else box["r"].figures["env_steps"], flush=True)
        else:                       # a run in a daemon thread; the main thread waits and takes Ctrl-C
            t = threading.Thread(target=lambda: rf.run(exp(), backend="process", max_seconds=40,
                                                       progress=False), daemon=True)
            t.start()
            print("started", flush=True)
            t.join()
""")


@pytest.mark.slow
def test_a_caught_ctrl_c_does_not_stop_a_later_run_in_a_thread():
    """The signal of an interrupted run stayed recorded; a later process run in a thread (which
    installs no handlers, so never cleared it) raised KeyboardInterrupt at once."""
    out = subprocess.run([sys.executable, "-c", THREAD_RUNS, "stale"], capture_output=True, text=True,
                         timeout=180, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert "interrupted" in out.stdout, out.stderr[-2000:]
    assert "later run: 400" in out.stdout, out.stdout + out.stderr[-2000:]


@pytest.mark.slow
def test_ctrl_c_with_a_run_in_a_daemon_thread_exits_within_seconds_and_quietly():
    """At exit, multiprocessing waited for the actor processes until the run's own limit (40 s here),
    then its resource tracker called the run's segments leaked."""
    marker = f"RLFLOW_DAEMON_RUN_{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-c", THREAD_RUNS, "daemon"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                            start_new_session=True, env=dict(os.environ, **{marker: "1"}))
    try:
        assert proc.stdout.readline().strip() == "started"
        time.sleep(4.0)
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < 8, (took, err[-2000:])
    assert "leaked" not in err, err[-2000:]
    time.sleep(0.5)
    assert not _family(marker), _family(marker)


def _actor_pids(parent: int) -> list[int]:
    """This process's spawned children (actors), by /proc."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == parent and b"spawn_main" in cmd:
            out.append(int(pid))
    return out


@pytest.mark.slow
def test_an_actor_killed_while_publishing_a_step_reports_the_rows_it_lost():
    """An actor counts a step before it publishes the step's items (so checkpoints never hold items
    their counters leave out). Killed while it waited for ring slots (backpressure), those items
    were counted and never arrived: actor_items exceeded inserts + items_in_flight with nothing
    saying so. Now they leave actor_items, `items_lost` counts them and the restart line says so."""
    import threading

    exp = experiment(learner=SlowLearner, table=minsize_table, num_envs=3)
    for attempt in range(3):
        def kill_one():
            time.sleep(1.5)                 # the ring (1 slot of 1 row) is full: the actor waits in a write
            for pid in _actor_pids(os.getpid())[:1]:
                os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_one)
        killer.start()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            r = rf.run(exp, backend="process", num_actors=1, max_learner_steps=1_500, progress=False,
                       queue_slots=1, slot_rows=1, max_restarts=2)
        killer.join()
        f = r.figures
        assert f["actor_restarts"] == 1, f
        assert f["actor_items"] == r.table.stats()["inserts"] + f["items_in_flight"], f
        assert f["env_steps"] == f["actor_items"] + f["items_lost"], f     # Transition: an item a step
        if f["items_lost"]:
            assert f"{f['items_lost']} items of the step it was publishing were lost" in err.getvalue()
            break
    assert f["items_lost"] in (1, 2, 3), f        # part of one 3-env step


class MisbehavingPolicy(RandomPolicy):
    """At its 100th act: hangs (sleeps for ever), SIGTERMs its own process, or raises SystemExit;
    once per marker file (the restarted actor then acts normally)."""

    def __init__(self, spec, how, marker):
        super().__init__(spec)
        self.how, self.marker, self.calls = how, marker, 0

    def act(self, obs):
        self.calls += 1
        if self.calls == 100 and KillSelfPolicy._claim_marker(self):
            if self.how == "hang":
                while True:
                    time.sleep(1)
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            if self.how == "exit":
                sys.exit(7)
        return super().act(obs)


class MisbehavingFactory:
    def __init__(self, how, marker):
        self.how, self.marker = how, marker

    def __call__(self, spec):
        return MisbehavingPolicy(spec, self.how, self.marker)


@pytest.mark.slow
def test_a_hung_actor_is_killed_after_actor_timeout_and_restarted(tmp_path):
    """A policy call that never returns hung the whole run (steps/s 0 for ever, nothing said): the
    actor's heartbeat stops, and after actor_timeout it is killed and restarted like a dead one."""
    marker = str(tmp_path / "hung-once")
    exp = experiment(policy=MisbehavingFactory("hang", marker), table=minsize_table, num_envs=2)
    t0 = time.monotonic()
    r = rf.run(exp, backend="process", max_env_steps=3_000, progress=False, actor_timeout=2.0)
    assert os.path.exists(marker) and r.figures["actor_restarts"] == 1
    assert r.figures["env_steps"] >= 3_000 and time.monotonic() - t0 < 60
    exp = experiment(policy=MisbehavingFactory("hang", str(tmp_path / "again")), table=minsize_table, num_envs=2)
    with pytest.raises(WorkerError, match=r"actor 0 .*no progress for \d+ s, more than actor_timeout=2"):
        rf.run(exp, backend="process", max_env_steps=3_000, progress=False, actor_timeout=2.0, max_restarts=0)
    with pytest.raises(UsageError, match="'actor_timeout': expected None or seconds > 0, got 0"):
        rf.run(exp, backend="process", max_env_steps=3_000, progress=False, actor_timeout=0)


@pytest.mark.parametrize("how, expected", [("sigterm", r"died \(signal SIGTERM, exit code 143\)"),
                                           ("exit", r"SystemExit: 7")])
def test_an_actor_ended_by_sigterm_or_a_users_sys_exit_says_so(tmp_path, how, expected):
    """Both were 'the actor process died (exit code 0)': the actor swallowed the SystemExit (its
    SIGTERM handler's too). SIGTERM now reads as such, and sys.exit in user code is an error in
    user code, with its traceback."""
    exp = experiment(policy=MisbehavingFactory(how, str(tmp_path / "m")), table=minsize_table, num_envs=2)
    with pytest.raises(WorkerError, match=expected) as err:
        rf.run(exp, backend="process", max_env_steps=3_000, progress=False, max_restarts=0)
    if how == "exit":
        assert "in act" in str(err.value) and "sys.exit(7)" in str(err.value)


SIGKILLED_LEARNER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import rlflow as rf
    from test_process_runtime import RandomPolicy, minsize_table

    def learner(spec):                # the learner's process dies (kill -9, OOM killer) as actors start
        os.kill(os.getpid(), signal.SIGKILL)

    if __name__ == "__main__":
        exp = rf.Experiment(env="CartPole-v1", policy=RandomPolicy, learner=learner,
                            adder=rf.adders.Transition(discount=0.99), table=minsize_table, num_envs=2,
                            batch_size=16)
        rf.run(exp, backend="process", num_actors=2, max_env_steps=20_000, progress=False)
''')


@pytest.mark.slow
def test_a_sigkilled_learner_leaves_no_ring_segment(tmp_path):
    """Rings were unlinked only once their actor attached, and were not known to the resource
    tracker: SIGKILL of the learner's process while actors started left them in /dev/shm."""
    script = tmp_path / "run.py"
    script.write_text(SIGKILLED_LEARNER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 20          # the tracker and the actors notice, then clean up
    while time.monotonic() < deadline:
        left = [x for x in os.listdir("/dev/shm") if x.startswith("rlflow_")]
        pid_left = [x for x in left if x.split("_")[1].isdigit() and not _pid_alive(int(x.split("_")[1]))]
        if not pid_left:
            break
        time.sleep(0.5)
    assert not pid_left


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
def test_fork_start_method_with_process_envs_runs():
    """start_method="fork" with env_backend="process": the forked actor inherited the lock its
    parent held while starting it, and its own env workers' start waited for it for ever."""
    exp = experiment(table=minsize_table, num_envs=4, env_backend="process")
    r = rf.run(exp, backend="process", max_env_steps=2_000, progress=False, start_method="fork")
    assert r.figures["env_steps"] >= 2_000


class HangsInActorFactory:
    """A policy factory that never returns in an actor process (the learner's own calls return)."""

    def __init__(self):
        self.main = os.getpid()

    def __call__(self, spec):
        if os.getpid() != self.main:
            time.sleep(3600)
        return RandomPolicy(spec)


@pytest.mark.slow
def test_an_actor_stuck_while_starting_is_an_error_after_actor_timeout():
    """actor_timeout covered only actors that had started acting: a factory that never returned
    hung the run silently."""
    exp = experiment(policy=HangsInActorFactory(), table=minsize_table)
    t = time.monotonic()
    with pytest.raises(WorkerError, match=r"did not start acting within actor_timeout=3 s"):
        rf.run(exp, backend="process", max_env_steps=1_000, progress=False, actor_timeout=3)
    assert time.monotonic() - t < 30


SLOW_IMPORT = textwrap.dedent('''
    import os, time
    import numpy as np
    import rlflow as rf
    if os.environ.get("IN_ACTOR"):
        open(os.environ["IMPORTING_FILE"] + str(os.getpid()), "w").close()
        time.sleep(4)                       # an actor importing something slow (torch...)

    class Policy(rf.Policy):
        def __init__(self, spec):
            self.n = int(spec.action_space.n)
        def act(self, obs):
            return np.random.randint(self.n, size=len(obs))
''')

SLOW_IMPORT_RUN = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import rlflow as rf
    import slowpolicy

    class Learner(rf.Learner):
        def __init__(self, spec):
            pass
        def step(self, batch):
            return {}

    def table(specs):
        return rf.Table(capacity=1000, rate_limiter=rf.rate_limiters.MinSize(10), specs=specs)

    if __name__ == "__main__":
        os.environ["IN_ACTOR"] = "1"            # the actors' environment: their import is slow
        exp = rf.Experiment(env="CartPole-v1", policy=slowpolicy.Policy, learner=Learner,
                            adder=rf.adders.Transition(discount=0.99), table=table, num_envs=2)
        try:
            rf.run(exp, backend="process", max_seconds=60, progress=False)
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
            sys.exit(130)
''')


@pytest.mark.slow
def test_ctrl_c_while_an_actor_imports_prints_no_traceback(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while an actor process is
    still importing: the run stops, and the actor prints no KeyboardInterrupt traceback."""
    (tmp_path / "slowpolicy.py").write_text(SLOW_IMPORT)
    (tmp_path / "run.py").write_text(SLOW_IMPORT_RUN)
    env = dict(os.environ, IMPORTING_FILE=str(tmp_path / "importing-"))
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_markers(proc, tmp_path, "importing-*", what="the actor did not start importing", poll=0.05)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "INTERRUPTED" in out, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


# --------------------------------------------------------------------------------------------------
# on-policy data through a Queue table: how old are the parameters that made each batch?
# --------------------------------------------------------------------------------------------------
class VersionedPolicy(RandomPolicy):
    """Writes the version of the parameters it acts with into its extras (and the values the
    Rollout adder needs)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.version = 0

    def act(self, obs):
        n = len(obs)
        return (np.random.randint(self.n, size=n),
                {"value": np.zeros(n, np.float32), "final_value": np.zeros(n, np.float32),
                 "version": np.full(n, self.version, np.int64)})

    def set_params(self, params):
        self.version = int(params[0][0])


class AgeLearner(rf.Learner):
    """Records, per batch, how many learner versions older than its own the oldest step is."""

    def __init__(self, spec):
        self.steps, self.ages = 0, []

    def step(self, batch):
        self.ages.append(int(self.steps - batch["version"].min()))
        time.sleep(0.1)                        # learning is the slow part, as in PPO
        self.steps += 1
        return {}

    def get_params(self):
        return [np.full(1, self.steps, np.int64)]


class QueueOf:
    def __init__(self, n):
        self.n = n

    def __call__(self, specs):
        return rf.Table.queue(self.n, specs=specs)


def on_policy_experiment(actors=1):
    return rf.Experiment(env="CartPole-v1", num_envs=4, policy=VersionedPolicy, learner=AgeLearner,
                         adder=rf.adders.Rollout(8, discount=0.99), table=QueueOf(4 * actors),
                         batch_size=4 * actors, param_sync_steps=1)


@pytest.mark.parametrize("backend,actors,oldest", [("local", 1, 1), ("process", 1, 2), ("process", 2, 4)])
def test_a_queue_table_keeps_on_policy_data_fresh(backend, actors, oldest):
    """A rollout's first step acts before the learner's newest parameters reach the actor (the
    fragment is emitted one call after its last step): 1 version old on the local backend. The
    process backend's actors collect the next rollout while the learner learns: one to three more.
    Its 32-slot rings used to buffer on top of the queue: the age grew by one per learner step."""
    kw = {"num_actors": actors} if backend == "process" else {}
    r = rf.run(on_policy_experiment(actors), backend=backend, max_learner_steps=16, progress=False, **kw)
    ages = r.learner.ages
    assert len(ages) >= 16 and max(ages) <= oldest, ages


class PidPolicy(RandomPolicy):
    def act(self, obs):
        n = len(obs)
        return np.random.randint(self.n, size=n), {"pid": np.full(n, os.getpid(), np.int64)}


class PidCountingLearner(CountingLearner):
    def __init__(self, spec):
        super().__init__(spec)
        self.by_pid = {}

    def step(self, batch):
        if self.steps >= 2_000:            # every actor is up by then: their start-up staggers
            for p, c in zip(*np.unique(batch["pid"], return_counts=True)):
                self.by_pid[int(p)] = self.by_pid.get(int(p), 0) + int(c)
        return super().step(batch)


def ratio_table(specs):
    return rf.Table(capacity=4_000, sampler=rf.selectors.Uniform(seed=0), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.SampleToInsertRatio(8.0, 200, 400.0), specs=specs)


class SlowPidCountingLearner(PidCountingLearner):
    def step(self, batch):
        time.sleep(0.002)
        return super().step(batch)


def tight_ratio_table(specs):
    return rf.Table(capacity=100_000, specs=specs,
                    rate_limiter=rf.rate_limiters.SampleToInsertRatio(16.0, 200, 64.0))


@pytest.mark.parametrize("num_actors,learner,table,steps", [
    (3, PidCountingLearner, ratio_table, 6_000), (2, SlowPidCountingLearner, tight_ratio_table, 4_000)])
def test_the_inline_receiver_shares_inserts_among_the_actors(num_actors, learner, table, steps, tmp_path):
    """The inline pump moved ring by ring from actor 0: under a samples-per-insert limiter actor 0
    took nearly every insert (3 actors: 92% / 8% / 0.2% of the sampled items) and the others sat on
    full rings, thousands of parameter versions behind. Then a start that moved on every call
    aliased with a limiter admitting a slot every other call: 2 actors beside a 2 ms learner, in a
    run writing checkpoints, gave 96% / 4% (5,044 / 216 env steps), the starved one's lag in the
    thousands. The next call now starts after the last ring that gave a slot."""
    exp = rf.Experiment(env="CartPole-v1", num_envs=4, policy=PidPolicy, learner=learner,
                        adder=rf.adders.Transition(0.99), table=table, batch_size=32 if num_actors == 3 else 16)
    kw = {"checkpoint_dir": str(tmp_path / "ckpt")} if num_actors == 2 else {}   # checkpoints: the aliasing
    r = rf.run(exp, backend="process", num_actors=num_actors, max_learner_steps=steps, progress=False, **kw)
    shares = sorted(r.learner.by_pid.values())
    assert len(shares) == num_actors and shares[0] > 0.5 / num_actors * sum(shares), r.learner.by_pid
    assert max(r.figures[f"param_lag_{i}"] for i in range(num_actors)) < 500


class FiveMsLearner(CountingLearner):
    def __init__(self, spec):
        super().__init__(spec, sleep=0.005)


def one_to_one_table(specs):
    return rf.Table(capacity=4_000, sampler=rf.selectors.Uniform(seed=0), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.SampleToInsertRatio(1.0, 64, 64.0), specs=specs)


@pytest.mark.parametrize("num_actors,receiver", [(1, "inline"), (2, "inline"), (2, "thread")])
def test_a_run_ending_at_max_env_steps_learns_all_its_rate_limiter_allows(num_actors, receiver):
    """A slow learner under a samples-per-insert limiter: the process run stopped up to a ring plus
    the error buffer short of the learning the limiter allowed (80 learner steps where the local
    runtime made 93), unless an evaluation fell on the last step. It now ends where local does."""
    exp = experiment(learner=FiveMsLearner, table=one_to_one_table, num_envs=4, warmup_steps=0)
    local = rf.run(exp, backend="local", max_env_steps=1_500, progress=False)
    r = rf.run(exp, backend="process", num_actors=num_actors, max_env_steps=1_500, progress=False,
               receiver=receiver)
    assert r.figures["items_in_flight"] == 0
    assert not r.table.can_sample(exp.batch_size), r.table.stats()      # nothing left to learn
    if r.figures["env_steps"] == local.figures["env_steps"]:     # (2 actors may overshoot by a step)
        assert r.learner.steps == local.learner.steps, (r.learner.steps, local.learner.steps)


class SlowCloseEnv(gym.Env):
    """CartPole-like dynamics do not matter here: its close() takes 0.8 s and leaves a file."""
    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, folder):
        self.folder = folder

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 1.0, False, False, {}

    def close(self):
        time.sleep(0.8)
        with open(os.path.join(self.folder, f"{os.getpid()}-{uuid.uuid4().hex}"), "w"):
            pass


class SlowCloseFactory:
    def __init__(self, folder):
        self.folder = folder

    def __call__(self):
        return SlowCloseEnv(self.folder)


def test_the_end_of_a_run_waits_for_the_actors_envs_to_close(tmp_path):
    """5 envs whose close() takes 0.8 s each: the stop's 3 s grace SIGTERMed the actor in the
    middle of closing them (2 or 3 of 5 closed), and nothing said so. Every close now runs."""
    exp = rf.Experiment(env=SlowCloseFactory(str(tmp_path)), policy=RandomPolicy, learner=CountingLearner,
                        adder=rf.adders.Transition(discount=0.99), table=minsize_table, num_envs=5,
                        batch_size=16)
    t = time.monotonic()
    r = rf.run(exp, backend="process", max_env_steps=500, progress=False)
    # the final figures' clock stopped when the run did, not after the actor's 4 s of closing
    assert r.figures["wall_time"] < time.monotonic() - t - 3.0
    in_actor = [n for n in os.listdir(tmp_path) if not n.startswith(f"{os.getpid()}-")]
    assert len(in_actor) == 5, in_actor


# the test's process (actor processes import this module afresh, and inherit the environment)
MAIN_PID = int(os.environ.setdefault("RLFLOW_TEST_MAIN_PID", str(os.getpid())))


class SlowEvalPolicy(RandomPolicy):
    """Its set_params takes 0.5 s in the learner's process: there only the evaluations call it."""

    def set_params(self, params):
        if os.getpid() == MAIN_PID:
            time.sleep(0.5)


def test_evaluation_time_is_out_of_the_rates_as_on_local():
    """The local runtime leaves evaluations out of its rows' rates; the process runtime, whose
    actors wait during them, counted them (949 env steps/s against ~9k around them)."""
    exp = experiment(policy=SlowEvalPolicy, table=minsize_table, eval_every=300, eval_episodes=2)
    r = rf.run(exp, backend="process", max_env_steps=1_500, progress=False, progress_every=0.2)
    assert r.figures["eval_seconds"] >= 2.0
    spent, last = 0.0, 0
    for row in r.history:            # each row's interval, as its env-step rate says
        if row["env_steps"] > last and row["env_steps_per_s"] > 0:
            spent += (row["env_steps"] - last) / row["env_steps_per_s"]
        last = row["env_steps"]
    assert spent <= r.figures["wall_time"] - r.figures["eval_seconds"] + 0.3, (spent, r.figures)


def test_a_ring_snapshot_counts_only_the_rows_of_its_slots():
    """RingReader.snapshot read the head, then its published-rows entry, and took the pair if the
    head had moved on by less than 2; the writer rewrites that entry in the write after the next,
    before it moves the head: a writer paused there made a snapshot of 1 slot (3 rows) count 9."""
    import multiprocessing as mp
    import threading

    from rlflow.runtime.transport import Ring, RingWriter
    from rlflow.specs import ArraySpec

    ring = Ring({"x": ArraySpec((), np.float32)}, slot_rows=4, slots=8, ctx=mp.get_context("spawn"))
    try:
        reader = ring.reader()
        w = RingWriter(ring.writer_args(), trusted=True)
        w.write({"x": np.arange(3, dtype=np.float32)})          # head 1, 3 rows
        go, paused = threading.Event(), threading.Event()

        class WriterCounters:        # the writer stops just before it moves the head to 3
            def __init__(self, a):
                self.a = a

            def __getitem__(self, k):
                return self.a[k]

            def __setitem__(self, k, v):
                if k == 0 and v == 3:
                    paused.set()
                    time.sleep(1.0)
                self.a[k] = v

        class ReaderCounters:        # the reader stops between its head read and its rows read
            def __init__(self, a):
                self.a, self.n = a, 0

            def __getitem__(self, k):
                v = self.a[k]
                if k == 0:
                    self.n += 1
                    if self.n == 1:
                        go.set()
                        paused.wait(5)
                return v

        w._counters = WriterCounters(w._counters)
        reader._counters = ReaderCounters(reader._counters)

        def writer():
            go.wait()
            w.write({"x": np.arange(4, dtype=np.float32)})      # head 2, 7 rows
            w.write({"x": np.arange(2, dtype=np.float32)})      # rows for head 3 (9), then the head
        t = threading.Thread(target=writer)
        t.start()
        items, published = reader.snapshot()
        t.join()
        assert published == sum(len(i["x"]) for i in items), (len(items), published)
    finally:
        ring.close()


def test_a_process_run_in_a_thread_leaves_the_main_runs_held_stop_armed():
    """A process run in another thread cleared the module's held-stop state on its way out, which
    a run in the main thread had armed: that run's next Ctrl-C stopped it without its checkpoint."""
    import threading

    from rlflow.runtime import process as proc_rt

    proc_rt._held_for[:] = ["some/dir"]
    try:
        exp = experiment(table=minsize_table)
        t = threading.Thread(target=rf.run, args=(exp,), kwargs=dict(backend="process", max_env_steps=300,
                                                                     progress=False))
        t.start()
        t.join(60)
        assert proc_rt._held_for == ["some/dir"]
    finally:
        proc_rt._held_for.clear()


def test_a_callers_own_sigterm_handler_stays_in_place_as_on_local():
    """The process run replaced a caller's SIGTERM handler for the run (the run stopped with 143
    and the handler never ran) while the local run left it, as it leaves a SIGINT handler."""
    import threading

    got = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        r = rf.run(experiment(table=minsize_table), backend="process", max_seconds=3.5, progress=False)
        assert got == [signal.SIGTERM] and r.figures["env_steps"] > 0
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_ring_slot_lent_by_reserve_is_published_by_commit():
    """reserve lends the next free slot's arrays (only for a whole slot), commit publishes them as
    write does, cancel gives the slot back unpublished, and a stop while the ring is full raises
    ClosedError with the rows counted as unsent."""
    import multiprocessing as mp

    from rlflow.errors import ClosedError
    from rlflow.runtime.transport import Ring, RingWriter
    from rlflow.specs import ArraySpec

    specs = {"x": ArraySpec((2,), np.float32), "a": ArraySpec((), np.int64)}
    ring = Ring(specs, slot_rows=3, slots=2, ctx=mp.get_context("spawn"))
    try:
        stop = [False]
        reader = ring.reader()
        w = RingWriter(ring.writer_args(), should_stop=lambda: stop[0], poll=0.01, trusted=True)
        assert w.reserve(2) is None                       # not a whole slot: write the items
        out = w.reserve(3)
        out["x"][...] = np.arange(6, dtype=np.float32).reshape(3, 2)
        out["a"][...] = [4, 5, 6]
        w.commit(3)
        w.write({"x": np.ones((3, 2), np.float32), "a": np.array([7, 8, 9])})
        got = reader.get(1.0)
        assert got["x"].tolist() == [[0, 1], [2, 3], [4, 5]] and got["a"].tolist() == [4, 5, 6]
        reader.release()
        assert reader.get(1.0)["a"].tolist() == [7, 8, 9]
        reader.release()
        assert ring.published_rows() == 6 and ring.depth() == 0
        w.reserve(3)
        w.cancel()                                        # nothing published, the slot is free again
        assert reader.get(0.05) is None and ring.published_rows() == 6
        for v in (1, 2):                                  # fill both slots
            w.reserve(3)["a"][...] = v
            w.commit(3)
        stop[0] = True
        with pytest.raises(ClosedError):
            w.reserve(3)
        assert w.unsent == 3 and ring.depth() == 2 and ring.published_rows() == 12
        # a writer that checks items (not `trusted`) lends no slot: its items go through write
        assert RingWriter(ring.writer_args()).reserve(3) is None
    finally:
        ring.close()


def test_an_actors_publisher_counts_a_cancelled_slot_out_again():
    """The process actor's sink counts the rows before they are published; a write into a lent
    slot that fails gives the slot back and takes the rows out of the count again."""
    import multiprocessing as mp
    import types

    from rlflow.runtime.process import ITEMS, ENV_STEPS, NSTATS, _Publisher
    from rlflow.runtime.transport import Ring, RingWriter
    from rlflow.specs import ArraySpec

    ring = Ring({"a": ArraySpec((), np.int64)}, slot_rows=2, slots=1, ctx=mp.get_context("spawn"))
    try:
        row = np.zeros(NSTATS)
        pub = _Publisher(row, RingWriter(ring.writer_args(), trusted=True), wait_taken=False)
        pub.actor = types.SimpleNamespace(env_steps=10, items_added=4)
        pub.reserve(2)["a"][...] = 1
        assert row[ITEMS] == 6 and row[ENV_STEPS] == 10
        pub.cancel()
        assert row[ITEMS] == 4
        pub.reserve(2)                           # the slot is free again
        pub.commit(2)
        assert row[ITEMS] == 6 and ring.published_rows() == 2
    finally:
        ring.close()
