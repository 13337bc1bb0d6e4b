"""Tests of ModelTuningEnv: Gymnasium API, masks, seeding, rewards and the test-split guard."""

import math

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from dvmrl import datasets
from dvmrl.agent import AgentConfig, DQNAgent, run_episode
from dvmrl.env import ACTION_INDEX, ACTIONS, ModelTuningEnv
from dvmrl.splits import make_split

SMALL = {
    "train_size": 300,
    "val_pool_size": 200,
    "val_size": 60,
    "reward_size": 100,
    "probe_size": 8,
    "probe_steps": 2,
    "budget_epochs": 4,
}


@pytest.fixture(scope="module")
def frame():
    return datasets.load("mp-formation-energy").iloc[:3000].reset_index(drop=True)


@pytest.fixture(scope="module")
def split(frame):
    return make_split(frame, "random", seed=0)


@pytest.fixture()
def env(frame, split):
    return ModelTuningEnv(frame, split, **SMALL)


def test_check_env_default():
    check_env(ModelTuningEnv(), skip_render_check=True)


def test_reset_observation_in_space(env):
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert info["action_mask"].shape == (len(ACTIONS),)
    assert info["action_mask"].dtype == bool


def test_test_split_never_enters(frame, split):
    poisoned = frame.copy()
    # NaN targets in the test part would surface in every reward and metric.
    poisoned.loc[split.test, "target"] = np.nan
    env = ModelTuningEnv(poisoned, split, **SMALL)
    test_formulas = set(frame["formula"].to_numpy()[split.test])
    assert not test_formulas & set(env.train_formulas)
    assert not test_formulas & set(env.pool_formulas)
    obs, info = env.reset(seed=1)
    rewards = []
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(ACTION_INDEX["continue"])
        rewards.append(reward)
        done = terminated or truncated
    assert np.isfinite(rewards).all()
    assert np.isfinite(info["val_rmse"])
    assert np.isfinite(obs).all()


def test_split_leak_rejected(frame, split):
    leaky = type(split)(
        train=np.concatenate([split.train, split.test[:5]]),
        val=split.val,
        test=split.test,
        kind=split.kind,
        seed=split.seed,
        data_fingerprint=split.data_fingerprint,
    )
    with pytest.raises(ValueError, match="shares 5 formulas with split.test"):
        ModelTuningEnv(frame, leaky, **SMALL)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("tolerance", 0.0, "tolerance must be > 0"),
        ("epsilon", 1.5, "epsilon must be in \\(0, 1\\)"),
        ("k_correlations", -1, "k_correlations must be >= 0"),
        ("probe_steps", 0, "probe_steps must be an integer >= 1"),
        ("val_size", 2.5, "val_size must be an integer >= 1, got 2.5"),
        ("model_config", {"hiden": 8}, r"model_config has unknown keys \['hiden'\]"),
        ("train_config", {"lrr": 1.0}, r"train_config has unknown keys \['lrr'\]"),
        ("train_config", {"lr": -1.0}, "TrainConfig.lr must be"),
        ("train_config", {"epochs": 5}, r"train_config must not set \['epochs'\]"),
        ("w_accuracy", math.nan, "w_accuracy must be a finite number"),
        ("stability_threshold", math.inf, "stability_threshold must be a finite"),
    ],
)
def test_bad_settings_rejected_before_reset(frame, split, option, value, message):
    with pytest.raises(ValueError, match=message):
        ModelTuningEnv(frame, split, **{**SMALL, option: value})


def test_budget_truncates(env):
    env.reset(seed=2)
    steps = 0
    terminated = truncated = False
    while not (terminated or truncated):
        _, _, terminated, truncated, info = env.step(ACTION_INDEX["lr-half"])
        steps += 1
    assert truncated
    assert not terminated
    assert steps == SMALL["budget_epochs"]
    assert info["budget_left"] == 0


def test_stop_terminates(env):
    env.reset(seed=3)
    _, reward, terminated, truncated, info = env.step(ACTION_INDEX["stop"])
    assert terminated
    assert not truncated
    assert reward == 0.0
    assert info["epochs_used"] == 0


