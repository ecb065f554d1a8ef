"""Replay table speed: rlflow beside cpprb (and TorchRL's uniform buffer), in one run.

    flock /tmp/rlflow-bench.lock .venv/bin/python benchmarks/replay.py [--quick]

Two configs, each with obs, action (int64), reward (float32), discount (float32), next_obs:
  cartpole  obs/next_obs float32 [4],        capacity 1,000,000
  atari     obs/next_obs uint8 [84, 84],     capacity   100,000  (one frame each, stored twice in
            every library: cpprb's next_of/stack_compress would change what is stored, so it is off)

Figures (each the best of REPEATS timed runs, to dampen noise from other processes on the machine):
  insert 1         single-item inserts per second, into a table that is filling (not yet full)
  insert 64        items per second inserted in batches of 64, into a table that is filling
  insert 64 full   the same into a full table (every insert evicts the oldest items)
  uniform 256      uniform samples of 256 per second from the full table
  per 256+update   prioritized (alpha 0.6) iterations per second of sample(256) then
                   update_priorities(256 new priorities), 1M (cartpole) items with random priorities
Each library gets its own native input: rlflow a dict of numpy arrays, cpprb keyword arrays,
TorchRL a prebuilt TensorDict (its conversion from numpy is not timed). Samples are copies in
all three. ratio = rlflow / peer.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

import rlflow as rf
from rlflow.replay import selectors

REPEATS = 5


def best_rate(fn, count, repeats=REPEATS):
    """Run fn() `repeats` times; each run does `count` units; return the best units/s."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = max(best, count / dt)
    return best


def make_items(n, obs_shape, obs_dtype, rng):
    if obs_dtype == np.uint8:
        obs = rng.integers(0, 255, (n,) + obs_shape, dtype=np.uint8)
        nobs = rng.integers(0, 255, (n,) + obs_shape, dtype=np.uint8)
    else:
        obs = rng.standard_normal((n,) + obs_shape).astype(obs_dtype)
        nobs = rng.standard_normal((n,) + obs_shape).astype(obs_dtype)
    return {"obs": obs, "action": rng.integers(0, 2, n).astype(np.int64),
            "reward": rng.standard_normal(n).astype(np.float32), "discount": np.ones(n, np.float32),
            "next_obs": nobs}


# --------------------------------------------------------------------------------------------------
class RLFlow:
    name = "rlflow"

    def __init__(self, capacity, obs_shape, obs_dtype, prioritized=False):
        sampler = selectors.Prioritized(0.6, seed=0) if prioritized else selectors.Uniform(seed=0)
        self.t = rf.Table(capacity, sampler=sampler, remover=selectors.Fifo(),
                          rate_limiter=rf.rate_limiters.MinSize(1))

    def prep(self, items):  # per-call input: a dict of arrays with the batch axis
        return items

    def prep_one(self, items, i):
        return {k: v[i:i + 1] for k, v in items.items()}

    def insert(self, batch, priorities=None):
        self.t.insert(batch, priorities)

    def sample(self, n):
        return self.t.sample(n)

    def per_step(self, n, new_p):
        s = self.t.sample(n)
        self.t.update_priorities(s.keys, new_p)


class CPPRB:
    name = "cpprb"

    def __init__(self, capacity, obs_shape, obs_dtype, prioritized=False):
        import cpprb
        env = {"obs": {"shape": obs_shape, "dtype": obs_dtype}, "action": {"dtype": np.int64},
               "reward": {"dtype": np.float32}, "discount": {"dtype": np.float32},
               "next_obs": {"shape": obs_shape, "dtype": obs_dtype}}
        if prioritized:
            self.b = cpprb.PrioritizedReplayBuffer(capacity, env, alpha=0.6)
        else:
            self.b = cpprb.ReplayBuffer(capacity, env)

    def prep(self, items):
        return items

    def prep_one(self, items, i):  # one transition, without the batch axis
        return {k: v[i] for k, v in items.items()}

    def insert(self, batch, priorities=None):
        if priorities is None:
            self.b.add(**batch)
        else:
            self.b.add(**batch, priorities=priorities)

    def sample(self, n):
        return self.b.sample(n)

    def per_step(self, n, new_p):
        s = self.b.sample(n, beta=0.4)
        self.b.update_priorities(s["indexes"], new_p)


