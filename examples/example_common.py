"""What the examples share, none of it an algorithm: the options every run has (an example's Args
adds its own and may change the defaults), an Args dataclass as command-line options, picklable
factories (process backends build a policy in every actor), the replay table of the off-policy
examples, and the run with its final evaluation."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import torch

import rlflow as rf


@dataclass
class RunArgs:
    env: str = "CartPole-v1"
    """Gymnasium env id"""
    seed: int = 0
    total_steps: int = 100_000
    """env steps at most"""
    backend: str = "local"
    """local | process"""
    num_actors: int = 1
    """actor processes (backend=process)"""
    eval_every: int = 2_000
    eval_episodes: int = 20
    target_return: float = 475.0
    """stop once the greedy policy's mean return reaches this"""
    threads: int = 1
    """torch threads (small networks run fastest on one)"""
    log_dir: str = ""
    """write figures.csv (and TensorBoard files if tensorboardX is installed) here"""


def parse_args(args_cls, doc: str, argv=None):
    """An `args_cls` dataclass from the command line: --field-name for each field."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(args_cls):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f"default: {f.default}")
    return args_cls(**vars(parser.parse_args(argv)))


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


class Build:
    """A picklable factory: `cls(spec, args, **kwargs)`, built after `setup(args.threads)` (and
    `torch.manual_seed(args.seed)` with `seed=True`)."""

    def __init__(self, cls, args, setup=set_threads, seed: bool = False, **kwargs):
        self.cls, self.args, self.setup, self.seed, self.kwargs = cls, args, setup, seed, kwargs

    def __call__(self, spec):
        self.setup(self.args.threads)
        if self.seed:
            torch.manual_seed(self.args.seed)
        return self.cls(spec, self.args, **self.kwargs)


class UniformReplay:
    """The off-policy examples' table: uniform samples, FIFO removal, no sample before
    `learning_starts` items, then `samples_per_insert` items sampled per item inserted."""

    def __init__(self, args):
        self.args = args

    def __call__(self, item_specs):
        a = self.args
        return rf.Table(capacity=a.buffer_size, sampler=rf.selectors.Uniform(seed=a.seed),
                        remover=rf.selectors.Fifo(), specs=item_specs,
                        rate_limiter=rf.rate_limiters.SampleToInsertRatio(
                            samples_per_insert=a.samples_per_insert, min_size_to_sample=a.learning_starts,
                            error_buffer=a.batch_size * a.samples_per_insert))


def run_and_evaluate(args, experiment, policy_cls, setup=set_threads, **policy_kwargs):
    """Run `experiment(args)`, then evaluate the trained parameters with `policy_cls(spec, args,
    **policy_kwargs)` (greedy or deterministic) on fresh seeds, and print both."""
    setup(args.threads)
    torch.manual_seed(args.seed)
    result = rf.run(experiment(args), backend=args.backend, num_actors=args.num_actors,
                    max_env_steps=args.total_steps, log_dir=args.log_dir or None)
    venv = rf.envs.make(args.env, num_envs=args.eval_episodes)
    policy = policy_cls(venv.spec, args, **policy_kwargs)
    policy.set_params(result.learner.get_params())
    final = rf.evaluate(policy, venv, episodes=args.eval_episodes, seed=args.seed + 12_345)
    venv.close()
    f = result.figures
    solved = f"solved at {result.solved_at:,} env steps" if result.solved_at else "not solved"
    print(f"trained {f['env_steps']:,.0f} env steps, {f['learner_steps']:,.0f} learner steps in "
          f"{f['wall_time']:.1f} s after {f['startup_seconds']:.1f} s of start-up ({solved})")
    print(f"final evaluation: mean return {final['mean_return']:.1f} +- {final['std_return']:.1f} "
          f"over {final['episodes']} episodes")
    return result, final
