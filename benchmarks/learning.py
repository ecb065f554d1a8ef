"""DQN on CartPole-v1: rlflow (examples/dqn.py) beside Stable-Baselines3's DQN, same hyperparameters
(rl-zoo's CartPole settings), 5 seeds, one torch thread each and denormal floats flushed to zero for
both (examples/dqn.py's CPU setting; Adam's moments of dead ReLU units decay into denormals), in one run.

For each seed it prints the env steps and the wall time until the greedy policy's mean return over
20 episodes reaches 475, evaluated every 2,000 env steps on the same 20-env evaluation (rf.evaluate,
same seeds) for both. Wall time is training time: evaluation time is subtracted for both, and so
is construction (SB3's constructor; rlflow's start-up, `figures["startup_seconds"]`). A run stops
when solved or at 100k env steps.

    python benchmarks/learning.py [--seeds 5] [--max-steps 100000] [--only rlflow|sb3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import rlflow as rf  # noqa: E402
import dqn  # noqa: E402

THRESHOLD = 475.0


def run_rlflow(seed: int, max_steps: int, eval_every: int, backend: str = "local", num_actors: int = 1,
               **args):
    """(env steps to solve, training seconds to solve, training seconds in all, start-up seconds).
    Training time leaves out evaluation and start-up (building the env, policy and learner, and
    with backend="process" starting the actor processes), as SB3's leaves out its constructor.
    `args`: other examples/dqn.py Args fields (e.g. param_sync)."""
    args = dqn.Args(seed=seed, total_steps=max_steps, eval_every=eval_every, target_return=THRESHOLD,
                    backend=backend, num_actors=num_actors, **args)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    result = rf.run(dqn.experiment(args), backend=backend, num_actors=num_actors,
                    max_env_steps=max_steps, progress=False)
    total = time.perf_counter() - t0
    eval_time = result.figures.get("eval_seconds", 0.0)
    startup = result.figures.get("startup_seconds", 0.0)
    train = total - eval_time - startup
    if result.solved_at is None:
        return None, None, train, startup
    return result.solved_at, result.solved_time, train, startup


class _SB3Greedy(rf.Policy):
    def __init__(self, model):
        self.model = model

    def act(self, obs):
        return self.model.predict(obs, deterministic=True)[0]


def run_sb3(seed: int, max_steps: int, eval_every: int):
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    eval_venv = rf.envs.make("CartPole-v1", num_envs=20)

    class Solve(BaseCallback):
        def __init__(self):
            super().__init__()
            self.solved_at = None
            self.eval_time = 0.0
            self.solved_time = None
            self.t0 = time.perf_counter()

        def _on_step(self):
            if self.num_timesteps % eval_every:
                return True
            t = time.perf_counter()
            out = rf.evaluate(_SB3Greedy(self.model), eval_venv, 20, seed=seed + 1_000_003)
            self.eval_time += time.perf_counter() - t
            if out["mean_return"] >= THRESHOLD:
                self.solved_at = self.num_timesteps
                self.solved_time = time.perf_counter() - self.t0 - self.eval_time
                return False
            return True

    torch.set_flush_denormal(True)      # the CPU float mode examples/dqn.py runs its learner in
    torch.manual_seed(seed)
    model = DQN("MlpPolicy", "CartPole-v1", learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
                learning_starts=1_000, gamma=0.99, target_update_interval=10, train_freq=256,
                gradient_steps=128, exploration_fraction=8_000 / max_steps, exploration_final_eps=0.04,
                policy_kwargs=dict(net_arch=[256, 256]), seed=seed, verbose=0, device="cpu")
    cb = Solve()
    t0 = time.perf_counter()
    model.learn(total_timesteps=max_steps, callback=cb)
    total = time.perf_counter() - t0 - cb.eval_time
    eval_venv.close()
    return cb.solved_at, cb.solved_time, total


def fmt(steps, secs):
    return ("not solved", "-") if steps is None else (f"{steps:,}", f"{secs:.1f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--eval-every", type=int, default=2_000)
    p.add_argument("--only", choices=["rlflow", "sb3"], default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"DQN CartPole-v1, solve = greedy mean return over 20 episodes >= {THRESHOLD:.0f}, "
          f"evaluated every {a.eval_every:,} env steps, at most {a.max_steps:,} env steps", flush=True)
    header = f"{'seed':>4} | {'rlflow steps':>12} {'rlflow s':>9} | {'SB3 steps':>12} {'SB3 s':>9} | {'time ratio SB3/rlflow':>21}"
    print(header)
    print("-" * len(header), flush=True)
    for seed in range(a.seeds):
        ours = run_rlflow(seed, a.max_steps, a.eval_every) if a.only != "sb3" else (None, None, None)
        peer = run_sb3(seed, a.max_steps, a.eval_every) if a.only != "rlflow" else (None, None, None)
        rows.append((seed, ours, peer))
        ratio = (f"{peer[1] / ours[1]:.2f}x" if ours[0] is not None and peer[0] is not None else "-")
        print(f"{seed:>4} | {fmt(*ours[:2])[0]:>12} {fmt(*ours[:2])[1]:>9} | {fmt(*peer[:2])[0]:>12} "
              f"{fmt(*peer[:2])[1]:>9} | {ratio:>21}", flush=True)
    solved_ours = [r[1] for r in rows if r[1][0] is not None and r[1][0] <= a.max_steps]
    solved_peer = [r[2] for r in rows if r[2][0] is not None]
    print("-" * len(header))
    print(f"rlflow solved {len(solved_ours)}/{a.seeds} seeds within {a.max_steps:,} env steps"
          + (f"; median {np.median([s for s, _, _ in solved_ours]):,.0f} steps, "
             f"{np.median([t for _, t, _ in solved_ours]):.1f} s" if solved_ours else ""))
    if a.only is None:
        print(f"SB3    solved {len(solved_peer)}/{a.seeds} seeds"
              + (f"; median {np.median([s for s, _, _ in solved_peer]):,.0f} steps, "
                 f"{np.median([t for _, t, _ in solved_peer]):.1f} s" if solved_peer else ""))
    ok = len(solved_ours) >= 4
    print(f"target (>= 4 of {a.seeds} seeds solve within 100k env steps): {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
