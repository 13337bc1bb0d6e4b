"""Ensemble members trained in their own processes (dvmrl train --jobs).

The member processes are real spawned Python processes that import dvmrl
and train with the compiled core. Nothing here is mocked across the
process boundary.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from child_env import child_environment
from dvmrl import datasets
from dvmrl.cli import _member_processes, main
from dvmrl.training import load_checkpoint

SMALL = ["--hidden", "8", "--layers", "1", "--batch-size", "16"]


def _train_args(alloys_csv, epochs: int) -> list[str]:
    return [
        "train", "--data", str(alloys_csv), "--epochs", str(epochs), "--members", "3",
        *SMALL, "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory, alloys_csv):
    """Three members trained one after another in this process (one thread)."""
    out = tmp_path_factory.mktemp("serial") / "run"
    argv = [*_train_args(alloys_csv, 200), "--threads", "1", "--out", str(out)]
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


def _default_sigint() -> None:
    # A test runner started without job control ignores SIGINT, and a child
    # would inherit that. The command must see Ctrl-C as a terminal sends it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_processes_match_serial_run(serial_run, alloys_csv, tmp_path):
    out = tmp_path / "run"
    argv = [*_train_args(alloys_csv, 200), "--threads", "2", "--jobs", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    _same_members(serial_run, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["member_processes"] == 2
    serial = json.loads((serial_run / "metrics.json").read_text())
    assert serial["member_processes"] == 1


def test_default_is_one_process_per_thread(alloys_csv, tmp_path):
    out = tmp_path / "run"
    argv = [*_train_args(alloys_csv, 1), "--threads", "2", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["member_processes"] == 2


def _children(pid: int) -> list[int]:
    """Return the process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The fields after the command name, which is in parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Return whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start_training(argv: list[str], new_session: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "dvmrl", *argv]
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=child_environment(),
        preexec_fn=_default_sigint,
        start_new_session=new_session,
    )


def _parallel_args(alloys_csv) -> list[str]:
    """Return a 200-epoch run of two member processes that logs every epoch."""
    return [*_train_args(alloys_csv, 200), "--threads", "2", "--jobs", "2", "--verbose"]


def _stop_when(process: subprocess.Popen, texts: list[str], stop) -> tuple[int, str]:
    """Call ``stop()`` once ``texts`` were logged; return the exit code and stderr."""
    try:
        lines = _read_until(process, *texts)
        stop()
        rest = process.stderr.read()
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return code, "".join(lines) + rest


def _read_until(process: subprocess.Popen, *texts: str) -> list[str]:
    """Read stderr lines until each of ``texts`` has appeared in one."""
    lines, missing = [], set(texts)
    for line in process.stderr:
        lines.append(line)
        missing = {text for text in missing if text not in line}
        if not missing:
            break
    return lines


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"]
)
def test_interrupt_and_resume_match_serial(serial_run, alloys_csv, tmp_path, signum):
    out = tmp_path / "run"
    process = _start_training([*_parallel_args(alloys_csv), "--out", str(out)])
    # --verbose logs every epoch record that a member process reports. The
    # signal goes to the main process alone: it must stop its members.
    code, err = _stop_when(
        process, ["member 1: epoch 3: "], lambda: process.send_signal(signum)
    )
    assert code == 130, err
    assert f"continue with: dvmrl train --resume --out {out}" in err
    assert "member 1: interrupted after " in err
    assert not (out / "model.pt").exists()
    assert (out / "member1" / "last.pt").is_file()

    assert main(["train", "--resume", "--out", str(out), "--threads", "2"]) == 0
    _same_members(serial_run, out)


def test_sigterm_to_process_group_saves_members(alloys_csv, tmp_path):
    # A batch system's time limit sends SIGTERM to every process of the job:
    # the members save their states as after Ctrl-C, and the run exits 130,
    # not as if a member had been killed.
    out = tmp_path / "run"
    argv = [*_parallel_args(alloys_csv), "--out", str(out)]
    process = _start_training(argv, new_session=True)
    code, err = _stop_when(
        process,
        ["member 0: epoch 3: ", "member 1: epoch 3: "],
        lambda: os.killpg(process.pid, signal.SIGTERM),
    )
    assert code == 130, err
    assert "before it finished" not in err
    for member in (0, 1):
        assert f"member {member}: interrupted after " in err
        assert (out / f"member{member}" / "last.pt").is_file()
    assert f"continue with: dvmrl train --resume --out {out}" in err


