"""Process and pool backends: same episodes as serial, faults, clean shutdown, pool streams."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import rlflow as rf
from rlflow.envs.vector import SerialVectorEnv, measure_step_cost
from rlflow.errors import SpecError, UsageError, WorkerError
from rlflow.runtime.env_workers import SPIN, ProcessVectorEnv, inline_split

from test_envs import Scripted

pytestmark = pytest.mark.multiprocess


class Tagged(Scripted):
    """Scripted env whose tag is its reset seed (env i gets seed + i), so obs[:, 0] names the env."""

    def reset(self, seed=None, options=None):
        if seed is not None:
            self.tag = seed
        return super().reset(seed=seed, options=options)


class Exploding(Scripted):
    def step(self, action):
        if int(action) == 4:
            raise RuntimeError("boom from the env")
        return super().step(action)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _rlflow_segments(pid):
    """Named blocks created by process `pid` ("rlflow_<pid>_<hex>"). Scoped to one creator: other
    rlflow runs on the machine (the process runtime names its segments the same way) come and go."""
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(f"rlflow_{pid}_"))


def _run(venv, seed, actions):
    out = [venv.reset(seed=seed)]
    for a in actions:
        out.append(venv.step(a))
    return out


def _assert_same(a, b):
    for s, t in zip(a, b):
        for f in ("obs", "reward", "terminated", "truncated", "final_obs", "env_ids", "alive", "action_mask"):
            x, y = getattr(s, f), getattr(t, f)
            if x is None:
                assert y is None, f
            else:
                np.testing.assert_array_equal(x, y, err_msg=f)
        np.testing.assert_array_equal(s.info["episode_return"], t.info["episode_return"])
        np.testing.assert_array_equal(s.info["episode_length"], t.info["episode_length"])


@pytest.mark.parametrize("env,n,workers,inline", [(Tagged, 7, 3, False), (Tagged, 4, 1, True),
                                                  (Tagged, 5, 2, True), ("CartPole-v1", 6, 2, False)])
def test_process_matches_serial(env, n, workers, inline):
    rng = np.random.default_rng(1)
    high = 5 if env is Tagged else 2
    actions = rng.integers(0, high, (80, n))
    with rf.envs.make(env, n) as serial:
        ref = _run(serial, 3, actions)
    with rf.envs.make(env, n, backend="process", workers=workers, inline=inline) as proc:
        assert proc.num_workers == workers and proc.inline == inline and proc.spec == serial.spec
        got = _run(proc, 3, actions)
        pids = proc.pids
    _assert_same(ref, got)
    assert not any(_alive(p) for p in pids)


def test_process_rejects_bad_actions_and_arguments():
    with rf.envs.make("CartPole-v1", 4, backend="process", workers=2) as venv:
        venv.reset(seed=0)
        with pytest.raises(SpecError, match="actions.*expected shape \\(4,\\).*got shape \\(2, 2\\)"):
            venv.step(np.zeros((2, 2), np.int64))
        venv.step(np.zeros(4, np.int64))          # still usable after a rejected call
    with pytest.raises(UsageError, match=r"'batch_size': expected an int in \[1, num_envs - 1 = 3\]"):
        rf.envs.make("CartPole-v1", 4, backend="pool")
    for batch_size in (None, 1):          # one env: no batch size would do, so num_envs is named
        with pytest.raises(UsageError, match="'num_envs': expected >= 2 with backend='pool'.*got 1"):
            rf.envs.make("CartPole-v1", 1, backend="pool", batch_size=batch_size)
    with pytest.raises(UsageError, match="batch_size"):
        rf.envs.make("CartPole-v1", 4, backend="pool", workers=2, batch_size=3)
    with pytest.raises(UsageError, match="'batch_size'.*backend='pool' returns batches, got 2"):
        rf.envs.make("CartPole-v1", 4, backend="process", workers=2, batch_size=2)
    with pytest.raises(UsageError, match="workers"):
        rf.envs.make("CartPole-v1", 4, backend="process", workers=5)
    with pytest.raises(UsageError, match="workers"):
        rf.envs.make("CartPole-v1", 4, backend="serial", workers=2)


@pytest.mark.parametrize("inline,where", [(False, "env worker 1"), (True, "inline slice")])
def test_worker_exception_is_worker_error_and_cleans_up(inline, where):
    venv = rf.envs.make(Exploding, 4, backend="process", workers=1 + (not inline), inline=inline)
    pids = venv.pids
    venv.reset(seed=0)
    venv.step(np.zeros(4, np.int64))
    with pytest.raises(WorkerError) as info:
        venv.step(np.array([0, 0, 4, 0]))
    err = info.value
    assert "boom from the env" in err.remote_traceback and "RuntimeError" in err.remote_traceback
    assert where in err.where and "env 2" in err.where
    assert venv.closed
    assert not any(_alive(p) for p in pids)


class LongError(Scripted):
    def step(self, action):
        if int(action) == 4:
            raise RuntimeError("boom from the env " + "y" * 300_000)
        return super().step(action)


@pytest.mark.parametrize("backend", ["process", "pool"])
def test_a_worker_exception_with_a_long_message_is_reported_clipped(backend):
    """A worker's report is clipped to a size its pipe holds, its start (file, line) and end kept."""
    kw = {"batch_size": 2} if backend == "pool" else {}
    venv = rf.envs.make(LongError, 4, backend=backend, workers=2, inline=False, **kw)
    step = venv.reset(seed=0)
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        for _ in range(5):
            step = venv.step(np.full(len(step), 4))
    assert time.monotonic() - t0 < 20
    tb = info.value.remote_traceback
    assert "boom from the env" in tb and "in step" in tb and "bytes of this report cut" in tb
    assert venv.closed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize("backend,inline", [("process", False), ("pool", True)])
def test_workers_run_under_sched_batch_without_an_inline_slice(backend, inline):
    """A worker's wake-up must not preempt the process that is still waking the other workers;
    beside a parent busy with its inline slice, workers keep the parent's policy (normal wake-up
    preemption unless the user chose otherwise). The caller's own policy is left as it was."""
    mine = os.sched_getscheduler(0)
    with rf.envs.make("CartPole-v1", 4, backend=backend, workers=1, batch_size=2 if inline else None,
                      inline=inline) as venv:
        venv.reset(seed=0)
        assert [os.sched_getscheduler(p) for p in venv.pids] == [mine if inline else os.SCHED_BATCH]
        assert os.sched_getscheduler(0) == mine


def test_worker_killed_is_worker_error():
    venv = rf.envs.make("CartPole-v1", 4, backend="process", workers=2, inline=True)
    venv.reset(seed=0)
    pids = venv.pids
    os.kill(pids[1], signal.SIGKILL)
    time.sleep(0.1)
    with pytest.raises(WorkerError, match="died.*SIGKILL"):
        for _ in range(3):
            venv.step(np.zeros(4, np.int64))
    assert venv.closed and not any(_alive(p) for p in pids)


