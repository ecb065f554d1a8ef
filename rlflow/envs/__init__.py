"""Vector environments: N envs stepped as one batch, speaking `rf.Step` records.

    venv = rf.envs.make("CartPole-v1", num_envs=16, backend="serial")   # "process" | "pool"
    step = venv.reset(seed=0)
    step = venv.step(actions)

`vector.py` holds the one stepping implementation (SerialVectorEnv, and the PettingZoo ones in
`pettingzoo.py`); the process and pool backends (`rlflow.runtime.env_workers.ProcessVectorEnv`) run
those same classes inside worker processes over shared memory.
"""

from rlflow.envs.make import make
from rlflow.envs.vector import Layout, SerialVectorEnv, VectorEnv

__all__ = ["make", "VectorEnv", "SerialVectorEnv", "Layout", "ParallelVectorEnv", "AECVectorEnv",
           "ProcessVectorEnv"]


def __getattr__(name):  # the PettingZoo and process classes load their modules on first use
    if name in ("ParallelVectorEnv", "AECVectorEnv"):
        from rlflow.envs import pettingzoo

        return getattr(pettingzoo, name)
    if name == "ProcessVectorEnv":
        from rlflow.runtime.env_workers import ProcessVectorEnv

        return ProcessVectorEnv
    raise AttributeError(f"module 'rlflow.envs' has no attribute {name!r}")
