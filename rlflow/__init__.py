"""rlflow: the data flow of reinforcement learning, in numpy.

    import rlflow as rf
    venv = rf.envs.make("CartPole-v1", num_envs=16)
    adder = rf.adders.NStepTransition(n=3, discount=0.99)
    table = rf.Table(capacity=100_000, sampler=rf.selectors.Uniform(), remover=rf.selectors.Fifo(),
                     rate_limiter=rf.rate_limiters.MinSize(1_000))
    result = rf.run(rf.Experiment(...), backend="local", max_env_steps=100_000)
"""

from rlflow import errors
from rlflow import specs
from rlflow.core import Adder
from rlflow.core import Learner
from rlflow.core import Policy
from rlflow.core import RateLimiter
from rlflow.core import Sample
from rlflow.core import Selector
from rlflow.core import Step
from rlflow.specs import ArraySpec
from rlflow.specs import EnvSpec
from rlflow import adders
from rlflow import envs
from rlflow import replay
from rlflow.replay import rate_limiters
from rlflow.replay import selectors
from rlflow.replay import Table
from rlflow.replay import importance_weights
from rlflow.actor import Actor
from rlflow.actor import evaluate
from rlflow.experiment import Experiment
from rlflow.experiment import RunResult
from rlflow.experiment import run
from rlflow.sync import ParamClient
from rlflow.sync import ParamStore

__version__ = "0.1.0"
