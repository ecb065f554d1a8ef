"""Cost of each adder per vector step of 16 CartPole-v1 envs, beside the bare serial env step.

The env step is gymnasium CartPole-v1 x 16, stepped by a plain Python loop with same-step autoreset
(the true final observation kept), random actions: the cheapest honest vector step there is. The
adders are timed on a recorded stream of those same steps (rf.Step records), so their figure is the
adder alone. Run under the benchmark lock:

    flock /tmp/rlflow-bench.lock .venv/bin/python benchmarks/adders.py
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

import rlflow as rf
from rlflow import adders


def serial_step_fn(envs):
    n = len(envs)
    obs = np.zeros((n, 4), np.float32)
    final = np.zeros((n, 4), np.float32)
    reward = np.zeros(n, np.float32)
    term = np.zeros(n, bool)
    trunc = np.zeros(n, bool)
    ids = np.arange(n)

    def step(actions):
        for i, env in enumerate(envs):
            o, r, te, tr, _ = env.step(int(actions[i]))
            final[i] = o
            if te or tr:
                o, _ = env.reset()
            obs[i] = o
            reward[i] = r
            term[i] = te
            trunc[i] = tr
        return rf.Step(obs=obs.copy(), reward=reward.copy(), terminated=term.copy(), truncated=trunc.copy(),
                       final_obs=final.copy(), env_ids=ids)
    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    n, T = args.num_envs, args.steps
    envs = [gym.make("CartPole-v1") for _ in range(n)]
    rng = np.random.default_rng(0)
    first_obs = np.stack([e.reset(seed=i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    first = rf.Step(obs=first_obs, reward=np.zeros(n, np.float32), terminated=np.zeros(n, bool),
                    truncated=np.zeros(n, bool), final_obs=first_obs, env_ids=np.arange(n))
    step_fn = serial_step_fn(envs)
    actions = rng.integers(0, 2, size=(T, n))

    # the bare serial env step (and the recorded stream for the adders)
    env_times = []
    stream = []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        steps = [step_fn(actions[t]) for t in range(T)]
        env_times.append((time.perf_counter() - t0) / T)
        if rep == 0:
            stream = steps
    env_us = 1e6 * float(np.median(env_times))

    values = rng.normal(size=(T + 1, n)).astype(np.float32)
    prev = [first] + stream
    rollout_extras = [{"value": values[t], "log_prob": values[t] * 0.1,
                       "final_value": np.where(prev[t].terminated | prev[t].truncated, values[t] + 1, values[t])
                       .astype(np.float32)} for t in range(T)]
    cases = [
        ("Transition(0.99)", lambda: adders.Transition(0.99), None),
        ("NStepTransition(n=3, 0.99)", lambda: adders.NStepTransition(3, 0.99), None),
        ("Sequence(80, 40, pad)", lambda: adders.Sequence(80, 40, 0.99, "pad"), None),
        ("Sequence(80, 40, continue)", lambda: adders.Sequence(80, 40, 0.99, "continue"), None),
        ("Episode(500)", lambda: adders.Episode(500, 0.99), None),
        ("Rollout(128, 0.99, 0.95)", lambda: adders.Rollout(128, 0.99, 0.95), rollout_extras),
    ]
    rows = []
    for name, make, extras in cases:
        times = []
        for _ in range(args.repeats):
            a = make()
            a.add_first(first)
            t0 = time.perf_counter()
            if extras is None:
                for t in range(T):
                    a.add(actions[t], stream[t])
            else:
                for t in range(T):
                    a.add(actions[t], stream[t], extras[t])
            times.append((time.perf_counter() - t0) / T)
        us = 1e6 * float(np.median(times))
        rows.append((name, us, us / env_us))

    print(f"{n} x CartPole-v1, {T} vector steps, median of {args.repeats} runs")
    print(f"{'adder':<30} {'us/step':>9} {'ratio to env step':>18}")
    print(f"{'(bare serial env step)':<30} {env_us:>9.1f} {1.0:>18.3f}")
    for name, us, ratio in rows:
        print(f"{name:<30} {us:>9.1f} {ratio:>18.3f}")
    nstep = dict((r[0], r[2]) for r in rows)["NStepTransition(n=3, 0.99)"]
    print(f"target NStepTransition(n=3) < 0.25 x env step: {'met' if nstep < 0.25 else 'NOT met'} ({nstep:.3f})")


if __name__ == "__main__":
    main()