def test_pool_mode_worker_killed_mid_step_is_worker_error():
    """Pool mode waits on whichever worker replies first; a worker that dies with a step in flight
    (here the one whose rows were not returned) ends that wait with WorkerError, not a hang."""
    with rf.envs.make(SlowTagged, 4, backend="pool", workers=2, batch_size=2) as venv:
        venv.reset(seed=0)
        step = venv.step(np.zeros(4, np.int64))        # both workers stepped; one slice returned
        victim = venv.pids[1 - int(step.env_ids[0]) // 2]
        os.kill(victim, signal.SIGKILL)
        pids = venv.pids
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="died.*SIGKILL"):
            # within a few steps (on a loaded machine the other worker may answer a few times first)
            while time.monotonic() - t0 < 10.0:
                step = venv.step(np.zeros(len(step), np.int64))
        assert venv.closed and not any(_alive(p) for p in pids)


@pytest.mark.parametrize("fault", ["exception", "death"])
def test_pool_mode_fault_surfaces_while_the_other_worker_keeps_finishing(fault):
    """Pool mode returns whichever worker finishes first. Worker 1 raises (or is killed) while
    worker 0 keeps finishing its cheap steps, so the parent never has to block: the fault must
    still surface within a fraction of a second (an error report is a word as well as a pipe
    message; a busy worker's pipe is polled once its step is late), not whenever a wait happens
    to block."""
    venv = rf.envs.make(Exploding, 4, backend="pool", workers=2, batch_size=2, inline=False)
    pids = venv.pids
    step = venv.reset(seed=0)
    actions = np.array([0, 0, 4 if fault == "exception" else 0, 0])
    if fault == "death":
        os.kill(pids[1], signal.SIGKILL)
    calls, t0 = 0, time.monotonic()
    with pytest.raises(WorkerError) as info:
        while time.monotonic() - t0 < 5.0:
            step = venv.step(actions[:len(step)] if calls else actions)
            assert set(step.env_ids.tolist()) <= {0, 1} or calls == 0
            calls += 1
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5, f"the fault surfaced after {elapsed:.2f} s and {calls} calls"
    if fault == "exception":
        assert "boom from the env" in info.value.remote_traceback and "env 2" in info.value.where
    else:
        assert "SIGKILL" in str(info.value)
    assert venv.closed and not any(_alive(p) for p in pids)


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")     # utime + stime


@pytest.mark.parametrize("inline", [True, False])
def test_spin_polls_then_blocks(inline):
    """With spin, a worker polls its pipe for at most `spin` seconds after each reply, then blocks:
    the episodes are the serial backend's, a caller that takes 20 ms between steps costs the worker
    about `spin` of CPU per step (not 20 ms), and an idle vector env costs no CPU."""
    n, spin = 4, 2e-3
    actions = np.random.default_rng(2).integers(0, 5, (60, n))
    with rf.envs.make(Tagged, n) as serial:
        ref = _run(serial, 7, actions)
    with rf.envs.make(Tagged, n, backend="process", workers=1 if inline else 2, inline=inline,
                      spin=spin) as venv:
        assert venv.spin == spin
        _assert_same(ref, _run(venv, 7, actions))
        pids = venv.pids
        before = [_cpu_seconds(p) for p in pids]
        for a in actions[:20]:
            venv.step(a)
            time.sleep(0.02)
        slow_caller = [_cpu_seconds(p) - b for p, b in zip(pids, before)]
        before = [_cpu_seconds(p) for p in pids]
        time.sleep(0.4)
        idle = [_cpu_seconds(p) - b for p, b in zip(pids, before)]
    # polling the whole time would be 20 x 20 ms = 0.4 s; polling `spin` a step is ~0.04 s
    assert max(slow_caller) < 0.2, slow_caller
    assert max(idle) < 0.05, idle
    assert not any(_alive(p) for p in pids)


class Sleepy(Tagged):
    """Sleeps action x 0.5 ms a step (0 to 2 ms)."""

    def step(self, action):
        time.sleep(int(action) * 5e-4)
        return super().step(action)


@pytest.mark.parametrize("mode", ["inline", "workers", "pool"])
def test_no_wake_up_is_lost_around_the_spin_window(monkeypatch, mode):
    """A sender skips the bell while the receiver is sure to be spinning (shared-memory words, see
    env_workers._BELLS). Steps whose gaps straddle the end of the spin window (both sides: the
    caller waits, or an env is slow) must each come back at once: with the blocked side's
    periodic re-read pushed to 60 s, a lost wake-up would show as a step of a minute."""
    from rlflow.runtime import env_workers

    monkeypatch.setattr(env_workers, "_INSURANCE_MS", 60_000)      # forked workers inherit it
    n, spin = 4, 1e-3
    kw = {"inline": dict(workers=1, inline=True), "workers": dict(workers=2, inline=False),
          "pool": dict(workers=2, inline=False, batch_size=2)}[mode]
    rng = np.random.default_rng(0)
    with rf.envs.make(Sleepy, n, backend="pool" if mode == "pool" else "process", spin=spin,
                      start_method="fork", **kw) as venv:
        step = venv.reset(seed=0)
        slowest = 0.0
        for i in range(150):
            time.sleep(float(rng.uniform(0, 2.5 * spin)))         # before, around and after the window
            t = time.perf_counter()
            step = venv.step(rng.integers(0, 5, len(step)))
            slowest = max(slowest, time.perf_counter() - t)
        assert slowest < 5.0, slowest


@pytest.mark.skipif(not hasattr(os, "eventfd"), reason="the word protocol's bells are eventfds (Linux)")
def test_a_word_posted_as_the_spin_window_closes_is_not_missed(monkeypatch):
    """The two sides of the word protocol's race, played out deterministically (with the blocked
    side's insurance re-read pushed to 60 s, a miss would show as a wait of a minute):
    the waiter's last read inside its spin window says "not yet", the word lands, the window
    closes: the waiter reads once more before it blocks; and a sender preempted between reading
    the clock and writing the word judges by the time after the write, so it rings a peer whose
    window has closed meanwhile."""
    import select

    from rlflow.runtime import env_workers as ew

    monkeypatch.setattr(ew, "_INSURANCE_MS", 60_000)
    r, w = os.pipe()
    try:
        poller = select.poll()
        poller.register(r, select.POLLIN)
        reads = []

        def done():                       # "not yet" on the spin window's only read, then posted
            reads.append(1)
            return len(reads) > 1

        t = time.monotonic()
        assert ew._await_word(done, poller, set(), time.monotonic_ns() - 1) == []
        assert time.monotonic() - t < 1.0 and len(reads) == 2
    finally:
        os.close(r)
        os.close(w)

    bell = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        t0 = time.monotonic_ns()
        clock = iter([t0, t0 + 10**9])            # preempted for 1 s around the word's write
        monkeypatch.setattr(ew.time, "monotonic_ns", lambda: next(clock))
        mine = np.zeros(2, np.int64)
        until = ew._post(mine, 7, 100_000, t0 + 200_000, bell)    # the peer spins 200 us past t0
        monkeypatch.undo()
        assert mine[0] == 7 and mine[1] == until == t0 + 100_000
        assert os.eventfd_read(bell) == 1         # rung: the peer stopped spinning during the write
        clock = iter([t0, t0 + 1_000])            # not preempted: the peer still spins, no bell
        monkeypatch.setattr(ew.time, "monotonic_ns", lambda: next(clock))
        ew._post(mine, 8, 100_000, t0 + 200_000, bell)
        monkeypatch.undo()
        with pytest.raises(BlockingIOError):
            os.eventfd_read(bell)
    finally:
        os.close(bell)


