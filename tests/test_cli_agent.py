"""Tests of ``dvmrl agent train`` and ``dvmrl agent evaluate`` and the task list."""

import json
import pickle
import re

import pytest
import torch

from dvmrl.agent import PRETRAINED_AGENT, DQNAgent, load_pretrained
from dvmrl.cli import main
from dvmrl.env import ModelTuningEnv
from dvmrl.meta import EVALUATION_DATASET, default_tasks, parse_task, state_paths
from dvmrl.metrics import DEFAULT_TOLERANCE

TRAIN = [
    "agent",
    "train",
    "--tasks",
    "mp-energy-above-hull/transition-metal@200",
    "--budget-epochs",
    "2",
    "--checkpoint-every",
    "1",
    "--no-progress",
    "--threads",
    "1",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("agent") / "agent.pt"
    code = main([*TRAIN, "--episodes", "2", "--out", str(out)])
    assert code == 0
    return out


def test_train_writes_state(trained):
    paths = state_paths(trained)
    progress = json.loads(paths["progress"].read_text())
    assert paths["agent"].is_file()
    assert paths["buffer"].is_file()
    assert len(progress["history"]) == 2
    assert progress["history"][0]["task"] == "mp-energy-above-hull/transition-metal@200"


def test_train_resume_continues(trained, tmp_path):
    copy = tmp_path / "agent.pt"
    for name, path in state_paths(trained).items():
        state_paths(copy)[name].write_bytes(path.read_bytes())
    code = main([*TRAIN, "--episodes", "3", "--out", str(copy), "--resume"])
    progress = json.loads(state_paths(copy)["progress"].read_text())
    assert code == 0
    assert len(progress["history"]) == 3
    assert DQNAgent.load(copy).episodes == 3


def test_train_refuses_overwrite(trained, capsys):
    code = main([*TRAIN, "--episodes", "2", "--out", str(trained)])
    assert code == 2
    assert "already exists" in capsys.readouterr().err


def test_train_rejects_evaluation_data(tmp_path, capsys):
    code = main(
        [
            *TRAIN[:2],
            "--tasks",
            EVALUATION_DATASET,
            "--episodes",
            "1",
            "--out",
            str(tmp_path / "a.pt"),
        ]
    )
    assert code == 2
    assert "excluded from meta-training" in capsys.readouterr().err


def test_evaluate_prints_trajectory(trained, capsys):
    code = main(
        [
            "agent",
            "evaluate",
            "--agent",
            str(trained),
            "--train-size",
            "200",
            "--budget-epochs",
            "2",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s", line)]
    lowest = min(float(row[-1]) for row in rows)
    assert code == 0
    assert "reward = 1 * (change in accuracy) + 1 * (decrease in vulnerability)" in out
    assert f"fraction within {DEFAULT_TOLERANCE:g} eV/atom" in out
    assert "on the validation set in use at that step" in out
    assert f"lowest val_rmse in the table: {lowest:.4f} eV/atom" in out
    assert "on the final" in out


def test_evaluate_rejects_small_pool(trained, capsys):
    code = main(["agent", "evaluate", "--agent", str(trained), "--train-size", "5"])
    assert code == 2
    assert "pass at least 64 compositions" in capsys.readouterr().err


def test_evaluate_rejects_pickle(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save(
        {"format": "dvmrl-dqn-agent", "obj": object()}, path, pickle_module=pickle
    )
    code = main(["agent", "evaluate", "--agent", str(path), "--train-size", "200"])
    assert code == 2
    assert "pickled objects are rejected" in capsys.readouterr().err


def test_evaluate_missing_agent(tmp_path, capsys):
    code = main(["agent", "evaluate", "--agent", str(tmp_path / "none.pt")])
    assert code == 2
    assert "not found" in capsys.readouterr().err


def test_pretrained_matches_env():
    if not PRETRAINED_AGENT.is_file():
        pytest.fail(
            f"the pretrained agent {PRETRAINED_AGENT} is missing from the package"
        )
    agent = load_pretrained()
    env = ModelTuningEnv(
        train_size=200, val_pool_size=250, val_size=60, budget_epochs=2
    )
    assert agent.obs_dim == env.observation_space.shape[0]
    assert agent.n_actions == env.action_space.n
    assert agent.metadata["episodes"] >= 1
    assert "machine" in agent.metadata


def test_parse_task_forms():
    task = parse_task("oqmd-formation-energy/rare-earth@1000")
    assert task.dataset == "oqmd-formation-energy"
    assert task.family == "rare-earth"
    assert task.train_size == 1000
    assert parse_task(task.name) == task
    assert parse_task("mp-energy-above-hull").family is None


def test_parse_task_rejects_family():
    with pytest.raises(ValueError, match="unknown chemical family"):
        parse_task("oqmd-formation-energy/noble-gas")


def test_default_tasks_exclude_evaluation():
    tasks = default_tasks()
    assert len(tasks) == 24
    assert all(task.dataset != EVALUATION_DATASET for task in tasks)
    assert {task.train_size for task in tasks} == {500, 1000, 1500}
