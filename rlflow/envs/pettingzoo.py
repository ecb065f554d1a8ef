"""PettingZoo envs as agent-batched vector envs: one row per (env, agent).

    row = env_index * num_agents + agent_index         agents: env.possible_agents, in that order

Agents whose spaces differ (most MPE games: simple_tag's adversaries see 16 numbers, its agent 14)
share one padded space where rlflow can build one (`padded_spaces`): Box observations (and Box
actions) of one dtype and rank become a Box of the largest size along each axis, an agent's values at
the front and zeros after; Discrete actions of different sizes become the largest Discrete, with an
action mask (`Step.action_mask`, added if the env has none) allowing each agent only its own actions.
A Box action is cut to the agent's own shape before the env sees it, and random warm-up actions
(`VectorEnv.random_actions`) are drawn from each agent's own space; a Discrete action outside the
agent's own range, in a row that acts, is a SpecError naming the agent and the caller's row, on
every backend (checked before any env steps). Other differences (a Dict
beside a Box, two dtypes) are refused, naming the agent and both spaces. Where an agent's observation is a
dict {"observation": ..., "action_mask": ...} (PettingZoo classic games), `Step.obs` holds the
"observation" part and `Step.action_mask` the mask (all zeros in rows not alive). `Step.alive[r]` says row r's agent acts next;
actions for rows not alive are ignored. PettingZoo is imported only by the envs themselves: this
module needs nothing beyond numpy and gymnasium.

Parallel API (ParallelVectorEnv): every live agent acts every step.

    step t      agents a b c alive; c terminates   -> rows a b: alive; row c: done, not alive
    step t+1..  a b act, c's row idle (not alive, not done, reward 0)
    step T      a b end too (the env has no agents left) -> rows a b done with their final_obs,
                the env is reset in the same step: obs of every row is the new episode's, all alive

AEC API (AECVectorEnv): one agent acts at a time; only its row is alive.

    step t      x acts (its row was alive); now y's turn -> row y alive, reward[y] = y's rewards
                since y last acted (PettingZoo's _cumulative_rewards)
    step T      x makes the winning move: the game is over for everyone -> rows x and y are both
                done (terminated, with their final rewards and final observations) although it is
                no one's turn, the env is reset in the same step, and only the new first agent's
                row is alive.

An agent that leaves an AEC game early is reported done when the env reaches its "dead step"
(PettingZoo selects dead agents first), which this class takes for it.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from rlflow.envs.vector import Layout, _InPlace, note_env_index
from rlflow.errors import SpecError, UsageError, mismatch

__all__ = ["ParallelVectorEnv", "AECVectorEnv"]


def _masked(space) -> bool:
    return (isinstance(space, spaces.Dict) and set(space.spaces) == {"observation", "action_mask"})


def _obs_part(space):
    """(observation space, action-mask shape or None) of one agent's observation space."""
    if _masked(space):
        return space.spaces["observation"], space.spaces["action_mask"].shape
    return space, None


def _pad_box(boxes):
    """One Box holding every Box of `boxes` at its front (zeros after), or None where they differ
    in dtype or rank. Bounds are the elementwise min / max over the agents, in the space's own
    dtype (int64 extremes stay exact); where an agent has no value (its padding) it counts as 0,
    so every padded observation lies inside."""
    first = boxes[0]
    if not all(isinstance(b, spaces.Box) and b.dtype == first.dtype and len(b.shape) == len(first.shape)
               for b in boxes):
        return None
    shape = tuple(int(max(b.shape[k] for b in boxes)) for k in range(len(first.shape)))
    lows, highs = [], []
    for b in boxes:
        lo, hi = np.zeros(shape, first.dtype), np.zeros(shape, first.dtype)
        own = tuple(slice(0, n) for n in b.shape)
        lo[own], hi[own] = b.low, b.high          # the padding keeps its zeros
        lows.append(lo)
        highs.append(hi)
    return spaces.Box(np.min(np.stack(lows), axis=0), np.max(np.stack(highs), axis=0), shape, first.dtype)


