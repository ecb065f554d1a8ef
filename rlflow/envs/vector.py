"""The one stepping implementation: N envs stepped as one batch into preallocated arrays.

Every transport runs the classes of this module: the serial backend runs one of them over all N envs
in the caller's process; the process backend (`rlflow.runtime.env_workers`) runs one per worker over
that worker's slice of envs, with its arrays placed in shared memory, so a step writes its results
in place where the parent reads them.

A vector env fills these row arrays (B rows: one per env, or one per (env, agent) for multi-agent):

    obs/<leaf>        [B, ...]  what the policy acts on next (the new episode's first obs after a reset)
    final_obs/<leaf>  [B, ...]  the obs this step's transition ends in (the true last obs where done)
    reward            float32 [B]
    terminated        bool [B]
    truncated         bool [B]
    alive             bool [B]            multi-agent only
    action_mask       int8 [B, n]         only where the env gives masks
    actions           [B, ...]            the input of `step` (the process backend writes it here)

Same-step autoreset, for one env row i (single-agent):

    step t:   obs_t --a_t--> env.step -> o, r, terminated, truncated
              not done:  obs[i] = o          final_obs[i] = o
              done:      obs[i] = reset()    final_obs[i] = o      (the true last observation)
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
from gymnasium import spaces

from rlflow.core import Step
from rlflow.errors import ClosedError, SpecError, UsageError, mismatch
from rlflow.specs import ArraySpec, EnvSpec, check_values_fit, from_space

__all__ = ["Layout", "VectorEnv", "SerialVectorEnv", "ObsBuffer"]


# --------------------------------------------------------------------------------------------------
# Layout: what the arrays of a vector env look like, known from the spaces before any env runs
# --------------------------------------------------------------------------------------------------
def _leaves(spec, path=()):
    """[(path, ArraySpec)] of a (nested) spec; Tuple spaces have integer path keys."""
    if isinstance(spec, ArraySpec):
        return [(path, spec)]
    out = []
    for k, s in spec.items():
        out.extend(_leaves(s, path + (k,)))
    return out


def _space_paths(space, path=()):
    """Like `_leaves`, but with the keys that index the env's own observation (int for Tuple)."""
    if isinstance(space, spaces.Dict):
        out = []
        for k, s in space.spaces.items():
            out.extend(_space_paths(s, path + (k,)))
        return out
    if isinstance(space, spaces.Tuple):
        out = []
        for i, s in enumerate(space.spaces):
            out.extend(_space_paths(s, path + (i,)))
        return out
    return [path]


class Layout:
    """The single-row spaces of a vector env and the row arrays they need.

    observation_space  the space of one row's obs (for masked PettingZoo games: the "observation" part)
    action_space       the space of one row's action (a fixed-size array space)
    agents             () for single-agent envs, else the agent names of one env (rows env-major)
    mask_shape         shape of one row's action mask, or None
    env_masks          whether the env's observations carry the mask (PettingZoo classic), not rlflow
    agent_obs_shapes   None, or per agent its own observation shape (padded into observation_space)
    agent_actions      None, or per agent its own action space (padded into action_space)
    """

    def __init__(self, observation_space, action_space, agents=(), mask_shape=None, env_masks=None,
                 agent_obs_shapes=None, agent_actions=None):
        self.observation_space = observation_space
        self.action_space = action_space
        self.agents = tuple(agents)
        self.mask_shape = None if mask_shape is None else tuple(mask_shape)
        self.env_masks = mask_shape is not None if env_masks is None else bool(env_masks)
        self.agent_obs_shapes = agent_obs_shapes
        self.agent_actions = agent_actions
        self.obs_spec = from_space(observation_space)
        try:
            act = from_space(action_space)
        except SpecError:
            act = None                    # a space without an array spec: named as the action space
        if not isinstance(act, ArraySpec):
            raise UsageError(mismatch("space", "action_space", "a Box, Discrete, MultiDiscrete or "
                                      "MultiBinary action space", repr(action_space)))
        self.action_spec = act
        self.obs_paths = _space_paths(observation_space)
        self.obs_leaves = _leaves(self.obs_spec)   # (flat path, spec), same order as obs_paths
        seen = {}
        for path, _ in self.obs_leaves:            # leaves are stored (and items named) by joined path
            name = "/".join(map(str, path))
            if name in seen:
                raise SpecError(mismatch("space", "observation_space", "Dict keys whose paths joined with "
                                         "'/' name one leaf each", f"the keys {seen[name]!r} and {path!r} "
                                         f"both stored as 'obs/{name}'"))
            seen[name] = path

    @property
    def multi_agent(self) -> bool:
        return bool(self.agents)

    @property
    def rows_per_env(self) -> int:
        return max(1, len(self.agents))

    def array_specs(self, rows: int) -> dict[str, tuple[tuple, np.dtype]]:
        """name -> (shape, dtype) of every row array for `rows` rows."""
        out = {}
        for prefix in ("obs", "final_obs"):
            for path, spec in self.obs_leaves:
                name = "/".join([prefix, *map(str, path)])
                out[name] = ((rows,) + spec.shape, spec.dtype)
        out["reward"] = ((rows,), np.dtype(np.float32))
        out["terminated"] = ((rows,), np.dtype(bool))
        out["truncated"] = ((rows,), np.dtype(bool))
        if self.multi_agent:
            out["alive"] = ((rows,), np.dtype(bool))
        if self.mask_shape is not None:
            out["action_mask"] = ((rows,) + self.mask_shape, np.dtype(np.int8))
        out["actions"] = ((rows,) + self.action_spec.shape, self.action_spec.dtype)
        return out

    def allocate(self, rows: int) -> dict[str, np.ndarray]:
        return {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.array_specs(rows).items()}

    def env_spec(self, rows: int) -> EnvSpec:
        return EnvSpec.from_spaces(self.observation_space, self.action_space, rows, agents=self.agents)

    def __eq__(self, other):
        return (isinstance(other, Layout) and self.observation_space == other.observation_space
                and self.action_space == other.action_space and self.agents == other.agents
                and self.mask_shape == other.mask_shape and self.env_masks == other.env_masks
                and self.agent_obs_shapes == other.agent_obs_shapes and self.agent_actions == other.agent_actions)