def test_spin_default_and_bad_values():
    from rlflow.runtime.env_workers import default_spin

    assert default_spin(1, cpus=2) == SPIN and default_spin(3, cpus=4) == SPIN
    assert default_spin(2, cpus=2) == SPIN and default_spin(8, cpus=2) == SPIN      # sync: always
    assert default_spin(1, cpus=2, pool=True, inline=True) == SPIN          # 2 slices, 2 CPUs
    assert default_spin(2, cpus=2, pool=True) == SPIN                       # 2 slices, 2 CPUs
    assert default_spin(2, cpus=2, pool=True, inline=True) == 0.0           # 3 slices, 2 CPUs
    assert default_spin(4, cpus=2, pool=True) == 0.0 and default_spin(1, cpus=1, pool=True) == 0.0
    with rf.envs.make("CartPole-v1", 4, backend="process", workers=1, spin=0.0) as venv:
        venv.reset(seed=0)
        venv.step(np.zeros(4, np.int64))
        assert venv.spin == 0.0
    for bad in (-1e-6, 2.0, "fast", True):
        with pytest.raises(UsageError, match="spin.*seconds in \\[0, 1\\).*got"):
            rf.envs.make("CartPole-v1", 4, backend="process", workers=1, spin=bad)
    with pytest.raises(UsageError, match="spin.*None with backend='serial'"):
        rf.envs.make("CartPole-v1", 4, spin=1e-4)


def test_factory_error_at_start_is_worker_error():
    calls = []

    def factory():
        calls.append(1)
        if len(calls) > 1:                  # the probe env (in this process) works, workers fail
            raise ValueError("cannot build this env")
        return gym.make("CartPole-v1")

    with pytest.raises(WorkerError, match="cannot build this env"):
        rf.envs.make(factory, 2, backend="process", workers=2)


@pytest.mark.slow
def test_spawn_matches_serial_and_leaves_no_segment():
    actions = np.random.default_rng(0).integers(0, 5, (30, 4))
    with rf.envs.make(Tagged, 4) as serial:
        ref = _run(serial, 0, actions)
    with rf.envs.make(Tagged, 4, backend="process", workers=2, start_method="spawn") as venv:
        assert venv.start_method == "spawn"
        assert _rlflow_segments(os.getpid()) == []     # unlinked as soon as the workers attached
        got = _run(venv, 0, actions)
        pids = venv.pids
    _assert_same(ref, got)
    assert not any(_alive(p) for p in pids)


CHILD = textwrap.dedent("""
    import sys, numpy as np, rlflow as rf
    venv = rf.envs.make("CartPole-v1", 4, backend="process", workers=2, start_method=sys.argv[1])
    venv.reset(seed=0)
    print(" ".join(map(str, venv.pids)), flush=True)
    mode = sys.argv[2]
    if mode == "loop":
        while True:
            venv.step(np.zeros(4, np.int64))
    elif mode == "exit":
        venv.step(np.zeros(4, np.int64))       # interpreter exit without close()
    elif mode == "raise":
        raise SystemExit("user code failed")
""")


@pytest.mark.slow
@pytest.mark.parametrize("method,mode", [("fork", "loop"), ("spawn", "loop"), ("fork", "exit"),
                                         ("fork", "raise")])
def test_sigint_and_exit_leave_nothing(method, mode):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, method, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()
        if mode == "loop":
            time.sleep(0.3)
            os.killpg(proc.pid, signal.SIGINT)      # Ctrl-C: the whole process group
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if mode == "loop":
        assert "KeyboardInterrupt" in proc.stderr.read()
    deadline = time.time() + 5
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
    assert _rlflow_segments(proc.pid) == []


@pytest.mark.parametrize("n,workers,k,inline", [(8, 4, 4, False), (8, 1, 4, True), (9, 2, 3, True),
                                                (12, 2, 8, True)])
def test_pool_mode_streams(n, workers, k, inline):
    epw = n // (workers + inline)
    rng = np.random.default_rng(0)
    refs = [Tagged() for _ in range(n)]
    expected = [e.reset(seed=10 + i)[0] for i, e in enumerate(refs)]
    with rf.envs.make(Tagged, n, backend="pool", workers=workers, batch_size=k, inline=inline) as venv:
        assert venv.pool and venv.num_envs == n and venv.inline == inline
        assert venv.slices == [(i, i + epw) for i in range(0, n, epw)]
        step = venv.reset(seed=10)
        np.testing.assert_array_equal(step.env_ids, np.arange(n))
        seen = set()
        totals = np.zeros((n, 2))                   # each env's episode return and length so far
        kept = []                                   # earlier Steps: later steps must not change them
        for _ in range(60):
            np.testing.assert_array_equal(step.obs[:, 0], 10 + step.env_ids)   # rows name their env
            for row, i in enumerate(step.env_ids):
                np.testing.assert_array_equal(step.obs[row], expected[i])
            actions = rng.integers(0, 5, len(step))
            # the reference: each env stepped by hand with the actions given to it
            for a, i in zip(actions, step.env_ids):
                o, r, te, tr, _ = refs[i].step(int(a))
                expected[i] = (o, r, te, tr)
            step = venv.step(actions)
            assert len(step) == k and len(set(step.env_ids.tolist())) == k
            ids = step.env_ids.reshape(-1, epw)
            assert (ids[:, 0] % epw == 0).all() and (np.diff(ids, axis=1) == 1).all()   # whole workers
            seen.update(step.env_ids.tolist())
            for row, i in enumerate(step.env_ids):
                o, r, te, tr = expected[i]
                np.testing.assert_array_equal(step.final_obs[row], o)
                assert step.reward[row] == r and step.terminated[row] == te and step.truncated[row] == tr
                totals[i] += (r, 1)
                assert step.info["episode_return"][row] == np.float32(totals[i, 0])
                assert step.info["episode_length"][row] == totals[i, 1]
                if te or tr:
                    totals[i] = 0
                expected[i] = refs[i].reset()[0] if te or tr else o
            kept.append((step, {f: np.copy(getattr(step, f)) for f in ("obs", "reward", "final_obs", "env_ids")}))
            assert not np.shares_memory(step.obs, venv.arrays["obs"])     # copies, not views of the block
        for old, copies in kept:
            for f, v in copies.items():
                np.testing.assert_array_equal(getattr(old, f), v)
        assert seen == set(range(n))
        with pytest.raises(SpecError, match="actions"):
            venv.step(np.zeros(n, np.int64))       # the last step returned k rows, not n
        step = venv.reset(seed=0)                   # a reset in the middle of pool mode drains the pool
        assert len(step) == n


class SlowTagged(Tagged):
    """A Tagged env whose step takes 2 ms in the envs with tag >= slow_from (tags = reset seeds)."""

    slow_from = 0

    def step(self, action):
        if self.tag >= self.slow_from:
            time.sleep(0.002)
        return super().step(action)


class _SlowFrom:
    def __init__(self, tag):
        self.tag = tag

    def __call__(self):
        env = SlowTagged()
        env.slow_from = self.tag
        return env