def _joins(a, b, kind) -> bool:
    """Whether agent spaces a and b can share one padded space (observation or action)."""
    if a == b:
        return True
    if kind == "action" and isinstance(a, spaces.Discrete) and isinstance(b, spaces.Discrete):
        return a.start == b.start and a.dtype == b.dtype
    return _pad_box([a, b]) is not None


def padded_spaces(agents, obs_spaces, act_spaces, mask_shapes):
    """The one (observation space, action space, mask shape, agent_obs_shapes, agent_actions) the
    agents' spaces fit in (the module docstring's rules), or UsageError naming the first agent
    whose space cannot join agent 0's. agent_obs_shapes / agent_actions are None where nothing is
    padded, else per agent its observation shape / its own action space."""
    def refuse(kind, k, why):
        spaces_ = obs_spaces if kind == "observation" else act_spaces
        raise UsageError(mismatch("env", f"{kind}_space({agents[k]!r})", f"a space that pads to agent "
                                  f"{agents[0]!r}'s, {spaces_[0]} ({why})", spaces_[k]))

    obs_space, agent_obs = obs_spaces[0], None
    if any(o != obs_space for o in obs_spaces):
        obs_space = _pad_box(obs_spaces)
        if obs_space is None:
            k = next(k for k, o in enumerate(obs_spaces) if not _joins(obs_spaces[0], o, "observation"))
            refuse("observation", k, "rlflow pads Box observations of one dtype and rank; other "
                   "spaces must be the same for every agent")
        agent_obs = tuple(tuple(o.shape) for o in obs_spaces)
    act_space, agent_act = act_spaces[0], None
    mask_shape = mask_shapes[0]
    if any(m != mask_shape for m in mask_shapes) and not all(m is not None and len(m) == 1 for m in mask_shapes):
        k = next(k for k, m in enumerate(mask_shapes) if m != mask_shape)
        refuse("observation", k, "an action mask of every agent, or of none")
    if any(a != act_space for a in act_spaces):
        if all(isinstance(a, spaces.Discrete) and a.start == act_space.start and a.dtype == act_space.dtype
               for a in act_spaces):
            n = max(int(a.n) for a in act_spaces)
            act_space = spaces.Discrete(n, start=act_space.start)
            agent_act = tuple(act_spaces)
            mask_shape = (n,)
        else:
            act_space = _pad_box(act_spaces)
            if act_space is None:
                k = next(k for k, a in enumerate(act_spaces) if not _joins(act_spaces[0], a, "action"))
                refuse("action", k, "rlflow pads Discrete actions of one start, and Box actions of one "
                       "dtype and rank; other spaces must be the same for every agent")
            agent_act = tuple(act_spaces)
    elif mask_shape is not None and any(m != mask_shape for m in mask_shapes):
        mask_shape = (max(m[0] for m in mask_shapes),)
    return obs_space, act_space, mask_shape, agent_obs, agent_act


def layout_of_pettingzoo(env) -> Layout:
    agents = tuple(env.possible_agents)
    if not agents:
        raise UsageError(mismatch("env", "possible_agents", "at least one agent", "none"))
    parts = [_obs_part(env.observation_space(a)) for a in agents]
    obs_space, act_space, mask_shape, agent_obs, agent_act = padded_spaces(
        agents, [o for o, _ in parts], [env.action_space(a) for a in agents], [m for _, m in parts])
    return Layout(obs_space, act_space, agents=agents, mask_shape=mask_shape, env_masks=parts[0][1] is not None,
                  agent_obs_shapes=agent_obs, agent_actions=agent_act)


