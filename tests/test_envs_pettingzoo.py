"""PettingZoo envs as agent-batched vector envs: row semantics, both APIs, both backends, into a table."""

import numpy as np
import pytest
from gymnasium import spaces
from pettingzoo.utils.env import ParallelEnv

import rlflow as rf
from rlflow.errors import SpecError, UsageError

tictactoe_v3 = pytest.importorskip("pettingzoo.classic.tictactoe_v3")
simple_spread_v3 = pytest.importorskip("mpe2.simple_spread_v3")


def ttt():
    return tictactoe_v3.env()


def spread_aec():
    return simple_spread_v3.env(N=3, max_cycles=7)


def spread_parallel():
    return simple_spread_v3.parallel_env(N=3, max_cycles=7)


def rps_aec():                 # a classic game with both APIs (tictactoe has only AEC)
    from pettingzoo.classic import rps_v2
    return rps_v2.env(max_cycles=5)


def rps_parallel():
    from pettingzoo.classic import rps_v2
    return rps_v2.parallel_env(max_cycles=5)


def legal_actions(step, rng):
    """A random legal action per row (0 for rows whose mask is empty: they are not alive)."""
    out = np.zeros(len(step), np.int64)
    for r, m in enumerate(step.action_mask):
        if m.any():
            out[r] = rng.choice(np.flatnonzero(m))
    return out


class Dying(ParallelEnv):
    """3 agents; agent k's episode ends after k + 1 steps (agent 2 truncated, the others terminated).
    obs = [agent, episode, t]; reward = 10 * agent + t."""

    metadata = {"name": "dying_v0"}
    possible_agents = ["a0", "a1", "a2"]

    def __init__(self):
        self.episode = -1

    def observation_space(self, agent):
        return spaces.Box(-1e9, 1e9, (3,), np.float32)

    def action_space(self, agent):
        return spaces.Discrete(2)

    def _obs(self, g):
        return np.array([self.possible_agents.index(g), self.episode, self.t], np.float32)

    def reset(self, seed=None, options=None):
        self.episode += 1
        self.t = 0
        self.agents = list(self.possible_agents)
        return {g: self._obs(g) for g in self.agents}, {g: {} for g in self.agents}

    def step(self, actions):
        assert set(actions) == set(self.agents), (actions, self.agents)
        self.t += 1
        obs = {g: self._obs(g) for g in actions}
        rew = {g: 10.0 * self.possible_agents.index(g) + self.t for g in actions}
        end = {g: self.t >= self.possible_agents.index(g) + 1 for g in actions}
        term = {g: end[g] and g != "a2" for g in actions}
        trunc = {g: end[g] and g == "a2" for g in actions}
        self.agents = [g for g in self.agents if not end[g]]
        return obs, rew, term, trunc, {g: {} for g in actions}


def test_parallel_rows_agents_die_then_autoreset():
    with rf.envs.make(Dying, 2) as venv:
        assert venv.num_envs == 6 and venv.spec.agents == ("a0", "a1", "a2")
        s = venv.reset(seed=0)
        assert s.alive.all() and s.action_mask is None
        a = np.zeros(6, np.int64)
        s = venv.step(a)                                       # t=1: a0 terminates
        np.testing.assert_array_equal(s.terminated, [1, 0, 0] * 2)
        np.testing.assert_array_equal(s.alive, [0, 1, 1] * 2)
        np.testing.assert_array_equal(s.reward, [1, 11, 21] * 2)
        np.testing.assert_array_equal(s.final_obs[0], [0, 0, 1])
        s = venv.step(a)                                       # t=2: a1 terminates, a0 idle
        np.testing.assert_array_equal(s.terminated, [0, 1, 0] * 2)
        np.testing.assert_array_equal(s.alive, [0, 0, 1] * 2)
        np.testing.assert_array_equal(s.reward, [0, 12, 22] * 2)
        s = venv.step(a)                                       # t=3: a2 truncated -> autoreset
        np.testing.assert_array_equal(s.truncated, [0, 0, 1] * 2)
        np.testing.assert_array_equal(s.terminated, [0] * 6)
        assert s.alive.all()
        np.testing.assert_array_equal(s.final_obs[2], [2, 0, 3])      # the true last obs
        np.testing.assert_array_equal(s.obs[:3], [[0, 1, 0], [1, 1, 0], [2, 1, 0]])   # new episode
        np.testing.assert_array_equal(s.final_obs[:2], s.obs[:2])     # rows not done: final = obs
        np.testing.assert_array_equal(s.info["episode_return"][2], 21 + 22 + 23)


