import json
import subprocess
import sys

import pytest

import dvmrl
from dvmrl import _core


def test_build_info_has_required_keys():
    info = dvmrl.build_info()
    for key in (
        "version",
        "compiler",
        "thread_backend",
        "num_threads",
        "cuda_compiled",
        "cuda_architectures",
        "gpu_usable",
        "torch_version",
    ):
        assert key in info, key
    assert info["version"] == dvmrl.__version__


def test_build_info_cuda_architectures_when_compiled():
    info = dvmrl.build_info()
    if info["cuda_compiled"]:
        assert info["cuda_architectures"] != ""
    else:
        assert info["cuda_architectures"] == ""
        assert info["gpu_usable"] is False


def test_set_num_threads_round_trip():
    before = dvmrl.get_num_threads()
    try:
        assert dvmrl.set_num_threads(1) == 1
        assert dvmrl.get_num_threads() == 1
        assert dvmrl.build_info()["num_threads"] == 1
        assert dvmrl.set_num_threads(3) == 3
        assert _core.get_num_threads() == 3
    finally:
        dvmrl.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -2, 1.5, 1025, 99999999999])
def test_set_num_threads_rejects_bad_count(bad):
    with pytest.raises(ValueError, match=r"threads must be an integer in 1 \.\. 1024"):
        dvmrl.set_num_threads(bad)


def test_resolve_device_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        dvmrl.resolve_device("tpu")
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        dvmrl.resolve_device("cuda:x")


def test_resolve_device_checks_gpu_number(monkeypatch):
    # A stand-in for one visible GPU: the check runs before any CUDA call.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dvmrl.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match=r"sees 1 CUDA GPU\(s\), cuda:0 \.\. cuda:0"):
        dvmrl.resolve_device("cuda:7")


