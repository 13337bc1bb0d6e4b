"""Tests of the dueling double DQN agent on hand-computed targets and a chain MDP."""

import json
import pickle

import numpy as np
import pytest
import torch

from dvmrl.agent import (
    AgentConfig,
    AgentFileError,
    DivergenceError,
    DQNAgent,
    DuelingQNetwork,
    ReplayBuffer,
    double_dqn_target,
    run_episode,
)


class ChainEnv:
    """Deterministic chain 0 .. n-1 with actions left (0), right (1) and jump (2).

    Moving right from the last state pays 1 and terminates. Left from state
    0 stays there. The observation is one-hot. Episodes are truncated after
    ``max_steps`` steps, and the observation carries no clock, so
    truncation must not stop bootstrapping.

    With discount gamma the optimal values are Q*(s, right) = gamma^(n-1-s)
    and Q*(s, left) = gamma * V*(max(s-1, 0)), which is gamma^(n-s+1) for
    s >= 1 and gamma^n for s = 0. Action 2 (jump) would pay 10 and terminate, but it
    is always masked.
    """

    action_names = ["left", "right", "jump"]

    def __init__(self, n=5, max_steps=12, seed=0):
        self.n = n
        self.max_steps = max_steps
        self.rng = np.random.default_rng(seed)
        self.state = 0
        self.t = 0

    def _obs(self):
        x = np.zeros(self.n, dtype=np.float32)
        x[self.state] = 1.0
        return x

    def _info(self):
        return {"action_mask": np.array([True, True, False]), "state": self.state}

    def reset(self, seed=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        # Random starts cover every state, so all Q-values get learned.
        self.state = int(self.rng.integers(0, self.n))
        self.t = 0
        return self._obs(), self._info()

    def step(self, action):
        assert action != 2, "masked action chosen"
        self.t += 1
        reward = 0.0
        terminated = False
        if action == 1:
            if self.state == self.n - 1:
                reward, terminated = 1.0, True
            else:
                self.state += 1
        else:
            self.state = max(self.state - 1, 0)
        truncated = (not terminated) and self.t >= self.max_steps
        return self._obs(), reward, terminated, truncated, self._info()


def optimal_q(n, gamma):
    q = np.zeros((n, 2))
    for s in range(n):
        q[s, 1] = gamma ** (n - 1 - s)
        q[s, 0] = gamma ** (n - s + 1) if s >= 1 else gamma**n
    return q


def test_target_hand_computed():
    reward = torch.tensor([1.0, 0.5, -1.0])
    online = torch.tensor([[1.0, 3.0], [5.0, 2.0], [0.0, 9.0]])
    target = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    terminated = torch.tensor([False, False, True])
    y = double_dqn_target(reward, online, target, 0.9, terminated)
    # Row 0: online picks a=1, target scores 20 -> 1 + 0.9 * 20 = 19.
    assert y[0].item() == pytest.approx(19.0)
    # Row 1: online picks a=0, target scores 30 -> 0.5 + 27 = 27.5.
    assert y[1].item() == pytest.approx(27.5)
    # Row 2: terminated, so no bootstrap.
    assert y[2].item() == pytest.approx(-1.0)


def test_target_uses_online_argmax():
    # The target network's own argmax (a=0) must not be used.
    y = double_dqn_target(
        torch.tensor([0.0]),
        torch.tensor([[0.0, 1.0]]),
        torch.tensor([[100.0, 2.0]]),
        1.0,
        torch.tensor([0.0]),
    )
    assert y.item() == pytest.approx(2.0)


def test_target_mask_excludes_argmax():
    mask = torch.tensor([[True, False, True]])
    y = double_dqn_target(
        torch.tensor([0.0]),
        torch.tensor([[1.0, 9.0, 2.0]]),
        torch.tensor([[10.0, 20.0, 30.0]]),
        0.5,
        torch.tensor([False]),
        next_action_mask=mask,
    )
    # a=1 is masked; the best valid online action is a=2 -> 0.5 * 30.
    assert y.item() == pytest.approx(15.0)


def test_target_empty_mask_nonterminal():
    with pytest.raises(ValueError, match="every action masked"):
        double_dqn_target(
            torch.tensor([0.0]),
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            0.9,
            torch.tensor([False]),
            next_action_mask=torch.tensor([[False, False]]),
        )


def test_target_empty_mask_terminal():
    y = double_dqn_target(
        torch.tensor([2.0]),
        torch.zeros(1, 2),
        torch.zeros(1, 2),
        0.9,
        torch.tensor([True]),
        next_action_mask=torch.tensor([[False, False]]),
    )
    assert y.item() == pytest.approx(2.0)


def test_target_shape_mismatch():
    with pytest.raises(ValueError, match=r"\[B, A\]"):
        double_dqn_target(
            torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 4), 0.9, torch.zeros(2)
        )