class _AgentBatched(_InPlace):
    layout_of = staticmethod(layout_of_pettingzoo)

    def _setup(self):
        lay = self.layout
        self.agents = lay.agents
        self.num_agents = len(self.agents)
        self._index = {a: i for i, a in enumerate(self.agents)}
        self._has_mask = lay.mask_shape is not None
        self._env_masks = lay.env_masks
        self._mask = self.arrays.get("action_mask")
        self._alive = self.arrays["alive"]
        self._scalar_actions = self._act_shape == () and self._act_dtype.kind in "iu"
        # padded spaces (padded_spaces): per agent its own observation shape, action n or shape
        self._obs_own = None
        if lay.agent_obs_shapes is not None:
            full = lay.observation_space.shape
            self._obs_own = [None if shp == full else tuple(slice(0, n) for n in shp)
                             for shp in lay.agent_obs_shapes]
        self._act_own = self._own_masks = None
        if lay.agent_actions is not None:
            if isinstance(lay.action_space, spaces.Discrete):     # each agent's mask: its own n actions
                own_n = np.array([int(a.n) for a in lay.agent_actions], np.int64)
                n = int(lay.action_space.n)
                self._own_masks = (np.arange(n)[None, :] < own_n[:, None]).astype(np.int8)
            else:
                full = lay.action_space.shape
                self._act_own = [None if a.shape == full else tuple(slice(0, n) for n in a.shape)
                                 for a in lay.agent_actions]

    def _write(self, r, o, final=True, obs=True):
        """Row r's observation (split into observation / action mask where masked; padded where
        the agents' spaces differ)."""
        k = r % self.num_agents
        if self._env_masks:
            m = o["action_mask"]
            if self._own_masks is not None or len(m) != self._mask.shape[1]:
                self._mask[r] = 0
                self._mask[r, :len(m)] = m
            else:
                self._mask[r] = m
            o = o["observation"]
        elif self._own_masks is not None:
            self._mask[r] = self._own_masks[k]
        if self._obs_own is not None and self._obs_own[k] is not None:
            o = self._pad(o, k, r)
        if obs:
            self._obs.write(r, o)
        if final:
            self._final.write(r, o)

    def _pad(self, o, k, r):
        """Agent k's observation at the front of a zero array of the padded shape."""
        a = np.asarray(o)
        own = self._obs_own[k]
        if a.shape != tuple(sl.stop for sl in own):
            err = SpecError(mismatch("env", "obs", f"shape {tuple(sl.stop for sl in own)} (agent "
                                     f"{self.agents[k]!r}'s observation space)", f"shape {a.shape} from row "
                                     f"{r + self._obs.row_offset}"))
            err.rlflow_env_row = r
            raise err
        out = np.zeros(self._obs.shapes[0], self._obs.arrays[0].dtype)
        out[own] = a
        return out

    def _act(self, r, a):
        """Row r's padded Box action cut to its agent's shape. (Discrete actions need nothing
        here: VectorEnv.step checks each acting row against its agent's range before any env steps.)"""
        own = self._act_own[r % self.num_agents]
        return a if own is None else a[own].copy()

    def _clear(self):
        a = self.arrays
        a["reward"][:] = 0
        a["terminated"][:] = False
        a["truncated"][:] = False
        self._alive[:] = False

    def _masks_of_idle_rows(self):
        if self._has_mask:
            self._mask[~self._alive] = 0        # rows that do not act next have no legal action

    def _actions_list(self, actions):
        # array actions: rows of a copy (an env may keep its action, e.g. MPE applies them once
        # every agent acted; the given array is the caller's, or a worker's shared block)
        return actions.tolist() if self._scalar_actions else actions.copy()

    def _seed(self, seed, e):
        env = self.envs[e]
        fresh = getattr(env, "rlflow_unseeded_copy", False)   # a copy of an instance, never reset here
        if fresh:
            env.rlflow_unseeded_copy = False
        if seed is not None:
            return seed + self.seed_offset + e
        return int(np.random.SeedSequence().generate_state(1)[0] >> 1) if fresh else None


