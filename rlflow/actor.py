"""The Actor: a policy acting on a vector env, feeding an adder, whose items go to a sink (a table's
insert, or a queue to one).

    actor = Actor(policy, venv, adder, sink=table.insert, warmup_steps=1_000, seed=0)
    actor.reset()
    while running:
        actor.step()                 # one vector step: act, env step, adder, sink; returns env steps
        actor.update_params()        # pulls new learner params through a ParamClient, if due

A sink may also lend buffers: with `reserve(n)` (field -> array [n, ...], or None), `commit(n)` and
`cancel()`, an adder that can (`add_into`: the Transition adder's usual steps) writes its items
straight into them (the process runtime's shared-memory rings); other steps go through `sink(items)`.

Warm-up: for the first `warmup_steps` env steps the policy is still called (its extras are kept) but
its actions are replaced by uniform random ones (legal ones where the step has an action mask).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Mapping, Optional

import numpy as np
from gymnasium import spaces

from rlflow.core import Adder, Policy, Step
from rlflow.errors import UsageError, is_int, mismatch
from rlflow.specs import batch_rows


def split_policy_output(out):
    """`policy.act` returns actions or (actions, extras)."""
    if isinstance(out, tuple):
        if len(out) != 2:
            raise UsageError(mismatch("policy output", "act", "actions or (actions, extras)",
                                      f"a tuple of {len(out)}"))
        extras = out[1]
        if extras is None:
            return out[0], {}
        if not isinstance(extras, Mapping):
            raise UsageError(mismatch("policy output", "extras", "a dict field -> array (act returns "
                                      "actions or (actions, extras))", f"{type(extras).__name__} {extras!r:.80}"))
        return out[0], extras
    return out, {}


def random_actions(space: spaces.Space, n: int, rng: np.random.Generator, action_mask=None):
    """`n` uniform random actions from a single-env action space (legal ones under `action_mask`)."""
    if isinstance(space, spaces.Discrete):
        if action_mask is not None:
            mask = np.asarray(action_mask, dtype=bool)
            u = rng.random(mask.shape) * mask
            return (np.argmax(u, axis=1) + space.start).astype(space.dtype)
        return rng.integers(space.start, space.start + space.n, size=n).astype(space.dtype)
    if isinstance(space, spaces.Box):
        if space.dtype.kind in "iub":      # integer (and bool) Boxes: bounds included, any range
            kind = space.dtype if space.dtype.kind in "iu" else np.dtype(np.int8)
            return rng.integers(space.low.astype(kind), space.high.astype(kind), size=(n,) + space.shape,
                                dtype=kind, endpoint=True).astype(space.dtype)
        return _random_floats(space, n, rng)
    if isinstance(space, spaces.MultiDiscrete):
        return (space.start + (rng.random((n,) + space.nvec.shape) * space.nvec).astype(np.int64)
                ).astype(space.dtype)
    if isinstance(space, spaces.MultiBinary):
        return rng.integers(0, 2, size=(n,) + tuple(space.shape)).astype(space.dtype)
    raise UsageError(mismatch("action space", type(space).__name__,
                              "Discrete, Box, MultiDiscrete or MultiBinary for random warm-up", space))


def _random_floats(space: spaces.Box, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` random points of a float Box, drawn per element as gymnasium's Box.sample draws them:
    uniform where both bounds are finite, low + Exp(1) where only low is, high - Exp(1) where only
    high is, N(0, 1) where neither is. Uniform as low * (1 - u) + high * u: high - low overflows
    for bounds near the dtype's limits."""
    shape = (n,) + space.shape
    low = np.broadcast_to(space.low, space.shape).astype(np.float64)
    high = np.broadcast_to(space.high, space.shape).astype(np.float64)
    lo_ok, hi_ok = np.isfinite(low), np.isfinite(high)
    u = rng.random(shape)
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.where(lo_ok & hi_ok, low * (1.0 - u) + high * u, 0.0)
        if not (lo_ok & hi_ok).all():
            e = rng.exponential(size=shape)
            out = np.where(lo_ok & ~hi_ok, low + e, out)
            out = np.where(~lo_ok & hi_ok, high - e, out)
            out = np.where(~lo_ok & ~hi_ok, rng.standard_normal(shape), out)
    return np.clip(out, low, high).astype(space.dtype)


_UNSET = object()
_NONE_ENDED = (np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.int64))


