"""The process runtime's costs, in one run:

(1) Data flow overhead. The whole pipeline (random policy, Transition adder, shared-memory rings,
    a table with a MinSize limiter, a learner that only consumes batches) on backend="process" with
    one actor, beside the bare vector env (the same one) stepped with random actions in one process.
    Target: env steps/s with the pipeline >= 0.8x the bare env's (the data flow costs < 20%).
    Each pipeline phase sits between two bare env phases and is compared with their mean: the
    host's speed drifts within minutes (a CartPole step 6 to 12 us here), and bracketing cancels
    a steady drift that one bare phase before each pipeline phase would count as overhead.
(2) DQN on CartPole-v1 (examples/dqn.py's experiment, rl-zoo hyperparameters): training wall time
    and env steps until the greedy policy's mean return over 20 episodes reaches 475, for the process
    backend, the local backend and Stable-Baselines3 with the same hyperparameters (the SB3 side is
    benchmarks/learning.py's). Target: process <= 0.7x SB3's wall time, with no more env steps.
    Training time leaves out evaluation and construction for all three: SB3's constructor, and
    rlflow's start-up until the first actor acts (printed per seed as 'start').

    flock /tmp/rlflow-bench.lock .venv/bin/python benchmarks/pipeline.py [--seeds 10] [--first-seed 0] [--only flow|dqn]

Before and after, it prints benchmarks/machine.py's check: whether one busy CPU slows the other down.
Both targets compare two busy processes (actor and learner) against one, so they move with it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rlflow as rf  # noqa: E402


# ---------------------------------------------------------------- (1) data flow vs bare env
class RandomPolicy(rf.Policy):
    def __init__(self, spec):
        self.n = int(spec.action_space.n)
        self.rng = np.random.default_rng(0)

    def act(self, obs):
        return self.rng.integers(self.n, size=len(obs))


class ConsumeLearner(rf.Learner):
    """Takes batches and does nothing with them."""

    def __init__(self, spec):
        pass

    def step(self, batch):
        return {}


class MinSizeTable:
    def __init__(self, capacity):
        self.capacity = capacity

    def __call__(self, specs):
        return rf.Table(capacity=self.capacity, sampler=rf.selectors.Uniform(seed=0),
                        remover=rf.selectors.Fifo(), rate_limiter=rf.rate_limiters.MinSize(1_000), specs=specs)


def bare_env_rate(env_id, num_envs, backend, seconds):
    venv = rf.envs.make(env_id, num_envs=num_envs, backend=backend)
    n = int(venv.single_action_space.n)
    rng = np.random.default_rng(0)
    venv.reset(seed=0)
    for _ in range(50):
        venv.step(rng.integers(n, size=num_envs))
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            venv.step(rng.integers(n, size=num_envs))
        steps += 20 * num_envs
    rate = steps / (time.perf_counter() - t0)
    venv.close()
    return rate


def steady_rate(history, key, skip_seconds):
    """Rate of `key` between the first figures row after `skip_seconds` and the last row."""
    rows = [r for r in history if r["wall_time"] >= skip_seconds]
    if len(rows) < 2:
        rows = history[-2:]
    a, b = rows[0], rows[-1]
    return (b[key] - a[key]) / max(b["wall_time"] - a["wall_time"], 1e-9)


def pipeline_rate(env_id, num_envs, backend, seconds, num_actors=1):
    exp = rf.Experiment(env=env_id, policy=RandomPolicy, learner=ConsumeLearner,
                        adder=rf.adders.Transition(discount=0.99), table=MinSizeTable(200_000),
                        batch_size=256, num_envs=num_envs, env_backend=backend)
    r = rf.run(exp, backend="process", num_actors=num_actors, max_seconds=seconds + 1.5, progress=False,
               progress_every=0.25)
    f = r.figures
    return (steady_rate(r.history, "env_steps", 1.5), steady_rate(r.history, "learner_steps", 1.5),
            f.get("actor_blocked_s", 0.0))


def print_header(header):
    print(header)
    print("-" * len(header), flush=True)
    return header


def flow(seconds, rounds=7):
    print(f"(1) data flow overhead, CartPole-v1, random actions, Transition adder, MinSize table, learner "
          f"consuming 256-batches, process runtime with 1 actor; {rounds} rounds of pipeline ({seconds:.0f} s "
          f"steady state), each between two bare env phases ({seconds:.0f} s), against their mean (the host's "
          f"speed drifts: bracketing cancels a steady drift); median of the per-round ratios")
    print_header(f"{'envs/actor':>10} | {'bare env steps/s':>16} | {'pipeline env steps/s':>20} | "
                 f"{'learner batches/s':>17} | {'ratio':>6} | target >= 0.80")
    out = []
    for num_envs in (16, 64):
        bares = [bare_env_rate("CartPole-v1", num_envs, "serial", seconds)]
        pipes, learns, ratios = [], [], []
        for _ in range(rounds):
            env_rate, learn_rate, _ = pipeline_rate("CartPole-v1", num_envs, "serial", seconds)
            bares.append(bare_env_rate("CartPole-v1", num_envs, "serial", seconds))
            pipes.append(env_rate)
            learns.append(learn_rate)
            ratios.append(env_rate / (0.5 * (bares[-2] + bares[-1])))
        ratio = float(np.median(ratios))
        out.append(ratio)
        print(f"{num_envs:>10} | {np.median(bares):>16,.0f} | {np.median(pipes):>20,.0f} | "
              f"{np.median(learns):>17,.0f} | {ratio:>6.2f} | {'MET' if ratio >= 0.8 else 'NOT MET'}"
              f"   (rounds: {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    return out


# ---------------------------------------------------------------- (2) DQN time to solve
def dqn(seeds, max_steps, eval_every, first_seed=0):
    import torch

    import learning

    torch.set_num_threads(1)
    print(f"\n(2) DQN CartPole-v1, solve = greedy mean return over 20 episodes >= {learning.THRESHOLD:.0f}, "
          f"evaluated every {eval_every:,} env steps, at most {max_steps:,} env steps; training wall time "
          f"(evaluation and construction excluded for all three: SB3's constructor, rlflow's start-up until the "
          f"first actor acts; 'start' is the process backend's start-up)")
    header = print_header(f"{'seed':>4} | {'process steps':>13} {'s':>6} {'start':>5} | {'local steps':>11} {'s':>6} | "
                          f"{'SB3 steps':>9} {'s':>6} | {'process/SB3 time':>16} {'local/SB3 time':>14}")
    rows = []
    for seed in range(first_seed, first_seed + seeds):
        proc = learning.run_rlflow(seed, max_steps, eval_every, backend="process", num_actors=1)
        loc = learning.run_rlflow(seed, max_steps, eval_every, backend="local")
        sb3 = learning.run_sb3(seed, max_steps, eval_every)
        rows.append((proc, loc, sb3))

        def cell(r):
            return ("-", "-") if r[0] is None else (f"{r[0]:,}", f"{r[1]:.1f}")

        def ratio(a, b):
            return f"{a[1] / b[1]:.2f}x" if a[0] is not None and b[0] is not None else "-"

        print(f"{seed:>4} | {cell(proc)[0]:>13} {cell(proc)[1]:>6} {proc[3]:>5.2f} | {cell(loc)[0]:>11} {cell(loc)[1]:>6} | "
              f"{cell(sb3)[0]:>9} {cell(sb3)[1]:>6} | {ratio(proc, sb3):>16} {ratio(loc, sb3):>14}", flush=True)
    print("-" * len(header))

    def solved(i, j):          # column j (0 steps, 1 seconds) of backend i's solved seeds
        return [r[i][j] for r in rows if r[i][0] is not None]

    def med(i, j):
        vals = solved(i, j)
        return (np.median(vals), len(vals)) if vals else (float("nan"), 0)

    (ps, n_p), (pt, _) = med(0, 0), med(0, 1)
    (ls, n_l), (lt, _) = med(1, 0), med(1, 1)
    (ss, n_s), (st, _) = med(2, 0), med(2, 1)
    print(f"median over solved seeds: process {ps:,.0f} steps {pt:.1f} s ({n_p}/{seeds} solved) | local "
          f"{ls:,.0f} steps {lt:.1f} s ({n_l}/{seeds}) | SB3 {ss:,.0f} steps {st:.1f} s ({n_s}/{seeds})")
    both = [(r[0], r[2]) for r in rows if r[0][0] is not None and r[2][0] is not None]
    if both:
        # A seed does not couple the two runs (each framework draws its own random numbers), so a
        # per-seed ratio divides two independent draws; the verdict uses the ratio of the medians.
        t_ratio = np.median([p[1] / s[1] for p, s in both])
        s_ratio = np.median([p[0] / s[0] for p, s in both])
        print(f"median of per-seed ratios process/SB3: wall time {t_ratio:.2f}x, env steps {s_ratio:.2f}x")
    if n_p > 1 and n_s > 1:
        # How far the env-steps verdict is from noise: a 90% bootstrap interval of the ratio of
        # medians (seeds resampled on each side), and the two means.
        p_steps, s_steps = np.array(solved(0, 0), dtype=float), np.array(solved(2, 0), dtype=float)
        rng = np.random.default_rng(0)
        boot = [np.median(rng.choice(p_steps, len(p_steps))) / np.median(rng.choice(s_steps, len(s_steps)))
                for _ in range(2000)]
        lo, hi = np.percentile(boot, [5, 95])
        print(f"env steps to solve, process/SB3: ratio of medians 90% bootstrap interval [{lo:.2f}, {hi:.2f}]; "
              f"means {p_steps.mean():,.0f} / {s_steps.mean():,.0f} = {p_steps.mean() / s_steps.mean():.2f}x")
    if n_p and n_s:
        print(f"ratio of medians process/SB3: wall time {pt / st:.2f}x (target <= 0.70: "
              f"{'MET' if pt / st <= 0.7 else 'NOT MET'}), env steps {ps / ss:.2f}x (target <= 1.00: "
              f"{'MET' if ps / ss <= 1.0 else 'NOT MET'}); per env step {pt / ps * 1e3:.3f} ms vs "
              f"{st / ss * 1e3:.3f} ms = {(pt / ps) / (st / ss):.2f}x")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--eval-every", type=int, default=2_000)
    p.add_argument("--only", choices=["flow", "dqn"], default=None)
    a = p.parse_args()
    import machine

    print(f"# before: {machine.describe()}", flush=True)
    if a.only != "dqn":
        flow(a.seconds)
    if a.only != "flow":
        dqn(a.seeds, a.max_steps, a.eval_every, a.first_seed)
    print(f"# after: {machine.describe()}")


if __name__ == "__main__":
    main()
