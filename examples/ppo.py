"""PPO on CartPole-v1 with rlflow and PyTorch (on-policy: GAE rollouts through a FIFO queue).

    python examples/ppo.py                        # trains until solved (eval >= 475) or 200k steps
    python examples/ppo.py --backend process      # the same experiment, actors in processes

rlflow moves the data: each actor's policy gives V(obs) and V(final_obs) beside its actions, the
Rollout adder cuts each env's stream into fragments of `n_steps` with GAE advantages and value
targets (bootstrapping at truncation, never at termination), `Table.queue` hands every fragment to
the learner exactly once, oldest first, and the policy delayer carries each update's weights back.
This file holds only what is PPO. Hyperparameters follow rl-zoo's CartPole-v1 PPO settings.
What every example shares (options, factories, the final evaluation) is in example_common.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import example_common
import rlflow as rf
from example_common import Build, RunArgs, run_and_evaluate
from rlflow.torch_utils import load_params, module_params


@dataclass
class Args(RunArgs):
    env: str = "CartPole-v1"
    """Gymnasium env id (a Discrete action space)"""
    total_steps: int = 200_000
    num_actors: int = 1
    """actor processes (backend=process); each steps num_envs envs"""
    num_envs: int = 8
    n_steps: int = 32
    """steps of each env per rollout fragment"""
    lr: float = 1e-3
    gamma: float = 0.98
    gae_lambda: float = 0.8
    epochs: int = 20
    minibatch: int = 256
    clip: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    hidden: int = 64
    eval_every: int = 5_000
    target_return: float = 475.0
    """stop once the greedy policy's mean return reaches this (<= 0: never stop early)"""


class ActorCritic(nn.Module):
    def __init__(self, spec: rf.EnvSpec, hidden: int):
        super().__init__()
        n_obs, n_act = int(np.prod(spec.observation.shape)), int(spec.action_space.n)
        self.pi = nn.Sequential(nn.Linear(n_obs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                nn.Linear(hidden, n_act))
        self.v = nn.Sequential(nn.Linear(n_obs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                               nn.Linear(hidden, 1))

    def value(self, obs):
        return self.v(obs).squeeze(-1)


# ---------------------------------------------------------------- PPO: the algorithm-specific part
class PPOPolicy(rf.Policy):
    def __init__(self, spec: rf.EnvSpec, args: Args, greedy: bool = False):
        self.net, self.greedy = ActorCritic(spec, args.hidden), greedy

    def act_step(self, step: rf.Step):      # the whole step: its final_obs gives V(final_obs)
        with torch.no_grad():
            logits = self.net.pi(torch.as_tensor(step.obs))
            if self.greedy:
                return logits.argmax(1).numpy()
            dist = torch.distributions.Categorical(logits=logits)
            action = dist.sample()
            # V(s_t) for the fragment, V(final_obs) for the step that led here (the true last
            # observation where an episode just ended, else obs): the adder's GAE bootstrap
            both = self.net.value(torch.as_tensor(np.concatenate([step.obs, step.final_obs])))
        n = len(step.obs)
        return action.numpy(), {"log_prob": dist.log_prob(action).numpy(), "value": both[:n].numpy(),
                                "final_value": both[n:].numpy()}

    def set_params(self, params):
        load_params(self.net, params)


class PPO(rf.Learner):
    def __init__(self, spec: rf.EnvSpec, args: Args):
        self.net, self.args, self.steps = ActorCritic(spec, args.hidden), args, 0
        self.opt = torch.optim.Adam(self.net.parameters(), lr=args.lr, eps=1e-5)
        self.params = module_params(self.net)
        self.gen = torch.Generator().manual_seed(args.seed)

    def step(self, batch):                  # one batch = one rollout: [fragments, n_steps, ...]
        a = self.args
        d = {k: torch.as_tensor(v).flatten(0, 1) for k, v in batch.data.items()}
        adv = (d["advantage"] - d["advantage"].mean()) / (d["advantage"].std() + 1e-8)
        n = len(adv)
        for _ in range(a.epochs):
            for idx in torch.randperm(n, generator=self.gen).split(a.minibatch):
                dist = torch.distributions.Categorical(logits=self.net.pi(d["obs"][idx]))
                ratio = (dist.log_prob(d["action"][idx].long()) - d["log_prob"][idx]).exp()
                pg = -torch.min(ratio * adv[idx], ratio.clamp(1 - a.clip, 1 + a.clip) * adv[idx]).mean()
                vf = (self.net.value(d["obs"][idx]) - d["return"][idx]).pow(2).mean()
                loss = pg + a.vf_coef * vf - a.ent_coef * dist.entropy().mean()
                self.opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.net.parameters(), 0.5)
                self.opt.step()
        self.steps += 1
        return {"policy_loss": pg.item(), "value_loss": vf.item(), "entropy": dist.entropy().mean().item()}

    def get_params(self):
        return self.params

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "steps": self.steps,
                "gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.steps = state["steps"]
        self.gen.set_state(state["gen"])


# ---------------------------------------------------------------- end of the PPO-specific part


class TableFactory:
    """On-policy: a FIFO queue of one rollout per actor (one batch); each fragment is read once."""

    def __init__(self, args: Args):
        self.args = args

    def __call__(self, item_specs):
        return rf.Table.queue(self.args.num_envs * self.args.num_actors, specs=item_specs)


def experiment(args: Args | None = None) -> rf.Experiment:
    """The PPO run (default Args() when called bare, as `rlflow run examples/ppo.py` does)."""
    args = Args() if args is None else args
    return rf.Experiment(
        env=args.env,
        policy=Build(PPOPolicy, args),
        learner=Build(PPO, args, seed=True),
        adder=rf.adders.Rollout(args.n_steps, discount=args.gamma, gae_lambda=args.gae_lambda),
        table=TableFactory(args),
        batch_size=args.num_envs * args.num_actors,   # one learner step per rollout of every actor
        num_envs=args.num_envs,
        seed=args.seed,
        param_sync_steps=1,                # on-policy: the actors take every update
        eval_policy=Build(PPOPolicy, args, greedy=True),
        eval_every=args.eval_every,
        eval_episodes=args.eval_episodes,
        target_return=args.target_return if args.target_return > 0 and args.eval_every > 0 else None,
    )


def parse_args(argv=None) -> Args:
    return example_common.parse_args(Args, __doc__, argv)


def main(argv=None):
    return run_and_evaluate(parse_args(argv), experiment, PPOPolicy, greedy=True)


if __name__ == "__main__":
    main()
