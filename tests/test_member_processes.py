"""Ensemble members trained in their own processes (dvmrl train --jobs).

The member processes are real spawned Python processes that import dvmrl
and train with the compiled core; nothing here is mocked across the
process boundary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dvmrl import datasets
from dvmrl.cli import _member_processes, main
from dvmrl.training import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "8", "--layers", "1", "--batch-size", "16"]


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    df = datasets.load("mp-formation-energy").sample(n=240, random_state=3)
    path = tmp_path_factory.mktemp("data") / "alloys.csv"
    df[["formula", "target"]].to_csv(path, index=False)
    return path


def _train_args(data_csv, epochs: int) -> list[str]:
    return [
        "train", "--data", str(data_csv), "--epochs", str(epochs), "--members", "3",
        *SMALL, "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory, data_csv):
    """Three members trained one after another in this process (one thread)."""
    out = tmp_path_factory.mktemp("serial") / "run"
    argv = [*_train_args(data_csv, 200), "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    return out


def _member_flats(out: Path) -> list[torch.Tensor]:
    flats = []
    for member in range(3):
        model, _ = load_checkpoint(out / f"member{member}" / "model.pt")
        flats.append(model.flat.detach().clone())
    return flats


def _same_members(first: Path, second: Path) -> None:
    for a, b in zip(_member_flats(first), _member_flats(second), strict=True):
        assert torch.equal(a, b)
    metrics = [json.loads((o / "metrics.json").read_text()) for o in (first, second)]
    for key in ("rmse", "mae", "member_metrics"):
        assert metrics[0][key] == metrics[1][key]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "python"), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def _default_sigint() -> None:
    # A test runner started without job control ignores SIGINT, and a child
    # would inherit that; the command must see Ctrl-C as a terminal sends it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_processes_match_serial_run(serial_run, data_csv, tmp_path):
    out = tmp_path / "run"
    argv = [*_train_args(data_csv, 200), "--threads", "2", "--jobs", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    _same_members(serial_run, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["member_processes"] == 2
    serial = json.loads((serial_run / "metrics.json").read_text())
    assert serial["member_processes"] == 1


def test_default_is_one_process_per_thread(data_csv, tmp_path):
    out = tmp_path / "run"
    argv = [*_train_args(data_csv, 1), "--threads", "2", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["member_processes"] == 2


def test_interrupt_and_resume_match_serial(serial_run, data_csv, tmp_path):
    out = tmp_path / "run"
    argv = [*_train_args(data_csv, 200), "--threads", "2", "--jobs", "2", "--verbose"]
    command = [sys.executable, "-m", "dvmrl", *argv, "--out", str(out)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
        preexec_fn=_default_sigint,
    )
    lines = []
    try:
        # --verbose logs every epoch record that a member process reports.
        for line in process.stderr:
            lines.append(line)
            if "member 1: epoch 3: " in line:
                break
        # SIGINT to the main process alone: it must stop its members itself.
        process.send_signal(signal.SIGINT)
        rest = process.stderr.read()
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    err = "".join(lines) + rest
    assert code == 130, err
    assert f"continue with: dvmrl train --resume --out {out}" in err
    assert "member 1: interrupted after " in err
    assert not (out / "model.pt").exists()
    assert (out / "member1" / "last.pt").is_file()

    assert main(["train", "--resume", "--out", str(out), "--threads", "2"]) == 0
    _same_members(serial_run, out)


def test_diverged_member_is_usage_error(data_csv, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*_train_args(data_csv, 1), "--lr", "1e6", "--threads", "2", "--jobs", "2"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err
    assert "member 0: training diverged" in err or "member 1: training diverged" in err
    assert f"lower --lr (default 0.001) in another --out, or delete {out}" in err


class _Progress:
    """Progress that records the calls, and can kill a member when it starts."""

    def __init__(self, kill: int | None = None) -> None:
        self.kill = kill
        self.started: list[int] = []
        self.finished: list[int] = []

    def start(self, member: int, slot: int) -> None:
        self.started.append(member)
        if member == self.kill:
            processes = _member_processes.multiprocessing.active_children()
            victim = next(p for p in processes if p.name == f"dvmrl-member-{member}")
            os.kill(victim.pid, signal.SIGKILL)

    def epoch(self, member: int, record: dict) -> None:
        pass

    def finish(self, member: int, summary: dict) -> None:
        self.finished.append(member)


def _jobs(data_csv, tmp_path, count: int) -> list[dict]:
    from dvmrl.featurize import featurize

    df = datasets.load("mp-formation-energy").sample(n=120, random_state=1)
    batch = featurize(df["formula"].tolist())
    targets = df["target"].to_numpy(dtype=np.float64)
    data = (batch[:100], targets[:100], batch[100:], targets[100:])
    model = {"hidden": 8, "layers": 1, "gate_hidden": 8, "msg_hidden": 8}
    run_config = {"model": model, "train": {"epochs": 2, "batch_size": 32}}
    return [
        {
            "member": member,
            "folder": str(tmp_path / f"member{member}"),
            "run_config": run_config,
            "data": data,
            "metadata": {},
            "device": torch.device("cpu"),
            "label": f"member {member}",
            "threads": 1,
        }
        for member in range(count)
    ]


def test_train_members_reports_each_member(data_csv, tmp_path):
    progress = _Progress()
    jobs = _jobs(data_csv, tmp_path, 3)
    finished = _member_processes.train_members(jobs, 2, progress)
    assert sorted(finished) == [0, 1, 2]
    assert progress.started == [0, 1, 2]
    assert sorted(progress.finished) == [0, 1, 2]
    for member in range(3):
        assert (tmp_path / f"member{member}" / "model.pt").is_file()


def test_exception_in_member_reaches_caller(data_csv, tmp_path):
    jobs = _jobs(data_csv, tmp_path, 2)
    jobs[1]["run_config"] = {**jobs[1]["run_config"], "model": {"hidden": -4}}
    with pytest.raises(ValueError, match="hidden") as raised:
        _member_processes.train_members(jobs, 2, _Progress())
    assert raised.value.member == 1


def test_killed_member_is_reported(data_csv, tmp_path):
    jobs = _jobs(data_csv, tmp_path, 2)
    failed = _member_processes.MemberFailed
    with pytest.raises(failed, match="member 1 ended with exit code -9"):
        _member_processes.train_members(jobs, 2, _Progress(kill=1))


def test_jobs_must_be_positive(data_csv, tmp_path, capsys):
    argv = [*_train_args(data_csv, 1), "--jobs", "0", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert "--jobs" in capsys.readouterr().err
