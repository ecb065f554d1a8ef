"""Does a busy CPU slow the other one down? A check printed in the benchmarks' headers.

    python benchmarks/machine.py

A VM's two vCPUs can sit on one physical core of the host (SMT siblings), or share it in some other
way, now and then: each then runs ~35-50% slower while the other is busy (measured on a 2-vCPU VM:
46.5 -> 69.4 us for the same 8-env CartPole step in one pair of runs, 53.3 -> 47.9 us in the next).
Every figure that compares two busy processes against one (the process backend against the serial
one, the data flow's actor beside a busy learner against the bare env loop) moves with it. So the
benchmarks print this check beside their figures: a slowdown well above 1.0x says the run measured
the host as much as the code.

`contention()` steps one unwrapped CartPole on the first CPU of this process's affinity, alone and
then while a child process spins on the second CPU, and returns both step times.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

_SPIN = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"


def cartpole_step_us(seconds: float, fast_check: bool = False) -> float:
    """Microseconds per step of one unwrapped CartPole in a tight loop (resets included), the best
    of 3 spans of seconds / 3; actions are numpy int64 scalars, as a vector env passes them.
    `fast_check`: its action space checks actions as rlflow's lean envs' does
    (rf.envs.make.fast_discrete)."""
    import gymnasium as gym
    import numpy as np

    env = gym.make("CartPole-v1").unwrapped
    if fast_check:
        from rlflow.envs.make import fast_discrete

        fast_discrete(env.action_space)
    env.reset(seed=0)
    actions = list(np.random.default_rng(0).integers(0, 2, 512))
    best = float("inf")
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            for a in actions:
                if env.step(a)[2]:
                    env.reset()
            n += len(actions)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    env.close()
    return best


def contention(seconds: float = 0.3, pairs: int = 3):
    """(us per step alone, us per step with the other CPU busy): the medians of `pairs` alternating
    measurements of `seconds` each; None with fewer than 2 CPUs."""
    try:
        mine = os.sched_getaffinity(0)
    except AttributeError:          # not Linux
        return None
    if len(mine) < 2:
        return None
    first, second = sorted(mine)[:2]
    alone, busy = [], []
    try:
        os.sched_setaffinity(0, {first})
        for _ in range(pairs):
            alone.append(cartpole_step_us(seconds))
            spinner = subprocess.Popen([sys.executable, "-c", _SPIN],
                                       preexec_fn=lambda: os.sched_setaffinity(0, {second}))
            try:
                time.sleep(0.15)        # the spinner is up and running
                busy.append(cartpole_step_us(seconds))
            finally:
                spinner.kill()
                spinner.wait()
    finally:
        os.sched_setaffinity(0, mine)
    return sorted(alone)[len(alone) // 2], sorted(busy)[len(busy) // 2]


def describe() -> str:
    c = contention()
    if c is None:
        return "CPU contention check: n/a (fewer than 2 CPUs)"
    alone, busy = c
    return (f"CPU contention check: a CartPole step on one CPU {alone:.2f} us alone, {busy:.2f} us while "
            f"the other CPU is busy ({busy / alone:.2f}x; ~1.0x: the two CPUs do not slow each other down)")


if __name__ == "__main__":
    print(describe())
