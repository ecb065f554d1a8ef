"""`rf.envs.make`: one function from "an environment" to a vector env on any backend."""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
from gymnasium import spaces

from rlflow.envs.vector import check_seed
from rlflow.errors import UsageError, is_int, mismatch

BACKENDS = ("serial", "process", "pool")
CHEAP_STEP = 20e-6        # seconds: an env step below this makes an inline slice pay with any workers


class FastDiscrete(spaces.Discrete):
    """gymnasium's Discrete with a fast path in `contains` for a scalar of the space's own numpy
    integer type, the type a vector env passes (`check_actions` casts every action to the space's
    dtype): the same answers for every input, in ~0.4 us instead of ~1.6 us. Classic control envs
    assert `action_space.contains(action)` on every step (CartPole: ~5.5 -> ~4.2 us a step on a
    2-vCPU VM). `fast_discrete(space)` turns a Discrete into one in place."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._bounds()

    def _bounds(self):
        self._scalar = self.dtype.type
        self._lo = int(self.start)
        self._hi = int(self.start) + int(self.n)

    def contains(self, x) -> bool:
        if x.__class__ is self._scalar:          # no dtype checks needed: it is the space's dtype
            return self._lo <= int(x) < self._hi
        return super().contains(x)


def fast_discrete(space) -> None:
    """Make a gymnasium `Discrete` space (exactly that class) a FastDiscrete, keeping its state (RNG,
    n, start, dtype), repr and equality; any other space is left alone."""
    if type(space) is not spaces.Discrete:
        return
    space.__class__ = FastDiscrete
    space._bounds()


class GymMake:
    """A picklable factory: `gymnasium.make(env_id, **kwargs)`.

    `lean=True` leaves out the two wrappers that only check the caller: gymnasium's passive env
    checker (unless kwargs set `disable_env_checker`) and its reset-before-step order enforcer. A
    vector env resets every env before it steps it and checks env 0 in full, so envs 1..N-1 are
    made lean: ~0.2 us less per step of each (CartPole: 4.3 -> 4.1 us). Same dynamics, same
    TimeLimit, same kwargs; an id that is not in the registry is made as usual. A lean env's
    Discrete action space also checks actions faster (`fast_discrete`: same answers).

    A lean env also leaves its time limit to the vector env: gymnasium's TimeLimit wrapper is left
    out and the limit (`max_episode_steps` of the kwargs, else of the registered spec) is put on the
    env as `rlflow_time_limit`, which SerialVectorEnv applies as TimeLimit does (truncated once the
    episode's step count reaches the limit), without a wrapper call per step (16 CartPoles, serial:
    ~2.5% less time a step, in 400 interleaved pairs). Only where nothing wraps the env above
    TimeLimit (no `additional_wrappers` in the spec, no `render_mode`), so no wrapper could see a
    step before its truncation. The env's spec keeps the limit as its `max_episode_steps`.

    `fast_space=True` gives the fast check alone, with every wrapper kept: env 0 of the process
    backends, built in a worker, where its space is not the one the caller sees (that is the probe
    env's, in this process). Without it env 0 was ~1.8 us a step slower than the others (CartPole:
    ~6.0 against ~4.2 us), and the worker stepping it finished last.
    """

    def __init__(self, env_id: str, kwargs: dict, lean: bool = False, fast_space: bool = False):
        self.env_id = env_id
        self.kwargs = dict(kwargs)
        self.lean = lean
        self.fast_space = fast_space or lean

    def __call__(self):
        import dataclasses

        import gymnasium as gym

        spec = gym.envs.registry.get(self.env_id) if self.lean else None
        if spec is None:
            env = gym.make(self.env_id, **self.kwargs)
        else:
            lean = {"order_enforce": False}
            if "disable_env_checker" not in self.kwargs:
                lean["disable_env_checker"] = True
            kwargs = dict(self.kwargs)
            limit = kwargs.get("max_episode_steps")
            limit = spec.max_episode_steps if limit is None else limit
            native = (isinstance(limit, int) and limit > 0 and not spec.additional_wrappers
                      and "render_mode" not in kwargs)
            if native:
                kwargs["max_episode_steps"] = -1      # gymnasium adds no TimeLimit
            env = gym.make(dataclasses.replace(spec, **lean), **kwargs)
            if native:
                env.rlflow_time_limit = limit          # applied by SerialVectorEnv
                if env.unwrapped.spec is not None:     # the spec says the limit the env runs under
                    env.unwrapped.spec = dataclasses.replace(env.unwrapped.spec, max_episode_steps=limit)
        if self.fast_space:
            fast_discrete(env.unwrapped.action_space)
        return env

    def __repr__(self):
        extra = ", lean" if self.lean else ", fast_space" if self.fast_space else ""
        return f"GymMake({self.env_id!r}, {self.kwargs}{extra})"


class CopyOf:
    """A picklable factory returning a deep copy of an env instance (what `make` does with instances)."""

    def __init__(self, env):
        self.env = env

    def __call__(self):
        env = copy.deepcopy(self.env)
        fresh_random_state(env)
        return env


def fresh_random_state(env) -> None:
    """Give a copied Gymnasium env (and its spaces) a random generator of its own: a deep copy of
    an instance that was reset already carries the original's seeded generator, and N copies then
    play N identical episodes (each autoreset too). A seeded `reset(seed=...)` reseeds it anyway.
    A copied PettingZoo env is marked `rlflow_unseeded_copy`: its first reset without a seed gets
    a seed drawn from the OS (rlflow.envs.pettingzoo)."""
    import gymnasium as gym

    inner = getattr(env, "unwrapped", None)
    if not isinstance(inner, gym.Env):
        # a PettingZoo env keeps its generators where each env likes (np_random, a randomizer...):
        # its vector env gives it a seed of its own at its first unseeded reset instead
        try:
            env.rlflow_unseeded_copy = True
        except Exception:        # an env refusing attributes keeps the instance's state
            pass
        return
    inner._np_random = None                # drawn afresh from the OS on first use (gymnasium)
    for space in (inner.action_space, inner.observation_space):
        if isinstance(getattr(space, "_np_random", None), np.random.Generator):
            space._np_random = None


class _Call:
    def __init__(self, fn, kwargs):
        self.fn = fn
        self.kwargs = kwargs

    def __call__(self):
        return self.fn(**self.kwargs)


class _Given:
    """Returns the probe env the first time (not picklable on purpose: serial backend only)."""

    def __init__(self, env):
        self.env = env

    def __call__(self):
        env, self.env = self.env, None
        if env is None:
            raise UsageError("this env instance was already used")
        return env


def kind_of(env) -> str:
    """"gym", "parallel" (PettingZoo ParallelEnv) or "aec" (PettingZoo AECEnv)."""
    import gymnasium as gym

    if isinstance(env, gym.Env):
        return "gym"
    try:
        from pettingzoo.utils.env import AECEnv, ParallelEnv
    except ImportError:  # pragma: no cover - pettingzoo is optional
        AECEnv = ParallelEnv = ()
    if AECEnv and isinstance(env, AECEnv):
        return "aec"
    if ParallelEnv and isinstance(env, ParallelEnv):
        return "parallel"
    if isinstance(env, gym.vector.VectorEnv):
        raise UsageError(mismatch("argument", "env", "a single Gymnasium env (rlflow makes the vector "
                                  "env)", f"a Gymnasium vector env {type(env).__name__}"))
    raise UsageError(mismatch("argument", "env", "a Gymnasium env id, a Gymnasium Env, a PettingZoo "
                              "AECEnv / ParallelEnv, or a zero-argument callable returning one",
                              f"{type(env).__name__} {env!r:.80}"))


def vector_class(kind: str):
    if kind == "gym":
        from rlflow.envs.vector import SerialVectorEnv

        return SerialVectorEnv
    from rlflow.envs import pettingzoo as pz

    return pz.ParallelVectorEnv if kind == "parallel" else pz.AECVectorEnv


def make(env, num_envs: int = 1, backend: str = "serial", workers: int | None = None,
         batch_size: int | None = None, seed: int | None = None, start_method: str | None = None,
         inline: bool | None = None, spin: float | None = None, pin: bool | None = None, **kwargs: Any):
    """A vector env of `num_envs` copies of `env`, returning `rf.Step` records.

    env         a Gymnasium env id (`gymnasium.make(env, **kwargs)`; envs 1..N-1 without the
                checker and order wrappers, see GymMake), a zero-argument callable
                returning a Gymnasium Env (wrappers included) or a PettingZoo AECEnv / ParallelEnv
                (called with `**kwargs`), or an env instance. An instance is used as env 0 by the
                serial backend and every other env is a `copy.deepcopy` of it with a random
                generator of its own (not the instance's: the copies of an instance that was reset
                would play the same episodes); the process backend pickles it into its workers
                (prefer a callable).
    num_envs    how many envs (a multi-agent env gives num_envs x agents rows).
    backend     "serial": all envs in this process, one after another.
                "process": worker processes, each stepping a slice of the envs into shared memory.
                "pool": "process" with `batch_size` < num_envs (EnvPool's async mode): `step`
                returns the `batch_size` envs that finished first; see ProcessVectorEnv.
    workers     process backends: how many worker processes. Default: "process": one per CPU
                but one, with `inline` on; "pool": the same (CPUs - 1 workers and an inline slice,
                N/CPUs envs each) when N/CPUs divides batch_size, else, without an inline slice,
                the most workers up to the CPUs (at least 2) whose envs each divide batch_size, or
                the fewest above the CPUs that do (num_envs=9, batch_size=3, 2 CPUs: 3 workers).
    batch_size  pool mode: envs per returned step (a multiple of the envs per worker).
    inline      pool mode: this process steps one slice of N/(workers+1) envs itself, in `step`,
                while the workers step theirs (see ProcessVectorEnv); default as for `workers`.
                "process": this process steps one slice of the envs itself while the workers step
                theirs (one wake-up less per step; what makes cheap envs pay off). Default: on when
                workers + 1 <= min(CPUs, num_envs), so that no core is oversubscribed, and also
                with more workers when one env step costs under CHEAP_STEP (20 us, measured): the
                workers of such envs mostly wait on wake-ups, not on a core. This
                process's slice is larger by (a worker's wake-up) / (one env's step), both measured
                at construction (a throwaway env, lean for an id, is stepped for ~50 ms and at
                most ~200 ms; see ProcessVectorEnv).
    spin        process backends: seconds a process polls for its peer's reply before it blocks
                (a worker waiting for the next step, this process for a worker), yielding its CPU
                between polls. Default: 100 us, except in pool mode with more stepping slices
                (workers, plus the inline slice) than CPUs, or one CPU: 0 (see ProcessVectorEnv).
    pin         process backend: run worker w on CPU w only (of the CPUs this process may use).
                Default: on where the workers are as many as those CPUs, there is no inline slice
                and one env step costs at least CHEAP_STEP (measured): each worker then has a core
                to itself, and none is ever placed beside another while a core idles (200 us env,
                16 envs, 2 workers, 2 vCPUs, two interleaved A/Bs: 1.89x -> 1.93x and 1.90x ->
                1.91x serial: a small gain). Off for cheap envs, where this process's own work
                needs a core that a pinned worker would hold (CartPole, 2 workers: 1.25x -> 1.02x).
    seed        the seed of the first `reset()` called without one. Env i gets seed + i, which
                must lie in [0, 2**63 - 1] (also for `reset(seed=...)`).
    start_method "fork" (default on Linux while this process runs one thread) or "spawn" (else);
                with "spawn" the env (id, callable or instance) must be picklable.
    """
    if backend not in BACKENDS:
        raise UsageError(mismatch("argument", "backend", f"one of {BACKENDS}", repr(backend)))
    if pin is not None and not isinstance(pin, bool):
        raise UsageError(mismatch("argument", "pin", "True, False or None (default)", repr(pin)))
    if not is_int(num_envs) or num_envs < 1:
        raise UsageError(mismatch("argument", "num_envs", "an int >= 1", repr(num_envs)))
    if workers is not None and (not is_int(workers)):
        raise UsageError(mismatch("argument", "workers", "an int or None (default)", repr(workers)))
    if inline is not None and not isinstance(inline, (bool, np.bool_)):
        raise UsageError(mismatch("argument", "inline", "True, False or None (default)", repr(inline)))
    if backend == "pool" and num_envs < 2:     # no batch size would do: say which argument must change
        raise UsageError(mismatch("argument", "num_envs", ">= 2 with backend='pool' (a step returns "
                                  "batch_size < num_envs of them; one env: backend='serial')", num_envs))
    if backend == "pool" and batch_size is not None and (not is_int(batch_size) or not 1 <= batch_size < num_envs):
        raise UsageError(mismatch("argument", "batch_size", f"an int in [1, num_envs - 1 = {num_envs - 1}] "
                                  "with backend='pool' (backend='process' steps every env)", repr(batch_size)))
    check_seed(seed, num_envs, "seed")
    num_envs = int(num_envs)             # numpy ints as Python ints from here on
    workers = None if workers is None else int(workers)
    batch_size = None if batch_size is None or not is_int(batch_size) else int(batch_size)
    if backend == "serial":
        for name, value in (("workers", workers), ("batch_size", batch_size), ("start_method", start_method),
                            ("inline", inline), ("spin", spin), ("pin", pin)):
            if value is not None:
                raise UsageError(mismatch("argument", name, "None with backend='serial'", repr(value)))

    # one factory per env, plus a probe env to read the spaces from
    others = None              # the factory of envs 1..N-1 where it differs from env 0's
    if isinstance(env, str):
        factory = GymMake(env, kwargs)
        probe = factory()
        others = GymMake(env, kwargs, lean=True)
        given = False
    elif callable(env) and not _is_env(env):
        factory = _Call(env, kwargs) if kwargs else env
        probe = factory()
        given = False
    else:
        if kwargs:
            raise UsageError(mismatch("argument", "kwargs", "none with an env instance",
                                      f"{sorted(kwargs)}"))
        factory = CopyOf(env)
        probe = env
        given = True
    try:
        kind = kind_of(probe)
    except BaseException:
        if not given:
            _close(probe)
        raise
    cls = vector_class(kind)

    others = others or (CopyOf(env) if given else factory)
    if backend == "serial":
        return cls([_Given(probe)] + [others] * (num_envs - 1), seed=seed)

    try:
        layout = cls.layout_of(probe)
    except BaseException:                 # spaces refused: the probe is closed, not leaked
        if not given:
            _close(probe)
        raise
    if batch_size is None and backend == "pool":
        if not given:
            _close(probe)
        raise UsageError(mismatch("argument", "batch_size", f"an int in [1, num_envs - 1 = {num_envs - 1}] "
                                  "with backend='pool'", None))
    if backend == "process" and batch_size is not None and batch_size != num_envs:
        if not given:
            _close(probe)
        raise UsageError(mismatch("argument", "batch_size", f"None (or num_envs = {num_envs}) with "
                                  "backend='process', whose steps return every env; backend='pool' "
                                  "returns batches", repr(batch_size)))
    cpus = min(os.cpu_count() or 1, num_envs)
    sync = batch_size is None or batch_size == num_envs
    cheap_only = False
    if not sync:
        if workers is None:
            if inline is None:      # CPUs - 1 workers and this process, when the slices fit the batch
                inline = (cpus >= 2 and num_envs % cpus == 0 and isinstance(batch_size, int)
                          and batch_size % (num_envs // cpus) == 0)
            if inline:
                workers = max(1, cpus - 1)
            else:
                # worker counts whose slices divide num_envs and whose envs per slice divide the
                # batch (num_envs itself always does): as many as the CPUs, else the fewest above
                fits = [d for d in range(2, num_envs + 1) if num_envs % d == 0
                        and (not isinstance(batch_size, int) or batch_size % (num_envs // d) == 0)]
                within = [d for d in fits if d <= cpus]
                workers = max(within) if within else min(fits)
        inline = bool(inline)
    elif workers is None:
        if inline is None:
            inline = cpus >= 2
        workers = max(1, cpus - int(inline))
    elif inline is None:
        inline = workers + 1 <= cpus
        cheap_only = not inline      # decided by the calibration: on for cheap envs only
    step_cost = None
    pin_by_cost = False          # inline=False given: pin as the calibrated default would
    if pin is None and sync and not inline and not cheap_only and workers > 1:
        from rlflow.runtime.children import usable_cpus

        pin_by_cost = workers == len(usable_cpus())
    if (inline or cheap_only or pin_by_cost) and sync and isinstance(workers, int) and 1 <= workers < num_envs:
        # the inline split's calibration steps the probe (a copy of a given instance), then closes it
        from rlflow.envs.vector import measure_step_cost

        try:
            # an env as envs 1..N-1 are built: the probe itself where it is one (a callable), a
            # copy of a given instance, and for an id a lean env, not the probe with its checking
            # wrappers (CartPole: ~4 against ~6 us a step; in slow phases of the host the probe
            # read near CHEAP_STEP)
            target = probe if others is factory else others()
        except Exception:        # an instance that does not copy: no calibration, an even split
            target = None
        if not given and target is not probe:
            _close(probe)
        step_cost = None if target is None else measure_step_cost(cls, target, layout)
        if cheap_only:
            # More steppers than cores pays only where an env step costs less than waking a
            # worker: the workers then mostly wait on wake-ups, not on the CPU.
            inline = step_cost is not None and step_cost < CHEAP_STEP
            if pin is None:        # an expensive env, a worker per CPU: each keeps its own core
                from rlflow.runtime.children import usable_cpus

                pin = (not inline and step_cost is not None and sync
                       and workers == len(usable_cpus()) and workers > 1)
        elif pin_by_cost:
            pin = step_cost is not None and step_cost >= CHEAP_STEP
    elif not given:
        _close(probe)
    from rlflow.runtime.env_workers import ProcessVectorEnv

    if isinstance(factory, GymMake):      # env 0 is built in a worker: its space is not the caller's
        factory = GymMake(env, kwargs, fast_space=True)
    return ProcessVectorEnv(cls, [factory] + [others] * (num_envs - 1), layout, workers=workers,
                            batch_size=batch_size, seed=seed, start_method=start_method, inline=inline,
                            step_cost=step_cost, spin=spin, pin=bool(pin))


def _is_env(obj) -> bool:
    import gymnasium as gym

    if isinstance(obj, gym.Env):
        return True
    try:
        from pettingzoo.utils.env import AECEnv, ParallelEnv
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, (AECEnv, ParallelEnv))


def _close(env):
    try:
        env.close()
    except Exception:
        pass
