"""DQN on CartPole-v1: env steps to solve over many seeds, for one backend or Stable-Baselines3.

    flock /tmp/rlflow-bench.lock .venv/bin/python benchmarks/dqn_seeds.py process 0 48
    .venv/bin/python benchmarks/dqn_seeds.py sb3 48 96          # [--param-sync N] for rlflow

benchmarks/pipeline.py's DQN verdict compares medians over 10 seeds, and env steps to solve move a
lot from seed to seed (2k to 46k here). This script prints the env steps of each seed and the median
and mean over the range, so the two sides can be compared over as many seeds as there is time for.
The same experiment and evaluation as pipeline.py (benchmarks/learning.py's run_rlflow / run_sb3;
a run that does not solve counts as --max-steps). Env steps only: the figures do not depend on the
machine's load, so runs of different backends may share the machine (SB3 and the local runtime are
deterministic for a seed; the process runtime is not).

Measured on a 2-vCPU VM (twelfth session): SB3 seeds 0-47 median 28,000 / mean 26,542, seeds 48-95
30,000 / 30,542; the process runtime seeds 0-47: 30,000 / 29,667 and, with param_sync=128,
30,000 / 28,042; local with param_sync=128: 31,000 / 27,667.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


def steps_to_solve(backend: str, seed: int, max_steps: int, eval_every: int, param_sync: int | None):
    import learning

    if backend == "sb3":
        return learning.run_sb3(seed, max_steps, eval_every)[0]
    extra = {} if param_sync is None else {"param_sync": param_sync}
    return learning.run_rlflow(seed, max_steps, eval_every, backend=backend, **extra)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backend", choices=["process", "local", "sb3"])
    p.add_argument("first", type=int, help="first seed")
    p.add_argument("end", type=int, help="one past the last seed")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--eval-every", type=int, default=2_000)
    p.add_argument("--param-sync", type=int, default=None, help="rlflow: examples/dqn.py's param_sync")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    steps = []
    for seed in range(a.first, a.end):
        s = steps_to_solve(a.backend, seed, a.max_steps, a.eval_every, a.param_sync)
        steps.append(a.max_steps if s is None else s)
        print(f"{seed:>4} {'not solved' if s is None else f'{s:,}'}", flush=True)
    v = np.array(steps, dtype=float)
    print(f"{a.backend} seeds {a.first}-{a.end - 1}: median {np.median(v):,.0f}, mean {v.mean():,.0f} "
          f"(standard error {v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float('nan'):,.0f}), "
          f"{int(np.sum(v < a.max_steps))}/{len(v)} solved")


if __name__ == "__main__":
    main()