def test_seeding_repeats_episode(frame, split):
    actions = [
        ACTION_INDEX["validate-gp-uncertainty"],
        ACTION_INDEX["lr-double"],
        ACTION_INDEX["validate-adversarial"],
        ACTION_INDEX["add-layer"],
    ]

    def episode():
        env = ModelTuningEnv(frame, split, **SMALL)
        obs, _ = env.reset(seed=7)
        trace = [obs]
        for action in actions:
            obs, reward, *_ = env.step(action)
            trace.extend([obs, np.array([reward])])
        return np.concatenate(trace)

    np.testing.assert_array_equal(episode(), episode())


def test_reward_formula(frame, split):
    env = ModelTuningEnv(frame, split, w_accuracy=2.0, w_vulnerability=3.0, **SMALL)
    _, info0 = env.reset(seed=4)
    _, reward, _, _, info1 = env.step(ACTION_INDEX["continue"])
    expected = 2.0 * (info1["reward_accuracy"] - info0["reward_accuracy"]) + 3.0 * (
        info0["vulnerability"] - info1["vulnerability"]
    )
    assert reward == pytest.approx(expected)


def test_diverged_slice_ends_episode(frame, split, monkeypatch):
    from dvmrl.training.trainer import Trainer

    env = ModelTuningEnv(frame, split, w_accuracy=2.0, **SMALL)
    _, info0 = env.reset(seed=4)
    best = env.best_val_rmse

    def nan_epoch(self):
        return float("nan"), self.train_config.lr

    monkeypatch.setattr(Trainer, "_optimise_epoch", nan_epoch)
    _, reward, terminated, truncated, info = env.step(ACTION_INDEX["continue"])
    assert terminated
    assert not truncated
    assert info["diverged"]
    assert reward == pytest.approx(-2.0 * info0["reward_accuracy"])
    # The step's scores describe the diverged model, not the one before it.
    assert math.isnan(info["val_rmse"])
    assert math.isnan(info["vulnerability"])
    assert info["reward_accuracy"] == 0.0
    assert info["epochs_used"] == env.epochs_per_step
    assert env.best_val_rmse == best


def test_weights_diverged_in_last_step_end_episode(frame, split):
    # The last update of the slice makes the weights NaN while the epoch's
    # mean loss, taken before each update, stays finite.
    env = ModelTuningEnv(frame, split, w_accuracy=2.0, **SMALL)
    _, info0 = env.reset(seed=4)
    optimizer = env.trainer._optimizer

    def poison(opt, args, kwargs):
        with torch.no_grad():
            env.trainer.model.flat.fill_(float("nan"))

    optimizer.register_step_post_hook(poison)
    _, reward, terminated, _, info = env.step(ACTION_INDEX["continue"])
    assert terminated
    assert info["diverged"]
    assert reward == pytest.approx(-2.0 * info0["reward_accuracy"])


def test_mask_blocks_range_edges(frame, split):
    env = ModelTuningEnv(
        frame, split, model_config={"layers": 1, "dropout": 0.0}, **SMALL
    )
    _, info = env.reset(seed=5)
    mask = info["action_mask"]
    assert not mask[ACTION_INDEX["remove-layer"]]
    assert not mask[ACTION_INDEX["dropout-down"]]
    assert mask[ACTION_INDEX["add-layer"]]
    assert mask[ACTION_INDEX["stop"]]


def test_masked_action_acts_as_continue(frame, split):
    env = ModelTuningEnv(frame, split, model_config={"layers": 1}, **SMALL)
    env.reset(seed=6)
    _, _, _, _, info = env.step(ACTION_INDEX["remove-layer"])
    assert info["invalid_action"]
    assert info["hp_layers"] == 1
    assert info["epochs_used"] == 1


def test_spent_budget_stops_instead_of_training(env):
    env.reset(seed=7)
    truncated = False
    while not truncated:
        _, _, _, truncated, info = env.step(ACTION_INDEX["continue"])
    assert info["budget_left"] == 0
    # After truncation only stop is valid; any other action must not train.
    _, reward, terminated, truncated, info = env.step(ACTION_INDEX["continue"])
    assert info["invalid_action"]
    assert terminated
    assert reward == 0.0
    assert info["epochs_used"] == SMALL["budget_epochs"]
    assert info["budget_left"] == 0


