"""Vector env throughput: rlflow serial / process / pool beside gymnasium and EnvPool, one run.

    flock /tmp/rlflow-bench.lock .venv/bin/python benchmarks/vector_envs.py [--seconds 11]

Two workloads, 16 envs each, random actions drawn up front:
  CartPole-v1   a cheap env (~6 us a step): measures the stepping loop and the transport overhead.
                Peer: EnvPool (its best of sync and async modes), else gymnasium SyncVectorEnv.
  heavy         CartPole whose step also burns 200 us of CPU time (a busy loop on the thread's CPU
                clock, so every backend pays it in full): measures parallel speed-up.
                Peer: gymnasium AsyncVectorEnv(shared_memory=True).
What bounds the figures on a 2-vCPU VM whose idle vCPU halts at once (the cpuidle driver is printed
in the header: "haltpoll" polls a while first, "none" does not): waking a process blocked on
an idle CPU costs ~15-20 us (an IPI and a VM exit), and a
step of the process backend pays about two of them on its critical path (a worker's start, the
parent's return), while 8 CartPoles take ~30-40 us. What makes the process backend pay off on
CartPole is the inline slice (the parent steps envs too, split as printed: envs per worker /
inline), polling for the peer for up to 100 us before blocking (`spin`; the polls yield the CPU),
which skips most of those wake-ups, and eventfd doorbells, whose wake-ups do not pull the woken
process onto the waker's CPU as a pipe's do (see rlflow/runtime/env_workers.py).
Before and after the figures it prints benchmarks/machine.py's check: whether one busy CPU slows the
other down (a VM's vCPUs can share a host core at times; every process-backend figure moves with it).
Ceilings, measured in the same run and printed beside the figures they bound:
  CartPole: any backend that steps gymnasium's Python CartPole is bounded by (cores) x (the raw
            step rate of one unwrapped env in a tight loop, resets included, its action check as
            fast as rlflow's lean envs make it), and a vector env pays more than the raw step
            (gym.make's wrappers, autoreset, the Step record: the printed serial / raw fraction).
            rlflow's envs 1..N-1 check actions ~1.2 us faster than gymnasium's Discrete does (same
            answers; `rf.envs.make.fast_discrete`), ~20% of a CartPole step; gymnasium's vector
            envs step the stock check. EnvPool steps a C++ CartPole (~1 us a step) in
            threads; where its figure is near or above the bound, ">= 1x EnvPool" is out of
            reach for Python envs, whatever the transport.
  heavy:    two stepping processes can at best halve the serial step time: 2 x serial. The ratio
            of that ceiling to AsyncVectorEnv says how far ">= 1.3x AsyncVectorEnv" was reachable in
            this run at all (AsyncVectorEnv's own figure moves from run to run on a shared
            machine: 16 processes time-share the 2 cores).
Every rlflow figure includes building the rf.Step record (copies, episode statistics) and, for the
process backends, the shared-memory round trip. Figures are env steps per second: the median of
ROUNDS rounds, interleaved across the backends, each round 1 s by default (--seconds / ROUNDS).
Rounds of a second, not of a fifth: EnvPool's async mode ran far faster in short bursts than it
keeps up (on this 2-vCPU VM: 170k-360k steps/s in rounds of 0.18 s, a median that moved between
204k and 311k from run to run, against 163k-179k over 5 s of continuous stepping, and 202k in its
best thread setting, num_threads=1), while rlflow's figures hardly move (~300k either way). With
0.18 s rounds the CartPole verdict followed EnvPool's luck (0.89x to 1.27x on the same code);
1 s rounds measure what each keeps up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gymnasium as gym
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlflow as rf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

N = 16
ROUNDS = 11


class Heavy(gym.Wrapper):
    """CartPole whose step also burns `us` microseconds of CPU time in a busy loop.

    The loop reads the thread's CPU clock (time.thread_time, CLOCK_THREAD_CPUTIME_ID, ~0.5 us a
    read), not the wall clock: a step costs 200 us of CPU on every backend, whether its process
    runs alone or is preempted midway. (A wall-clock busy-wait lets a preempted process count the
    time another process ran as its own burn: with 16 processes on 2 cores, AsyncVectorEnv then
    looks faster than the CPU work it was asked to do.)"""

    def __init__(self, us=200.0):
        super().__init__(gym.make("CartPole-v1"))
        self.burn = us * 1e-6

    def step(self, action):
        end = time.thread_time() + self.burn
        while time.thread_time() < end:
            pass
        return self.env.step(action)


def heavy():
    return Heavy()


def cartpole():
    return gym.make("CartPole-v1")


class Runner:
    """One backend, built once; `run(seconds)` steps it and returns env steps per second."""

    def __init__(self, name, stepper, closer):
        self.name, self.stepper, self.closer = name, stepper, closer
        self.rates = []

    def run(self, seconds):
        n, i = 0, 0
        t0 = time.perf_counter()
        t_end = t0 + seconds
        while True:
            n += self.stepper(i)
            i += 1
            if (i & 7) == 0 and time.perf_counter() >= t_end:
                break
        self.rates.append(n / (time.perf_counter() - t0))

    @property
    def rate(self):
        return float(np.median(self.rates)) if self.rates else None


def rlflow_runner(name, env, **kw):
    actions = np.random.default_rng(0).integers(0, 2, (1024, N))
    venv = rf.envs.make(env, N, **kw)
    if getattr(venv, "inline", False):          # the calibrated split: envs per worker / inline
        name += " [" + "/".join(str(b - a) for a, b in venv.slices) + " envs]"
    box = [venv.reset(seed=0)]

    def one(i):
        s = venv.step(actions[i & 1023, :len(box[0])])
        box[0] = s
        return len(s)

    return Runner(name, one, venv.close)


def gym_runner(name, env_fn, asynchronous):
    actions = np.random.default_rng(0).integers(0, 2, (1024, N))
    if asynchronous:
        venv = gym.vector.AsyncVectorEnv([env_fn] * N, shared_memory=True)
    else:
        venv = gym.vector.SyncVectorEnv([env_fn] * N)
    venv.reset(seed=0)

    def one(i):
        venv.step(actions[i & 1023])
        return N

    return Runner(name, one, venv.close)


def envpool_runners():
    """EnvPool in sync (batch 16) and async (batch 8 of 16) modes, the latter also with one stepping
    thread (num_threads=1: its best over seconds of continuous stepping on 2 vCPUs, 202k against
    163k with its default of a thread per env), or ([], why)."""
    try:
        import envpool
    except Exception as exc:  # noqa: BLE001
        return [], f"n/a: envpool does not import ({type(exc).__name__}: {str(exc)[:80]})"
    actions = np.random.default_rng(0).integers(0, 2, (1024, N))
    out = []
    for batch, threads in ((N, 0), (N // 2, 0), (N // 2, 1)):
        env = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=N, batch_size=batch,
                           num_threads=threads)
        env.async_reset()
        box = [env.recv()]

        def one(i, env=env, box=box):
            ids = box[0][-1]["env_id"]
            env.send(actions[i & 1023, :len(ids)], ids)
            box[0] = env.recv()
            return len(ids)

        mode = ("sync" if batch == N else f"async, batch {batch}") + (f", {threads} thread" if threads else "")
        out.append(Runner(f"EnvPool ({mode})", one, env.close))
    return out, f"envpool {envpool.__version__}"


def raw_cartpole_rate(seconds=0.5):
    """Steps per second of one unwrapped gymnasium CartPole in a tight loop (resets included): the
    most one core can step of it, with no vector env, wrapper or transport around it. Its action
    space checks actions as rlflow's lean envs' does (rf.envs.make.fast_discrete: same answers,
    ~1.2 us less than gymnasium's Discrete.contains a step), and actions are numpy int64 scalars as
    a vector env passes them, so the figure bounds what rlflow steps."""
    return 1e6 / machine.cartpole_step_us(seconds, fast_check=True)


def measure(runners, seconds, rounds=ROUNDS):
    """Interleaved rounds (every backend once per round, in turn): the machine's load drifts alike
    for all of them, so the ratios hold even on a shared machine. Median of the rounds."""
    for r in runners:
        r.run(0.2)                         # warm-up
        r.rates.clear()
    for _ in range(rounds):
        for r in runners:
            r.run(seconds / rounds)
    for r in runners:
        r.closer()


def cpuidle_driver() -> str:
    """The kernel's cpuidle driver: on a VM, "haltpoll" polls a while before an idle vCPU halts
    (cheap wake-ups); "none" halts at once (each wake-up of a process on an idle vCPU is an IPI and
    a VM exit). The process backends' figures on cheap envs depend on it."""
    try:
        with open("/sys/devices/system/cpu/cpuidle/current_driver") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=11.0, help="timed seconds per figure (ROUNDS rounds)")
    args = ap.parse_args()
    sec = args.seconds
    print(f"# numpy {np.__version__}, gymnasium {gym.__version__}, {os.cpu_count()} CPUs, {N} envs, "
          f"median of {ROUNDS} interleaved rounds, {sec:.1f} s per figure; cpuidle driver: {cpuidle_driver()}")
    print(f"# before: {machine.describe()}", flush=True)

    # ---- CartPole --------------------------------------------------------------------------------
    cp = [rlflow_runner("rlflow serial", "CartPole-v1"),
          rlflow_runner("rlflow process (auto: 1 worker + inline)", "CartPole-v1",
                        backend="process"),
          rlflow_runner("rlflow process (2 workers)", "CartPole-v1", backend="process", workers=2),
          rlflow_runner("rlflow pool (2 workers, batch 8)", "CartPole-v1", backend="pool", workers=2,
                        batch_size=8),
          rlflow_runner("rlflow pool (auto: 1 worker + inline, batch 8)", "CartPole-v1", backend="pool",
                        batch_size=8),
          gym_runner("gymnasium SyncVectorEnv", cartpole, False),
          gym_runner("gymnasium AsyncVectorEnv(shm)", cartpole, True)]
    pools, ep_note = envpool_runners()
    measure(cp + pools, sec)
    raw = raw_cartpole_rate()
    cores = min(os.cpu_count() or 1, N)
    serial = cp[0].rate
    best_ep = max(pools, key=lambda r: r.rate) if pools else None
    peer, peer_name = (best_ep.rate, "EnvPool") if best_ep else (cp[5].rate, "SyncVectorEnv")
    rows = [("CartPole-v1", r.name, r.rate, serial, peer, peer_name) for r in cp + pools]
    best_sync = max(r.rate for r in cp[:3])          # steps of all 16 envs
    best_pool = max(r.rate for r in cp[3:5])         # steps of 8 of 16 (EnvPool's async mode)
    ours = max(cp[:5], key=lambda r: r.rate)         # rlflow's best backend
    best_cp = ours.rate

    # ---- heavy -----------------------------------------------------------------------------------
    hv = [rlflow_runner("rlflow serial", heavy),
          rlflow_runner("rlflow process (2 workers)", heavy, backend="process", workers=2),
          rlflow_runner("rlflow process (auto: 1 worker + inline)", heavy, backend="process"),
          rlflow_runner("rlflow pool (2 workers, batch 8)", heavy, backend="pool", workers=2, batch_size=8),
          rlflow_runner("rlflow pool (auto: 1 worker + inline, batch 8)", heavy, backend="pool", batch_size=8),
          gym_runner("gymnasium SyncVectorEnv", heavy, False),
          gym_runner("gymnasium AsyncVectorEnv(shm)", heavy, True)]
    measure(hv, sec * 1.5)
    hserial, hproc, hasync = hv[0].rate, hv[1].rate, hv[6].rate
    rows += [("heavy (200 us)", r.name, r.rate, hserial, hasync, "AsyncVectorEnv") for r in hv]

    print(f"\n| env | backend | steps/s | vs rlflow serial | vs peer |")
    print("|---|---|---:|---:|---:|")
    for env, name, v, ser, pr, pname in rows:
        print(f"| {env} | {name} | {v:,.0f} | {v / ser:.2f}x | {v / pr:.2f}x {pname} |")
    if not pools:
        print(f"| CartPole-v1 | EnvPool | {ep_note} | | |")
    print(f"| CartPole-v1 | ceiling: {cores} cores x one raw unwrapped env ({raw:,.0f}/s; rlflow serial "
          f"steps {serial / raw:.0%} of that on one core) | "
          f"{cores * raw:,.0f} | {cores * raw / serial:.2f}x | {cores * raw / peer:.2f}x {peer_name} |")
    print(f"| heavy (200 us) | ceiling: 2 stepping processes = 2 x serial | {2 * hserial:,.0f} | 2.00x | "
          f"{2 * hserial / hasync:.2f}x AsyncVectorEnv |")
    print(f"\n# after: {machine.describe()}")
    print(f"EnvPool: {ep_note}")
    proc = cp[1].rate

    met = []

    def verdict(value, target):          # on the unrounded ratio: 1.798 prints as 1.80 but misses 1.8
        met.append(value >= target)
        return f"{value:.3f} ({'MET' if met[-1] else 'NOT MET'}: >= {target})"

    print("targets:")
    print(f"  CartPole: rlflow best / {peer_name} (its best mode) = {verdict(best_cp / peer, 1.0)}; the ceiling "
          f"for Python CartPole on {cores} cores is {cores * raw / peer:.2f}x {peer_name}")
    if len(pools) >= 2:
        best_async = max(r.rate for r in pools[1:])
        print(f"    by mode: rlflow best 16-env step / EnvPool sync = {best_sync / pools[0].rate:.2f}; "
              f"rlflow best pool (8 of 16) / EnvPool best async (8 of 16) = {best_pool / best_async:.2f}")
    if best_ep is not None:
        # how far the verdict moves within this run: the two figures' rounds, and their ratio round
        # by round (each round times every backend once, in turn, so a round pairs close-by times)
        per = np.array(ours.rates) / np.array(best_ep.rates)
        print(f"    spread over the {len(per)} rounds: {ours.name} {min(ours.rates):,.0f}-{max(ours.rates):,.0f}, "
              f"{best_ep.name} {min(best_ep.rates):,.0f}-{max(best_ep.rates):,.0f} steps/s; their ratio round by "
              f"round: median {np.median(per):.2f}, {np.mean(per >= 1.0):.0%} of rounds >= 1.0")
    print(f"  CartPole: process / serial, never below 0.9: auto {verdict(proc / serial, 0.9)}, 2 workers "
          f"{verdict(cp[2].rate / serial, 0.9)} (the calibrated split aims at >= 1.1)")
    print(f"  heavy: process(2 workers) / serial = {verdict(hproc / hserial, 1.8)}")
    print(f"  heavy: process(2 workers) / AsyncVectorEnv = {verdict(hproc / hasync, 1.3)}; ceiling in this run "
          f"(2 x serial) / AsyncVectorEnv = {2 * hserial / hasync:.2f}")
    print(f"  all targets: {'MET' if all(met) else 'NOT MET'} ({sum(met)} of {len(met)})")


if __name__ == "__main__":
    main()