def check_seed(seed, num_envs: int, name: str = "seed") -> None:
    """A seed for `num_envs` envs (env i gets seed + i): None, or an int with every seed + i in
    [0, 2**63 - 1] (the process backends carry seeds as int64; gymnasium refuses negative ones)."""
    if seed is None:
        return
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
        raise UsageError(mismatch("argument", name, "an int or None", repr(seed)))
    if not 0 <= int(seed) <= 2**63 - num_envs:
        raise UsageError(mismatch("argument", name, f"an int in [0, 2**63 - {num_envs}] (env i gets "
                                  f"seed + i, for {num_envs} envs)", repr(seed)))


def lossy_cast(a: np.ndarray, dtype: np.dtype) -> Optional[str]:
    """Why `a`'s values would not survive numpy's cast to `dtype` (which wraps ints, truncates and
    wraps floats into ints, makes any nonzero True), or None where they do."""
    if a.dtype == dtype or not a.size or np.can_cast(a.dtype, dtype, casting="safe"):
        return None
    kind, to = a.dtype.kind, dtype.kind
    if kind not in "biufc":
        return f"values of dtype {a.dtype}"
    if to == "b":
        return None if ((a == 0) | (a == 1)).all() else "values other than 0 and 1"
    if kind == "c" and to != "c":
        return None if not np.imag(a).any() and lossy_cast(np.real(a), dtype) is None else "complex values"
    if to in "iu":
        if kind == "f" and not (np.isfinite(a).all() and (a == np.trunc(a)).all()):
            return "values that are not integers"
        info = np.iinfo(dtype)
        lo, hi = a.min(), a.max()
        if lo < info.min or hi > info.max:
            return f"values in [{lo}, {hi}], outside [{info.min}, {info.max}]"
    elif to == "f" and kind in "fc":
        big = np.abs(a[np.isfinite(a)])
        if big.size and big.max() > np.finfo(dtype).max:
            return f"a finite value of {big.max():.4g}, beyond {np.finfo(dtype).max:.4g}"
    return None


class ObsBuffer:
    """One (possibly nested) observation stored as flat leaf arrays with a leading row axis.

    `write(i, value)` stores one env's observation in row i; `tree(index)` returns the nested
    structure (the array itself for a flat space, a dict for Dict, a tuple for Tuple) of copies.
    """

    def __init__(self, layout: Layout, arrays: dict[str, np.ndarray], prefix: str):
        self.paths = layout.obs_paths
        self.arrays = [arrays["/".join([prefix, *map(str, p)])] for p, _ in layout.obs_leaves]
        self.flat = self.paths == [()]
        self.space = layout.observation_space
        self.shapes = [a.shape[1:] for a in self.arrays]
        self.row_offset = 0           # added to the rows that messages name (a worker's first row)

    def write(self, i, value):
        """Row i's observation; one of another shape raises SpecError (numpy would broadcast it),
        and so does one whose values numpy's cast to the space's dtype would change (300.7 into
        uint8, 1e12 into int32, 7 into bool, 1e300 into float32: `lossy_cast`), whether it comes
        as an array, a Python number or a list."""
        if self.flat:
            self._put(self.arrays[0], i, value, 0)
            return
        for k, (path, arr) in enumerate(zip(self.paths, self.arrays)):
            v = value
            try:
                for key in path:
                    v = v[key]
            except (KeyError, IndexError, TypeError):
                leaf = "obs" + "".join(f"[{p!r}]" for p in path)
                err = SpecError(mismatch("env", leaf, f"a value there (the observation space is "
                                         f"{self.space})", f"an observation without it from row {i + self.row_offset}"))
                err.rlflow_env_row = i
                raise err from None
            self._put(arr, i, v, k)

    def _put(self, arr, i, value, k):
        a = value if value.__class__ is np.ndarray else np.asarray(value)
        if a.shape != self.shapes[k]:
            self.check(value, i, k)
        if a.dtype is not arr.dtype and a.dtype != arr.dtype:
            self.check_cast([a], i, k)
        arr[i] = a

    def write_all(self, values: Sequence):
        """Rows 0..len(values)-1 at once (a list of per-env observations), stacked by numpy first:
        the stack's shape and dtype cover every row (one float64 row among float32 ones makes a
        float64 stack), so a wrong shape or a value the cast would change in any row raises
        SpecError naming that row."""
        if self.flat:
            arr = self.arrays[0]
            try:
                src = np.asarray(values)
            except ValueError:                     # rows of different shapes
                src = None
            if src is None or src.shape[1:] != self.shapes[0]:
                for i, v in enumerate(values):
                    self.check(v, i)
                raise SpecError(mismatch("env", "obs", f"rows of shape {self.shapes[0]}",
                                         f"rows that stack to {None if src is None else src.shape}"))
            if src.dtype is not arr.dtype and src.dtype != arr.dtype:
                self.check_cast(values, 0, 0)
            arr[: len(values)] = src
            return
        for i, v in enumerate(values):
            self.write(i, v)

    def check(self, value, row: int, k: int = 0) -> None:
        """SpecError unless `value` (row `row`'s observation leaf k, at `paths[k]`) has the leaf's
        shape; a Python number or list of that shape is fine."""
        shape = np.shape(value)
        if shape != self.shapes[k]:
            leaf = "obs" + "".join(f"[{p!r}]" for p in self.paths[k])
            err = SpecError(mismatch("env", leaf, f"shape {self.shapes[k]} (the observation space's)",
                                     f"shape {shape} from row {row + self.row_offset}"))
            err.rlflow_env_row = row
            raise err

    def check_cast(self, values, row: int, k: int = 0) -> None:
        """SpecError naming the leaf and the row unless every value (rows row, row + 1, ...) keeps
        its values in leaf k's dtype."""
        dtype = self.arrays[k].dtype
        for j, v in enumerate(values):
            a = np.asarray(v)
            why = lossy_cast(a, dtype)
            if why is not None:
                leaf = "obs" + "".join(f"[{p!r}]" for p in self.paths[k])
                err = SpecError(mismatch("env", leaf, f"dtype {dtype} (the observation space's) or "
                                         "values that keep their value in it", f"dtype {a.dtype} with "
                                         f"{why} from row {row + j + self.row_offset}"))
                err.rlflow_env_row = row + j
                raise err

    def copy_to(self, other: "ObsBuffer"):
        if self.flat:                    # one array: one call (on every serial step's path)
            np.copyto(other.arrays[0], self.arrays[0])
            return
        for a, b in zip(self.arrays, other.arrays):
            np.copyto(b, a)

    def tree(self, index=None):
        arrays = [a.copy() if index is None else a[index] for a in self.arrays]
        if self.flat:
            return arrays[0]
        return _build(self.space, iter(arrays))