def test_parallel_mpe_matches_the_env_stepped_by_hand():
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 5, (20, 2 * 3))
    envs = [spread_parallel() for _ in range(2)]
    obs = [e.reset(seed=5 + i)[0] for i, e in enumerate(envs)]
    with rf.envs.make(spread_parallel, 2) as venv:
        s = venv.reset(seed=5)
        np.testing.assert_array_equal(s.obs, np.concatenate([[o[g] for g in e.possible_agents]
                                                             for o, e in zip(obs, envs)]))
        for acts in actions:
            s = venv.step(acts)
            for i, e in enumerate(envs):
                agents = e.possible_agents
                o, r, te, tr, _ = e.step({g: int(acts[3 * i + k]) for k, g in enumerate(agents)})
                rows = slice(3 * i, 3 * i + 3)
                np.testing.assert_array_equal(s.final_obs[rows], [o[g] for g in agents])
                np.testing.assert_allclose(s.reward[rows], [r[g] for g in agents], rtol=1e-6)
                np.testing.assert_array_equal(s.truncated[rows], [tr[g] for g in agents])
                if not e.agents:
                    o = e.reset()[0]
                np.testing.assert_array_equal(s.obs[rows], [o[g] for g in agents])
                assert s.alive[rows].all()


def test_aec_tictactoe_rows_and_returns_match_agent_iter_replay():
    """Per-agent episode returns seen through the vector env equal those of a replay of the same
    actions through PettingZoo's own agent_iter loop."""
    rng = np.random.default_rng(1)
    n = 3
    applied = [[] for _ in range(n)]           # actions applied per env, in order
    returns = [[] for _ in range(n)]           # (agent, episode return) per env, in order of ending
    with rf.envs.make(ttt, n) as venv:
        s = venv.reset(seed=0)
        for _ in range(60):
            assert s.alive.reshape(n, 2).sum(1).tolist() == [1] * n        # one player to move
            assert (s.action_mask[~s.alive] == 0).all()
            acts = legal_actions(s, rng)
            for r in np.flatnonzero(s.alive):
                applied[r // 2].append(int(acts[r]))
            s = venv.step(acts)
            done = s.done.reshape(n, 2)
            assert (done[:, 0] == done[:, 1]).all()                  # the game ends for both at once
            for r in np.flatnonzero(s.done):
                returns[r // 2].append((r % 2, float(s.info["episode_return"][r])))
            assert (s.reward.reshape(n, 2)[done].reshape(-1, 2).sum(1) == 0).all()   # zero-sum
    for i in range(n):
        env = ttt()
        env.reset(seed=i)
        it = iter(applied[i])
        ref, totals = [], {g: 0.0 for g in env.possible_agents}
        finished = False
        while not finished:
            for g in env.agent_iter():
                _, rew, te, tr, _ = env.last()
                totals[g] += rew
                if te or tr:
                    ref.append((env.possible_agents.index(g), totals[g]))
                    totals[g] = 0.0
                    env.step(None)
                    continue
                a = next(it, None)
                if a is None:
                    finished = True
                    break
                env.step(a)
            else:
                env.reset()
        got = sorted(returns[i])
        assert sorted(ref[:len(got)]) == got and len(got) >= 2


@pytest.mark.parametrize("fn", [spread_aec, spread_parallel, ttt])
@pytest.mark.multiprocess
def test_process_backend_matches_serial(fn):
    rng = np.random.default_rng(2)
    runs = []
    for backend, kw in (("serial", {}), ("process", {"workers": 2})):
        with rf.envs.make(fn, 4, backend=backend, **kw) as venv:
            s = venv.reset(seed=3)
            out = [s]
            for _ in range(25):
                acts = legal_actions(s, rng) if s.action_mask is not None else rng.integers(0, 5, len(s))
                s = venv.step(acts)
                out.append(s)
            runs.append(out)
        rng = np.random.default_rng(2)
    for a, b in zip(*runs):
        for f in ("obs", "reward", "terminated", "truncated", "final_obs", "alive", "action_mask"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x, y, err_msg=f)


def test_aec_spread_reports_everyone_done_at_truncation():
    with rf.envs.make(spread_aec, 1) as venv:
        s = venv.reset(seed=0)
        truncs = []
        for t in range(3 * 7 + 3):
            assert s.alive.sum() == 1
            s = venv.step(np.zeros(3, np.int64))
            truncs.append(s.truncated.copy())
        truncs = np.array(truncs)
        end = int(np.flatnonzero(truncs.any(1))[0])
        assert truncs[end].all()                   # all three agents at once, in the same step
        assert s.reward.dtype == np.float32


class Mixed(ParallelEnv):
    """2 agents whose spaces rlflow cannot pad into one: a Box and a Discrete observation."""

    metadata = {"name": "mixed_v0"}
    possible_agents = ["a", "b"]

    def observation_space(self, agent):
        return spaces.Box(0, 1, (3,), np.float32) if agent == "a" else spaces.Discrete(4)

    def action_space(self, agent):
        return spaces.Discrete(2)


def test_agents_with_spaces_that_do_not_pad_are_rejected():
    with pytest.raises(UsageError, match=r"observation_space\('b'\).*pads Box observations.*got Discrete\(4\)"):
        rf.envs.make(Mixed, 1)


def tag_parallel():
    from mpe2 import simple_tag_v3
    return simple_tag_v3.parallel_env(max_cycles=9)


def tag_aec():
    from mpe2 import simple_tag_v3
    return simple_tag_v3.env(max_cycles=9)


def listener_parallel(continuous=False):
    from mpe2 import simple_speaker_listener_v4
    return simple_speaker_listener_v4.parallel_env(max_cycles=9, continuous_actions=continuous)


def listener_continuous():
    return listener_parallel(True)


def _pad(o, shape):
    out = np.zeros(shape, np.float32)
    out[tuple(slice(0, n) for n in np.shape(o))] = o
    return out


@pytest.mark.parametrize("fn", [tag_parallel, listener_parallel, listener_continuous])
def test_agents_of_different_spaces_are_padded_and_match_the_env_stepped_by_hand(fn):
    """MPE games whose agents see different numbers of values (simple_tag: 16 and 14) and take
    different actions (speaker_listener: Discrete(3) and Discrete(5), or Boxes (3,) and (5,)): each
    row holds its agent's observation at the front and zeros after, a Discrete agent's mask allows
    its own actions only, and the env gets each agent's own action (a Box cut to its shape)."""
    probe = fn()
    agents = probe.possible_agents
    own_obs = [probe.observation_space(g).shape for g in agents]
    own_act = [probe.action_space(g) for g in agents]
    rng = np.random.default_rng(0)
    envs = [fn() for _ in range(2)]
    A = len(agents)
    with rf.envs.make(fn, 2) as venv:
        space, act_space = venv.single_observation_space, venv.single_action_space
        assert space.shape == tuple(max(o[k] for o in own_obs) for k in range(len(own_obs[0])))
        s = venv.reset(seed=4)
        obs = [e.reset(seed=4 + i)[0] for i, e in enumerate(envs)]
        for t in range(20):
            want = np.stack([_pad(o[g], space.shape) for o, e in zip(obs, envs) for g in agents])
            np.testing.assert_array_equal(s.obs, want)
            assert space.contains(s.obs[0]) and space.contains(s.obs[A - 1])
            if isinstance(act_space, spaces.Discrete):
                if len({a.n for a in own_act}) > 1:
                    assert s.action_mask.shape == (2 * A, act_space.n)
                    np.testing.assert_array_equal(s.action_mask.sum(1), [a.n for a in own_act] * 2)
                acts = np.array([rng.integers(own_act[r % A].n) for r in range(2 * A)])
                given = [{g: int(acts[i * A + k]) for k, g in enumerate(agents)} for i in range(2)]
            else:
                acts = rng.random((2 * A,) + act_space.shape).astype(np.float32)
                given = [{g: acts[i * A + k][:own_act[k].shape[0]] for k, g in enumerate(agents)}
                         for i in range(2)]
            s = venv.step(acts)
            for i, e in enumerate(envs):
                o, r, te, tr, _ = e.step(given[i])
                rows = slice(A * i, A * i + A)
                np.testing.assert_array_equal(s.final_obs[rows], [_pad(o[g], space.shape) for g in agents])
                np.testing.assert_allclose(s.reward[rows], [r[g] for g in agents], rtol=1e-6)
                if not e.agents:
                    o = e.reset()[0]
                obs[i] = o


def test_an_action_outside_its_agents_own_range_names_the_agent():
    with rf.envs.make(listener_parallel, 1) as venv:     # speaker: Discrete(3), listener: Discrete(5)
        venv.reset(seed=0)
        with pytest.raises(rf.errors.SpecError, match=r"actions\[0\].*agent 'speaker_0'.*\[0, 2\].*got 4"):
            venv.step(np.array([4, 4]))


@pytest.mark.parametrize("fn,backend", [(tag_aec, "serial"), (listener_parallel, "serial"),
                                        pytest.param(tag_parallel, "process", marks=pytest.mark.multiprocess),
                                        pytest.param(tag_aec, "pool", marks=pytest.mark.multiprocess)])
def test_padded_agents_through_an_adder_into_a_table_match_serial(fn, backend):
    """The padded rows flow through an adder into a table alike on every backend."""
    def collect(backend):
        kw = {"serial": {}, "process": {"workers": 2}, "pool": {"workers": 2, "batch_size": 2}}[backend]
        rng = np.random.default_rng(1)
        with rf.envs.make(fn, 4, backend=backend, **kw) as venv:
            adder = rf.adders.Transition(discount=0.9)
            table = rf.Table.queue(10_000, specs=adder.item_specs(venv.spec))
            s = venv.reset(seed=2)
            adder.add_first(s)
            for _ in range(30):
                acts = legal_actions(s, rng) if s.action_mask is not None else rng.integers(0, 5, len(s))
                s = venv.step(acts)
                items = adder.add(acts, s)
                if len(items["reward"]):
                    table.insert(items)
            return table.sample(len(table)).data, venv.spec
    data, spec = collect(backend)
    assert len(data["obs"]) > 20 and data["obs"].shape[1:] == spec.observation_space.shape
    if backend != "pool":             # pool mode returns the envs in another order: compare sets
        ref, _ = collect("serial")
        for k in ref:
            np.testing.assert_array_equal(data[k], ref[k], err_msg=k)


@pytest.mark.parametrize("fn,backend", [(ttt, "serial"), (spread_aec, "serial"),
                                        (spread_parallel, "serial"), (rps_aec, "serial"), (rps_parallel, "serial"),
                                        pytest.param(ttt, "process", marks=pytest.mark.multiprocess),
                                        pytest.param(rps_parallel, "process", marks=pytest.mark.multiprocess),
                                        pytest.param(spread_parallel, "process",
                                                     marks=pytest.mark.multiprocess)])
def test_through_an_adder_into_a_table(fn, backend):
    rng = np.random.default_rng(0)
    kw = {"workers": 2} if backend == "process" else {}
    with rf.envs.make(fn, 2, backend=backend, **kw) as venv:
        adder = rf.adders.Transition(discount=0.5)
        specs = adder.item_specs(venv.spec)
        table = rf.Table(capacity=10_000, specs=specs)
        s = venv.reset(seed=0)
        adder.add_first(s)
        closed = 0
        open_ = np.zeros(len(s), bool)          # the row rule of rf.Step, counted by hand
        for _ in range(40):
            acts = (legal_actions(s, rng) if s.action_mask is not None
                    else rng.integers(0, venv.single_action_space.n, len(s)))
            open_ |= s.alive                    # these rows act now
            s = venv.step(acts)
            ends = open_ & (s.alive | s.done)
            closed += int(ends.sum())
            open_ &= ~ends
            items = adder.add(acts, s)
            if len(items["reward"]):
                table.insert(items)
        n = len(table)
        assert n == closed
        data = table.sample(n).data
        if fn is ttt:
            terminal = data["discount"] == 0
            assert terminal.any() and set(np.unique(data["reward"][terminal])) <= {-1.0, 0.0, 1.0}
            assert (data["reward"][~terminal] == 0).all()
        else:
            assert (data["discount"] == 0.5).all()   # MPE and rps only truncate: always bootstrap


@pytest.mark.parametrize("backend", ["serial", pytest.param("process", marks=pytest.mark.multiprocess)])
def test_multi_agent_episode_length_counts_the_agents_actions(backend):
    """Agent k of Dying acts k + 1 times an episode, in every episode: an agent that left early is
    alive again at the autoreset step, which is no action of the new episode (as after reset())."""
    kw = {} if backend == "serial" else {"workers": 1, "inline": False}
    with rf.envs.make(Dying, 2, backend=backend, **kw) as venv:
        venv.reset(seed=0)
        ended = []
        for _ in range(9):                  # three episodes
            s = venv.step(np.zeros(6, np.int64))
            for r in np.flatnonzero(s.done):
                ended.append((r % 3, int(s.info["episode_length"][r])))
        assert ended == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3)] * 3


