"""Tests of ``dvmrl agent train`` and ``dvmrl agent evaluate`` and the task list."""

import json
import logging
import pickle
import re

import numpy as np
import pytest
import torch

from dvmrl.agent import PRETRAINED_AGENT, DQNAgent, load_pretrained
from dvmrl.cli import main
from dvmrl.env import ModelTuningEnv
from dvmrl.meta import (
    EVALUATION_DATASET,
    default_tasks,
    parse_task,
    plot_learning_curve,
    state_paths,
)
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


def test_resume_complete_writes_curve(trained, tmp_path, capsys):
    # An interrupt while the curve was drawn leaves a complete run without it.
    copy = copy_run(trained, tmp_path / "agent.pt")
    before = copy.read_bytes()
    curve = tmp_path / "curve.png"
    argv = [*TRAIN, "--episodes", "2", "--out", str(copy), "--resume"]
    assert main([*argv, "--curve", str(curve)]) == 0
    out = capsys.readouterr().out
    assert "is complete with 2 episodes" in out
    assert curve.read_bytes()[:4] == b"\x89PNG"
    assert copy.read_bytes() == before
    # The stored settings are still compared.
    assert main([*argv, "--seed", "7"]) == 2
    assert "trained with other settings" in capsys.readouterr().err


def test_resume_complete_settles_staged_checkpoint(trained, tmp_path):
    # Interrupted after the progress file of the last checkpoint was written
    # but before the staged agent replaced agent.pt: the resume settles it.
    from dvmrl.meta import _staged_paths

    copy = copy_run(trained, tmp_path / "agent.pt")
    paths = state_paths(copy)
    staged = _staged_paths(paths, 2)
    staged["agent"].write_bytes(paths["agent"].read_bytes())
    older = DQNAgent.load(copy)
    older.episodes = 1
    older.save(copy)
    argv = [*TRAIN, "--episodes", "2", "--out", str(copy), "--resume"]
    assert main(argv) == 0
    assert DQNAgent.load(copy).episodes == 2
    assert not staged["agent"].exists()


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


def copy_run(source, out):
    """Copy the agent, buffer and progress files of the run at ``source`` to ``out``."""
    for name, path in state_paths(source).items():
        state_paths(out)[name].write_bytes(path.read_bytes())
    return out


def write_nan_agent(source, out):
    agent = DQNAgent.load(source)
    with torch.no_grad():
        agent.online.trunk[0].weight[0, 0] = float("nan")
    agent.save(out)
    return out