def _build(space, it):
    if isinstance(space, spaces.Dict):
        return {k: _build(s, it) for k, s in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(_build(s, it) for s in space.spaces)
    return next(it)


# --------------------------------------------------------------------------------------------------
# The base class: public API, action checks, Step records, episode statistics
# --------------------------------------------------------------------------------------------------
class VectorEnv:
    """A batch of environments behind one `reset` / `step`, speaking `rf.Step` records.

        venv = rf.envs.make("CartPole-v1", num_envs=16)        # backend="serial" | "process" | "pool"
        step = venv.reset(seed=0)                              # env i is reset with seed 0 + i
        while ...:
            step = venv.step(policy(step.obs))                 # actions: [len(step), *action_shape]
        venv.close()                                           # or: with rf.envs.make(...) as venv:

    Attributes: `num_envs` (rows of a full step: envs, or envs x agents for multi-agent envs),
    `single_observation_space`, `single_action_space`, `spec` (an `rf.specs.EnvSpec`), `closed`.

    `step(actions)` takes one action per row of the previous returned Step (the same rows, in the same
    order) and checks their shape and dtype: a wrong shape raises SpecError naming 'actions'.

    `Step.info` holds two per-row arrays: `episode_return` (float32) and `episode_length` (int64), the
    totals of the row's episode so far including this step; where `step.done`, the totals of the
    episode that just ended. For multi-agent rows, the length counts the agent's actions: the steps
    that followed a Step in which the row was alive (so an agent that left early, or the AEC player
    that moves second, counts only the moves it made).
    """

    num_envs: int
    layout: Layout

    def __init__(self, layout: Layout, num_rows: int, seed=None):
        self.layout = layout
        self.num_envs = int(num_rows)
        self.single_observation_space = layout.observation_space
        self.single_action_space = layout.action_space
        self.spec = layout.env_spec(self.num_envs)
        self._default_seed = seed
        self._closed = False
        self._unreset = "before the first reset()"    # why a step must wait for a reset (None: it need not)
        self._all_ids = np.arange(self.num_envs, dtype=np.int64)
        self._all_ids.flags.writeable = False
        self._expected_rows = self.num_envs
        self._ret = np.zeros(self.num_envs, np.float64)
        self._len = np.zeros(self.num_envs, np.int64)
        self._acted = np.zeros(self.num_envs, bool)     # multi-agent: rows alive in the last Step
        act = layout.action_spec
        self._act_shape = act.shape
        self._act_dtype = act.dtype
        # single-agent rows with one observation array: `_make_step` takes its short path
        self._plain = not layout.multi_agent and layout.mask_shape is None and layout.obs_paths == [()]
        # a single-agent Discrete action space: actions outside it are a SpecError here, on every
        # backend (the env's own assert was a bare AssertionError, and in a worker a WorkerError
        # that closed the vector env); multi-agent rows that do not act may hold anything
        sp = layout.action_space
        self._act_range = ((int(sp.start), int(sp.start) + int(sp.n))
                           if isinstance(sp, spaces.Discrete) and not layout.multi_agent else None)
        # the range check of [0, n) in one numpy call: np.ravel_multi_index((a,), (n,)) raises
        # ValueError for any entry outside [0, n), negative ones too (on a step's critical path:
        # ~1.4 us less than a.min() and a.max() at 16 rows). Not for uint64, which it does not take.
        self._act_dims = None
        if (self._act_range is not None and self._act_range[0] == 0
                and (act.dtype.kind == "i" or (act.dtype.kind == "u" and act.dtype.itemsize < 8))):
            self._act_dims = (self._act_range[1],)
        self._act_shapes = {}                # rows -> (rows, *action_shape): check_actions' shape
        # MultiDiscrete / MultiBinary likewise, per element: [low, high) arrays of the action's shape
        self._act_bounds = None
        if isinstance(sp, spaces.MultiDiscrete):
            self._act_bounds = (np.asarray(sp.start, np.int64), np.asarray(sp.start, np.int64) + sp.nvec)
        elif isinstance(sp, spaces.MultiBinary):
            self._act_bounds = (np.zeros(sp.shape, np.int64), np.full(sp.shape, 2, np.int64))
        # agents of different Discrete action sizes (padded): each row's own n, checked on step
        # multi-agent rows: the acting rows' actions are checked (each agent's own Discrete n where
        # agents of different sizes were padded; MultiDiscrete / MultiBinary bounds per element)
        self._own_n = None
        self._last_rows = None               # (env_ids, alive) of the last returned Step
        if layout.multi_agent and isinstance(sp, spaces.Discrete):
            A = len(layout.agents)
            ns = ([int(a.n) for a in layout.agent_actions] if layout.agent_actions is not None
                  else [int(sp.n)] * A)
            self._own_n = np.array(ns, np.int64)[np.arange(self.num_envs) % A]
        elif layout.multi_agent and isinstance(sp, (spaces.MultiDiscrete, spaces.MultiBinary)):
            self._own_n = np.zeros(0, np.int64)            # bounds only: _act_bounds

    # ---- public API -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def reset(self, seed: int | None = None) -> Step:
        """Reset every env (env i with `seed + i` when a seed is given) and return all rows."""
        self._check_open()
        if seed is None and self._default_seed is not None:
            seed, self._default_seed = self._default_seed, None
        if seed is not None:
            check_seed(seed, self.num_envs)
        self._unreset = "after a reset() that raised (some envs were reset, others not)"
        step = self._reset(None if seed is None else int(seed))
        self._unreset = None
        if self._own_n is not None:
            self._last_rows = (step.env_ids, step.alive)
        self._ret[:] = 0             # the reset step is no step of an episode: totals start at 0
        self._len[:] = 0
        for k in ("episode_return", "episode_length"):
            if k in step.info:
                step.info[k] = np.zeros_like(step.info[k])
        self._expected_rows = len(step)
        return step

    def step(self, actions) -> Step:
        """Apply one action per row of the previous Step; return the next Step (same-step autoreset)."""
        self._check_open()
        if self._unreset is not None:
            raise UsageError(mismatch(f"{type(self).__name__}.step", "reset", "a reset() before the steps",
                                      f"step() {self._unreset}"))
        actions = self.check_actions(actions, self._expected_rows)
        if self._own_n is None:
            return self._step(actions)
        self._check_own_actions(actions)
        step = self._step(actions)
        self._last_rows = (step.env_ids, step.alive)
        return step

    def _check_own_actions(self, actions: np.ndarray) -> None:
        """Multi-agent rows (agents of different Discrete sizes share the largest): SpecError naming
        the position in `actions`, its agent and row, unless every acting row's action is in its
        agent's range."""
        ids, alive = self._last_rows
        if not isinstance(self.single_action_space, spaces.Discrete):        # MultiDiscrete / MultiBinary
            self._check_bounds(actions, alive, ids)
            return
        start = int(self.single_action_space.start)
        n = self._own_n[ids]
        off = actions.astype(np.int64) - start
        bad = ((off < 0) | (off >= n)) & (True if alive is None else alive)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            agent = self.layout.agents[int(ids[j]) % len(self.layout.agents)]
            raise SpecError(mismatch("argument", f"actions[{j}]", f"an action of agent {agent!r} (row "
                                     f"{int(ids[j])}), in [{start}, {start + int(n[j]) - 1}] (its "
                                     f"Discrete({int(n[j])}); step.action_mask says which)", actions[j]))

    def random_actions(self, rng: np.random.Generator, step: Step) -> np.ndarray:
        """A uniformly random action for each row of `step` (legal under its action mask): random
        warm-up. Agents whose Box action spaces were padded into one get actions of their own
        space (zeros in the padding)."""
        from rlflow.actor import random_actions

        acts = random_actions(self.single_action_space, len(step), rng, step.action_mask)
        own = self.layout.agent_actions
        if own is None or isinstance(self.single_action_space, spaces.Discrete):
            return acts
        agent = np.asarray(step.env_ids) % len(own)
        for k, space in enumerate(own):
            rows = np.flatnonzero(agent == k)
            if len(rows):
                acts[rows] = 0
                acts[(rows,) + tuple(slice(0, d) for d in space.shape)] = random_actions(space, len(rows), rng)
        return acts

    def close(self) -> None:
        """Close every env (and stop the workers, free the shared memory). An exception that an
        env's own `close()` raised is raised here once everything is closed, naming the env."""
        if not self._closed:
            self._closed = True
            self._close()

    def _abort(self) -> None:
        """`close()` on the way out of another error: what the envs' close raises is dropped."""
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._abort()      # the error that leaves the with block is the one to see

    def __repr__(self):
        return (f"{type(self).__name__}(num_envs={self.num_envs}, obs={self.single_observation_space}, "
                f"action={self.single_action_space}{', closed' if self._closed else ''})")

    # ---- helpers for subclasses -----------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")

    def check_actions(self, actions, rows: int) -> np.ndarray:
        """`actions` as an array of shape [rows, *action_shape] and the action dtype, or SpecError."""
        a = actions if actions.__class__ is np.ndarray else np.asarray(actions)
        expected = self._act_shapes.get(rows)
        if expected is None:
            expected = self._act_shapes[rows] = (rows,) + self._act_shape
        if a.shape != expected:
            raise SpecError(mismatch("argument", "actions", f"shape {expected} (one action per row of "
                                     "the previous step)", f"shape {a.shape}"))
        if a.dtype is not self._act_dtype and a.dtype != self._act_dtype:
            if a.dtype.kind != self._act_dtype.kind and not (
                    a.dtype.kind in "iub" and self._act_dtype.kind in "iu"):
                raise SpecError(mismatch("argument", "actions", f"dtype {self._act_dtype}",
                                         f"dtype {a.dtype}"))
            if self._act_dtype.kind in "iu":         # no int wraps on the cast
                check_values_fit(a, self._act_dtype, "actions", "argument")
            a = a.astype(self._act_dtype)
        rng = self._act_range
        if rng is None or not len(a):
            pass
        elif self._act_dims is not None:            # [0, n): ValueError for any other entry
            try:
                np.ravel_multi_index((a,), self._act_dims)
            except ValueError:
                self._bad_action(a, rng)
        elif a.min() < rng[0] or a.max() >= rng[1]:
            self._bad_action(a, rng)
        if self._act_bounds is not None and len(a) and self._own_n is None:   # multi-agent: acting rows, on step
            self._check_bounds(a)
        return a

    def _bad_action(self, a: np.ndarray, rng) -> None:
        """SpecError naming the first action outside the Discrete range `rng` = [lo, hi)."""
        j = int(np.flatnonzero((a < rng[0]) | (a >= rng[1]))[0])
        raise SpecError(mismatch("argument", f"actions[{j}]", f"an action of {self.single_action_space} "
                                 f"(in [{rng[0]}, {rng[1] - 1}])", a[j]))

    def _check_bounds(self, actions: np.ndarray, acting=None, ids=None) -> None:
        """MultiDiscrete / MultiBinary: SpecError naming the first row (of the `acting` ones; its
        agent where `ids` are given) with a value outside [low, high] (`_act_bounds`)."""
        lo, hi = self._act_bounds
        bad = ((actions < lo) | (actions >= hi)).reshape(len(actions), -1).any(axis=1)
        if acting is not None:
            bad &= acting
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            whose = "" if ids is None else \
                f" of agent {self.layout.agents[int(ids[j]) % len(self.layout.agents)]!r} (row {int(ids[j])})"
            raise SpecError(mismatch("argument", f"actions[{j}]", f"an action{whose} of {self.single_action_space} "
                                     f"(each value in [low, high] = [{lo.tolist()}, {(hi - 1).tolist()}])",
                                     actions[j].tolist()))

    def _make_step(self, arrays: dict, obs: ObsBuffer, final: ObsBuffer, ids=None, index=None) -> Step:
        """A Step of copies of `arrays` (all rows, or rows `index`: an index array, or a slice
        whose rows are `ids`), with episode statistics."""
        if isinstance(index, slice) or index is None:
            if self._plain:
                return self._make_full_step(arrays, obs, final, index, ids)
            if index is not None:
                index = ids                    # the same rows as an index array (indexing copies)
        take = (lambda a: a.copy()) if index is None else (lambda a: a[index])
        reward = take(arrays["reward"])
        terminated = take(arrays["terminated"])
        truncated = take(arrays["truncated"])
        alive = take(arrays["alive"]) if "alive" in arrays else None
        mask = take(arrays["action_mask"]) if "action_mask" in arrays else None
        done = terminated | truncated
        # episode statistics, vectorized over the rows
        # a multi-agent row's length counts its agent's actions: the steps after a Step in which
        # the row was alive (its agent acted in this one), whenever its episode began or ended
        if index is None:
            ids = self._all_ids
            ret, length = self._ret, self._len
            ret += reward
            length += 1 if alive is None else self._acted
            info = {"episode_return": ret.astype(np.float32), "episode_length": length.copy()}
        else:
            ret = self._ret[ids] + reward
            length = self._len[ids] + (1 if alive is None else self._acted[ids])
            info = {"episode_return": ret.astype(np.float32), "episode_length": length}
            self._ret[ids] = ret
            self._len[ids] = length
        if alive is not None:
            self._acted[ids] = alive
        if np.count_nonzero(done):
            ended = ids[done]
            self._ret[ended] = 0.0
            self._len[ended] = 0
        return Step(obs=obs.tree(index), reward=reward, terminated=terminated, truncated=truncated,
                    final_obs=final.tree(index), env_ids=ids, alive=alive, action_mask=mask, info=info)

    def _make_full_step(self, arrays: dict, obs: ObsBuffer, final: ObsBuffer, rows: slice | None = None,
                        ids=None, lengths=None, obs_ready=None) -> Step:
        """`_make_step` of every row (or of the contiguous `rows`, whose ids are `ids`) of a plain
        env (`_plain`): the same Step in fewer numpy calls, with slices where `_make_step` indexes
        (it is on every step's critical path: ~5 -> ~4 us at 16 rows).

        `lengths` (every row only): `_count_lengths()`, called by the caller beforehand (the process
        backend does it while a worker may still be stepping). `obs_ready()` (every row only), if
        given, is called before `obs` is read, once everything else is (the process backend waits
        there for its workers' autoresets)."""
        # two branches, not `rows = slice(None)`: indexing seven arrays with it costs ~0.7 us a step
        if rows is None:
            reward, terminated = arrays["reward"].copy(), arrays["terminated"].copy()
            truncated = arrays["truncated"].copy()
            o, f, ids = None, final.arrays[0].copy(), self._all_ids      # obs last (see `obs_ready`)
            # the totals are new arrays (`_count_lengths` changes nothing): a step that raises in
            # the caller's waits before, or in `obs_ready()`, leaves them as they were
            before = self._ret
            self._ret = ret = before + reward    # (info holds its own float32 copy)
            if lengths is None:
                lengths = self._count_lengths()
            length = self._len
            np.copyto(length, lengths)           # (not the info array itself: it is the caller's)
        else:
            reward, terminated = arrays["reward"][rows].copy(), arrays["terminated"][rows].copy()
            truncated = arrays["truncated"][rows].copy()
            o, f = obs.arrays[0][rows].copy(), final.arrays[0][rows].copy()
            ret, length = self._ret[rows], self._len[rows]          # views: updated in place
            ret += reward
            length += 1
            lengths = length.copy()
        info = {"episode_return": ret.astype(np.float32), "episode_length": lengths}
        if np.count_nonzero(terminated) or np.count_nonzero(truncated):
            ended = terminated | truncated
            ret[ended] = 0.0
            length[ended] = 0
        if o is None:
            if obs_ready is not None:
                try:
                    obs_ready()
                except BaseException:            # no Step is made: the totals go back
                    self._ret = before
                    np.subtract(lengths, 1, out=length)
                    raise
            o = obs.arrays[0].copy()
        # positional: half the cost of keywords (Step's field order: obs, reward, terminated,
        # truncated, final_obs, env_ids, alive, action_mask, info)
        return Step(o, reward, terminated, truncated, f, ids, None, None, info)

    def _count_lengths(self) -> np.ndarray:
        """Every row's episode length after the step being made (+1: it needs none of the step's
        results), for `_make_full_step(lengths=...)`; a new array: nothing is changed until the
        Step is made."""
        return self._len + 1

    # ---- what a subclass implements -------------------------------------------------------------
    def _reset(self, seed) -> Step:
        raise NotImplementedError

    def _step(self, actions: np.ndarray) -> Step:
        raise NotImplementedError

    def _close(self) -> None:
        pass


class _InPlace(VectorEnv):
    """A vector env that runs its envs in this process and writes results into row arrays.

    `arrays` may be given (views into shared memory: that is how a worker process runs it); otherwise
    they are allocated. Subclasses implement `reset_rows(seed)` and `step_rows(actions)`, which only
    write the arrays; `reset` / `step` wrap them into Step records.
    """

    def __init__(self, env_fns: Sequence[Callable[[], Any]], layout: Layout | None = None,
                 arrays: dict | None = None, seed_offset: int = 0, seed=None, envs=None):
        if envs is None:
            if not env_fns:
                raise UsageError(mismatch("argument", "env_fns", "at least one env factory", "none"))
            envs = []
            try:
                for fn in env_fns:
                    envs.append(fn())
            except BaseException as exc:
                note_env_index(exc, int(seed_offset) + len(envs))     # which env failed to build
                for e in envs:
                    _safe_close(e)
                raise
        self.envs = list(envs)
        try:
            layout = self._check_layouts(layout)
        except BaseException:               # spaces refused: the envs built are closed, not leaked
            for e in self.envs:
                _safe_close(e)
            raise
        rows = len(self.envs) * layout.rows_per_env
        super().__init__(layout, rows, seed=seed)
        self.seed_offset = int(seed_offset)
        self.arrays = layout.allocate(rows) if arrays is None else arrays
        self._obs = ObsBuffer(layout, self.arrays, "obs")
        self._final = ObsBuffer(layout, self.arrays, "final_obs")
        self._obs.row_offset = self._final.row_offset = self.seed_offset * layout.rows_per_env
        self._raised = None               # what an env raised in the last step, until a reset
        self._setup()

    def _check_layouts(self, layout: Layout | None) -> Layout:
        if layout is None:
            layout = self.layout_of(self.envs[0])
        for i, e in enumerate(self.envs[1:], 1):
            other = self.layout_of(e)
            if other != layout:
                raise UsageError(mismatch("env", f"env {i}", f"the spaces of env 0 "
                                          f"({layout.observation_space}, {layout.action_space})",
                                          f"({other.observation_space}, {other.action_space})"))
        return layout

    @staticmethod
    def layout_of(env) -> Layout:
        raise NotImplementedError

    def _setup(self):
        pass

    def _reset(self, seed):
        self.reset_rows(seed)
        self._raised = None
        return self._make_step(self.arrays, self._obs, self._final)

    def _step(self, actions):
        if self._raised is not None:
            raise UsageError(mismatch(f"{type(self).__name__}.step", "envs", "reset() after an env raised "
                                      "(the envs before it had stepped, the others had not)",
                                      f"a step after {self._raised}"))
        try:
            self.step_rows(actions)
        except BaseException as exc:     # Ctrl-C or SystemExit too: the envs are half stepped
            index = getattr(exc, "rlflow_env_index", None)
            self._raised = f"env {index}'s {type(exc).__name__}" if index is not None else type(exc).__name__
            raise
        return self._make_step(self.arrays, self._obs, self._final)

    def _close(self):
        first = None
        for i, e in enumerate(self.envs):
            try:
                e.close()
            except Exception as exc:
                if first is None:
                    note_env_index(exc, self.seed_offset + i)
                    first = exc
        if first is not None:           # every env is closed: raise the first env's error
            raise first

    def reset_rows(self, seed) -> None:
        raise NotImplementedError

    def step_rows(self, actions: np.ndarray) -> None:
        raise NotImplementedError


def _reset_obs(out):
    """The observation of a Gymnasium `reset()`'s (obs, info); SpecError for anything else (an
    old gym env returns the observation alone, whose [0] read as one would be its first value)."""
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict):
        return out[0]
    got = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
    raise SpecError(mismatch("env", "reset()", "(obs, info) (the Gymnasium API; an old gym env returns obs "
                             "alone: shimmy's GymV21CompatibilityV0 / GymV26CompatibilityV0 convert one)", got))