def test_aec_episode_length_counts_each_players_moves():
    """Tic-tac-toe: each player's episode_length at the end is the number of its moves (the player
    who moves second is alive from the first step on, but has not acted then)."""
    rng = np.random.default_rng(0)
    with rf.envs.make(ttt, 1) as venv:
        s = venv.reset(seed=0)
        moves = {0: 0, 1: 0}
        checked = 0
        for _ in range(60):
            acting = np.flatnonzero(s.alive)
            s = venv.step(legal_actions(s, rng))
            for r in acting:
                moves[int(r)] += 1
            for r in np.flatnonzero(s.done):
                assert s.info["episode_length"][r] == moves[int(r)], (r, moves)
                checked += 1
            if s.done.any():
                moves = {0: 0, 1: 0}
        assert checked >= 4


class KeepsActions(ParallelEnv):
    """2 agents with Box(2) actions, applied only at the end of the episode (as MPE applies all
    agents' actions once each acted): an env may keep the action arrays it is given."""

    metadata = {"name": "keeps_v0"}
    possible_agents = ["a", "b"]

    def observation_space(self, agent):
        return spaces.Box(-1e9, 1e9, (2,), np.float32)

    def action_space(self, agent):
        return spaces.Box(-10, 10, (2,), np.float32)

    def reset(self, seed=None, options=None):
        self.agents, self.kept, self.t = list(self.possible_agents), [], 0
        return {g: np.zeros(2, np.float32) for g in self.agents}, {g: {} for g in self.agents}

    def step(self, actions):
        self.t += 1
        self.kept.append(actions["a"])                  # kept, not copied
        obs = {g: np.array(sum(self.kept), np.float32) for g in actions}
        end = self.t >= 3
        if end:
            self.agents = []
        return (obs, {g: 0.0 for g in actions}, {g: end for g in actions}, {g: False for g in actions},
                {g: {} for g in actions})