def test_members_stop_when_main_is_killed(alloys_csv, tmp_path):
    out = tmp_path / "run"
    process = _start_training([*_parallel_args(alloys_csv), "--out", str(out)])
    try:
        # Both members are training (a member that is still starting when
        # the main process dies stops before it writes any file).
        _read_until(process, "member 0: epoch 3: ", "member 1: epoch 3: ")
        members = _children(process.pid)
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    # The spawn method also starts a resource tracker, which is not a member.
    assert len(members) >= 2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_running(pid) for pid in members):
        time.sleep(0.2)
    assert not any(_running(pid) for pid in members)
    # They stopped with their states saved, not after finishing on their own.
    for member in (0, 1):
        assert (out / f"member{member}" / "last.pt").is_file()
        assert not (out / f"member{member}" / "model.pt").exists()


def test_diverged_member_is_usage_error(alloys_csv, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        *_train_args(alloys_csv, 1),
        "--lr",
        "1e6",
        "--threads",
        "2",
        "--jobs",
        "2",
    ]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err
    assert "member 0: training diverged" in err or "member 1: training diverged" in err
    assert f"lower --lr (default 0.001) in another --out, or delete {out}" in err


class _Progress:
    """Progress that records the calls, and can kill a member when it starts."""

    def __init__(self, kill: int | None = None, interrupt_at_end: bool = False) -> None:
        self.kill = kill
        self.interrupt_at_end = interrupt_at_end
        self.started: list[int] = []
        self.finished: list[int] = []
        self.closed = False

    def start(self, member: int) -> None:
        self.started.append(member)
        if member == self.kill:
            processes = _member_processes.multiprocessing.active_children()
            victim = next(p for p in processes if p.name == f"dvmrl-member-{member}")
            os.kill(victim.pid, signal.SIGKILL)

    def epoch(self, member: int, record: dict) -> None:
        pass

    def finish(self, member: int, summary: dict) -> None:
        self.finished.append(member)
        if self.interrupt_at_end and len(self.finished) == len(self.started):
            raise KeyboardInterrupt  # as Ctrl-C there would

    def close(self) -> None:
        self.closed = True


def _jobs(alloys_csv, tmp_path, count: int) -> list[dict]:
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


def test_train_members_reports_each_member(alloys_csv, tmp_path):
    progress = _Progress()
    jobs = _jobs(alloys_csv, tmp_path, 3)
    finished = _member_processes.train_members(jobs, 2, progress)
    assert sorted(finished) == [0, 1, 2]
    assert progress.started == [0, 1, 2]
    assert sorted(progress.finished) == [0, 1, 2]
    for member in range(3):
        assert (tmp_path / f"member{member}" / "model.pt").is_file()


def test_members_log_through_main(alloys_csv, tmp_path, caplog):
    jobs = _jobs(alloys_csv, tmp_path, 2)
    _member_processes.train_members(jobs, 2, _Progress())
    # A second run finds the state files and logs that it resumes them.
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, "dvmrl"):
        _member_processes.train_members(jobs, 2, _Progress())
    lines = [r.getMessage() for r in caplog.records if r.name == "dvmrl"]
    for member in (0, 1):
        folder = tmp_path / f"member{member}"
        assert f"resuming {folder} after 2 epochs" in lines


def test_interrupt_as_last_member_ends(alloys_csv, tmp_path):
    progress = _Progress(interrupt_at_end=True)
    with pytest.raises(KeyboardInterrupt):
        _member_processes.train_members(_jobs(alloys_csv, tmp_path, 2), 2, progress)
    assert progress.closed


def test_exception_in_member_reaches_caller(alloys_csv, tmp_path):
    jobs = _jobs(alloys_csv, tmp_path, 2)
    jobs[1]["run_config"] = {**jobs[1]["run_config"], "model": {"hidden": -4}}
    with pytest.raises(ValueError, match="hidden") as raised:
        _member_processes.train_members(jobs, 2, _Progress())
    assert raised.value.member == 1


def test_killed_member_is_reported(alloys_csv, tmp_path):
    jobs = _jobs(alloys_csv, tmp_path, 2)
    failed = _member_processes.MemberFailed
    with pytest.raises(failed, match="member 1 ended with signal SIGKILL"):
        _member_processes.train_members(jobs, 2, _Progress(kill=1))