class EpisodeStats:
    """Returns and lengths of finished episodes, per row, vectorized.

    Where the vector env already keeps each row's totals (`step.info["episode_return"]` and
    `["episode_length"]`, as every rlflow vector env does), those are read at the rows that ended;
    otherwise the rewards are summed here. `mean_return()` is the mean of the last `window` episodes
    (a running sum, O(1))."""

    def __init__(self, window: int = 100):
        self.returns = None
        self.lengths = None
        self.finished = deque(maxlen=window)
        self.finished_lengths = deque(maxlen=window)
        self.episodes = 0
        self._sum = 0.0
        self._exact_at = 0

    def reset(self, num_rows: int):
        self.returns = np.zeros(num_rows, np.float64)
        self.lengths = np.zeros(num_rows, np.int64)

    def update(self, step: Step):
        """Add the step's rewards; returns (rows, returns, lengths) of the episodes that ended."""
        info = step.info
        if "episode_return" in info and "episode_length" in info:
            if not (np.count_nonzero(step.terminated) or np.count_nonzero(step.truncated)):
                return _NONE_ENDED                        # the usual step (two counts: ~2x faster than done's)
            done = step.done
            ended = step.env_ids[done]
            out = (ended, info["episode_return"][done].astype(np.float64), info["episode_length"][done])
        else:
            rows = step.env_ids
            live = True if step.alive is None else (step.alive | step.done)
            self.returns[rows] += np.where(live, step.reward, 0.0)
            self.lengths[rows] += live
            if not np.count_nonzero(step.done):
                return _NONE_ENDED
            ended = rows[step.done]
            out = (ended, self.returns[ended], self.lengths[ended])
            self.returns[ended] = 0.0
            self.lengths[ended] = 0
        finished = self.finished
        for r in out[1].tolist():
            if len(finished) == finished.maxlen:
                self._sum -= finished[0]
            finished.append(r)
            self._sum += r
        self.finished_lengths.extend(out[2].tolist())
        self.episodes += len(ended)
        return out

    def mean_return(self) -> float:
        n = len(self.finished)
        if not n:
            return float("nan")
        if self.episodes >= self._exact_at:              # now and then, drop the running sum's drift
            self._sum = float(sum(self.finished))
            self._exact_at = self.episodes + 1000
        return self._sum / n


class Actor:
    """Runs `policy` on `venv`, feeds `adder`, hands items to `sink` (see the module docstring)."""

    def __init__(self, policy: Policy, venv, adder: Optional[Adder], sink: Optional[Callable] = None,
                 warmup_steps: int = 0, seed: int = 0, param_client=None):
        if warmup_steps < 0:
            raise UsageError(mismatch("Actor", "warmup_steps", ">= 0", warmup_steps))
        self.policy = policy
        self.venv = venv
        self._act_dtype = venv.spec.action.dtype
        self.adder = adder
        self.sink = sink
        self._into_adder = self._into_sink = _UNSET     # what `_add_into` was chosen for
        self._add_into = None
        self.warmup_steps = int(warmup_steps)
        self.seed = seed
        self.param_client = param_client
        self.rng = np.random.default_rng(seed)
        self.env_steps = 0
        self.items_added = 0
        self.stats = EpisodeStats()
        self._step: Optional[Step] = None
        self.extras_specs = None

    @property
    def last_step(self) -> Optional[Step]:
        return self._step

    def reset(self) -> Step:
        step = self.venv.reset(seed=self.seed)
        self.stats.reset(self.venv.num_envs)
        if self.adder is not None:
            self.adder.add_first(step)
        self._step = step
        return step

    def act(self, step: Step):
        out = self.policy.act_step(step)
        actions, extras = (out, {}) if out.__class__ is np.ndarray else split_policy_output(out)
        if self.env_steps < self.warmup_steps:
            draw = getattr(self.venv, "random_actions", None)     # rlflow's vector envs: per agent's space
            actions = (draw(self.rng, step) if draw is not None else
                       random_actions(self.venv.single_action_space, len(step), self.rng, step.action_mask))
        return (actions if actions.__class__ is np.ndarray else np.asarray(actions)), extras

    def step(self) -> int:
        """One vector step. Returns the number of env steps taken (live rows)."""
        if self._step is None:
            self.reset()
        prev = self._step
        actions, extras = self.act(prev)
        if actions.dtype != self._act_dtype:
            # as the env takes them (bool or int32 actions for an int64 space...): the adder's
            # items then carry the actions the envs applied, in the action spec's dtype
            actions = self.venv.check_actions(actions, len(prev))
        step = self.venv.step(actions)
        self._step = step
        self.stats.update(step)
        taken = len(prev) if prev.alive is None else int(np.count_nonzero(prev.alive))
        self.env_steps += taken
        adder = self.adder
        if adder is not None:
            sink = self.sink
            into = self._add_into
            if adder is not self._into_adder or sink is not self._into_sink:
                into = self._choose_add_into()
            if into is not None:
                n = into(actions, step, extras, sink)
                if n is not None:
                    self.items_added += n
                    return taken
            items = adder.add(actions, step, extras)
            if items:
                n = batch_rows(items)
                if n and sink is not None:
                    sink(items)
                    self.items_added += n
        return taken

    def _choose_add_into(self):
        """A sink that lends buffers (`reserve`/`commit`/`cancel`, as a process actor's ring does)
        takes the items of an adder that can write into them (`add_into`), with no item arrays
        made; chosen again whenever `adder` or `sink` is replaced."""
        adder, sink = self.adder, self.sink
        lends = sink is not None and all(hasattr(sink, a) for a in ("reserve", "commit", "cancel"))
        self._add_into = getattr(adder, "add_into", None) if lends else None
        self._into_adder, self._into_sink = adder, sink
        return self._add_into

    def update_params(self) -> bool:
        """Pull new parameters through the param client if due. Returns whether the policy changed."""
        if self.param_client is None:
            return False
        got = self.param_client.poll()
        if got is None:
            return False
        self.policy.set_params(got[1])
        return True