@pytest.mark.parametrize("slow_from", [0, 4, 99])   # all slow, the inline slice slow, none
def test_pool_mode_with_an_inline_slice_serves_every_slice(slow_from):
    """Neither side starves the other: the inline slice (envs 4, 5) is returned at most every
    other step and at least every W + 2 = 4th, whether it is much slower than the workers, much
    faster, or alike; and each worker's slice gets a fair share of the rest.

    The run lasts at least 0.3 s, not a fixed number of steps: with fast envs 60 steps take ~2 ms,
    shorter than the OS may leave a runnable worker waiting for a core on a 2-CPU machine (the
    pool then rightly returns the slices that did finish), and the shares would measure that."""
    with rf.envs.make(_SlowFrom(slow_from), 6, backend="pool", workers=2, batch_size=2,
                      inline=True) as venv:
        step = venv.reset(seed=0)
        returned = []
        end = time.perf_counter() + 0.3
        while len(returned) < 60 or time.perf_counter() < end:
            step = venv.step(np.zeros(len(step), np.int64))
            returned.append(step.env_ids.tolist())
    inline_at = [t for t, ids in enumerate(returned) if ids == [4, 5]]
    assert all(ids in ([0, 1], [2, 3], [4, 5]) for ids in returned)
    gaps = np.diff([-1] + inline_at)
    assert 2 <= gaps[1:].min() and gaps.max() <= 4, returned
    for ids in ([0, 1], [2, 3]):         # a fair share is ~1/4 each; a starved worker gets ~0
        assert returned.count(ids) >= len(returned) // 8, (ids, returned.count(ids), len(returned))


@pytest.mark.parametrize("workers,inline", [(3, False), (2, True)])
def test_pool_mode_through_an_adder_into_a_table(workers, inline):
    with rf.envs.make(Tagged, 6, backend="pool", workers=workers, batch_size=2, inline=inline) as venv:
        adder = rf.adders.Transition(discount=0.9)
        table = rf.Table(capacity=1000, specs=adder.item_specs(venv.spec))
        step = venv.reset(seed=0)
        adder.add_first(step)
        rng = np.random.default_rng(0)
        for _ in range(100):
            actions = rng.integers(0, 5, len(step))
            step = venv.step(actions)
            items = adder.add(actions, step)
            if len(items["reward"]):
                table.insert(items)
        data = table.sample(len(table)).data
    # every transition stays inside one env's stream: same tag, t advances by one (or the episode ended)
    np.testing.assert_array_equal(data["obs"][:, 0], data["next_obs"][:, 0])
    np.testing.assert_array_equal(data["next_obs"][:, 2], data["obs"][:, 2] + 1)
    np.testing.assert_array_equal(data["next_obs"][:, 3], data["action"])


# ---- the inline split: formula, calibration, and the same episodes whatever the split ------------
def _split_reference(n, workers, c, w):
    """The formula written out: the inline slice takes d = w / c envs more than each worker slice."""
    d = w / c if c and w else 0.0
    p = int(np.floor((n + workers * d) / (workers + 1) + 0.5))
    p = max(1, min(p, n - workers))
    k, extra = divmod(n - p, workers)
    return [k + 1] * extra + [k] * (workers - extra) + [p]


@pytest.mark.parametrize("n,workers,c,w,sizes", [
    (16, 1, 5e-6, 20e-6, [6, 10]),        # CartPole-like: d = 4, p = (16 + 4) / 2
    (16, 1, 2e-4, 4e-5, [8, 8]),          # heavy env: d = 0.2, about even
    (16, 3, 5e-6, 20e-6, [3, 3, 3, 7]),   # p = (16 + 3 * 4) / 4
    (16, 1, 1e-7, 4e-5, [1, 15]),         # nearly free env: every worker keeps one env
    (7, 2, None, None, [3, 2, 2]),        # unknown costs: near-equal slices
    (2, 1, 1e-6, 1e-3, [1, 1]),
])
def test_inline_split_examples(n, workers, c, w, sizes):
    assert inline_split(n, workers, c, w) == sizes


@pytest.mark.parametrize("n,workers,cores,sizes", [
    (16, 2, 2, [3, 3, 10]),   # 2 workers share the one spare core: p = (16 + 1 * 4) / 2
    (16, 2, 3, [4, 4, 8]),    # a core each: p = (16 + 2 * 4) / 3
    (16, 3, 2, [2, 2, 2, 10]),
    (16, 1, 1, [6, 10]),      # one core: still one worker's worth
])
def test_inline_split_with_fewer_cores_than_slices(n, workers, cores, sizes):
    assert inline_split(n, workers, 5e-6, 20e-6, cores) == sizes


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 64), data=st.data(), c=st.floats(1e-7, 1e-2), w=st.floats(0, 1e-3))
def test_inline_split_follows_the_formula(n, data, c, w):
    workers = data.draw(st.integers(1, n - 1))
    sizes = inline_split(n, workers, c, w)
    assert sizes == _split_reference(n, workers, c, w)
    assert len(sizes) == workers + 1 and sum(sizes) == n and min(sizes) >= 1
    assert max(sizes[:-1]) - min(sizes[:-1]) <= 1
    # the inline slice is within one env of balancing p * c = w + k * c (k: mean worker slice)
    p = sizes[-1]
    if 1 < p < n - workers:
        k = (n - p) / workers
        assert abs((p - k) - w / c) <= 1 + 1 / workers + 1e-9


@pytest.mark.parametrize("n,workers,sizes", [(6, 1, [1, 5]), (6, 1, [3, 3]), (9, 2, [2, 2, 5]),
                                             (9, 2, [3, 3, 3]), (10, 3, [1, 1, 1, 7])])