def test_killed_member_exit_code(alloys_csv, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    original = _member_processes.train_members

    def kill_member_one(jobs, processes, progress):
        # The CLI's own progress object, wrapped so that member 1 is killed.
        class Killing:
            def __getattr__(self, name):
                return getattr(progress, name)

            def start(self, member):
                progress.start(member)
                _Progress(kill=1).start(member)

        return original(jobs, processes, Killing())

    monkeypatch.setattr(_member_processes, "train_members", kill_member_one)
    argv = [*_train_args(alloys_csv, 200), "--threads", "2", "--jobs", "2"]
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "internal error" not in err
    assert "member 1 ended with signal SIGKILL" in err
    assert f"continue with: dvmrl train --resume --out {out}" in err


def test_jobs_must_be_positive(alloys_csv, tmp_path, capsys):
    argv = [
        *_train_args(alloys_csv, 1),
        "--jobs",
        "0",
        "--out",
        str(tmp_path / "run"),
    ]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert "--jobs" in capsys.readouterr().err


# Run in a child process: a broken queue hangs its next put, and the child's
# timeout turns that into a failure. The child reads its own queue in a
# thread, as the main process reads a member's.
_PUT_FLOOD = """
import multiprocessing, os, signal, sys, threading
from dvmrl.cli import _member_processes as mp

messages = multiprocessing.get_context("spawn").Queue()
for trial in range(30):
    seen = threading.Event()

    def read():
        while messages.get(timeout=20) != "last":
            pass
        seen.set()

    threading.Thread(target=read, daemon=True).start()
    mp._interrupt_once()
    timer = threading.Timer(0.002 + 0.001 * (trial % 9), os.kill,
                            (os.getpid(), signal.SIGINT))
    try:
        timer.start()  # inside: the signal may come before start() returns
        while True:
            mp._put(messages, "x" * 100)
    except KeyboardInterrupt:
        pass
    timer.join()
    mp._put(messages, "last")
    if not seen.wait(20):
        sys.exit(f"trial {trial}: the message after Ctrl-C was lost")
print("delivered")
"""


def test_put_survives_interrupt():
    # In a member process, Ctrl-C lands wherever the training is. It must not
    # break the queue to the main process, whose next message names the file
    # with the saved state. Raised inside Queue.put, the interrupt can leave
    # the queue so that the next put hangs, so the member defers it until the
    # put returns.
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PUT_FLOOD],
            capture_output=True,
            text=True,
            timeout=180,
            env=child_environment(),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a put after Ctrl-C hung: the interrupt broke the queue")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "delivered"


def test_interrupt_deferred_during_put():
    interrupt = _member_processes._Interrupt()
    interrupt.depth = 1  # as inside a put
    interrupt.handler(signal.SIGINT, None)
    assert interrupt.deferred
    interrupt.depth = 0
    with pytest.raises(KeyboardInterrupt):
        interrupt.put(queue.Queue(), "item")
    # Later signals are ignored, so they cannot break the saving of the state.
    interrupt.handler(signal.SIGINT, None)
    interrupt.put(queue.Queue(), "item")


def test_main_signal_stops_members(alloys_csv, tmp_path):
    # The main process records SIGINT while it reads its members' messages
    # and stops them between messages, then restores the handler.
    class Interrupting(_Progress):
        def __init__(self) -> None:
            super().__init__()
            self.reported: set[int] = set()

        def epoch(self, member: int, record: dict) -> None:
            self.reported.add(member)
            os.kill(os.getpid(), signal.SIGINT)

    jobs = _jobs(alloys_csv, tmp_path, 2)
    for job in jobs:
        train = {"epochs": 50, "batch_size": 32}
        job["run_config"] = {**job["run_config"], "train": train}
    before = signal.getsignal(signal.SIGINT)
    progress = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        _member_processes.train_members(jobs, 2, progress)
    assert signal.getsignal(signal.SIGINT) is before
    assert progress.closed
    # A member still starting then stops before it writes anything; one that
    # reported an epoch has its state saved.
    assert progress.reported
    for member in progress.reported:
        assert (tmp_path / f"member{member}" / "last.pt").is_file()
    for member in (0, 1):
        assert not (tmp_path / f"member{member}" / "model.pt").exists()
    assert not _member_processes.multiprocessing.active_children()