@pytest.mark.parametrize("backend", ["serial", pytest.param("process", marks=pytest.mark.multiprocess)])
def test_an_env_that_keeps_its_actions_sees_them_unchanged(backend):
    """The actions array is the caller's (or a worker's shared block, rewritten every step): each
    env gets its own copy, so an action it kept is the one it was given."""
    kw = {} if backend == "serial" else {"workers": 1, "inline": False}
    with rf.envs.make(KeepsActions, 2, backend=backend, **kw) as venv:
        venv.reset(seed=0)
        buf = np.zeros((4, 2), np.float32)          # one buffer, rewritten between steps
        for t in range(1, 4):
            buf[:] = t
            s = venv.step(buf)
        np.testing.assert_array_equal(s.final_obs[0], [6, 6])      # 1 + 2 + 3, not 3 + 3 + 3


def test_aec_step_after_an_env_raised_asks_for_a_reset_then_plays_on():
    """An out-of-range action of an acting row is refused before any env moves (a SpecError in the
    calling process: the envs are as they were, play goes on); an env that raises mid-step leaves
    the vector env half-stepped: the next step asks for a reset (it used to blame the caller: 'a
    row that was not alive', on every later step)."""
    with rf.envs.make(ttt, 2) as venv:
        s = venv.reset(seed=0)
        bad = legal_actions(s, np.random.default_rng(0))
        bad[np.flatnonzero(s.alive)[0]] = 99
        with pytest.raises(SpecError, match="action"):
            venv.step(bad)
        s = venv.step(legal_actions(s, np.random.default_rng(0)))       # nothing had moved
        env1 = venv.envs[1]
        original = env1.step
        env1.step = lambda action: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            venv.step(legal_actions(s, np.random.default_rng(0)))
        env1.step = original
        with pytest.raises(UsageError, match=r"reset\(\) after an env raised"):
            venv.step(legal_actions(s, np.random.default_rng(0)))
        s = venv.reset(seed=0)
        rng = np.random.default_rng(1)
        for _ in range(20):
            s = venv.step(legal_actions(s, rng))
        assert s.alive.sum() == 2