def test_threads_too_many_exit_2(capsys):
    from dvmrl.cli import main

    code = main(["predict", "--threads", "99999999999", "missing.pt", "NiAl"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--threads: threads must be an integer in 1 .. 1024" in err


def test_info_command_prints_json():
    result = subprocess.run(
        [sys.executable, "-m", "dvmrl", "info", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["version"] == dvmrl.__version__


def test_unknown_command_exits_2():
    result = subprocess.run(
        [sys.executable, "-m", "dvmrl", "no-such-command"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def _run_cli(*words):
    return subprocess.run(
        [sys.executable, "-m", "dvmrl", *words],
        capture_output=True,
        text=True,
        check=False,
    )


def test_parser_error_is_one_line():
    result = _run_cli("info", "--no-such-option")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "see 'dvmrl info --help'" in lines[0]


def test_verbose_accepted_after_command():
    result = _run_cli("info", "--json", "--verbose")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["version"] == dvmrl.__version__


def test_main_keeps_caller_signal_handlers(monkeypatch, capsys):
    # Called from Python, main leaves the caller's Ctrl-C handler in place.
    import signal

    from dvmrl.cli import main

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(sys, "argv", ["dvmrl", "info", "--json"])
    assert main() == 0
    assert signal.getsignal(signal.SIGINT) is before
    assert json.loads(capsys.readouterr().out)["version"] == dvmrl.__version__


def test_version_option():
    result = _run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"dvmrl {dvmrl.__version__}"


def test_output_path_under_a_file_exits_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = _run_cli(
        "data", "split", "mp-formation-energy", "--split", "random",
        "--out", str(blocker / "split.json"),
    )
    assert result.returncode == 2
    assert f"{blocker} is a file, so nothing can be written under it" in result.stderr
    assert "internal error" not in result.stderr


def test_unusable_path_error_exits_2(tmp_path, monkeypatch, capsys):
    """A path error that no check caught before the work still exits 2."""
    from dvmrl.cli import main

    blocker = tmp_path / "a_file"

    def raise_not_a_directory():
        raise NotADirectoryError(20, "Not a directory", str(blocker / "x"))

    monkeypatch.setattr(dvmrl, "build_info", raise_not_a_directory)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert f"cannot use path '{blocker / 'x'}': Not a directory" in err
    assert "choose another path" in err


def test_positionals_after_options_are_kept():
    from dvmrl.cli import _parse, build_parser

    parser = build_parser()
    args = _parse(
        parser, ["predict", "model.pt", "--alloy-notation", "Ni3Al", "Fe70Ni30"]
    )
    assert args.formulas == ["Ni3Al", "Fe70Ni30"]
    assert args.alloy_notation is True


def test_unknown_option_after_positionals_rejected():
    result = _run_cli("predict", "model.pt", "Ni3Al", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


@pytest.mark.parametrize(
    "argv", [["data", "info", "mp-formation-energy"], ["agent", "evaluate"]]
)
def test_unknown_option_names_action_help(argv, capsys):
    # The group page ("dvmrl data --help") does not list an action's options.
    from dvmrl.cli import _parse, build_parser

    with pytest.raises(SystemExit) as stop:
        _parse(build_parser(), [*argv, "--bogus"])
    assert stop.value.code == 2
    assert f"see 'dvmrl {argv[0]} {argv[1]} --help'" in capsys.readouterr().err


@pytest.mark.parametrize("verbose", [False, True])
def test_internal_error_hint(monkeypatch, capsys, verbose):
    """The traceback hint appears only when --verbose did not print it already."""
    from dvmrl.cli import main

    def broken():
        raise RuntimeError("stand-in fault")

    monkeypatch.setattr(dvmrl, "build_info", broken)
    code = main(["info", *(["--verbose"] if verbose else [])])
    err = capsys.readouterr().err
    assert code == 1
    assert "internal error: RuntimeError: stand-in fault" in err
    assert ("rerun with --verbose" in err) is not verbose
    assert ("Traceback" in err) is verbose


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", 1), ("3", 3), ("3,1", 3), (" 3 ", 3), ("3\t,1", 3), (" 3 , 1", 3), ("3\n", 3),
        ("abc", None), ("0", None), ("", None), ("3 x", None), ("-2", None),
    ],  # fmt: skip
)
def test_default_threads_follow_omp_num_threads(value, expected):
    # The pool is made once per process, so each value needs a fresh one.
    # None means the cores this process may run on.
    import os

    from child_env import child_environment

    env = {**child_environment(), "OMP_NUM_THREADS": value}
    code = (
        "import dvmrl, dvmrl._runtime as r; "
        "print(r.default_threads(), dvmrl.get_num_threads())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    cores = len(os.sched_getaffinity(0))
    count = cores if expected is None else expected
    assert result.stdout.split() == [str(count), str(count)]


def test_finished_command_ignores_late_signals():
    # A finished command ignores SIGINT and SIGTERM while the interpreter
    # shuts down: sent then, neither changes the exit status from 0.
    from child_env import child_environment

    code = (
        "import os, signal, sys\n"
        "from dvmrl.cli import console_main\n"
        "sys.argv = ['dvmrl', 'info', '--json']\n"
        "status = console_main()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.exit(status)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=child_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["version"] == dvmrl.__version__


def test_bench_threads_problem_names_the_source(monkeypatch):
    # Benchmarks reject more threads than cores, whether --threads or
    # OMP_NUM_THREADS requested them, because the timings would measure
    # oversubscription.
    from dvmrl._runtime import _available_cores
    from dvmrl.cli._common import bench_threads_problem

    cores = _available_cores()
    before = dvmrl.get_num_threads()
    try:
        assert bench_threads_problem(1) is None
        message = bench_threads_problem(cores + 1)
        assert f"--threads {cores + 1} exceeds the {cores} cores" in message
        monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 2))
        message = bench_threads_problem(None)
        assert f"OMP_NUM_THREADS={cores + 2} exceeds the {cores} cores" in message
        assert "threads must be an integer in 1 .. 1024" in bench_threads_problem(10**5)
    finally:
        dvmrl.set_num_threads(before)


def test_output_file_problem(tmp_path):
    from dvmrl.cli._common import output_file_problem

    assert output_file_problem(str(tmp_path / "out.json")) is None
    assert "is a folder; pass a file name" in output_file_problem(str(tmp_path))
    missing = tmp_path / "nope" / "out.json"
    assert "is missing or not writable" in output_file_problem(str(missing))


def test_check_bench_compute_rejects_device_and_threads(capsys):
    import argparse

    from dvmrl.cli._common import check_bench_compute

    parser = argparse.ArgumentParser(prog="bench")
    with pytest.raises(SystemExit) as caught:
        check_bench_compute(parser, argparse.Namespace(threads=1, device="tpu"))
    assert caught.value.code == 2
    assert "--device: unknown device 'tpu'" in capsys.readouterr().err
    args = argparse.Namespace(threads=1, device="cpu")
    check_bench_compute(parser, args)
    assert args.device == "cpu"
    with pytest.raises(SystemExit):
        check_bench_compute(parser, argparse.Namespace(threads=10**5))
    assert "threads must be an integer in 1 .. 1024" in capsys.readouterr().err