def note_env_index(exc: BaseException, index: int) -> None:
    """Mark an env's exception with the env's index (read back by the process backend)."""
    try:
        exc.rlflow_env_index = index
        exc.add_note(f"(raised by env {index})")
    except Exception:  # pragma: no cover - exotic exception types
        pass


def _safe_close(env):
    try:
        env.close()
    except Exception:
        pass


class SerialVectorEnv(_InPlace):
    """N Gymnasium envs stepped one after another in this process (same-step autoreset).

    For env row i at each `step`:

        o, r, term, trunc, _ = envs[i].step(actions[i])     # wrappers (TimeLimit, ...) included
        final_obs[i] = o
        obs[i]       = envs[i].reset()[0] if term or trunc else o

    `reset(seed)` resets env i with `seed + seed_offset + i` (the process backend passes each worker
    its first env index as `seed_offset`, so seeded episodes are the same on every backend). After an
    autoreset the env is reset without a seed: its own generator, seeded at the first reset, goes on.

    An env with an `rlflow_time_limit` (rf.envs.make's lean envs of an id, made without gymnasium's
    TimeLimit wrapper) is truncated here as TimeLimit would: at the step where its episode's step
    count reaches the limit. This vector env counts steps once per call (`_t`) and keeps the call
    at which each env's episode began; the per-row check runs only once `_t` reaches the earliest
    possible deadline, so a step pays one int compare for it.
    """

    @staticmethod
    def layout_of(env) -> Layout:
        return Layout(env.observation_space, env.action_space)

    def _setup(self):
        # may the terminated / truncated arrays hold a True: tracked only where this class's own
        # step_rows is the only writer of the flags (a subclass's step_rows may set one itself)
        self._own_flags = type(self).step_rows is SerialVectorEnv.step_rows
        self._flags_set = (True, True)
        limits = [getattr(e, "rlflow_time_limit", None) for e in self.envs]
        self._limit = None
        if any(lim is not None for lim in limits):
            never = np.iinfo(np.int64).max // 4
            self._limit = np.array([never if lim is None else int(lim) for lim in limits], np.int64)
            self._began = [0] * len(limits)       # `_t` when each env's episode began (a list: set per reset)
            self._t = 0
            self._deadline = 0            # no env reaches its limit before this `_t` (a lower bound)

    def _time_limits(self, trunc: np.ndarray) -> bool:
        """The native time limit once `_t` reached `_deadline`: truncate the envs whose episode
        reached its limit, and move `_deadline` to the next one. Returns whether any env hit."""
        t = self._t
        began = np.array(self._began, np.int64)
        hit = t - began >= self._limit
        # rows that hit are reset at this step (their episodes begin at t); the others' deadlines stand
        self._deadline = int((np.where(hit, t, began) + self._limit).min())
        if not np.count_nonzero(hit):
            return False
        trunc |= hit
        return True

    def reset_rows(self, seed) -> None:
        off = self.seed_offset
        first = []
        try:
            for i, e in enumerate(self.envs):
                first.append(_reset_obs(e.reset(seed=None if seed is None else seed + off + i)))
        except BaseException as exc:     # SystemExit too: the worker's report names the env
            note_env_index(exc, off + len(first))
            raise
        self._write_all(first)
        self._obs.copy_to(self._final)
        a = self.arrays
        a["reward"][:] = 0
        a["terminated"][:] = False
        a["truncated"][:] = False
        self._flags_set = (False, False) if self._own_flags else (True, True)
        if self._limit is not None:
            self._began = [self._t] * len(self._began)
            self._deadline = self._t + int(self._limit.min())

    def _write_all(self, obs_l) -> None:
        try:
            self._obs.write_all(obs_l)
        except SpecError as exc:       # an observation of the wrong shape: name its env
            note_env_index(exc, self.seed_offset + getattr(exc, "rlflow_env_row", 0))
            raise

    _checked_outputs = False

    def _check_outputs(self, rewards, terminated, truncated) -> None:
        """SpecError naming the env and the field unless each reward is a real number and each flag
        a bool (a None reward became NaN, a "False" flag True). Run on the first step, and on a
        later step with a None or array reward, a flag equal to neither bool (0 / 1 are taken), or
        values numpy refuses. (Later steps are not checked value by value: a str reward numpy
        parses, or a 1.0 flag, goes through.)"""
        for i, (r, te, tr) in enumerate(zip(rewards, terminated, truncated)):
            for name, v, kinds, what in (("reward", r, "biuf", "a real number"),
                                         ("terminated", te, "b", "a bool"), ("truncated", tr, "b", "a bool")):
                ok = isinstance(v, (bool, int, float, np.number, np.bool_, np.ndarray)) and \
                    np.ndim(v) == 0 and np.asarray(v).dtype.kind in kinds
                if name != "reward" and not ok and isinstance(v, (int, np.integer)) and v in (0, 1):
                    ok = True                  # 0 / 1 flags are taken as bools
                if not ok:
                    err = SpecError(mismatch("env", name, what, f"{v!r} ({type(v).__name__}"
                                             f"{', shape ' + str(np.shape(v)) if np.ndim(v) else ''}) "
                                             f"from env {self.seed_offset + i}"))
                    note_env_index(err, self.seed_offset + i)
                    raise err

    def _check_results(self, results) -> None:
        """SpecError naming the env whose step() did not return Gymnasium's 5-tuple (an env of
        the old gym API returns (obs, reward, done, info))."""
        for i, res in enumerate(results):
            if not isinstance(res, (tuple, list)) or len(res) != 5:
                got = f"a {type(res).__name__} of {len(res)}" if isinstance(res, (tuple, list)) else type(res).__name__
                err = SpecError(mismatch(f"env {self.seed_offset + i}", "step()",
                                         "(obs, reward, terminated, truncated, info) (the Gymnasium API; an "
                                         "old gym env returns 4 values: shimmy's GymV21CompatibilityV0 / "
                                         "GymV26CompatibilityV0 convert one)", got))
                note_env_index(err, self.seed_offset + i)
                raise err

    # step_rows takes `stepped`: called once every row but the autoreset rows' new obs is written
    stepped_hook = True

    def step_rows(self, actions: np.ndarray, stepped=None) -> None:
        """Step every env with its action and write the rows in place (see the class doc).
        `stepped()`, if given, is called once reward, flags, final_obs and the obs of the rows that
        did not end are written, before the envs that ended are reset (the process backend's
        worker posts it: its parent reads those rows while the resets run)."""
        # numpy scalars: gymnasium checks them ~10% faster than ints. Array actions (Box,
        # MultiDiscrete...) are rows of a copy: an env may keep its action, and the array given
        # here is the caller's (or, in a worker, the shared block that the next step rewrites).
        acts = list(actions) if actions.ndim == 1 else list(actions.copy())
        results = []
        try:
            for env, act in zip(self.envs, acts):
                results.append(env.step(act))
        except BaseException as exc:     # SystemExit too: the worker's report names the env
            note_env_index(exc, self.seed_offset + len(results))
            raise
        try:
            obs_l, rew_l, term_l, trunc_l, _ = zip(*results)
        except (TypeError, ValueError):
            self._check_results(results)
            raise
        a = self.arrays
        self._write_all(obs_l)
        term = a["terminated"]
        trunc = a["truncated"]
        if self._checked_outputs:
            # every step, in C-speed scans (~1 us at 16 envs): a None reward would become NaN and a
            # "False" or 2 flag True in the arrays; a flag that equals neither bool is checked in full
            n = len(term_l)
            try:
                suspect = (None in rew_l or term_l.count(False) + term_l.count(True) != n
                           or trunc_l.count(False) + trunc_l.count(True) != n)
            except (TypeError, ValueError):      # an array reward or flag: `==` has no one truth value
                suspect = True
            if suspect:
                self._check_outputs(rew_l, term_l, trunc_l)
            # a flag array that is all False and stays so is not written (most steps: ~0.4 us a
            # flag); `_flags_set` says which of the two may hold a True
            t_any, r_any = any(term_l), any(trunc_l)
            set_t, set_r = self._flags_set
            try:
                a["reward"][:] = rew_l
                if t_any or set_t:
                    term[:] = term_l
                if r_any or set_r:
                    trunc[:] = trunc_l
            except (TypeError, ValueError):
                self._check_outputs(rew_l, term_l, trunc_l)
                raise
        else:                 # the first step: every env's reward and flags are checked once
            self._check_outputs(rew_l, term_l, trunc_l)
            a["reward"][:] = rew_l
            term[:] = term_l
            trunc[:] = trunc_l
            self._checked_outputs = True
            t_any, r_any = any(term_l), any(trunc_l)
        ended = t_any or r_any
        hit = False                  # a native time limit truncated a row (not in trunc_l)
        if self._limit is not None:
            self._t += 1
            if self._t >= self._deadline and self._time_limits(trunc):
                ended = r_any = hit = True
        if self._own_flags:
            self._flags_set = (t_any, r_any)
        self._obs.copy_to(self._final)                 # final_obs = obs: the true last obs where done
        if stepped is not None:
            stepped()
        if ended:
            began, t = (self._began, self._t) if self._limit is not None else (None, 0)
            # the rows that ended: from the env's own flags in Python where they say it all
            # (~3x faster than numpy's three calls for a few rows)
            rows = (np.flatnonzero(term | trunc).tolist() if hit else
                    [i for i, (x, y) in enumerate(zip(term_l, trunc_l)) if x or y])
            for i in rows:
                if began is not None:
                    began[i] = t
                try:
                    self._obs.write(i, _reset_obs(self.envs[i].reset()))   # same-step autoreset
                except BaseException as exc:
                    note_env_index(exc, self.seed_offset + i)
                    raise