def evaluate(policy: Policy, venv, episodes: int, seed: int = 0) -> dict:
    """Run `policy` on `venv` and return the mean/std/min/max return and mean length of `episodes`
    episodes. With `venv.num_envs >= episodes`, rows 0..episodes-1 each play exactly one episode
    (no bias toward short episodes); otherwise episodes count in the order they end. Deterministic
    for a given seed and policy.

    A multi-agent vector env (PettingZoo: rows = envs x agents) plays `episodes` games: with at
    least `episodes` envs, envs 0..episodes-1 each play exactly one, and every agent row of those
    envs counts; with fewer, games count whole, in the order their last agent ends. The figures
    are over agent-episodes (as the runs' `episodes` and mean return are): `mean_return` is the
    mean of each agent's return over those games; `episodes` says the games. A game counts the
    agents that took part (PettingZoo lets a game begin with fewer than possible_agents); with
    fewer envs than games, an env whose games have different sets of agents may count one agent's
    episode of a later game in an earlier game (with at least `episodes` envs, never)."""
    if not isinstance(policy, Policy):
        raise UsageError(mismatch("evaluate", "policy", "an rf.Policy", type(policy).__name__))
    if not hasattr(venv, "reset") or not hasattr(venv, "num_envs"):
        raise UsageError(mismatch("evaluate", "venv", "a vector env (rf.envs.make(...))", repr(venv)))
    if not is_int(episodes) or episodes < 1:
        raise UsageError(mismatch("evaluate", "episodes", "an int >= 1", repr(episodes)))
    episodes = int(episodes)
    layout = getattr(venv, "layout", None)
    per_env = int(layout.rows_per_env) if layout is not None else 1    # agent rows of one env
    wanted = episodes * per_env                                         # agent-episodes to count
    one_each = venv.num_envs >= wanted
    step = venv.reset(seed=seed)
    stats = EpisodeStats(window=wanted)
    stats.reset(venv.num_envs)
    counted = np.zeros(venv.num_envs, bool)
    if one_each:
        counted[wanted:] = True            # rows of envs past `episodes` are not counted
    returns: list[float] = []
    lengths: list[int] = []
    # A game counts whole, once every agent row of its env that takes part has ended (a single-agent
    # env's game is its one row's episode): counting agent-episodes as they ended took the early
    # leavers of games still running and dropped their teammates. A row takes part once it was
    # alive; PettingZoo lets a game begin with fewer agents than possible_agents, and a row
    # of an agent that sits a game out never ends in it (waiting for it hung the evaluation): a
    # game also ends when every row seen alive so far has ended in it, or when one of its rows
    # ends again (its env is in its next game by then).
    games: dict[int, dict] = {}      # env -> {row: (return, length)} of its game's ended agents
    seen = np.zeros(venv.num_envs, bool)      # rows alive at some step so far
    seen[step.env_ids if step.alive is None else step.env_ids[step.alive]] = True
    played = 0                                 # games counted

    def close(e):
        nonlocal played
        game = games.pop(e)
        for row in sorted(game):
            returns.append(game[row][0])
            lengths.append(game[row][1])
        if one_each:
            counted[e * per_env:(e + 1) * per_env] = True
        played += 1

    while played < episodes:
        actions, _ = split_policy_output(policy.act_step(step))
        step = venv.step(np.asarray(actions))
        seen[step.env_ids if step.alive is None else step.env_ids[step.alive]] = True
        ended = list(zip(*stats.update(step)))
        # every row that ended in this step took part, alive or not (a poker player whose opponent
        # folded at once wins without a move): all are marked before any game is judged complete
        for r, _, _ in ended:
            seen[r] = True
        touched = []                         # envs with rows ended in this step, in order
        for r, ret, length in ended:
            if counted[r] or played >= episodes:
                continue
            e = r // per_env
            if r in games.get(e, ()):        # its env went on to its next game: the last is over
                close(e)
                if counted[r] or played >= episodes:
                    continue
            games.setdefault(e, {})[r] = (float(ret), int(length))
            if e not in touched:
                touched.append(e)
        for e in touched:
            game = games.get(e)
            if game is None or played >= episodes:
                continue
            rows = range(e * per_env, (e + 1) * per_env)
            if len(game) == per_env or all(x in game or not seen[x] for x in rows):
                close(e)
    r = np.asarray(returns, dtype=np.float64)
    return {"mean_return": float(r.mean()), "std_return": float(r.std()), "min_return": float(r.min()),
            "max_return": float(r.max()), "mean_length": float(np.mean(lengths)),
            "episodes": episodes}