class LowestLegal(rf.Policy):
    """Tictactoe's lowest legal square: every game is the same, player_1 wins (+1, player_2 -1)."""

    def __init__(self, spec=None):
        pass

    def act_step(self, step):
        return np.argmax(step.action_mask, axis=1)


@pytest.mark.parametrize("num_envs, episodes", [(5, 5), (5, 3), (2, 5), (1, 1)])
def test_evaluate_counts_whole_games_with_every_agent(num_envs, episodes):
    """rf.evaluate on agents x envs rows took `episodes` ROWS: 5 episodes on 5 tictactoe envs were
    env 0's and env 1's two players and env 2's first (mean 0.2, envs 3 and 4 never counted). Now
    `episodes` games, every agent of each: mean 0 over 2 * episodes agent-episodes."""
    with rf.envs.make(ttt, num_envs=num_envs) as venv:
        out = rf.evaluate(LowestLegal(), venv, episodes=episodes, seed=0)
    assert out["episodes"] == episodes
    assert out["mean_return"] == 0.0 and out["min_return"] == -1.0 and out["max_return"] == 1.0, out
    # the winner makes 4 moves (squares 0, 2, 4, 6), the loser 3: a mean of 3.5 per agent-episode
    assert out["mean_length"] == 3.5, out


def test_run_evaluations_on_a_game_count_both_players():
    """The runtime's evaluations (eval_episodes games) average both players: 0 here, never the
    0.2 that let target_return=0.1 stop the run at its first evaluation."""
    exp = rf.Experiment(env=ttt, policy=LowestLegal, learner=lambda spec: _NoLearner(),
                        adder=rf.adders.Transition(discount=0.99), table=_queue_table, batch_size=4,
                        eval_every=200, eval_episodes=5, target_return=0.1)
    r = rf.run(exp, backend="local", max_env_steps=600, progress=False)
    assert r.evals and all(abs(ret) < 1e-12 for _, _, ret in r.evals), r.evals   # (env steps, time, return)
    assert r.solved_at is None


class _NoLearner(rf.Learner):
    def step(self, batch):
        return {}


def _queue_table(specs):
    return rf.Table(capacity=10_000, sampler=rf.selectors.Uniform(seed=0), remover=rf.selectors.Fifo(),
                    rate_limiter=rf.rate_limiters.MinSize(1), specs=specs)


class LeavesEarly(ParallelEnv):
    """a0 leaves after 1 step with return 0; a1 plays 3 steps and gets 10 on its last: every game's
    agents average 5."""
    metadata = {"name": "leaves_early_v0"}
    possible_agents = ["a0", "a1"]

    def observation_space(self, agent):
        return spaces.Box(0, 10, (1,), np.float32)

    def action_space(self, agent):
        return spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        self.t = 0
        self.agents = list(self.possible_agents)
        return {g: np.zeros(1, np.float32) for g in self.agents}, {g: {} for g in self.agents}

    def step(self, actions):
        self.t += 1
        obs = {g: np.full(1, self.t, np.float32) for g in actions}
        rew = {g: (10.0 if (g == "a1" and self.t == 3) else 0.0) for g in actions}
        end = {g: (g == "a0" and self.t == 1) or self.t == 3 for g in actions}
        self.agents = [g for g in self.agents if not end[g]]
        return obs, rew, end, {g: False for g in actions}, {g: {} for g in actions}