def test_any_inline_split_matches_serial(monkeypatch, n, workers, sizes):
    """Env i is seeded seed + i and keeps row i whichever process steps it."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)      # a core for every slice: the plain formula
    p, k = sizes[-1], sizes[0]
    # costs that make the formula give these sizes: d = p - k
    c, w = (1.0, float(p - k)) if p > k else (1.0, None)
    rng = np.random.default_rng(n)
    actions = rng.integers(0, 5, (60, n))
    with rf.envs.make(Tagged, n) as serial:
        ref = _run(serial, 7, actions)
    layout = serial.layout
    with ProcessVectorEnv(SerialVectorEnv, [Tagged] * n, layout, workers=workers, inline=True,
                          step_cost=c, wake_cost=w) as proc:
        assert [b - a for a, b in proc._env_bounds] == sizes
        got = _run(proc, 7, actions)
        pids = proc.pids
    _assert_same(ref, got)
    for s in got:
        np.testing.assert_array_equal(s.env_ids, np.arange(n))
        np.testing.assert_array_equal(s.obs[:, 0], 7 + np.arange(n))       # row i is env i
    assert not any(_alive(p) for p in pids)


@pytest.mark.parametrize("n,workers", [(16, 1), (5, 1), (8, 2)])
def test_calibrated_split_matches_serial(n, workers):
    actions = np.random.default_rng(0).integers(0, 2, (200, n))
    with rf.envs.make("CartPole-v1", n) as serial:
        ref = _run(serial, 3, actions)
    with rf.envs.make("CartPole-v1", n, backend="process", workers=workers, inline=True) as proc:
        assert proc.step_cost > 0 and proc.wake_cost > 0
        sizes = [b - a for a, b in proc._env_bounds]
        assert sizes == inline_split(n, workers, proc.step_cost, proc.wake_cost, os.cpu_count())
        got = _run(proc, 3, actions)
    _assert_same(ref, got)


@pytest.mark.parametrize("wake,where", [(None, "env worker 1"), (3.0, "inline slice")])
def test_fault_names_the_env_whatever_the_split(wake, where):
    # n=6, 2 workers: even split [2, 2, 2] puts env 2 in worker 1; d = 3 gives [1, 1, 4]: inline
    venv = ProcessVectorEnv(SerialVectorEnv, [Exploding] * 6, SerialVectorEnv.layout_of(Exploding()),
                            workers=2, inline=True, step_cost=1.0, wake_cost=wake)
    venv.reset(seed=0)
    with pytest.raises(WorkerError) as info:
        venv.step(np.array([0, 0, 4, 0, 0, 0]))
    assert where in info.value.where and "env 2" in info.value.where
    assert venv.closed


class Slow(Scripted):
    def step(self, action):
        time.sleep(0.03)
        return super().step(action)


def test_measure_step_cost_is_bounded_and_never_raises():
    layout = SerialVectorEnv.layout_of(Scripted())
    t = time.perf_counter()
    c = measure_step_cost(SerialVectorEnv, gym.make("CartPole-v1"), layout_of_cartpole())
    assert 0 < c < 0.01 and time.perf_counter() - t < 0.5
    t = time.perf_counter()
    c = measure_step_cost(SerialVectorEnv, Slow(), layout)       # stops at 4 x the time budget
    assert c >= 0.03 and time.perf_counter() - t < 0.35
    assert measure_step_cost(SerialVectorEnv, Exploding(), layout, steps=200) is None   # action 4 raises


class _Hiccup(gym.Wrapper):
    """CartPole whose process is "preempted" for 60 ms (more than the calibration's 50 ms budget)
    once: in its first reset, or in its n-th step."""

    def __init__(self, at):
        super().__init__(gym.make("CartPole-v1"))
        self.at, self.calls = at, 0

    def reset(self, **kwargs):
        if self.at == "reset" and self.calls == 0:
            time.sleep(0.06)
        self.calls += 1
        return self.env.reset(**kwargs)

    def step(self, action):
        if self.at == self.calls:
            time.sleep(0.06)
        self.calls += 1
        return self.env.step(action)


@pytest.mark.parametrize("at", ["reset", 1, 2, 3])
def test_a_preempted_calibration_still_measures_a_cheap_env_as_cheap(at):
    """One stall longer than the whole budget, in the reset or in any of the first timed steps,
    leaves the median step cost of CartPole about where it is (a few us; the stall alone would read
    60 ms): the inline slice and pinning decisions do not flip on one preemption. Compared with the
    same env's calibration without a stall, so that a loaded machine slows both alike."""
    from rlflow.envs.make import CHEAP_STEP

    ref = measure_step_cost(SerialVectorEnv, _Hiccup(None), layout_of_cartpole())
    t = time.perf_counter()
    c = measure_step_cost(SerialVectorEnv, _Hiccup(at), layout_of_cartpole())
    assert c is not None and c < max(CHEAP_STEP, 10 * ref), (c, ref)
    assert time.perf_counter() - t < 0.5


def layout_of_cartpole():
    return SerialVectorEnv.layout_of(gym.make("CartPole-v1"))


def test_given_instance_is_not_stepped_by_the_calibration():
    env = Tagged(tag=42)
    with rf.envs.make(env, 3, backend="process", workers=1, inline=True) as venv:
        assert venv.step_cost is not None
        step = venv.reset(seed=5)
    assert env.episode == -1                 # never reset (the calibration stepped a copy)
    np.testing.assert_array_equal(step.obs[:, 0], [5, 6, 7])


def _slow_cartpole():
    import time as _time

    import gymnasium as gym

    class Slow(gym.Wrapper):
        def step(self, action):
            end = _time.thread_time() + 100e-6    # 100 us of CPU: well above CHEAP_STEP
            while _time.thread_time() < end:
                pass
            return self.env.step(action)

    return Slow(gym.make("CartPole-v1"))


def test_pool_mode_with_more_slices_than_cores_does_not_spin(monkeypatch):
    """Pollers sharing a core pass over the worker they share it with: pool mode keeps spin 0 where
    the stepping slices outnumber the CPUs (sync mode waits for every worker, so it polls for cheap
    envs), and polls where there are as many slices as CPUs."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    env = "CartPole-v1"
    for workers, inline, spin in ((4, False, 0.0), (2, True, 0.0), (2, False, SPIN)):
        with rf.envs.make(env, 12 if inline else 8, backend="pool", workers=workers, batch_size=4,
                          inline=inline) as venv:
            assert venv.num_workers == workers and venv.inline == inline and venv.pool
            assert venv.spin == spin, (workers, inline)
            step = venv.reset(seed=1)
            for _ in range(20):
                step = venv.step(np.zeros(len(step), np.int64))
            assert len(step) == 4
    with rf.envs.make(env, 8, backend="pool", workers=4, batch_size=4, spin=SPIN) as venv:
        assert venv.spin == SPIN                                     # an explicit value wins


@pytest.mark.parametrize("env,expect_inline", [("CartPole-v1", True), (_slow_cartpole, False)])
def test_more_workers_than_spare_cores_step_inline_only_for_cheap_envs(monkeypatch, env, expect_inline):
    """workers + 1 > CPUs: the calling process also steps a slice only where an env step is cheaper
    than waking a worker; an expensive env keeps its cores to the workers. The threshold is put
    half way between the two envs here (CartPole ~4-12 us a step, depending on the host's phase;
    the other 100 us more), so the test checks the rule, not this machine's speed."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(sys.modules["rlflow.envs.make"], "CHEAP_STEP", 50e-6)
    with rf.envs.make(env, 8, backend="process", workers=2) as venv:
        assert venv.num_workers == 2 and venv.inline == expect_inline
        from rlflow.envs.make import CHEAP_STEP

        assert (venv.step_cost < CHEAP_STEP) == expect_inline
        assert venv.spin == SPIN                 # sync mode polls (yielding) however many workers
        with rf.envs.make(env, 8) as serial:
            a, b = venv.reset(seed=4), serial.reset(seed=4)
            for _ in range(30):
                np.testing.assert_array_equal(a.obs, b.obs)
                act = np.arange(8) % 2
                a, b = venv.step(act), serial.step(act)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_workers_of_an_expensive_env_get_a_cpu_each(monkeypatch):
    """With as many workers as usable CPUs and an env step above CHEAP_STEP, worker w runs on CPU w
    only (pin); a cheap env, pin=False, or fewer workers leave the affinity alone; pin=True asks for
    it. The caller's own affinity never changes. Run on 2 of this machine's CPUs, with CHEAP_STEP
    half way between CartPole and the 100 us env (the rule, not this machine's speed)."""
    monkeypatch.setattr(sys.modules["rlflow.envs.make"], "CHEAP_STEP", 50e-6)
    mine = os.sched_getaffinity(0)
    if len(mine) < 2:
        pytest.skip("needs 2 CPUs")
    two = sorted(mine)[:2]
    os.sched_setaffinity(0, two)
    try:
        with rf.envs.make(_slow_cartpole, 4, backend="process", workers=2) as venv:
            assert venv.pinned and not venv.inline
            assert [os.sched_getaffinity(p) for p in venv.pids] == [{two[0]}, {two[1]}]
            with rf.envs.make(_slow_cartpole, 4) as serial:
                a, b = venv.reset(seed=2), serial.reset(seed=2)
                for t in range(20):
                    np.testing.assert_array_equal(a.obs, b.obs)
                    a, b = venv.step(np.arange(4) % 2), serial.step(np.arange(4) % 2)
        # "no inline slice" spelled out, as README does: the same calibrated default
        with rf.envs.make(_slow_cartpole, 4, backend="process", workers=2, inline=False) as venv:
            assert venv.pinned and [os.sched_getaffinity(p) for p in venv.pids] == [{two[0]}, {two[1]}]
        with rf.envs.make("CartPole-v1", 4, backend="process", workers=2, inline=False) as venv:
            assert not venv.pinned
        for kwargs in ({"env": _slow_cartpole, "workers": 2, "pin": False},
                       {"env": _slow_cartpole, "workers": 1},
                       {"env": "CartPole-v1", "workers": 2}):
            with rf.envs.make(num_envs=4, backend="process", **kwargs) as venv:
                assert not venv.pinned, kwargs
                assert all(os.sched_getaffinity(p) == set(two) for p in venv.pids), kwargs
        with rf.envs.make("CartPole-v1", 4, backend="process", workers=1, pin=True) as venv:
            assert venv.pinned and [os.sched_getaffinity(p) for p in venv.pids] == [{two[0]}]
        assert os.sched_getaffinity(0) == set(two)
        with pytest.raises(UsageError, match="pin"):
            rf.envs.make("CartPole-v1", 2, pin=True)
        with pytest.raises(UsageError, match=r"pin.*True, False or None.*'yes'"):
            rf.envs.make("CartPole-v1", 2, backend="process", pin="yes")
    finally:
        os.sched_setaffinity(0, mine)


class StuckOnAction(Tagged):
    """Action 3 blocks the step for a minute."""

    def step(self, action):
        if int(action) == 3:
            time.sleep(60)
        return super().step(action)


STUCK_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, "tests")
    import rlflow as rf
    from test_envs_process import StuckOnAction
    venv = rf.envs.make(lambda: StuckOnAction(), 8, backend="process", workers=4, inline=False)
    venv.reset(seed=0)
    print(" ".join(str(p) for p in venv.pids), flush=True)
    venv.step(np.full(8, 3))