def test_actions_change_settings(env):
    env.reset(seed=8)
    before = env.hyperparameters()
    moves = {
        "lr-double": ("lr", before["lr"] * 2),
        "batch-half": ("batch_size", before["batch_size"] // 2),
        "weight-decay-up": ("weight_decay", before["weight_decay"] * 10),
        "add-layer": ("layers", before["layers"] + 1),
    }
    for name, (key, value) in moves.items():
        _, _, _, _, info = env.step(ACTION_INDEX[name])
        assert info[f"hp_{key}"] == pytest.approx(value), name


def test_validation_action_sets_strategy(env):
    env.reset(seed=9)
    _, _, _, _, info = env.step(ACTION_INDEX["validate-ensemble-variance"])
    assert info["strategy"] == "ensemble-variance"
    assert 0.0 <= info["shift_auc"] <= 1.0
    assert env.best_state() is not None


def test_agent_never_picks_masked(frame, split):
    env = ModelTuningEnv(frame, split, model_config={"layers": 1}, **SMALL)
    agent = DQNAgent(
        env.observation_space.shape[0],
        env.action_space.n,
        AgentConfig(hidden=(16,), stream_hidden=8, epsilon_decay_steps=10_000),
    )
    result = run_episode(agent, env, learn=False, explore=True, seed=10)
    assert not any(row["invalid_action"] for row in result.trajectory)


def test_stable_baselines3_dqn_trains():
    sb3 = pytest.importorskip("stable_baselines3")
    env = ModelTuningEnv(**SMALL)
    model = sb3.DQN("MlpPolicy", env, learning_starts=4, train_freq=1, verbose=0, seed=0)
    model.learn(total_timesteps=8)
    assert model.num_timesteps == 8


def test_episode_training_settings_pinned(env):
    # The shipped agent was meta-trained on episodes with these settings,
    # not with those in dvmrl.defaults for a standalone model.
    env.reset(seed=0)
    assert env.train_config.loss == "mse"
    assert env.train_config.monitor == "val_rmse"
    assert env.train_config.ema_decay == 0.0
    assert env.model_config.fraction_hidden == 0


@pytest.mark.parametrize("n_other", [1, 2])
def test_shift_detection_tiny_part(n_other):
    from dvmrl import env as env_module

    rng = np.random.default_rng(0)
    f_train = rng.normal(size=(40, 6))
    f_other = rng.normal(size=(n_other, 6)) + 3.0
    labels, probability, used = env_module._adversarial_validation_probabilities(
        f_train, f_other, rng
    )
    # Too few rows for three folds: no shift is claimed, and nothing fails.
    assert len(used) == 40
    assert labels.tolist() == [0.0] * 40 + [1.0] * n_other
    assert np.all(probability == 0.5)
    assert env_module._adversarial_validation_auc(f_train, f_other, rng) == 0.5


def test_shift_detection_three_rows_fitted():
    from dvmrl import env as env_module

    rng = np.random.default_rng(0)
    f_train = rng.normal(size=(40, 6))
    f_other = rng.normal(size=(3, 6)) + 5.0
    # A shift this large is found with three rows of the other class.
    assert env_module._adversarial_validation_auc(f_train, f_other, rng) > 0.9


def test_observation_subsample_spans_the_validation_set():
    from dvmrl.env import _spread

    rows = np.arange(100, 600)
    picked = _spread(rows, 256)
    assert len(picked) == len(np.unique(picked)) == 256
    # Both ends of the (system-ordered) validation set are observed.
    assert picked[0] == rows[0]
    assert picked[-1] == rows[-1]
    assert np.all(np.diff(picked) <= 2)
    np.testing.assert_array_equal(_spread(rows[:50], 256), rows[:50])


def test_reset_keeps_global_torch_rng(env):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    env.reset(seed=4)
    env.step(ACTION_INDEX["continue"])
    assert torch.equal(torch.rand(3), expected)