@pytest.mark.parametrize("num_envs, games", [(3, 3), (1, 3), (2, 3), (2, 5)])
def test_evaluate_with_fewer_envs_than_games_counts_whole_games(num_envs, games):
    """With fewer envs than games, agent-episodes were counted as they ended: the agents that leave
    early of games still running came in, their teammates did not (2 envs, 3 games: mean 3.33)."""
    class Zero(rf.Policy):
        def act(self, obs):
            return np.zeros(len(obs), np.int64)

    with rf.envs.make(LeavesEarly, num_envs=num_envs) as venv:
        out = rf.evaluate(Zero(), venv, games, seed=0)
    assert out["episodes"] == games
    assert out["mean_return"] == 5.0 and out["mean_length"] == 2.0, out


def chess_aec():
    from pettingzoo.classic import chess_v6
    return chess_v6.env()


def leduc_aec():
    from pettingzoo.classic import leduc_holdem_v4
    return leduc_holdem_v4.env()


def pistonball_parallel():
    from pettingzoo.butterfly import pistonball_v6
    return pistonball_v6.parallel_env(n_pistons=4, max_cycles=6)


def pistonball_aec():
    from pettingzoo.butterfly import pistonball_v6
    return pistonball_v6.env(n_pistons=4, max_cycles=6, continuous=False)


@pytest.mark.parametrize("fn", [chess_aec, leduc_aec, pistonball_parallel, pistonball_aec])
def test_classic_and_butterfly_games_of_the_pettingzoo_extra_run_into_a_table(fn):
    """The `pettingzoo` extra installs what chess (chess), the card games (rlcard) and butterfly
    (pymunk) need; each plays through an adder into a table, ending episodes on the way."""
    rng = np.random.default_rng(0)
    with rf.envs.make(fn, 2) as venv:
        adder = rf.adders.Transition(discount=0.9)
        table = rf.Table.queue(500, specs=adder.item_specs(venv.spec))    # pistonball: 160 kB an obs
        s = venv.reset(seed=0)
        adder.add_first(s)
        ended = 0
        for _ in range(12):
            if s.action_mask is not None:
                acts = legal_actions(s, rng)
            else:
                acts = rf.actor.random_actions(venv.single_action_space, len(s), rng)
            s = venv.step(acts)
            ended += int(s.done.sum())
            items = adder.add(acts, s)
            if len(items["reward"]):
                table.insert(items)
        assert len(table) > 0 and table.sample(len(table)).data["obs"].shape[1:] == venv.single_observation_space.shape
        if fn is not chess_aec:
            assert ended > 0


class Hetero(ParallelEnv):
    """Agents with the given observation and action spaces; step asserts each action is in its
    agent's own space (as MPE's and most envs' checks do). obs: zeros; episodes of 5 steps."""

    metadata = {"name": "hetero_v0"}

    def __init__(self, obs_spaces, act_spaces):
        self.possible_agents = [f"g{k}" for k in range(len(obs_spaces))]
        self._obs = dict(zip(self.possible_agents, obs_spaces))
        self._act = dict(zip(self.possible_agents, act_spaces))

    def observation_space(self, agent):
        return self._obs[agent]

    def action_space(self, agent):
        return self._act[agent]

    def _observe(self, g):
        sp = self._obs[g]
        return np.clip(np.zeros(sp.shape, sp.dtype), sp.low, sp.high)

    def reset(self, seed=None, options=None):
        self.agents, self.t = list(self.possible_agents), 0
        return {g: self._observe(g) for g in self.agents}, {g: {} for g in self.agents}

    def step(self, actions):
        for g, a in actions.items():
            assert self._act[g].contains(np.asarray(a, self._act[g].dtype)), (g, a)
        self.t += 1
        end = self.t >= 5
        obs = {g: self._observe(g) for g in actions}
        out = obs, {g: 1.0 for g in actions}, {g: False for g in actions}, {g: end for g in actions}
        if end:
            self.agents = []
        return (*out, {g: {} for g in actions})


def box_actions_env():
    return Hetero([spaces.Box(-1, 1, (3,), np.float32)] * 2,
                  [spaces.Box(0.5, 1, (2,), np.float32), spaces.Box(0.5, 1, (4,), np.float32)])


class ThreeQuarters(rf.Policy):
    def __init__(self, spec):
        self.shape = spec.action_space.shape

    def act(self, obs):
        return np.full((len(obs),) + self.shape, 0.75, np.float32)


def _no_learner(spec):
    return _NoLearner()


@pytest.mark.parametrize("backend", ["local", pytest.param("process", marks=pytest.mark.multiprocess)])
def test_random_warm_up_draws_each_agents_own_box_actions(backend):
    """Padded Box actions: Box(0.5, 1, (2,)) and Box(0.5, 1, (4,)) share Box([.5 .5 0 0], 1, (4,)); the
    warm-up drew from that, and the first agent's env got values below 0.5 (its assert failed)."""
    exp = rf.Experiment(env=box_actions_env, policy=ThreeQuarters, learner=_no_learner, adder=rf.adders.Transition(0.9),
                        table=_queue_table, batch_size=4, num_envs=2, warmup_steps=10_000)
    r = rf.run(exp, backend=backend, max_env_steps=400, progress=False)
    assert r.figures["env_steps"] >= 400
    acts = r.table.sample(len(r.table)).data["action"] if len(r.table) else None
    if acts is not None:
        first = acts[:, :2]
        assert (first >= 0.5).all() and (first <= 1).all()


