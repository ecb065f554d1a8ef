"""The `rlflow` command: run an Experiment defined in a Python file, or print what is installed.

    rlflow run examples/dqn.py:experiment --backend process --num-actors 2 --max-env-steps 100000
    rlflow run mypkg.experiments:cartpole --max-seconds 600 --checkpoint-dir ckpt --checkpoint-every 5000
    rlflow run mypkg.experiments:cartpole --resume ckpt --max-env-steps 200000
    rlflow info

TARGET is `FILE.py[:NAME]` or `MODULE[:NAME]` (NAME defaults to `experiment`): an rf.Experiment, or a
callable that takes no arguments and returns one. A file is imported as a module named after it, with
its folder on sys.path, so actor processes (started with "spawn") import the same factories.
Every option maps to the `rf.run` argument of the same name (`--quiet`: progress=False).
"""

from __future__ import annotations

import argparse
import inspect
import importlib
import os
import sys
from typing import Optional, Sequence

from rlflow.errors import UsageError, mismatch


def load_experiment(target: str):
    """The rf.Experiment that TARGET (`FILE.py[:NAME]` or `MODULE[:NAME]`) names."""
    from rlflow.experiment import Experiment

    where, _, name = target.partition(":")
    name = name or "experiment"
    if not where:
        raise UsageError(mismatch("rlflow run", "TARGET", "FILE.py[:NAME] or MODULE[:NAME]", repr(target)))
    if where.endswith(".py"):
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise UsageError(mismatch("rlflow run", "TARGET", "an existing .py file or a module name",
                                      repr(where)))
        folder, module_name = os.path.split(path[:-3])
        if folder not in sys.path:
            sys.path.insert(0, folder)       # inherited by spawned actors, which re-import the module
        module = importlib.import_module(module_name)
        if os.path.abspath(getattr(module, "__file__", "") or "") != path:
            raise UsageError(mismatch("rlflow run", "TARGET", f"a file whose name does not shadow an "
                                      f"installed module ({module_name!r} imports {module.__file__})",
                                      repr(where)))
    else:
        # as `python -m` does: a module in the current directory is importable (the `rlflow`
        # script's sys.path starts with its own folder instead); spawned actors inherit sys.path
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name is None or not (where == e.name or where.startswith(e.name + ".")):
                raise                        # the module exists; something it imports does not
            raise UsageError(mismatch("rlflow run", "TARGET", "an existing .py file or an importable "
                                      "module", repr(where))) from None
    if not hasattr(module, name):
        raise UsageError(mismatch("rlflow run", "TARGET", f"a name defined in {where}", repr(name)))
    obj = getattr(module, name)
    if not isinstance(obj, Experiment) and callable(obj):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            raise UsageError(mismatch("rlflow run", "TARGET", "an rf.Experiment or a callable that takes "
                                      "no arguments", f"{name}{inspect.signature(obj)} in {where}")) from None
        except ValueError:       # no signature to read (some builtins): the call says
            pass
        obj = obj()
    if not isinstance(obj, Experiment):
        raise UsageError(mismatch("rlflow run", "TARGET", "an rf.Experiment or a callable returning one",
                                  f"{type(obj).__name__} from {target}"))
    return obj


def _run(args) -> int:
    import rlflow as rf

    exp = load_experiment(args.target)
    options = {k: getattr(args, k) for k in ("max_env_steps", "max_learner_steps", "max_seconds", "log_dir",
                                             "checkpoint_dir", "checkpoint_every", "resume", "max_restarts")
               if getattr(args, k) is not None}
    result = rf.run(exp, backend=args.backend, num_actors=args.num_actors, progress=not args.quiet,
                    **options)
    f = result.figures
    solved = (f"solved at {result.solved_at:,} env steps" if result.solved_at is not None
              else "target not reached" if exp.target_return is not None else "no target")
    last = f" last eval return {result.evals[-1][2]:.1f};" if result.evals else ""
    print(f"{args.backend}: {f.get('env_steps', 0):,.0f} env steps, {f.get('learner_steps', 0):,.0f} learner "
          f"steps in {f.get('wall_time', 0.0):.1f} s after {f.get('startup_seconds', 0.0):.1f} s of start-up;"
          f"{last} {solved}")
    return 0


def _info(_args) -> int:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import rlflow as rf

    print(f"rlflow {rf.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.machine()}")
    for dist in ("numpy", "gymnasium", "torch", "numba", "ray", "pettingzoo", "tensorboardX"):
        try:
            v = version(dist)
        except PackageNotFoundError:
            v = "not installed"
        print(f"  {dist:<13} {v}")
    return 0


def _positive(kind):
    what = "an int" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} > 0, got {text!r}") from None
        if not value > 0:              # (nan too)
            raise argparse.ArgumentTypeError(f"expected {what} > 0, got {text!r}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    import rlflow as rf
    from rlflow.experiment import BACKENDS

    p = argparse.ArgumentParser(prog="rlflow", description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"rlflow {rf.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run an Experiment (FILE.py[:NAME] or MODULE[:NAME])")
    r.add_argument("target", help="FILE.py[:NAME] or MODULE[:NAME]; NAME defaults to 'experiment'")
    r.add_argument("--backend", choices=BACKENDS, default="local")
    r.add_argument("--num-actors", type=_positive(int), default=1, help="actor processes (process backend)")
    r.add_argument("--max-env-steps", type=_positive(int))
    r.add_argument("--max-learner-steps", type=_positive(int))
    r.add_argument("--max-seconds", type=_positive(float))
    r.add_argument("--log-dir", help="write figures.csv (and TensorBoard files with tensorboardX) here")
    r.add_argument("--checkpoint-dir")
    r.add_argument("--checkpoint-every", type=_positive(int), help="learner steps between checkpoints")
    r.add_argument("--resume", help="a checkpoint directory to carry on from")
    r.add_argument("--max-restarts", type=int, help="restarts per dead actor (process backend; default: "
                   "rf.run's)")
    r.add_argument("--quiet", action="store_true", help="no live progress lines")
    r.set_defaults(func=_run)
    i = sub.add_parser("info", help="versions of rlflow, its dependencies and extras; CPUs")
    i.set_defaults(func=_info)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"rlflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:            # Ctrl-C: the run has stopped and cleaned up; no traceback
        print("rlflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:              # `rlflow info | head -1`: the reader has gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
