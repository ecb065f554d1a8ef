"""rlflow: the data flow of reinforcement learning, in numpy.

    import rlflow as rf
    table = rf.Table(capacity=100_000, sampler=rf.selectors.Uniform(), remover=rf.selectors.Fifo(),
                     rate_limiter=rf.rate_limiters.MinSize(1_000))
"""

from rlflow import errors, specs
from rlflow.core import Adder, Learner, Policy, RateLimiter, Sample, Selector, Step
from rlflow.specs import ArraySpec, EnvSpec
from rlflow import adders, envs, replay
from rlflow.replay import rate_limiters, selectors
from rlflow.replay import Table

__version__ = "0.1.0"