def test_dueling_mean_advantage_zero():
    net = DuelingQNetwork(4, 3, (8,), 8)
    x = torch.randn(5, 4)
    q = net(x)
    value = net.value(net.trunk(x))
    # Q averaged over actions equals V because the advantage is mean-subtracted.
    assert torch.allclose(q.mean(dim=1, keepdim=True), value, atol=1e-6)


@pytest.fixture()
def one_thread():
    # Tiny networks run fastest on one thread, and more threads only contend
    # for the cores on a loaded machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_chain_learns_optimal_q(one_thread):
    gamma = 0.9
    config = AgentConfig(
        hidden=(32,),
        stream_hidden=16,
        gamma=gamma,
        lr=3e-3,
        batch_size=64,
        learning_starts=100,
        target_update="hard",
        target_update_interval=100,
        epsilon_decay_steps=1500,
        epsilon_end=0.1,
        seed=0,
    )
    env = ChainEnv(n=5, max_steps=12, seed=0)
    agent = DQNAgent(5, 3, config)
    while agent.env_steps < 4000:
        run_episode(agent, env, learn=True)
    q = agent.q_values(np.eye(5, dtype=np.float32))
    expected = optimal_q(5, gamma)
    greedy = q[:, :2].argmax(axis=1)
    assert (greedy == 1).all(), f"greedy actions {greedy}"
    np.testing.assert_allclose(q[:, :2], expected, atol=0.05)


def test_chain_greedy_episode_reaches_goal():
    agent = DQNAgent(5, 3, AgentConfig(hidden=(16,), stream_hidden=8, seed=1))
    with torch.no_grad():
        for p in agent.online.parameters():
            p.zero_()
        # Make the advantage of "jump" (masked) the largest, then "right".
        agent.online.advantage[2].bias.copy_(torch.tensor([0.0, 1.0, 5.0]))
    env = ChainEnv(n=5, max_steps=12, seed=3)
    result = run_episode(agent, env, learn=False)
    assert result.terminated
    assert result.total_return == 1.0
    assert all(row["action_name"] == "right" for row in result.trajectory)


def test_act_never_picks_masked():
    agent = DQNAgent(3, 6, AgentConfig(hidden=(8,), stream_hidden=8, seed=2))
    mask = np.array([False, True, False, True, False, False])
    obs = np.zeros(3, dtype=np.float32)
    explored = {agent.act(obs, mask, explore=True) for _ in range(300)}
    greedy = {agent.act(np.random.default_rng(i).normal(size=3), mask, explore=False)
              for i in range(50)}
    assert explored <= {1, 3}
    assert explored == {1, 3}
    assert greedy <= {1, 3}


def test_act_rejects_empty_mask():
    agent = DQNAgent(3, 2, AgentConfig(hidden=(8,), stream_hidden=8))
    with pytest.raises(ValueError, match="no valid action"):
        agent.act(np.zeros(3), np.array([False, False]))


def test_epsilon_schedule_linear():
    agent = DQNAgent(
        2, 2, AgentConfig(epsilon_start=1.0, epsilon_end=0.1, epsilon_decay_steps=100)
    )
    assert agent.epsilon == pytest.approx(1.0)
    agent.env_steps = 50
    assert agent.epsilon == pytest.approx(0.55)
    agent.env_steps = 1000
    assert agent.epsilon == pytest.approx(0.1)


def test_polyak_update_blends():
    agent = DQNAgent(2, 2, AgentConfig(hidden=(4,), stream_hidden=4, tau=0.5))
    with torch.no_grad():
        for p in agent.online.parameters():
            p.fill_(1.0)
        for p in agent.target.parameters():
            p.fill_(0.0)
    agent._update_target()
    values = torch.cat([p.flatten() for p in agent.target.parameters()])
    assert torch.allclose(values, torch.full_like(values, 0.5))


def test_truncation_keeps_bootstrap():
    agent = DQNAgent(2, 2, AgentConfig(hidden=(4,), stream_hidden=4))
    agent.observe(np.zeros(2), 0, 1.0, np.ones(2), terminated=False, truncated=True,
                  learn=False)
    agent.observe(np.zeros(2), 1, 1.0, np.ones(2), terminated=True, truncated=False,
                  learn=False)
    assert agent.buffer.terminated[:2].tolist() == [False, True]
    assert agent.episode_returns == [1.0, 1.0]


def test_divergence_raises():
    agent = DQNAgent(2, 2, AgentConfig(hidden=(4,), stream_hidden=4, q_limit=10.0,
                                       batch_size=4))
    for _ in range(4):
        agent.observe(np.ones(2), 0, 1e6, np.ones(2), False, False, learn=False)
    with pytest.raises(DivergenceError, match="exceeds q_limit"):
        agent.update()