@pytest.mark.parametrize("backend,kw", [("process", {"workers": 2, "inline": False}),
                                        ("pool", {"workers": 2, "batch_size": 2})])
@pytest.mark.multiprocess
def test_an_action_outside_its_agents_range_is_the_same_error_on_every_backend(backend, kw):
    """Checked before any env steps: a SpecError naming the caller's position (a worker named its own
    row, inside a WorkerError that closed the vector env; pool mode raised it only at close())."""
    with rf.envs.make(listener_parallel, 4, backend=backend, **kw) as venv:
        s = venv.reset(seed=0)
        a = np.zeros(len(s), np.int64)
        j = int(np.flatnonzero(s.env_ids % 2 == 0)[-1])         # a speaker's row: Discrete(3)
        a[j] = 4
        with pytest.raises(rf.errors.SpecError, match=rf"actions\[{j}\].*agent 'speaker_0' \(row "
                                                       rf"{s.env_ids[j]}\).*\[0, 2\].*got 4"):
            venv.step(a)
        a[j] = 2
        s = venv.step(a)                        # nothing was sent: the vector env goes on
        assert len(s) > 0


def test_the_agent_that_breaks_the_padding_is_the_one_named():
    box = spaces.Box(-1, 1, (3,), np.float32)
    with pytest.raises(UsageError, match=r"observation_space\('g2'\).*got Box\(-1.0, 1.0, \(4,\), float64\)"):
        rf.envs.make(lambda: Hetero([box, spaces.Box(-1, 1, (4,), np.float32), spaces.Box(-1, 1, (4,), np.float64)],
                                    [spaces.Discrete(2)] * 3), 1)
    with pytest.raises(UsageError, match=r"action_space\('g2'\).*got MultiDiscrete"):
        rf.envs.make(lambda: Hetero([box] * 3, [spaces.Discrete(3), spaces.Discrete(5), spaces.MultiDiscrete([2, 2])]), 1)


def test_integer_bounds_at_the_dtypes_extremes_pad_exactly():
    big = np.iinfo(np.int64).max
    with rf.envs.make(lambda: Hetero([spaces.Box(0, big, (2,), np.int64), spaces.Box(0, big, (3,), np.int64)],
                                     [spaces.Discrete(2)] * 2), 1) as venv:
        space = venv.single_observation_space
        assert space.shape == (3,) and space.dtype == np.int64 and (space.high == big).all() and (space.low == 0).all()
        s = venv.reset(seed=0)
        assert space.contains(s.obs[0]) and space.contains(s.obs[1])


class DyingMulti(Dying):
    """Dying with MultiDiscrete actions (the env records what it received)."""
    space = spaces.MultiDiscrete([3, 4])

    def action_space(self, agent):
        return self.space

    def step(self, actions):
        self.received = dict(actions)
        return super().step(actions)


class DyingBinary(DyingMulti):
    space = spaces.MultiBinary(3)


@pytest.mark.parametrize("cls,good,bad", [(Dying, 1, 7), (DyingMulti, [2, 3], [5, 7]),
                                          (DyingBinary, [1, 0, 1], [2, 0, -1])])
def test_multi_agent_actions_out_of_range_in_acting_rows_are_named(cls, good, bad):
    """An acting agent's Discrete 7 of Discrete(2) (all agents alike), a MultiDiscrete [5, 7] or
    a MultiBinary 2 reached the env unchecked; rows that do not act may still hold anything."""
    venv = rf.envs.make(cls, 2)
    step = venv.reset(seed=0)
    dtype = venv.single_action_space.dtype
    acts = np.array([good] * len(step), dtype)
    step = venv.step(acts)                           # agent a0 of each env ends: its rows stop acting
    assert not step.alive[0]
    acts = np.array([good] * len(step), dtype)
    acts[0] = bad                                    # a row that does not act: anything goes
    step = venv.step(acts)
    acts = np.array([good] * len(step), dtype)
    acts[2] = bad                                    # env 0's a2 acts
    with pytest.raises(SpecError, match=r"actions\[2\].*agent 'a2'"):
        venv.step(acts)
    venv.close()


class _SitsOut(ParallelEnv):
    """possible_agents a, b, c; c plays every `every`-th game (never with every=0); every game lasts
    3 steps, each agent gets 1 a step."""
    metadata = {"name": "sits_out"}
    every = 0

    def __init__(self):
        self.possible_agents = ["a", "b", "c"]
        self.agents = []
        self.games = 0

    def observation_space(self, agent):
        return spaces.Box(-1, 1, (2,), np.float32)

    def action_space(self, agent):
        return spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        self.games += 1
        plays = self.every and self.games % self.every == 0
        self.agents, self.t = (["a", "b", "c"] if plays else ["a", "b"]), 0
        return {g: np.zeros(2, np.float32) for g in self.agents}, {g: {} for g in self.agents}

    def step(self, actions):
        self.t += 1
        obs = {g: np.full(2, self.t / 10, np.float32) for g in self.agents}
        trunc = {g: self.t >= 3 for g in self.agents}
        out = (obs, {g: 1.0 for g in self.agents}, {g: False for g in self.agents}, trunc, {g: {} for g in obs})
        if self.t >= 3:
            self.agents = []
        return out


