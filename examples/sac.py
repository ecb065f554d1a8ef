"""SAC on Pendulum-v1 with rlflow and PyTorch (continuous actions, off-policy replay).

    python examples/sac.py                        # trains until eval >= -200 or 30k steps
    python examples/sac.py --backend process      # the same experiment, actors in processes

rlflow moves the data (env -> actor -> Transition adder -> replay table -> learner -> params ->
actor); this file holds only what is SAC: a squashed-Gaussian actor, twin Q critics with target
copies and a learned temperature. Pendulum's episodes end by truncation only (200 steps), so every
target bootstraps: the adder's `discount` is gamma there, 0 only at a termination.
Hyperparameters follow rl-zoo's Pendulum-v1 SAC settings.
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
from rlflow.torch_utils import load_params, module_params


@dataclass
class Args(RunArgs):
    env: str = "Pendulum-v1"
    """Gymnasium env id (a Box action space)"""
    total_steps: int = 30_000
    lr: float = 1e-3
    batch_size: int = 256
    buffer_size: int = 100_000
    learning_starts: int = 1_000
    samples_per_insert: float = 256.0
    """one gradient step of 256 per env step"""
    gamma: float = 0.99
    tau: float = 0.005
    hidden: int = 256
    param_sync: int = 16
    eval_episodes: int = 10
    target_return: float = -200.0
    """stop once the deterministic policy's mean return reaches this"""


def mlp(n_in: int, n_out: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


class SquashedGaussian(nn.Module):
    """a = scale * tanh(u) + shift, u ~ N(mu(s), sigma(s)): actions inside the Box's bounds."""

    def __init__(self, spec: rf.EnvSpec, hidden: int):
        super().__init__()
        box = spec.action_space
        self.n_act = int(np.prod(box.shape))
        self.net = mlp(int(np.prod(spec.observation.shape)), 2 * self.n_act, hidden)
        self.register_buffer("scale", torch.as_tensor((box.high - box.low) / 2, dtype=torch.float32))
        self.register_buffer("shift", torch.as_tensor((box.high + box.low) / 2, dtype=torch.float32))

    def forward(self, obs, deterministic: bool = False):
        mu, log_std = self.net(obs).split(self.n_act, dim=-1)
        if deterministic:
            return torch.tanh(mu) * self.scale + self.shift, None
        std = log_std.clamp(-20, 2).exp()
        u = mu + std * torch.randn_like(mu)
        log_prob = torch.distributions.Normal(mu, std).log_prob(u).sum(-1)
        log_prob -= (2 * (np.log(2) - u - F.softplus(-2 * u))).sum(-1) + torch.log(self.scale).sum()
        return torch.tanh(u) * self.scale + self.shift, log_prob


# ---------------------------------------------------------------- SAC: the algorithm-specific part
class SACPolicy(rf.Policy):
    def __init__(self, spec: rf.EnvSpec, args: Args, deterministic: bool = False):
        self.pi, self.deterministic = SquashedGaussian(spec, args.hidden), deterministic

    def act(self, obs):
        with torch.no_grad():
            return self.pi(torch.as_tensor(obs), self.deterministic)[0].numpy()

    def set_params(self, params):
        load_params(self.pi, params)


class SAC(rf.Learner):
    def __init__(self, spec: rf.EnvSpec, args: Args):
        n_obs, n_act = int(np.prod(spec.observation.shape)), int(np.prod(spec.action_space.shape))
        self.pi = SquashedGaussian(spec, args.hidden)
        self.q = nn.ModuleList([mlp(n_obs + n_act, 1, args.hidden) for _ in range(2)])
        self.q_target = copy.deepcopy(self.q)
        self.log_alpha = torch.zeros(1, requires_grad=True)
        self.target_entropy = -float(n_act)
        self.pi_opt = torch.optim.Adam(self.pi.parameters(), lr=args.lr)
        self.q_opt = torch.optim.Adam(self.q.parameters(), lr=args.lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.lr)
        self.args, self.steps = args, 0
        self.params = module_params(self.pi)

    def qs(self, nets, obs, action):
        x = torch.cat([obs, action], -1)
        return [q(x).squeeze(-1) for q in nets]

    def step(self, batch):
        b = {k: torch.as_tensor(v) for k, v in batch.data.items()}
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():   # discount: 0 where the episode terminated, gamma where truncated
            a2, logp2 = self.pi(b["next_obs"])
            q2 = torch.min(*self.qs(self.q_target, b["next_obs"], a2)) - alpha * logp2
            target = b["reward"] + b["discount"] * q2
        q_loss = sum(F.mse_loss(q, target) for q in self.qs(self.q, b["obs"], b["action"]))
        self.q_opt.zero_grad()
        q_loss.backward()
        self.q_opt.step()

        a, logp = self.pi(b["obs"])
        pi_loss = (alpha * logp - torch.min(*self.qs(self.q, b["obs"], a))).mean()
        self.pi_opt.zero_grad()
        pi_loss.backward()
        self.pi_opt.step()
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()

        with torch.no_grad():
            for p, pt in zip(self.q.parameters(), self.q_target.parameters()):
                pt.lerp_(p, self.args.tau)
        self.steps += 1
        return {"q_loss": q_loss.item(), "pi_loss": pi_loss.item(), "alpha": alpha.item()}

    def get_params(self):
        return self.params

    def state_dict(self):
        return {"nets": [m.state_dict() for m in (self.pi, self.q, self.q_target, self.pi_opt, self.q_opt,
                                                  self.alpha_opt)],
                "log_alpha": self.log_alpha.detach().clone(), "steps": self.steps}

    def load_state_dict(self, state):
        for m, s in zip((self.pi, self.q, self.q_target, self.pi_opt, self.q_opt, self.alpha_opt), state["nets"]):
            m.load_state_dict(s)
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.steps = state["steps"]


# ---------------------------------------------------------------- end of the SAC-specific part


def experiment(args: Args | None = None) -> rf.Experiment:
    """The SAC run (default Args() when called bare, as `rlflow run examples/sac.py` does)."""
    args = Args() if args is None else args
    return rf.Experiment(
        env=args.env,
        policy=Build(SACPolicy, args),
        learner=Build(SAC, args, seed=True),
        adder=rf.adders.Transition(discount=args.gamma),
        table=UniformReplay(args),
        batch_size=args.batch_size,
        warmup_steps=args.learning_starts,
        seed=args.seed,
        param_sync_steps=args.param_sync,
        eval_policy=Build(SACPolicy, args, deterministic=True),
        eval_every=args.eval_every,
        eval_episodes=args.eval_episodes,
        target_return=args.target_return if args.eval_every > 0 else None,
    )


def parse_args(argv=None) -> Args:
    return example_common.parse_args(Args, __doc__, argv)


def main(argv=None):
    return run_and_evaluate(parse_args(argv), experiment, SACPolicy, deterministic=True)


if __name__ == "__main__":
    main()
