"""Vector env throughput: rlflow serial / process / pool beside gymnasium and EnvPool, one run.

    flock /tmp/rlflow-bench.lock .venv/bin/python benchmarks/vector_envs.py [--seconds 2]

Two workloads, 16 envs each, random actions drawn up front:
  CartPole-v1   a cheap env (~6 us a step): measures the stepping loop and the transport overhead.
                Peer: EnvPool (its best of sync and async modes), else gymnasium SyncVectorEnv.
  heavy         CartPole whose step also burns ~200 us of CPU: measures parallel speed-up.
                Peer: gymnasium AsyncVectorEnv(shared_memory=True).
Every rlflow figure includes building the rf.Step record (copies, episode statistics) and, for the
process backends, the shared-memory round trip. Figures are env steps per second (median of 3).
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

N = 16


class Heavy(gym.Wrapper):
    """CartPole whose step also burns `us` microseconds of CPU in a busy loop."""

    def __init__(self, us=200.0):
        super().__init__(gym.make("CartPole-v1"))
        self.burn = us * 1e-6

    def step(self, action):
        end = time.perf_counter() + self.burn
        while time.perf_counter() < end:
            pass
        return self.env.step(action)


def heavy():
    return Heavy()


def cartpole():
    return gym.make("CartPole-v1")


def measure(step_fn, batch_of, seconds, warmup=0.2):
    """Env steps per second of `step_fn(i)`, which returns the number of env steps it made."""
    rates = []
    for _ in range(3):
        t_end = time.perf_counter() + warmup
        i = 0
        while time.perf_counter() < t_end:
            step_fn(i)
            i += 1
        n = 0
        t0 = time.perf_counter()
        t_end = t0 + seconds / 3
        while True:
            n += step_fn(i)
            i += 1
            if (i & 7) == 0 and time.perf_counter() >= t_end:
                break
        rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates))


def bench_rlflow(env, seconds, **kw):
    actions = np.random.default_rng(0).integers(0, 2, (1024, N))
    with rf.envs.make(env, N, **kw) as venv:
        step = venv.reset(seed=0)
        box = [step]

        def one(i):
            s = venv.step(actions[i & 1023, :len(box[0])])
            box[0] = s
            return len(s)

        return measure(one, N, seconds)


def bench_gym(env_fn, seconds, asynchronous):
    actions = np.random.default_rng(0).integers(0, 2, (1024, N))
    if asynchronous:
        venv = gym.vector.AsyncVectorEnv([env_fn] * N, shared_memory=True)
    else:
        venv = gym.vector.SyncVectorEnv([env_fn] * N)
    venv.reset(seed=0)
    try:
        def one(i):
            venv.step(actions[i & 1023])
            return N

        return measure(one, N, seconds)
    finally:
        venv.close()


def bench_envpool(seconds):
    """EnvPool's best of sync (batch 16) and async (batch 8 of 16) modes, or (None, why)."""
    try:
        import envpool
    except Exception as exc:  # noqa: BLE001
        return None, f"n/a: envpool does not import ({type(exc).__name__}: {str(exc)[:80]})"
    actions = np.random.default_rng(0).integers(0, 2, (1024, N))
    best = 0.0
    for batch in (N, N // 2):
        env = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=N, batch_size=batch,
                           num_threads=0)
        env.async_reset()
        box = [env.recv()]

        def one(i, env=env, box=box):
            ids = box[0][-1]["env_id"]
            env.send(actions[i & 1023, :len(ids)], ids)
            box[0] = env.recv()
            return len(ids)

        best = max(best, measure(one, batch, seconds))
        env.close()
    return best, f"envpool {envpool.__version__}, best of sync/async"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per figure")
    args = ap.parse_args()
    sec = args.seconds
    print(f"# numpy {np.__version__}, gymnasium {gym.__version__}, {os.cpu_count()} CPUs, {N} envs, "
          f"median of 3, {sec:.1f} s per figure")

    rows = []
    # ---- CartPole --------------------------------------------------------------------------------
    serial = bench_rlflow("CartPole-v1", sec)
    proc = bench_rlflow("CartPole-v1", sec, backend="process")
    proc1 = bench_rlflow("CartPole-v1", sec, backend="process", workers=2)
    pool = bench_rlflow("CartPole-v1", sec, backend="pool", workers=2, batch_size=8)
    sync = bench_gym(cartpole, sec, asynchronous=False)
    asyn = bench_gym(cartpole, sec, asynchronous=True)
    ep, ep_note = bench_envpool(sec)
    peer, peer_name = (ep, "EnvPool") if ep else (sync, "SyncVectorEnv")
    for name, v in [("rlflow serial", serial), ("rlflow process (auto: 1 worker + inline)", proc),
                    ("rlflow process (2 workers)", proc1), ("rlflow pool (2 workers, batch 8)", pool),
                    ("gymnasium SyncVectorEnv", sync), ("gymnasium AsyncVectorEnv(shm)", asyn),
                    ("EnvPool", ep)]:
        rows.append(("CartPole-v1", name, v, serial, peer, peer_name))
    best_cp = max(serial, proc, proc1, pool)

    # ---- heavy -----------------------------------------------------------------------------------
    hserial = bench_rlflow(heavy, sec)
    hproc = bench_rlflow(heavy, sec, backend="process", workers=2)
    hpool = bench_rlflow(heavy, sec, backend="pool", workers=2, batch_size=8)
    hsync = bench_gym(heavy, sec, asynchronous=False)
    hasync = bench_gym(heavy, sec, asynchronous=True)
    for name, v in [("rlflow serial", hserial), ("rlflow process (2 workers)", hproc),
                    ("rlflow pool (2 workers, batch 8)", hpool), ("gymnasium SyncVectorEnv", hsync),
                    ("gymnasium AsyncVectorEnv(shm)", hasync)]:
        rows.append(("heavy (200 us)", name, v, hserial, hasync, "AsyncVectorEnv"))

    print(f"\n| env | backend | steps/s | vs rlflow serial | vs peer |")
    print("|---|---|---:|---:|---:|")
    for env, name, v, ser, pr, pname in rows:
        if v is None:
            print(f"| {env} | {name} | {ep_note} | | |")
            continue
        print(f"| {env} | {name} | {v:,.0f} | {v / ser:.2f}x | {v / pr:.2f}x {pname} |")
    print(f"\nEnvPool: {ep_note}")
    print("targets:")
    print(f"  CartPole: rlflow best / {peer_name} = {best_cp / peer:.2f} (>= 1.0)")
    print(f"  CartPole: process / serial = {proc / serial:.2f} (>= 0.9)")
    print(f"  heavy: process(2) / serial = {hproc / hserial:.2f} (>= 1.8)")
    print(f"  heavy: process(2) / AsyncVectorEnv = {hproc / hasync:.2f} (>= 1.3)")


if __name__ == "__main__":
    main()