""")


@pytest.mark.slow
def test_ctrl_c_in_a_step_of_stuck_workers_takes_seconds_not_seconds_per_worker():
    """Closing waited 2 s per busy worker (a worker in a long env step cannot read the close
    command): 4 workers took 8 s. Now one grace period covers them all."""
    proc = subprocess.Popen([sys.executable, "-c", STUCK_CHILD], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 4, proc.stderr.read()
        time.sleep(0.5)
        t = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "KeyboardInterrupt" in proc.stderr.read()
    assert took < 5.0, took
    assert not any(_alive(p) for p in pids)
    assert _rlflow_segments(proc.pid) == []


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_process_vector_env_made_in_a_thread_outlives_the_thread(start_method):
    """Linux's parent-death signal follows the thread that started a process: workers of a vector
    env made in a thread were killed when that thread ended."""
    import threading

    made = []
    t = threading.Thread(target=lambda: made.append(rf.envs.make(Tagged, 4, backend="process", workers=2,
                                                                  inline=False, start_method=start_method)))
    t.start()
    t.join()
    venv = made[0]
    try:
        venv.reset(seed=0)
        for _ in range(20):
            venv.step(np.zeros(4, np.int64))
    finally:
        venv.close()


def test_numpy_integer_arguments_are_taken_as_ints():
    """Counts computed with numpy (np.int64 from an array's sum, a config array) are ints: make()
    refused num_envs=np.int64(4) ('expected an int >= 1, got np.int64(4)') and pool mode's
    batch_size=np.int64(8) ('expected a multiple of ... (8), got np.int64(8)'); rf.evaluate's
    episodes=np.int64 raised a raw TypeError."""
    with rf.envs.make("CartPole-v1", np.int64(4)) as venv:
        assert venv.num_envs == 4 and len(venv.reset(seed=0)) == 4
    with rf.envs.make("CartPole-v1", np.int64(16), backend="pool", workers=np.int64(2),
                      batch_size=np.int64(8)) as venv:
        assert len(venv.reset(seed=0)) == 16
        assert len(venv.step(np.zeros(16, np.int64))) == 8
    class ZeroPolicy(rf.Policy):
        def act(self, obs):
            return np.zeros(len(obs), np.int64)

    with rf.envs.make("CartPole-v1", 4) as venv:
        out = rf.evaluate(ZeroPolicy(), venv, np.int64(3))
        assert out["episodes"] == 3 and type(out["episodes"]) is int
    for bad in (True, 2.0, "4"):
        with pytest.raises(UsageError, match="num_envs"):
            rf.envs.make("CartPole-v1", bad)


def test_an_env_that_does_not_pickle_under_spawn_is_a_usage_error_saying_why():
    """'spawn' (given, or the default while this process runs threads) pickles the env factories
    for the workers: a lambda raised pickle's AttributeError from inside multiprocessing, naming
    neither the env nor the start method."""
    import threading

    before = set(os.listdir("/dev/shm"))
    with pytest.raises(UsageError, match=r"'env'.*picklable.*start_method='spawn'.*lambda"):
        rf.envs.make(lambda: gym.make("CartPole-v1"), 4, backend="process", workers=2, start_method="spawn")
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:                                   # a second thread: the default is spawn, and it says why
        with pytest.raises(UsageError, match=r"picklable.*'spawn' \(the default: this process runs more "
                                             r"than one thread"):
            rf.envs.make(lambda: gym.make("CartPole-v1"), 4, backend="pool", batch_size=2)
    finally:
        stop.set()
        t.join()
    assert set(os.listdir("/dev/shm")) <= before
    with rf.envs.make(lambda: gym.make("CartPole-v1"), 4, backend="process", workers=2,
                      start_method="fork") as venv:          # fork takes it as it is
        assert len(venv.reset(seed=0)) == 4


class BadClose(Tagged):
    """Env 2's close() raises (its tag is its reset seed: seed 0 + 2)."""

    def close(self):
        if self.tag == 2:
            raise OSError("close failed in env 2")


@pytest.mark.parametrize("kw", [dict(backend="serial"), dict(backend="process", workers=2, inline=False),
                                dict(backend="process", workers=1, inline=True),
                                dict(backend="pool", workers=2, batch_size=2, inline=False)])
def test_an_exception_in_an_envs_close_is_raised_after_everything_is_closed(kw):
    """As gymnasium's vector envs do: close() raises what an env's close raised (it was dropped on
    every backend), naming the env, once every env, worker and segment is closed; a vector env
    closed on the way out of another error keeps that error."""
    before = set(_rlflow_segments(os.getpid()))
    venv = rf.envs.make(BadClose, num_envs=4, **kw)
    pids = list(getattr(venv, "pids", []))
    step = venv.reset(seed=0)
    venv.step(np.zeros(len(step), np.int64))
    with pytest.raises((OSError, WorkerError), match="close") as err:
        venv.close()
    assert "close failed in env 2" in (err.value.remote_traceback if isinstance(err.value, WorkerError) else str(err.value))
    assert "env 2" in (err.value.where if isinstance(err.value, WorkerError) else " ".join(err.value.__notes__))
    assert venv.closed and not any(_alive(p) for p in pids)
    assert set(_rlflow_segments(os.getpid())) == before
    venv.close()                                   # closed: nothing more to raise
    with pytest.raises(KeyError):                  # the with block's own error is the one seen
        with rf.envs.make(BadClose, num_envs=4, **kw) as venv:
            venv.reset(seed=0)
            raise KeyError("the error that matters")


def test_a_shape_error_in_a_worker_names_the_row_of_the_whole_vector_env():
    """Worker 1 steps envs 2 and 3: env 3's bad observation is row 3 (it said row 1, its own)."""
    class Shapeless(Tagged):
        def step(self, action):
            o, r, te, tr, i = super().step(action)
            return (o[:2] if self.tag == 3 else o), r, te, tr, i

    venv = rf.envs.make(Shapeless, num_envs=4, backend="process", workers=2, inline=False)
    venv.reset(seed=0)
    with pytest.raises(WorkerError) as err:
        venv.step(np.zeros(4, np.int64))
    assert "env 3" in err.value.where and "from row 3" in err.value.remote_traceback
    assert "from row 1" not in err.value.remote_traceback


def test_pool_mode_picks_workers_that_can_serve_the_batch():
    """9 envs in batches of 3 on 2 CPUs: the default was 1 worker of 9 envs, which no batch below 9
    fits (an error blaming batch_size); 3 workers of 3 envs serve it."""
    import unittest.mock as mock

    with mock.patch("os.cpu_count", return_value=2):
        venv = rf.envs.make(Tagged, num_envs=9, backend="pool", batch_size=3)
    try:
        assert len(venv.pids) == 3 and not venv.inline
        step = venv.reset(seed=0)
        seen = set()
        for _ in range(300):                                    # whichever 3 finish first, each step
            step = venv.step(np.zeros(len(step), np.int64))    # the rows of the previous step
            assert len(step) == 3 and step.env_ids.tolist() in ([0, 1, 2], [3, 4, 5], [6, 7, 8])
            seen.update(step.env_ids.tolist())
            if len(seen) == 9:
                break
        assert seen == set(range(9))
    finally:
        venv.close()


class RaisesLate(Tagged):
    """Env 0's steps take 0.3 s and raise: in pool mode the other worker's envs come back first."""

    def step(self, action):
        if self.tag == 0:
            time.sleep(0.3)
            raise RuntimeError("late boom")
        return super().step(action)


def test_a_pool_steps_error_that_close_finds_unread_is_raised_by_close():
    """A pool step returns the worker that finished first; the other's error, still in its pipe when
    close() came, was dropped. close() raises it now, saying which step it was in."""
    venv = rf.envs.make(RaisesLate, num_envs=4, backend="pool", workers=2, batch_size=2, inline=False)
    step = venv.reset(seed=0)
    assert venv.step(np.zeros(len(step), np.int64)).env_ids.tolist() == [2, 3]
    time.sleep(0.5)
    with pytest.raises(WorkerError, match=r"env worker 0, env 0.*in a step whose results close\(\) found unread") as err:
        venv.close()
    assert "late boom" in err.value.remote_traceback


class LifeCounter(gym.Env):
    """obs = the steps this env has taken in its life, across resets (state a reset keeps, as a
    wrapper's running statistics are)."""

    observation_space = gym.spaces.Box(0, 1e9, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self.steps = 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.array([self.steps], np.float32), {}

    def step(self, action):
        self.steps += 1
        return np.array([self.steps], np.float32), 0.0, False, False, {}


@pytest.mark.parametrize("workers,inline", [(2, True), (3, False), (1, True)])
def test_pool_reset_lets_every_env_take_the_actions_given_before_it(workers, inline):
    """A reset() in the middle of pool mode: the envs whose actions were given but whose step was
    not returned yet take them, on workers and on the inline slice alike (the inline slice's were
    dropped while the workers' were applied)."""
    with rf.envs.make(LifeCounter, 6, backend="pool", batch_size=2 if workers > 1 else 3, workers=workers,
                      inline=inline) as venv:
        step = venv.reset(seed=0)
        given = np.zeros(6, np.int64)
        for _ in range(5):
            given[step.env_ids] += 1
            step = venv.step(np.zeros(len(step), np.int64))
        step = venv.reset(seed=0)
        np.testing.assert_array_equal(step.obs[:, 0], given)


class Exits(Scripted):
    """Calls sys.exit in env 2's third step (a BaseException that is not an Exception)."""

    def step(self, action):
        if self.tag == 2 and self.t == 2:
            sys.exit(3)
        return super().step(action)


class TaggedExits(Tagged, Exits):
    pass


@pytest.mark.parametrize("inline", [False, True])
def test_sys_exit_in_an_env_closes_the_vector_env_instead_of_a_hang(inline):
    """SystemExit in the inline slice went past the error handling (Exception only): the vector env
    stayed open with a worker's reply unread and the next step waited for ever. In a worker it was
    a WorkerError without the env index."""
    venv = rf.envs.make(TaggedExits, 4, backend="process", workers=1, inline=inline)
    pids = venv.pids
    venv.reset(seed=0)                       # env i has tag i
    with pytest.raises((SystemExit, WorkerError)) as info:
        for _ in range(3):
            venv.step(np.zeros(4, np.int64))
    if inline:                                # env 2 is in this process's slice (envs 2, 3)
        assert venv.slices[-1][0] <= 2 and isinstance(info.value, SystemExit)
    else:
        assert "env 2" in info.value.where and "SystemExit" in info.value.remote_traceback
    assert venv.closed
    with pytest.raises(rf.errors.ClosedError):
        venv.step(np.zeros(4, np.int64))
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


class _SlowCloseCartPole(gym.Wrapper):
    def __init__(self):
        super().__init__(gym.make("CartPole-v1"))

    def close(self):
        time.sleep(1.0)
        super().close()


def test_ctrl_c_during_close_still_reaps_every_worker():
    """A Ctrl-C that landed while close() joined the workers (an env whose close() takes 1 s) left
    them unreaped or running, and close() ran once only: nothing reaped them until the parent
    exited. The shutdown finishes first now; the KeyboardInterrupt follows it."""
    import threading

    venv = rf.envs.make(_SlowCloseCartPole, num_envs=4, backend="process", workers=2, inline=False)
    venv.reset(seed=0)
    pids = venv.pids
    threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        venv.close()
    assert venv.closed
    for pid in pids:           # reaped: not even a zombie left
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        assert not _alive(pid)


def _unpickle_fails():
    raise RuntimeError("cannot rebuild the factory here")


class _FactoryThatFailsToUnpickle:
    def __call__(self):
        return gym.make("CartPole-v1")

    def __reduce__(self):
        return (_unpickle_fails, ())


def test_a_factory_that_fails_to_unpickle_in_a_worker_shows_its_traceback():
    """Spawned workers unpickled their env factories before any rlflow code ran: the parent saw
    'died (exit code 1)' for 'envs 0..3' (a range no worker had yet), and no traceback."""
    with pytest.raises(WorkerError, match="cannot rebuild the factory here") as info:
        rf.envs.make(_FactoryThatFailsToUnpickle(), num_envs=4, backend="process", workers=2,
                     start_method="spawn")
    assert "_unpickle_fails" in str(info.value)


_CTRL_C_IN_FORK = r'''
import os, signal, sys, time
import rlflow as rf
fired = []

def ctrl_c_inside_fork():            # as a Ctrl-C landing while os.fork runs its after-fork hooks
    if not fired:
        fired.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)

os.register_at_fork(after_in_parent=ctrl_c_inside_fork)
try:
    if sys.argv[1] == "envs":
        venv = rf.envs.make("CartPole-v1", 4, backend="process", workers=2, inline=False, start_method="fork")
        print("made", flush=True)
        venv.close()
    else:
        import numpy as np

        class Random(rf.Policy):
            def __init__(self, spec):
                pass

            def act(self, obs):
                return np.zeros(len(obs), np.int64)

        class Idle(rf.Learner):
            def __init__(self, spec):
                pass

            def step(self, batch):
                return {}

        def table(specs):
            return rf.Table(capacity=1000, sampler=rf.selectors.Uniform(), remover=rf.selectors.Fifo(),
                            rate_limiter=rf.rate_limiters.MinSize(10), specs=specs)

        exp = rf.Experiment(env="CartPole-v1", policy=Random, learner=Idle, table=table, batch_size=4,
                            adder=rf.adders.Transition(discount=0.99))
        rf.run(exp, backend="process", num_actors=1, max_env_steps=300_000, progress=False, start_method="fork")
        print("ran", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
'''


@pytest.mark.parametrize("what", ["envs", "run"])
def test_a_ctrl_c_during_a_fork_is_not_lost(what):
    """A Ctrl-C that came while os.fork ran its after-fork hooks was dropped by Python ("Exception
    ignored in ... KeyboardInterrupt"): the program went on as if no key was pressed (a loop making
    vector envs never stopped). SIGINT is held while a child starts and raised after."""
    out = subprocess.run([sys.executable, "-c", _CTRL_C_IN_FORK, what], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "interrupted", (out.stdout, out.stderr[-2000:])
    assert "Exception ignored" not in out.stderr


class ResetBoom(Tagged):
    """Env 0's first autoreset raises (after its step's rows are written: a worker's first reply)."""

    def reset(self, seed=None, options=None):
        if seed is None and getattr(self, "tag", None) == 0:
            raise RuntimeError("boom in the autoreset")
        return super().reset(seed=seed, options=options)


@pytest.mark.parametrize("inline", [True, False])
def test_an_exception_in_a_workers_autoreset_is_a_worker_error_naming_the_env(inline):
    """In sync mode a worker replies twice (its rows, then its autoresets): an env that raises in
    its autoreset is raised after the first reply all the same, naming the env, and the vector
    env is closed with no worker left."""
    venv = rf.envs.make(ResetBoom, 4, backend="process", workers=1 + (not inline), inline=inline)
    pids = venv.pids
    assert venv.slices[0][0] == 0 and venv._two_phase
    venv.reset(seed=0)
    with pytest.raises(WorkerError) as info:
        for _ in range(20):                       # env 0's episode ends within 6 steps
            venv.step(np.zeros(4, np.int64))
    assert "boom in the autoreset" in info.value.remote_traceback
    assert "env worker 0" in info.value.where and "env 0" in info.value.where
    assert venv.closed
    assert not any(_alive(p) for p in pids)


class _OwnStepRows(SerialVectorEnv):
    """A subclass with a step_rows of its own (no `stepped` parameter)."""

    def step_rows(self, actions):
        super().step_rows(actions)


def test_two_phase_replies_only_for_a_step_rows_that_takes_the_hook():
    from rlflow.runtime.env_workers import _BELLS, _takes_stepped

    assert _takes_stepped(SerialVectorEnv) and not _takes_stepped(_OwnStepRows)
    assert not _takes_stepped(type("NoHook", (SerialVectorEnv,), {"stepped_hook": False}))
    from rlflow.envs.pettingzoo import AECVectorEnv, ParallelVectorEnv
    assert not _takes_stepped(ParallelVectorEnv) and not _takes_stepped(AECVectorEnv)
    fns = [lambda i=i: Tagged(i) for i in range(4)]
    layout = SerialVectorEnv.layout_of(Tagged(0))
    with SerialVectorEnv(fns) as serial:
        ref = _run(serial, 3, np.ones((30, 4), np.int64))
    with ProcessVectorEnv(_OwnStepRows, fns, layout, workers=1, inline=True, start_method="fork") as venv:
        assert venv._two_phase is False
        _assert_same(ref, _run(venv, 3, np.ones((30, 4), np.int64)))
    with ProcessVectorEnv(SerialVectorEnv, fns, layout, workers=1, inline=True, start_method="fork") as venv:
        assert venv._two_phase is _BELLS
        _assert_same(ref, _run(venv, 3, np.ones((30, 4), np.int64)))


class _SlowAt3(gym.Env):
    """Env 0 (reset with seed 0: a worker's) takes 0.3 s over its 3rd step (`where="step"`), or
    ends its episode there and takes 0.3 s over the autoreset (`where="reset"`: after its worker's
    first reply of the two)."""
    observation_space = gym.spaces.Box(-10, 10, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, where="step"):
        self.t = 0
        self.slow = False
        self.where = where

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.slow = seed == 0
        elif self.slow and self.where == "reset":
            time.sleep(0.3)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        if self.t == 3 and self.slow and self.where == "step":
            time.sleep(0.3)
        return np.zeros(1, np.float32), 1.0, self.t == 3 and self.where == "reset", False, {}


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="SIGALRM timers")
@pytest.mark.parametrize("inline", [False, True])
@pytest.mark.parametrize("where", ["step", "reset"])
def test_an_exception_while_waiting_for_a_worker_leaves_the_episode_totals_as_they_were(inline, where):
    """An exception raised in this process while it waits for a worker (a SIGALRM handler's
    TimeoutError), for its rows or for its autoresets, leaves the vector env open, as before, and
    its episode totals as they were before that step."""
    def alarm(signum, frame):
        raise TimeoutError("alarm")

    old = signal.signal(signal.SIGALRM, alarm)
    try:
        with rf.envs.make(_SlowAt3, 4, backend="process", workers=1, inline=inline, spin=0.0,
                          where=where) as venv:
            assert venv.slices[0][0] == 0                 # env 0 is the worker's
            venv.reset(seed=0)
            seen = []
            for t in range(6):
                if t == 2:
                    signal.setitimer(signal.ITIMER_REAL, 0.05)
                try:
                    s = venv.step(np.zeros(4, np.int64))
                except TimeoutError:
                    assert not venv.closed
                    continue
                seen.append((s.info["episode_length"][0], s.info["episode_return"][0]))
            # the interrupted step is not counted (as when its Step was never made): env 0's totals
            # go on from where they were, lengths and returns together
            assert seen == [(k, float(k)) for k in range(1, 6)], seen
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