class ParallelVectorEnv(_AgentBatched):
    """PettingZoo ParallelEnvs, agent-batched: see the module docstring for the row semantics."""

    def reset_rows(self, seed) -> None:
        self._clear()
        for e, env in enumerate(self.envs):
            try:
                obs, _ = env.reset(seed=self._seed(seed, e))
            except BaseException as exc:     # SystemExit too: the worker's report names the env
                note_env_index(exc, self.seed_offset + e)
                raise
            self._start(e, env, obs, done=None)
        self._masks_of_idle_rows()

    def _start(self, e, env, obs, done):
        base = e * self.num_agents
        for agent, o in obs.items():
            r = base + self._index[agent]
            self._write(r, o, final=done is None or not done[r])
        for agent in env.agents:
            self._alive[base + self._index[agent]] = True

    def step_rows(self, actions) -> None:
        acts = self._actions_list(actions)
        self._obs.copy_to(self._final)
        self._clear()
        a = self.arrays
        reward, term, trunc = a["reward"], a["terminated"], a["truncated"]
        index, A = self._index, self.num_agents
        padded = self._act_own is not None
        for e, env in enumerate(self.envs):
            base = e * A
            try:
                if padded:
                    given = {g: self._act(base + index[g], acts[base + index[g]]) for g in env.agents}
                else:
                    given = {g: acts[base + index[g]] for g in env.agents}
                obs, rews, terms, truncs, _ = env.step(given)
                for g, o in obs.items():
                    self._write(base + index[g], o)
                for g, x in rews.items():
                    reward[base + index[g]] = x
                for g, x in terms.items():
                    term[base + index[g]] = x
                for g, x in truncs.items():
                    trunc[base + index[g]] = x
                if env.agents:
                    for g in env.agents:
                        self._alive[base + index[g]] = True
                else:                                   # every agent is done: same-step autoreset
                    obs, _ = env.reset()
                    self._start(e, env, obs, done=term | trunc)
            except BaseException as exc:     # SystemExit too: the worker's report names the env
                note_env_index(exc, self.seed_offset + e)
                raise
        self._masks_of_idle_rows()


class AECVectorEnv(_AgentBatched):
    """PettingZoo AECEnvs (turn-based), agent-batched: see the module docstring for the row semantics."""

    def reset_rows(self, seed) -> None:
        self._clear()
        for e, env in enumerate(self.envs):
            try:
                env.reset(seed=self._seed(seed, e))
                self._start(e, env, None)
            except BaseException as exc:     # SystemExit too: the worker's report names the env
                note_env_index(exc, self.seed_offset + e)
                raise
        self._masks_of_idle_rows()

    def _start(self, e, env, done):
        """Every agent's row gets the new episode's observation (final_obs too, unless done now);
        the first agent's row is alive. Rewards and flags of rows done now are kept."""
        base = e * self.num_agents
        for g in env.agents:
            r = base + self._index[g]
            self._write(r, env.observe(g), final=done is None or not done[r])
        self._alive[base + self._index[env.agent_selection]] = True

    def _advance(self, e, env):
        """Take dead steps (reporting those agents done) until a live agent is to act; reset the env
        when no agent is left. Marks the acting agent's row alive."""
        base = e * self.num_agents
        a = self.arrays
        while True:
            if not env.agents:                          # game over: same-step autoreset
                env.reset()
                self._start(e, env, a["terminated"] | a["truncated"])
                return
            g = env.agent_selection
            r = base + self._index[g]
            te, tr = env.terminations[g], env.truncations[g]
            a["reward"][r] = env._cumulative_rewards[g]
            self._write(r, env.observe(g))
            if te or tr:
                a["terminated"][r] = te
                a["truncated"][r] = tr
                env.step(None)                          # PettingZoo's dead step
                continue
            self._alive[r] = True
            return

    def step_rows(self, actions) -> None:
        acts = self._actions_list(actions)
        alive = self._alive.copy()
        self._obs.copy_to(self._final)
        self._clear()
        base = 0
        for e, env in enumerate(self.envs):
            try:
                g = env.agent_selection
                r = base + self._index[g]
                if not alive[r]:                        # cannot happen unless the env was touched
                    raise UsageError(mismatch("env", f"env {e}", f"agent {g!r} to act (its row alive)",
                                              "a row that was not alive"))
                env.step(acts[r] if self._act_own is None else self._act(r, acts[r]))
                self._advance(e, env)
            except BaseException as exc:     # SystemExit too: the worker's report names the env
                note_env_index(exc, self.seed_offset + e)
                raise
            base += self.num_agents
        self._masks_of_idle_rows()
