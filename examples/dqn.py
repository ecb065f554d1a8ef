"""DQN on CartPole-v1 with rlflow and PyTorch.

    python examples/dqn.py                        # trains until solved (eval >= 475) or 100k steps
    python examples/dqn.py --backend process      # the same experiment, actors in processes

rlflow moves the data (env -> actor -> adder -> replay table -> learner -> params -> actor);
this file holds only what is DQN: a Q-network, an epsilon-greedy policy and the learner.
Hyperparameters follow rl-zoo's CartPole-v1 DQN settings.
What every example shares (options, factories, the final evaluation) is in example_common.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import example_common
import rlflow as rf
from example_common import Build, RunArgs, UniformReplay, run_and_evaluate
from rlflow.torch_utils import FlatParams, load_params, module_params


@dataclass
class Args(RunArgs):
    lr: float = 2.3e-3
    batch_size: int = 64
    buffer_size: int = 100_000
    learning_starts: int = 1_000
    """random warm-up steps; the learner starts once the table holds this many items"""
    samples_per_insert: float = 32.0
    """rl-zoo: 128 gradient steps of 64 every 256 env steps"""
    param_sync: int = 128
    """learner steps between the actors' parameter pulls (rl-zoo's train_freq=256: the acting policy
    changes once per 256 env steps, i.e. per 128 learner steps)"""
    gamma: float = 0.99
    target_update: int = 128
    """learner steps between target-network copies"""
    eps_start: float = 1.0
    eps_end: float = 0.04
    eps_steps: int = 8_000
    """env steps over which epsilon decays linearly"""
    hidden: int = 256
    target_return: float = 475.0
    """stop once the greedy policy's mean return reaches this (<= 0: never stop early)"""


def torch_setup(threads: int) -> None:
    torch.set_num_threads(threads)
    # Adam's moments of dead ReLU units decay into denormal floats (over half of the hidden layer's
    # after 30k env steps), which x86 CPUs handle slowly: flushing them to zero made learner steps
    # ~3% faster, with no effect on learning (they are < 1.2e-38).
    torch.set_flush_denormal(True)


def q_network(spec: rf.EnvSpec, hidden: int) -> nn.Module:
    n_obs = int(np.prod(spec.observation.shape))
    n_actions = int(spec.action_space.n)
    return nn.Sequential(nn.Linear(n_obs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_actions))


# ---------------------------------------------------------------- DQN: the algorithm-specific part
class EpsilonGreedy(rf.Policy):
    """Epsilon decays with the run's env steps, told by the learner: its published learner steps
    give the env steps the table had taken (learning_starts + learner steps x batch_size /
    samples_per_insert), plus what the actors acted since. So a resumed run, a restarted actor and
    K actors all follow one schedule (a count kept in the policy would start again at 1.0)."""

    def __init__(self, spec: rf.EnvSpec, args: Args, greedy: bool = False):
        self.q, self.args, self.greedy = q_network(spec, args.hidden), args, greedy
        self.env_steps, self.since = 0.0, 0    # the run's env steps at the last params; acted since

    def epsilon(self) -> float:
        a = self.args
        steps = self.env_steps + self.since * a.num_actors
        return 0.0 if self.greedy else max(a.eps_end, a.eps_start - (a.eps_start - a.eps_end) * steps / a.eps_steps)

    def act(self, obs):
        n = self.q[-1].out_features
        eps = self.epsilon()
        self.since += len(obs)
        with torch.no_grad():
            greedy = self.q(torch.as_tensor(obs)).argmax(1).numpy()
        return np.where(np.random.random(len(obs)) < eps, np.random.randint(n, size=len(obs)), greedy)

    def set_params(self, params):          # the learner's parameters, through rlflow's policy delayer
        load_params(self.q, params["q"])
        learner_steps = int(params["learner_steps"][0])
        if learner_steps:                  # before the first learner step: the actors' own count
            a = self.args
            self.env_steps = a.learning_starts + learner_steps * a.batch_size / a.samples_per_insert
            self.since = 0


class DQN(rf.Learner):
    def __init__(self, spec: rf.EnvSpec, args: Args):
        self.q = q_network(spec, args.hidden)
        self.target = copy.deepcopy(self.q)
        self.flat = FlatParams(self.q)         # q's weights (and grads) as views of one tensor (each)
        self.opt = torch.optim.Adam([self.flat.param], lr=args.lr, fused=True)   # = Adam(q.parameters())
        self.args, self.steps = args, 0
        # numpy views of the live weights (stores copy on publish), and the learner's step count
        # (the policies' epsilon schedule follows it)
        self.params = {"q": module_params(self.q), "learner_steps": np.zeros(1, np.int64)}

    def step(self, batch):
        b = {k: torch.as_tensor(v) for k, v in batch.data.items()}
        with torch.no_grad():  # discount is 0 where the episode terminated, gamma where it was truncated
            target = b["reward"] + b["discount"] * self.target(b["next_obs"]).max(1).values
        loss = F.smooth_l1_loss(self.q(b["obs"]).gather(1, b["action"].long()[:, None]).squeeze(1), target)
        self.flat.zero_grad()
        loss.backward()
        self.flat.clip_grad_norm(10.0)         # = nn.utils.clip_grad_norm_, minus a no-op rescale
        self.opt.step()
        self.steps += 1
        self.params["learner_steps"][0] = self.steps
        if self.steps % self.args.target_update == 0:
            self.target.load_state_dict(self.q.state_dict())
        return {"loss": loss.item()}

    def get_params(self):
        return self.params

    def state_dict(self):                  # checkpoints and resume
        return {"nets": (self.q.state_dict(), self.target.state_dict(), self.opt.state_dict()), "steps": self.steps}

    def load_state_dict(self, state):
        for obj, s in zip((self.q, self.target, self.opt), state["nets"]):
            obj.load_state_dict(s)
        self.steps = state["steps"]
        self.params["learner_steps"][0] = self.steps


# ---------------------------------------------------------------- end of the DQN-specific part


def experiment(args: Args | None = None) -> rf.Experiment:
    """The DQN run (default Args() when called bare, as `rlflow run examples/dqn.py` does)."""
    args = Args() if args is None else args
    return rf.Experiment(
        env=args.env,
        policy=Build(EpsilonGreedy, args, setup=torch_setup),
        learner=Build(DQN, args, setup=torch_setup),
        adder=rf.adders.Transition(discount=args.gamma),
        table=UniformReplay(args),
        batch_size=args.batch_size,
        warmup_steps=args.learning_starts,
        seed=args.seed,
        param_sync_steps=args.param_sync,
        eval_policy=Build(EpsilonGreedy, args, setup=torch_setup, greedy=True),
        eval_every=args.eval_every,
        eval_episodes=args.eval_episodes,
        target_return=args.target_return if args.target_return > 0 and args.eval_every > 0 else None,
    )


def parse_args(argv=None) -> Args:
    return example_common.parse_args(Args, __doc__, argv)


def main(argv=None):
    # trains, then evaluates the trained Q-network, greedy, on fresh seeds
    return run_and_evaluate(parse_args(argv), experiment, EpsilonGreedy, setup=torch_setup, greedy=True)


if __name__ == "__main__":
    main()