class TorchRL:
    name = "torchrl"

    def __init__(self, capacity, obs_shape, obs_dtype, prioritized=False):
        import logging
        import torch  # noqa: F401
        from torchrl.data import LazyTensorStorage, PrioritizedReplayBuffer, ReplayBuffer
        logging.getLogger("torchrl").setLevel(logging.WARNING)
        if prioritized:
            self.b = PrioritizedReplayBuffer(alpha=0.6, beta=0.4, storage=LazyTensorStorage(capacity))
            # fails here, not later, if the C++ sum tree does not load
            self.b._sampler._get_sum_tree_class() if hasattr(self.b._sampler, "_get_sum_tree_class") else None
        else:
            self.b = ReplayBuffer(storage=LazyTensorStorage(capacity))

    def prep(self, items):
        import torch
        from tensordict import TensorDict
        n = len(items["action"])
        return TensorDict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in items.items()}, batch_size=[n])

    def prep_one(self, items, i):
        import torch
        from tensordict import TensorDict
        return TensorDict({k: torch.from_numpy(np.array(v[i])) for k, v in items.items()}, batch_size=[])

    def insert(self, batch, priorities=None):
        if batch.batch_size == ():
            self.b.add(batch)
        else:
            self.b.extend(batch)

    def sample(self, n):
        return self.b.sample(n)

    def per_step(self, n, new_p):
        s, info = self.b.sample(n, return_info=True)
        self.b.update_priority(info["index"], new_p)


