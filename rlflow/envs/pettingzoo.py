"""PettingZoo envs as agent-batched vector envs: one row per (env, agent).

    row = env_index * num_agents + agent_index         agents: env.possible_agents, in that order

All agents must share one observation space and one action space. Where an agent's observation is a
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

from gymnasium import spaces

from rlflow.envs.vector import Layout, _InPlace, note_env_index
from rlflow.errors import UsageError, mismatch

__all__ = ["ParallelVectorEnv", "AECVectorEnv"]


def _masked(space) -> bool:
    return (isinstance(space, spaces.Dict) and set(space.spaces) == {"observation", "action_mask"})


def layout_of_pettingzoo(env) -> Layout:
    agents = tuple(env.possible_agents)
    if not agents:
        raise UsageError(mismatch("env", "possible_agents", "at least one agent", "none"))
    obs_space = env.observation_space(agents[0])
    act_space = env.action_space(agents[0])
    for a in agents[1:]:
        if env.observation_space(a) != obs_space:
            raise UsageError(mismatch("env", f"observation_space({a!r})", f"the space of agent "
                                      f"{agents[0]!r}, {obs_space} (all agents must share one space)",
                                      env.observation_space(a)))
        if env.action_space(a) != act_space:
            raise UsageError(mismatch("env", f"action_space({a!r})", f"the space of agent "
                                      f"{agents[0]!r}, {act_space} (all agents must share one space)",
                                      env.action_space(a)))
    mask_shape = None
    if _masked(obs_space):
        mask_shape = obs_space.spaces["action_mask"].shape
        obs_space = obs_space.spaces["observation"]
    return Layout(obs_space, act_space, agents=agents, mask_shape=mask_shape)


class _AgentBatched(_InPlace):
    layout_of = staticmethod(layout_of_pettingzoo)

    def _setup(self):
        self.agents = self.layout.agents
        self.num_agents = len(self.agents)
        self._index = {a: i for i, a in enumerate(self.agents)}
        self._has_mask = self.layout.mask_shape is not None
        self._mask = self.arrays.get("action_mask")
        self._alive = self.arrays["alive"]
        self._scalar_actions = self._act_shape == () and self._act_dtype.kind in "iu"

    def _write(self, r, o, final=True, obs=True):
        """Row r's observation (split into observation / action mask where masked)."""
        if self._has_mask:
            self._mask[r] = o["action_mask"]
            o = o["observation"]
        if obs:
            self._obs.write(r, o)
        if final:
            self._final.write(r, o)

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
        return None if seed is None else seed + self.seed_offset + e


class ParallelVectorEnv(_AgentBatched):
    """PettingZoo ParallelEnvs, agent-batched: see the module docstring for the row semantics."""

    def reset_rows(self, seed) -> None:
        self._clear()
        for e, env in enumerate(self.envs):
            try:
                obs, _ = env.reset(seed=self._seed(seed, e))
            except Exception as exc:
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
        for e, env in enumerate(self.envs):
            base = e * A
            try:
                obs, rews, terms, truncs, _ = env.step({g: acts[base + index[g]] for g in env.agents})
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
            except Exception as exc:
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
            except Exception as exc:
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
                env.step(acts[r])
                self._advance(e, env)
            except Exception as exc:
                note_env_index(exc, self.seed_offset + e)
                raise
            base += self.num_agents
        self._masks_of_idle_rows()