def test_evaluate_rejects_nan_agent(trained, tmp_path, capsys):
    path = write_nan_agent(trained, tmp_path / "nan.pt")
    code = main(["agent", "evaluate", "--agent", str(path), "--train-size", "200"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err
    assert "online.trunk.0.weight" in err
    assert "corrupt" in err


def test_run_rejects_nan_agent(trained, tmp_path, capsys):
    path = write_nan_agent(trained, tmp_path / "nan.pt")
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--methods",
            "agent",
            "--agent",
            str(path),
            "--budget",
            "quick",
            "--no-progress",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "online.trunk.0.weight" in err
    assert not (out / "report.json").exists()


def test_evaluate_truncated_agent(trained, tmp_path, capsys):
    path = tmp_path / "cut.pt"
    data = trained.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    code = main(["agent", "evaluate", "--agent", str(path), "--train-size", "200"])
    err = capsys.readouterr().err
    assert code == 2
    assert "truncated or corrupt" in err
    assert "pickle" not in err
    assert "weights_only" not in err


def test_evaluate_agent_folder(tmp_path, capsys):
    code = main(["agent", "evaluate", "--agent", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "is a folder" in err
    assert "not found" not in err


def test_train_out_folder(tmp_path, capsys):
    code = main([*TRAIN, "--episodes", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--out {tmp_path}: the path is a folder" in err
    assert f"such as {tmp_path / 'agent.pt'}" in err
    assert "already exists" not in err


def test_train_checks_out_before_training(tmp_path, capsys, monkeypatch):
    """An --out that cannot be written fails before the first episode."""
    import os

    import dvmrl.meta

    def never(*args, **kwargs):
        raise AssertionError("meta-training started before --out was checked")

    monkeypatch.setattr(dvmrl.meta, "meta_train", never)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Root may write anywhere, so the test makes the folder read-only for
    # the check itself.
    monkeypatch.setattr(
        os, "access", lambda path, mode: path != locked and real_access(path, mode)
    )
    code = main([*TRAIN, "--episodes", "1", "--out", str(locked / "agent.pt")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"the folder {locked} is not writable" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main([*TRAIN, "--episodes", "1", "--out", str(blocker / "agent.pt")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{blocker} is a file, so nothing can be written under it" in err


def test_train_rejects_curve_format(tmp_path, capsys):
    out = tmp_path / "agent.pt"
    code = main([*TRAIN, "--episodes", "1", "--out", str(out), "--curve", "c.txt"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--curve" in err
    assert ".txt is not an image format" in err
    assert ".svg" in err
    # The suffix is checked before meta-training, so nothing was written.
    assert not out.exists()


def test_train_rejects_curve_on_agent(tmp_path, capsys):
    # An agent file may have any suffix, so --out can name an image path too.
    out = tmp_path / "agent.png"
    argv = [*TRAIN, "--episodes", "1", "--out", str(out)]
    code = main([*argv, "--curve", str(tmp_path / "." / "agent.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert "is the same file as --out" in err
    assert not out.exists()


def test_learning_curve_format_follows_suffix(trained, tmp_path):
    history = json.loads(state_paths(trained)["progress"].read_text())["history"]
    plot_learning_curve(history, tmp_path / "curve.svg")
    plot_learning_curve(history, tmp_path / "curve")
    assert b"<svg" in (tmp_path / "curve.svg").read_bytes()[:500]
    assert (tmp_path / "curve").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_rejects_bad_buffer(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "agent.pt")
    buffer = state_paths(out)["buffer"]
    with np.load(buffer, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["action"] = np.full_like(arrays["action"], 999)
    with open(buffer, "wb") as f:
        np.savez(f, **arrays)
    progress = state_paths(out)["progress"].read_text()
    code = main([*TRAIN, "--episodes", "3", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(buffer) in err
    assert "field 'action'" in err
    assert "action 999" in err
    assert state_paths(out)["progress"].read_text() == progress


def test_resume_missing_buffer_warns(trained, tmp_path, caplog):
    out = copy_run(trained, tmp_path / "agent.pt")
    buffer = state_paths(out)["buffer"]
    buffer.unlink()
    with caplog.at_level(logging.WARNING):
        code = main([*TRAIN, "--episodes", "3", "--out", str(out), "--resume"])
    assert code == 0
    assert f"replay buffer file {buffer} not found" in caplog.text
    assert "learning restarts from an empty replay buffer" in caplog.text
    assert buffer.is_file()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (["--seed", "4"], "--seed: stored 0, requested 4"),
        (["--budget-epochs", "3"], "--budget-epochs: stored 2, requested 3"),
        (
            ["--tasks", "oqmd-formation-energy@200"],
            "--tasks: stored mp-energy-above-hull/transition-metal@200, requested "
            "oqmd-formation-energy@200",
        ),
    ],
)
def test_resume_rejects_changed_settings(trained, tmp_path, capsys, change, expected):
    out = copy_run(trained, tmp_path / "agent.pt")
    progress = state_paths(out)["progress"].read_text()
    agent = state_paths(out)["agent"].read_bytes()
    code = main([*TRAIN, *change, "--episodes", "3", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert "choose another --out" in err
    assert state_paths(out)["progress"].read_text() == progress
    assert state_paths(out)["agent"].read_bytes() == agent


def test_resume_reuses_stored_settings(trained, tmp_path):
    out = copy_run(trained, tmp_path / "agent.pt")
    bare = ["agent", "train", "--no-progress", "--threads", "1", "--device", "cpu"]
    code = main([*bare, "--episodes", "3", "--out", str(out), "--resume"])
    progress = json.loads(state_paths(out)["progress"].read_text())
    assert code == 0
    assert len(progress["history"]) == 3
    assert progress["history"][2]["task"] == "mp-energy-above-hull/transition-metal@200"
    assert progress["env_options"]["budget_epochs"] == 2
    assert progress["seed"] == 0


def test_resume_lists_every_change(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "agent.pt")
    change = ["--seed", "1", "--budget-epochs", "5"]
    code = main([*TRAIN, *change, "--episodes", "3", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--seed: stored 0, requested 1" in err
    assert "--budget-epochs: stored 2, requested 5" in err


def test_resume_allows_other_device(trained, tmp_path):
    out = copy_run(trained, tmp_path / "agent.pt")
    progress = state_paths(out)["progress"]
    saved = json.loads(progress.read_text())
    saved["env_options"]["device"] = "cuda:0"
    progress.write_text(json.dumps(saved))
    code = main([*TRAIN, "--episodes", "3", "--out", str(out), "--resume"])
    assert code == 0


def test_resume_finished_run(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "agent.pt")
    progress = state_paths(out)["progress"].read_text()
    code = main([*TRAIN, "--episodes", "1", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert "already has 2 episodes, more than --episodes 1" in err
    assert "pass --episodes 2 or more" in err
    assert state_paths(out)["progress"].read_text() == progress


def interrupt_at_episode(monkeypatch, episode):
    """Make meta-training raise KeyboardInterrupt when ``episode`` starts."""
    import dvmrl.meta

    calls = []
    real = dvmrl.meta.run_episode

    def run_episode(*args, **kwargs):
        calls.append(1)
        if len(calls) == episode:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dvmrl.meta, "run_episode", run_episode)


def test_train_interrupt_names_checkpoint(tmp_path, monkeypatch, caplog, capsys):
    out = tmp_path / "agent.pt"
    interrupt_at_episode(monkeypatch, 4)
    args = [*TRAIN, "--checkpoint-every", "2", "--episodes", "5", "--out", str(out)]
    with caplog.at_level(logging.WARNING):
        code = main(args)
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert "checkpoint after episode 2 of 5" in caplog.text
    assert str(out) in caplog.text
    assert "--resume" in caplog.text
    progress = json.loads(state_paths(out)["progress"].read_text())
    assert len(progress["history"]) == 2
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    progress = json.loads(state_paths(out)["progress"].read_text())
    assert len(progress["history"]) == 5


def interrupt_staged_replace(monkeypatch, episodes: int) -> list:
    """Raise one Ctrl-C as the checkpoint after ``episodes`` commits its staged files.

    Returns the list that receives the interrupted source path.
    """
    import os

    import dvmrl.meta

    real_replace = os.replace
    interrupted = []

    def replace(source, target):
        # One Ctrl-C: the handler's own replace of the file goes through.
        if str(source).endswith(f".staged-{episodes}") and not interrupted:
            interrupted.append(source)
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(dvmrl.meta.os, "replace", replace)
    return interrupted


@pytest.mark.parametrize(
    "moment", ["before the progress file", "after the progress file"]
)
def test_train_interrupt_inside_checkpoint(tmp_path, monkeypatch, caplog, moment):
    """A checkpoint cut short leaves agent, buffer and progress of one episode."""
    import dvmrl.meta

    out = tmp_path / "agent.pt"
    paths = state_paths(out)
    args = [*TRAIN, "--episodes", "3", "--out", str(out)]
    if moment == "before the progress file":
        real_write = dvmrl.meta.write_text_atomic

        def write(path, text):
            if len(json.loads(text)["history"]) == 2:
                raise KeyboardInterrupt
            real_write(path, text)

        monkeypatch.setattr(dvmrl.meta, "write_text_atomic", write)
    else:
        interrupt_staged_replace(monkeypatch, episodes=2)
    with caplog.at_level(logging.WARNING):
        assert main(args) == 130
    monkeypatch.undo()
    committed = 1 if moment == "before the progress file" else 2
    # The interrupt settles the staged files, so the agent file contains the
    # episode that the progress file and the message name.
    assert len(json.loads(paths["progress"].read_text())["history"]) == committed
    assert DQNAgent.load(out).episodes == committed
    assert f"checkpoint after episode {committed} of 3" in caplog.text
    assert not list(tmp_path.glob("*.staged-*"))
    assert main([*args, "--resume"]) == 0
    history = json.loads(paths["progress"].read_text())["history"]
    agent = DQNAgent.load(out, buffer_path=paths["buffer"])
    assert len(history) == agent.episodes == 3
    assert agent.env_steps == len(agent.buffer) == sum(row["steps"] for row in history)
    assert not list(tmp_path.glob("*.staged-*"))


def test_train_interrupt_inside_final_checkpoint(tmp_path, monkeypatch, caplog):
    # With --checkpoint-every above --episodes only the final checkpoint runs.
    out = tmp_path / "agent.pt"
    paths = state_paths(out)
    args = [*TRAIN, "--checkpoint-every", "5", "--episodes", "2", "--out", str(out)]
    interrupted = interrupt_staged_replace(monkeypatch, episodes=2)
    with caplog.at_level(logging.WARNING):
        assert main(args) == 130
    monkeypatch.undo()
    assert interrupted
    assert DQNAgent.load(out).episodes == 2
    assert "checkpoint after episode 2 of 2" in caplog.text
    assert not list(tmp_path.glob("*.staged-*"))
    assert len(json.loads(paths["progress"].read_text())["history"]) == 2


def test_train_interrupt_before_checkpoint(tmp_path, monkeypatch, caplog):
    out = tmp_path / "agent.pt"
    interrupt_at_episode(monkeypatch, 1)
    with caplog.at_level(logging.WARNING):
        code = main([*TRAIN, "--episodes", "2", "--out", str(out)])
    assert code == 130
    assert "nothing was saved" in caplog.text
    assert "without --resume" in caplog.text
    assert not out.exists()


def test_evaluate_warns_train_size_above_data(trained, capsys, monkeypatch):
    """A --train-size above the data is named before the episode starts."""
    import dvmrl.agent

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dvmrl.agent, "run_episode", stop)
    argv = ["agent", "evaluate", "--agent", str(trained), "--train-size", "100000"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert re.search(
        r"--train-size 100000 exceeds the \d+ compositions of the training part", err
    )


def test_agent_train_out_in_use_rejected(tmp_path, capsys):
    from dvmrl._files import FolderLock

    out = tmp_path / "agent.pt"
    with FolderLock(tmp_path / "agent.lock", lock_file=True):
        code = main(["agent", "train", "--episodes", "1", "--out", str(out)])
    assert code == 2
    assert f"--out {out} is in use by another dvmrl process" in capsys.readouterr().err
    assert not out.exists()


def test_train_rejects_files_of_other_suffix(trained, tmp_path, capsys):
    # agent.pt and agent.ckpt share agent.progress.json and agent.buffer.npz.
    copy_run(trained, tmp_path / "agent.pt")
    progress = state_paths(tmp_path / "agent.pt")["progress"].read_text()
    code = main([*TRAIN, "--episodes", "1", "--out", str(tmp_path / "agent.ckpt")])
    err = capsys.readouterr().err
    assert code == 2
    assert "agent.progress.json already exists and belongs to another run" in err
    assert not (tmp_path / "agent.ckpt").exists()
    assert state_paths(tmp_path / "agent.pt")["progress"].read_text() == progress


def test_resume_rejects_progress_of_other_run(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "agent.pt")
    progress = state_paths(out)["progress"]
    saved = json.loads(progress.read_text())
    saved["history"] = saved["history"][:1]
    progress.write_text(json.dumps(saved))
    code = main([*TRAIN, "--episodes", "3", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert "an agent trained for 2 episodes, but agent.progress.json records 1" in err


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("rng_state", "x", "its random state of the task draws cannot be restored"),
        ("rng_state", {}, "its random state of the task draws cannot be"),
        ("history", [1, 2], "history row 1 has no 'return'"),
        ("wall_time_s", "long", "'wall_time_s' is 'long', not a number"),
        ("commands", 5, "'commands' is 5, not a list"),
    ],
)
def test_resume_rejects_damaged_progress_fields(
    trained, tmp_path, capsys, field, value, problem
):
    out = copy_run(trained, tmp_path / "agent.pt")
    progress = state_paths(out)["progress"]
    saved = json.loads(progress.read_text())
    saved[field] = value
    progress.write_text(json.dumps(saved))
    code = main([*TRAIN, "--episodes", "3", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"invalid progress file {progress}: {problem}" in err


def test_resume_rejects_agent_of_other_size(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "agent.pt")
    agent = DQNAgent.load(out)
    smaller = DQNAgent(agent.obs_dim - 3, agent.n_actions, agent.config)
    smaller.episodes = agent.episodes
    smaller.save(out)
    state_paths(out)["buffer"].unlink()
    code = main([*TRAIN, "--episodes", "3", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        f"its agent expects {agent.obs_dim - 3} observations and {agent.n_actions} "
        f"actions, but the environment of this dvmrl version has {agent.obs_dim}"
    ) in err


def test_resume_accepts_default_budget():
    import inspect

    from dvmrl.meta import _resume_differences

    default = inspect.signature(ModelTuningEnv).parameters["budget_epochs"].default
    # A run started without --budget-epochs stores no value.
    pairs = (({}, {"budget_epochs": default}), ({"budget_epochs": default}, {}))
    for stored, requested in pairs:
        saved = {"env_options": stored, "seed": 0}
        assert _resume_differences(saved, [], 0, requested) == []
    saved = {"env_options": {}, "seed": 0}
    assert _resume_differences(saved, [], 0, {"budget_epochs": default + 1}) == [
        f"--budget-epochs: stored {default}, requested {default + 1}"
    ]


def test_footer_names_divergence(capsys):
    from types import SimpleNamespace

    from dvmrl.cli.agent import _print_footer

    rows = [
        {"step": 1, "val_rmse": 0.31, "strategy": "random"},
        {"step": 2, "val_rmse": 0.25, "strategy": "random"},
        {"step": 3, "val_rmse": float("nan"), "strategy": "random", "diverged": True},
    ]
    result = SimpleNamespace(
        trajectory=rows, total_return=-0.1, terminated=True, best_val_rmse=0.25
    )
    _print_footer(result)
    out = capsys.readouterr().out
    assert "ended by diverged training" in out
    assert "lowest val_rmse in the table: 0.2500 eV/atom at step 2" in out