def test_divergence_nonfinite():
    agent = DQNAgent(2, 2, AgentConfig(hidden=(4,), stream_hidden=4, batch_size=4))
    for _ in range(4):
        agent.observe(np.ones(2), 0, 1.0, np.ones(2), False, False, learn=False)
    # A target network gone NaN makes the loss non-finite.
    with torch.no_grad():
        next(agent.target.parameters()).fill_(float("nan"))
    before = [p.clone() for p in agent.online.parameters()]
    with pytest.raises(DivergenceError, match="non-finite"):
        agent.update()
    after = list(agent.online.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_update_logs_namespaced(caplog):
    agent = DQNAgent(2, 2, AgentConfig(hidden=(4,), stream_hidden=4, batch_size=2))
    with caplog.at_level("INFO", logger="dvmrl.agent"):
        agent.observe(np.zeros(2), 0, 0.5, np.ones(2), False, False, learn=False)
        agent.observe(np.zeros(2), 1, 0.5, np.ones(2), True, False, learn=False)
    stats = agent.update()
    assert "agent/episode_return=1.0000" in caplog.text
    assert np.isfinite(stats.td_loss)
    assert np.isfinite(stats.mean_q)


def test_save_load_round_trip(tmp_path):
    agent = DQNAgent(3, 4, AgentConfig(hidden=(8,), stream_hidden=8, batch_size=4, seed=5))
    rng = np.random.default_rng(0)
    for _ in range(10):
        agent.observe(rng.normal(size=3), int(rng.integers(4)), 1.0, rng.normal(size=3),
                      False, False, np.array([True, True, False, True]))
    agent.update()
    agent.save(tmp_path / "a.pt", metadata={"episodes": 3}, buffer_path=tmp_path / "b.npz")
    loaded = DQNAgent.load(tmp_path / "a.pt", buffer_path=tmp_path / "b.npz")
    obs = rng.normal(size=(6, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded.q_values(obs), agent.q_values(obs))
    assert loaded.env_steps == agent.env_steps
    assert loaded.gradient_steps == agent.gradient_steps
    assert loaded.metadata == {"episodes": 3}
    assert loaded.config == agent.config
    np.testing.assert_array_equal(loaded.buffer.obs[:10], agent.buffer.obs[:10])
    np.testing.assert_array_equal(loaded.buffer.next_mask[:10], agent.buffer.next_mask[:10])
    # Same random state: the next sampled batch and exploration draw match.
    np.testing.assert_array_equal(
        loaded.buffer.sample(5)["action"], agent.buffer.sample(5)["action"]
    )
    assert loaded.rng.random() == agent.rng.random()


def test_saved_mid_episode_keeps_running_return(tmp_path):
    # An agent saved after each step and loaded on resume must close the
    # episode in progress with its whole return, not the part after resuming.
    config = AgentConfig(hidden=(4,), stream_hidden=4, batch_size=2)
    agent = DQNAgent(2, 2, config)
    for reward in (0.25, 0.5):
        agent.observe(np.zeros(2), 0, reward, np.ones(2), False, False, learn=False)
    agent.save(tmp_path / "a.pt")
    loaded = DQNAgent.load(tmp_path / "a.pt")
    for candidate in (agent, loaded):
        candidate.observe(np.zeros(2), 1, 1.0, np.ones(2), True, False, learn=False)
    assert loaded.episode_returns == agent.episode_returns == [1.75]


def test_file_without_running_return_loads(tmp_path):
    # Agent files written before the running return was stored lack the key.
    agent = DQNAgent(2, 2, AgentConfig(hidden=(4,), stream_hidden=4, batch_size=2))
    state = agent.state_dict()
    header = json.loads(state["header_json"])
    del header["episode_return"]
    state["header_json"] = json.dumps(header)
    torch.save(state, tmp_path / "old.pt")
    loaded = DQNAgent.load(tmp_path / "old.pt")
    loaded.observe(np.zeros(2), 1, 0.5, np.ones(2), True, False, learn=False)
    assert loaded.episode_returns == [0.5]


class Payload:
    """An arbitrary Python object, which a data-only agent file never holds."""


def test_load_rejects_pickle(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "dvmrl-dqn-agent", "obj": Payload()}, path, pickle_module=pickle)
    with pytest.raises(AgentFileError, match="pickled objects are rejected"):
        DQNAgent.load(path)


def test_load_rejects_foreign(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(AgentFileError, match="not a dvmrl agent file"):
        DQNAgent.load(path)


def test_load_names_file_with_invalid_config(tmp_path):
    path = tmp_path / "a.pt"
    DQNAgent(3, 4, AgentConfig(hidden=(8,))).save(path)
    state = torch.load(path, weights_only=True)
    header = json.loads(state["header_json"])
    header["config"]["gamma"] = 2.0
    state["header_json"] = json.dumps(header)
    torch.save(state, path)
    with pytest.raises(AgentFileError, match=r"a\.pt: ValueError: gamma must be in"):
        DQNAgent.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        DQNAgent.load(tmp_path / "missing.pt")


def test_buffer_rejects_pickled_npz(tmp_path):
    path = tmp_path / "b.npz"
    np.savez(path, format=np.array([{"a": 1}], dtype=object))
    with pytest.raises(AgentFileError, match="invalid replay buffer"):
        ReplayBuffer.load(path)


def test_buffer_wraps_around():
    buffer = ReplayBuffer(3, 1, 2)
    for i in range(5):
        buffer.add(np.array([i]), 0, float(i), np.array([i]), False)
    assert len(buffer) == 3
    assert sorted(buffer.reward.tolist()) == [2.0, 3.0, 4.0]


def test_config_rejects_bad_gamma():
    with pytest.raises(ValueError, match="gamma must be in"):
        AgentConfig(gamma=1.5)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_config_rejects_seed_outside_range(seed):
    with pytest.raises(ValueError, match=rf"seed must be an integer .*got {seed}"):
        AgentConfig(seed=seed)


def test_agent_leaves_global_random_state():
    # The networks draw from their own seeded stream, so building or loading
    # an agent does not reseed the caller's PyTorch generator.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    DQNAgent(4, 3, AgentConfig(seed=7))
    assert torch.equal(torch.rand(3), expected)
    first = DQNAgent(4, 3, AgentConfig(seed=7))
    second = DQNAgent(4, 3, AgentConfig(seed=7))
    for a, b in zip(first.online.parameters(), second.online.parameters(), strict=True):
        assert torch.equal(a, b)


def test_observation_of_another_size_is_named():
    agent = DQNAgent(5, 3)
    for explore in (True, False):
        with pytest.raises(ValueError, match=r"shape \[4\], but this agent takes 5"):
            agent.act(np.zeros(4, dtype=np.float32), explore=explore)
    with pytest.raises(ValueError, match=r"shape \[2, 6\], but this agent takes 5"):
        agent.q_values(np.zeros((2, 6), dtype=np.float32))
    assert agent.q_values(np.zeros((2, 5), dtype=np.float32)).shape == (2, 3)


def test_agent_config_accepts_numpy_integers():
    config = AgentConfig(seed=np.int64(3), batch_size=np.int32(16))
    assert config.seed == 3
    assert type(config.seed) is int
    assert json.loads(json.dumps(config.to_dict()))["batch_size"] == 16
    with pytest.raises(ValueError, match="batch_size must be an integer, got 2.5"):
        AgentConfig(batch_size=2.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"action": 3}, "action 3 is outside"),
        ({"action": -1}, "action -1 is outside"),
        ({"action": 1.5}, "action must be an integer"),
        ({"reward": float("nan")}, "reward must be finite"),
        ({"reward": 1e39}, "reward must be finite"),
        ({"obs": np.array([0.0, np.inf])}, "obs contains NaN"),
        ({"next_obs": np.zeros(3)}, "next_obs must have shape"),
        ({"next_mask": np.zeros(3, dtype=bool)}, "masks every action"),
        ({"next_mask": np.ones(3)}, "next_mask must be a bool or 0/1 array"),
        ({"next_mask": np.array([0, 2, 1])}, "next_mask must be a bool or 0/1 array"),
        ({"action": None}, "action must be an integer, got None"),
        ({"action": float("nan")}, "action must be an integer, got nan"),
    ],
)
def test_buffer_rejects_bad_transition(change, message):
    # Stored, such a transition broke a later update at random or the saved
    # buffer's loading.
    buffer = ReplayBuffer(8, 2, 3)
    fields = {
        "obs": np.zeros(2),
        "action": 1,
        "reward": 0.5,
        "next_obs": np.ones(2),
        "terminated": False,
        "next_mask": None,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        buffer.add(**fields)
    assert len(buffer) == 0


def test_buffer_accepts_integer_mask():
    buffer = ReplayBuffer(8, 2, 3)
    buffer.add(np.zeros(2), 0, 0.5, np.ones(2), False, np.array([1, 0, 1], np.int8))
    assert buffer.next_mask[0].tolist() == [True, False, True]


def test_buffer_accepts_terminal_with_empty_mask():
    buffer = ReplayBuffer(8, 2, 3)
    buffer.add(np.zeros(2), 2, -1.0, np.ones(2), True, np.zeros(3, dtype=bool))
    assert len(buffer) == 1
    assert buffer.action[0] == 2