# --------------------------------------------------------------------------------------------------
# Calibration: what one env costs per step, measured on a throwaway instance
# --------------------------------------------------------------------------------------------------
MIN_TIMED = 8          # steps measure_step_cost times at least (within 4 x its budget)


def measure_step_cost(cls, env, layout: Layout, steps: int = 32, budget: float = 0.05,
                      seed: int = 0) -> float | None:
    """Median seconds that `cls.step_rows` takes for one env, measured on `env` (a throwaway).

    `env` is reset with `seed` and stepped up to `steps` times with random actions from the action
    space (seeded; legal ones where the env gives masks; drawn outside the timed calls), and
    stepping stops once `budget` seconds have passed since the reset began and `MIN_TIMED` steps
    were timed, or once 4 x `budget` has passed: a slow env gets one step, or none when its reset
    alone took that long (then the result is the time the reset took, a lower bound: such an env
    is slow whatever it is). The first step is a warm-up, left out of the median when there are
    others. `env` is closed afterwards. Returns None when the env raised (a random action may be
    illegal): the cost is then unknown.

    MIN_TIMED: a process preempted for the whole budget (in the reset, or in one step) would
    otherwise leave one or two timings, and a cheap env measured as an expensive one (CartPole
    judged >= 20 us a step once in a CI run). The steps right after such a stall are slow too
    (CartPole after 60 ms asleep: ~150-330 us, then ~12-23 us, then its ~7 us): with 7 timings
    beside the warm-up the stalled step and the two after it cannot move the median.

    The median, not the mean: a calibration run on a shared machine is preempted now and then, and
    the split it feeds (ProcessVectorEnv's inline slice) needs the typical step, not the tail.
    """
    import copy
    import time

    clock = time.perf_counter
    venv = None
    try:
        venv = cls(None, layout=layout, envs=[env])
        space = copy.deepcopy(layout.action_space)
        space.seed(seed)
        rng = np.random.default_rng(seed)
        mask = venv.arrays.get("action_mask")
        rows = layout.rows_per_env
        dtype = layout.action_spec.dtype
        t0 = clock()
        venv.reset_rows(seed)
        times = []
        for _ in range(steps):
            elapsed = clock() - t0
            if elapsed > budget and (len(times) >= MIN_TIMED or elapsed > 4 * budget):
                break
            if mask is not None and isinstance(space, spaces.Discrete):
                acts = [int(space.start + rng.choice(np.flatnonzero(m))) if m.any() else int(space.start)
                        for m in mask]
            else:
                acts = [space.sample() for _ in range(rows)]
            actions = np.asarray(acts, dtype=dtype).reshape((rows,) + layout.action_spec.shape)
            t = clock()
            venv.step_rows(actions)
            times.append(clock() - t)
        if not times:
            return clock() - t0
        return float(np.median(times[1:] if len(times) > 1 else times))
    except Exception:
        return None
    finally:
        if venv is not None:
            venv._abort()
        else:
            _safe_close(env)