# --------------------------------------------------------------------------------------------------
def bench_library(cls, cfg, rng, quick):
    """All figures of one library in one config: dict figure -> rate (or a string reason)."""
    out = {}
    cap, shape, dtype = cfg["capacity"], cfg["obs_shape"], cfg["obs_dtype"]
    try:
        lib = cls(cap, shape, dtype)
    except Exception as e:  # pragma: no cover - peer not installed
        return {k: f"n/a ({type(e).__name__}: {e})" for k in cfg["figures"]}
    pool = make_items(4096, shape, dtype, rng)
    if "insert 1" in cfg["figures"]:
        n1 = cfg["n_single"] // (10 if quick else 1)
        ones = [lib.prep_one(pool, i % 4096) for i in range(n1)]

        def single():
            for b in ones:
                lib.insert(b)
        out["insert 1"] = best_rate(single, n1, repeats=3)
        del ones
    batches = [lib.prep({k: v[i * 64:(i + 1) * 64] for k, v in pool.items()}) for i in range(64)]
    nb = cfg["n_batches"] // (10 if quick else 1)

    def batch64():
        for i in range(nb):
            lib.insert(batches[i & 63])
    out["insert 64"] = best_rate(batch64, nb * 64, repeats=1)
    # fill the table (untimed)
    big = lib.prep({k: np.concatenate([v] * 4)[:min(cap, 16384)] for k, v in pool.items()})
    m = len(big["action"]) if isinstance(big, dict) else big.batch_size[0]
    for _ in range(cap // m + 1):
        lib.insert(big)
    del big
    if "insert 64 full" in cfg["figures"]:
        out["insert 64 full"] = best_rate(batch64, nb * 64, repeats=2)
    ns = cfg["n_samples"] // (10 if quick else 1)

    def uniform():
        for _ in range(ns):
            lib.sample(256)
    uniform()  # warm up
    out["uniform 256"] = best_rate(uniform, ns)
    del lib
    gc.collect()

    if "per 256+update" in cfg["figures"]:
        try:
            lib = cls(cap, shape, dtype, prioritized=True)
            big = {k: np.concatenate([v] * 4)[:16384] for k, v in pool.items()}
            pri = rng.random(16384) + 0.05
            for _ in range(cap // 16384 + 1):
                lib.insert(lib.prep(big), pri)
            npr = cfg["n_per"] // (10 if quick else 1)
            new_p = [rng.random(256) + 0.05 for _ in range(16)]
            if cls is TorchRL:
                import torch
                new_p = [torch.from_numpy(p) for p in new_p]

            def per():
                for i in range(npr):
                    lib.per_step(256, new_p[i & 15])
            for i in range(20):  # warm up (numba JIT, caches)
                lib.per_step(256, new_p[i & 15])
            out["per 256+update"] = best_rate(per, npr)
        except Exception as e:
            msg = str(e).split("\n")[0][:90]
            out["per 256+update"] = f"n/a ({type(e).__name__}: {msg})"
        finally:
            lib = None
            gc.collect()
    return out


CONFIGS = {
    "cartpole": dict(capacity=1_000_000, obs_shape=(4,), obs_dtype=np.float32, n_single=100_000,
                     n_batches=5_000, n_samples=2_000, n_per=1_000,
                     figures=["insert 1", "insert 64", "insert 64 full", "uniform 256", "per 256+update"]),
    "atari": dict(capacity=100_000, obs_shape=(84, 84), obs_dtype=np.uint8, n_single=20_000,
                  n_batches=500, n_samples=200, n_per=0,
                  figures=["insert 1", "insert 64", "uniform 256"]),
}

TARGETS = {  # (config, figure) -> (min ratio, against)
    ("cartpole", "insert 1"): (5.0, "cpprb"),
    ("cartpole", "insert 64"): (3.0, "cpprb"),
    ("cartpole", "uniform 256"): (1.0, "cpprb"),
    ("cartpole", "per 256+update"): (3.0, "cpprb"),
    ("atari", "uniform 256"): (1.0, "best peer"),
}


def fmt(v):
    if isinstance(v, str):
        return v
    return f"{v:,.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tenth of the work (smoke run)")
    ap.add_argument("--configs", default="cartpole,atari")
    args = ap.parse_args()
    from rlflow.replay.sumtree import _numba_kernels
    print(f"numba sum tree: {'on' if _numba_kernels() else 'off (numpy fallback)'}; best of {REPEATS} runs")
    rng = np.random.default_rng(0)
    for cname in args.configs.split(","):
        cfg = CONFIGS[cname]
        results = {}
        for cls in (RLFlow, CPPRB, TorchRL):
            results[cls.name] = bench_library(cls, cfg, rng, args.quick)
            gc.collect()
        print(f"\n== {cname}: obs {cfg['obs_dtype'].__name__}{list(cfg['obs_shape'])}, capacity {cfg['capacity']:,} ==")
        print(f"{'figure':<16} {'rlflow':>12} {'cpprb':>12} {'torchrl':>12} {'rlflow/cpprb':>13} "
              f"{'rlflow/torchrl':>15}  target")
        for fig in cfg["figures"]:
            r, c, t = (results[k].get(fig, "-") for k in ("rlflow", "cpprb", "torchrl"))
            rc = f"{r / c:.2f}x" if not isinstance(r, str) and not isinstance(c, str) else "-"
            rt = f"{r / t:.2f}x" if not isinstance(r, str) and not isinstance(t, str) else "-"
            tgt = ""
            if (cname, fig) in TARGETS:
                need, against = TARGETS[(cname, fig)]
                peers = [v for v in ((c,) if against == "cpprb" else (c, t)) if not isinstance(v, str)]
                if peers and not isinstance(r, str):
                    ratio = r / max(peers)
                    tgt = f">= {need:g}x {against}: {'MET' if ratio >= need else 'NOT MET'} ({ratio:.2f}x)"
            print(f"{fig:<16} {fmt(r):>12} {fmt(c):>12} {fmt(t):>12} {rc:>13} {rt:>15}  {tgt}")
        for k in ("rlflow", "cpprb", "torchrl"):
            for fig, v in results[k].items():
                if isinstance(v, str) and v.startswith("n/a"):
                    print(f"  {k} {fig}: {v}")
    print("\nunits: insert figures in items/s; uniform in batches/s; per in iterations/s")


if __name__ == "__main__":
    main()