class _SitsOutEveryOther(_SitsOut):
    every = 2


@pytest.mark.parametrize("env", [_SitsOut, _SitsOutEveryOther])
@pytest.mark.parametrize("num_envs,episodes", [(2, 2), (1, 3), (4, 2)])
def test_evaluate_counts_games_an_agent_sat_out(env, num_envs, episodes):
    """A game that began with fewer agents than possible_agents never counted (the absent agent's
    row never ends): rf.evaluate, and every run with eval_every, hung."""
    class Zero(rf.Policy):
        def act(self, obs):
            return np.zeros(len(obs), np.int64)

    with rf.envs.make(env, num_envs=num_envs) as venv:
        out = rf.evaluate(Zero(), venv, episodes=episodes)
    assert out["episodes"] == episodes
    assert out["mean_return"] == 3.0 and out["mean_length"] == 3.0


class _FoldFirst(rf.Policy):
    """Leduc hold'em: fold whenever folding is legal (player_0 folds at its first move, so player_1
    wins +0.5 without ever acting)."""

    def act_step(self, step):
        m = step.action_mask
        return np.where(m[:, 2] == 1, 2, np.argmax(m, axis=1)).astype(np.int64)


@pytest.mark.parametrize("num_envs, games", [(8, 4), (2, 4), (1, 3)])
@pytest.mark.parametrize("backend", ["serial", "process"])
def test_evaluate_counts_a_player_that_won_without_a_move(backend, num_envs, games):
    """A poker player whose opponent folded at once ends the game without ever being alive: it was
    left out (8 envs, 4 games: mean -0.5, only the losers). Zero-sum: every game's two players
    average 0, as a reference loop over PettingZoo's agent_iter says."""
    leduc = pytest.importorskip("pettingzoo.classic.leduc_holdem_v4")
    kw = {"workers": 1} if backend == "process" else {}
    with rf.envs.make(leduc.env, num_envs=num_envs, backend=backend, **kw) as venv:
        out = rf.evaluate(_FoldFirst(), venv, games, seed=0)
    assert out["episodes"] == games
    assert out["mean_return"] == 0.0 and out["min_return"] == -0.5 and out["max_return"] == 0.5, out
    assert out["mean_length"] == 0.5, out          # the folder moved once, the winner never


class _OwnRng(ParallelEnv):
    """Keeps its generator across unseeded resets (as gymnasium envs do); deep copies copy it."""
    metadata = {"name": "own_rng_v0"}
    possible_agents = ["a0", "a1"]

    def observation_space(self, agent):
        return spaces.Box(0, 1, (2,), np.float64)

    def action_space(self, agent):
        return spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        if seed is not None or not hasattr(self, "rng"):
            self.rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self.t = 0
        return {g: self.rng.random(2) for g in self.agents}, {g: {} for g in self.agents}

    def step(self, actions):
        self.t += 1
        obs = {g: self.rng.random(2) for g in actions}
        end = {g: self.t == 5 for g in actions}
        self.agents = [] if self.t == 5 else self.agents
        return obs, {g: 0.0 for g in actions}, end, {g: False for g in actions}, {g: {} for g in actions}


@pytest.mark.parametrize("backend", ["serial", "process"])
def test_copies_of_a_reset_pettingzoo_instance_play_their_own_episodes(backend):
    """Copies of a PettingZoo instance that was reset with a seed kept its generator: on an unseeded
    reset every copy played the same episodes (as the docstring of make promises otherwise). Each
    copy now draws a seed of its own at its first unseeded reset; seeded resets stay seeded."""
    inst = _OwnRng()
    inst.reset(seed=0)
    kw = {"workers": 2, "inline": False} if backend == "process" else {}
    with rf.envs.make(inst, num_envs=3, backend=backend, **kw) as venv:
        step = venv.reset()
        obs = [step.obs.reshape(3, 2, 2)]
        for _ in range(12):                      # through two autoresets
            step = venv.step(np.ones(len(step), np.int64))
            obs.append(step.obs.reshape(3, 2, 2))
        o = np.stack(obs)
        assert not np.array_equal(o[:, 1], o[:, 2]), "copies 1 and 2 played the same episodes"
        first = venv.reset(seed=5).obs.copy()
        assert np.array_equal(venv.reset(seed=5).obs, first)


def test_copies_of_an_instance_stay_reproducible_after_a_seeded_reset():
    """A copy drew a seed of its own at its first unseeded reset even after a seeded one: two
    identical programs (reset(seed=3), then reset()) differed."""
    def program():
        inst = _OwnRng()
        inst.reset(seed=0)
        with rf.envs.make(inst, num_envs=3) as venv:
            venv.reset(seed=3)
            return venv.reset().obs.copy()
    assert np.array_equal(program(), program())
