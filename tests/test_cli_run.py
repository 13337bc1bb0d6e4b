import json
import os
import signal
import subprocess
import sys
import time

import pytest

from child_env import child_environment
from dvmrl.agent import PRETRAINED_AGENT
from dvmrl.cli import main
from dvmrl.cli import run as run_cli
from tiny_run import TINY

TINY_BUDGET = TINY.to_dict()


def command(*args):
    return [sys.executable, "-m", "dvmrl", "run", "--threads", "2", *args]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_run")


@pytest.fixture(scope="module")
def budget_file(workdir):
    path = workdir / "tiny.json"
    path.write_text(json.dumps(TINY_BUDGET))
    return str(path)


@pytest.fixture(scope="module")
def agent_args(workdir, make_untrained_agent):
    """Use the shipped agent when the package has it, else an untrained one."""
    if PRETRAINED_AGENT.is_file():
        return []
    return ["--agent", make_untrained_agent(workdir / "agent.pt")]


def test_quick_smoke(workdir, agent_args):
    out = workdir / "quick"
    started = time.perf_counter()
    result = subprocess.run(
        command("--budget", "quick", "--out", str(out), *agent_args),
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["complete"]
    assert report["methods"] == ["random", "bayesian", "agent"]
    assert (out / "report.md").is_file()
    assert "dvmrl run" in (out / "run.log").read_text()
    for method in ("random", "bayesian", "agent"):
        assert f"{method} seed 0" in result.stderr
    # quick must fit in 3 minutes on 2 cores; allow slack for a shared machine.
    assert elapsed < 240


def _default_sigint():
    """Give the child the default SIGINT action before it starts Python.

    A shell without job control starts background commands with SIGINT
    ignored, and Python then keeps ignoring it, so the Ctrl-C of the test
    would be lost when the suite itself runs in the background.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_until(cmd, out, unit, count, sig):
    """Start ``cmd`` and send ``sig`` once ``unit`` has ``count`` trials or steps."""
    process = subprocess.Popen(
        cmd,
        env=child_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_default_sigint,
    )
    sent = False
    deadline = time.monotonic() + 200
    while process.poll() is None and time.monotonic() < deadline:
        try:
            state = json.loads((out / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {"units": {}}
        entry = state["units"].get(unit, {})
        if len(entry.get("trials", [])) + len(entry.get("steps", [])) >= count:
            process.send_signal(sig)
            sent = True
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    stderr = process.stderr.read().decode()
    process.stderr.close()
    return sent, process.returncode, stderr


def unit_results(out):
    state = json.loads((out / "state.json").read_text())
    return {
        key: {
            "test": unit["test"],
            "chemsys": unit["chemsys"],
            "robustness": unit["robustness"]["robustness_radius"],
            "vulnerability": unit["robustness"]["vulnerability"],
            "config": unit["chosen"]["config"],
        }
        for key, unit in state["units"].items()
    }


def test_kill_and_resume_matches(workdir, budget_file, agent_args):
    base = ["--budget", budget_file, "--no-progress", *agent_args]
    reference = workdir / "reference"
    result = subprocess.run(
        command(*base, "--out", str(reference)),
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    out = workdir / "interrupted"
    first = command(*base, "--out", str(out))
    resume = command(*base, "--out", str(out), "--resume")
    sent, code, _ = run_until(first, out, "random/seed0", 2, signal.SIGKILL)
    assert sent
    assert code == -signal.SIGKILL
    sent, code, stderr = run_until(resume, out, "bayesian/seed0", 2, signal.SIGTERM)
    assert sent
    assert code == 130, stderr[-2000:]
    assert f"continue with: dvmrl run --resume --out {out}" in stderr
    sent, code, stderr = run_until(resume, out, "agent/seed0", 1, signal.SIGINT)
    assert sent
    assert code == 130, stderr[-2000:]
    final = subprocess.run(
        resume, env=child_environment(), capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stderr[-2000:]

    expected = unit_results(reference)
    got = unit_results(out)
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key]["config"] == expected[key]["config"], key
        assert got[key]["test"] == expected[key]["test"], key
        assert got[key]["chemsys"] == expected[key]["chemsys"], key
        assert got[key]["robustness"] == expected[key]["robustness"], key
        assert got[key]["vulnerability"] == expected[key]["vulnerability"], key
    assert not list(out.rglob("*.tmp"))


def test_help_states_epochs(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "quick: 16 epochs per method and seed" in text
    assert "small: 60 epochs per method and seed" in text
    assert "full: 600 epochs per method and seed" in text
    assert "subsampled" in text


def test_unknown_method_exit_2(tmp_path, capsys):
    code = main(["run", "--methods", "random", "grid", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "unknown method" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_data_exit_2(tmp_path, capsys):
    code = main(["run", "--data", "nope-data", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope-data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_budget_too_small_exit_2(tmp_path, capsys):
    path = tmp_path / "budget.json"
    path.write_text(json.dumps({**TINY_BUDGET, "epochs": 1, "trial_epochs": 4}))
    code = main(["run", "--budget", str(path), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot fit one trial" in err
    # The trial rules are checked with the methods, after the file was read,
    # and the message still names the file.
    assert f"budget file {path}: budget" in err
    assert not (tmp_path / "o").exists()


def test_budget_file_named_in_run_check(tmp_path, capsys):
    # n_initial_points is checked with the methods, after the file was read,
    # and the message still names the file.
    path = tmp_path / "budget.json"
    path.write_text(json.dumps({**TINY_BUDGET, "n_initial_points": 50}))
    code = main(["run", "--budget", str(path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"budget file {path}: budget" in capsys.readouterr().err


def test_budget_file_not_blamed_for_methods(tmp_path, capsys):
    path = tmp_path / "budget.json"
    path.write_text(json.dumps(TINY_BUDGET))
    argv = ["run", "--budget", str(path), "--methods", "foo"]
    code = main([*argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown method(s) ['foo']" in err
    assert "budget file" not in err


def test_unknown_budget_exit_2(tmp_path, capsys):
    code = main(["run", "--budget", "huge", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "unknown budget 'huge'" in capsys.readouterr().err


def test_occupied_out_exit_2(workdir, capsys):
    out = workdir / "reference"
    if not (out / "report.json").is_file():
        pytest.skip("needs the reference run of test_kill_and_resume_matches")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code = main(["run", "--methods", "random", "--out", str(out)])
    assert code == 2
    assert "pass --resume" in capsys.readouterr().err
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert before == after


def test_missing_agent_exit_2(tmp_path, capsys):
    code = main(
        [
            "run",
            "--methods",
            "agent",
            "--agent",
            str(tmp_path / "none.pt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_out_is_a_file_exit_2(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code = main(["run", "--methods", "random", "--out", str(afile)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--out {afile} is a file, but --out must be a folder" in err
    assert "Errno" not in err
    assert afile.read_text() == "mine"


def test_out_not_writable_exit_2(tmp_path, capsys, monkeypatch):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:
        # Root bypasses file permissions, so the test raises the system's
        # PermissionError itself.
        import tempfile

        def reject(*args, **kwargs):
            raise PermissionError(13, "Permission denied", f"{kwargs['dir']}/.x.tmp")

        monkeypatch.setattr(tempfile, "mkstemp", reject)
    try:
        code = main(["run", "--methods", "random", "--out", str(out)])
    finally:
        out.chmod(0o755)
    assert code == 2
    err = capsys.readouterr().err
    assert f"output folder {out} is not writable (Permission denied)" in err
    assert ".tmp" not in err
    assert not list(out.iterdir())


def test_resume_missing_folder_exit_2(tmp_path, capsys):
    out = tmp_path / "never-ran"
    code = main(["run", "--methods", "random", "--out", str(out), "--resume"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"nothing to resume: output folder {out} does not exist" in err
    assert "without --resume" in err
    assert not out.exists()


@pytest.mark.parametrize("option", [["--agent", "missing.pt"], ["--agent-learn"]])
def test_agent_options_without_agent_exit_2(tmp_path, capsys, option):
    out = tmp_path / "o"
    code = main(["run", "--methods", "random", *option, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{option[0]} applies only to the agent method" in err
    assert not out.exists()


def test_help_states_cost_of_seeds(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "time and disk grow in proportion to N" in text
    assert "about 3 minutes" not in text


def test_resume_with_methods_reordered(workdir, budget_file, agent_args, capsys):
    out = workdir / "reference"
    if not (out / "report.json").is_file():
        pytest.skip("needs the reference run of test_kill_and_resume_matches")
    before = (out / "report.json").read_text()
    code = main(
        [
            "run",
            "--budget",
            budget_file,
            "--methods",
            "agent",
            "random",
            "bayesian",
            "--out",
            str(out),
            "--resume",
            "--no-progress",
            *agent_args,
        ]
    )
    assert code == 0, capsys.readouterr().err
    after = json.loads((out / "report.json").read_text())
    # The stored order is kept, and the finished units are not rerun.
    assert after["methods"] == ["random", "bayesian", "agent"]
    assert after["results"] == json.loads(before)["results"]


def test_resume_takes_recorded_settings(workdir, capsys):
    # Only --resume and --out: the budget file, agent and methods come from
    # run.json, so the default budget does not clash with the recorded one.
    out = workdir / "reference"
    if not (out / "report.json").is_file():
        pytest.skip("needs the reference run of test_kill_and_resume_matches")
    before = json.loads((out / "report.json").read_text())
    code = main(["run", "--out", str(out), "--resume", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    after = json.loads((out / "report.json").read_text())
    assert after["results"] == before["results"]
    assert after["methods"] == before["methods"]


def test_resume_option_still_checked(workdir, capsys):
    out = workdir / "reference"
    if not (out / "report.json").is_file():
        pytest.skip("needs the reference run of test_kill_and_resume_matches")
    code = main(["run", "--out", str(out), "--resume", "--budget", "quick"])
    assert code == 2
    assert "other settings" in capsys.readouterr().err


def sample_csv(path, rows: int):
    """Write ``rows`` compositions of the vendored data to ``path``; return it."""
    from dvmrl.datasets import load

    sample = load("mp-formation-energy").sample(n=rows, random_state=1)
    sample[["formula", "target"]].to_csv(path, index=False)
    return path


def test_tiny_data_leaves_no_folder(tmp_path, capsys):
    data = sample_csv(tmp_path / "ten.csv", 10)
    out = tmp_path / "run"
    argv = ["run", "--budget", "quick", "--data", str(data), "--methods", "random"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 2
    assert "leaves too few in some parts" in capsys.readouterr().err
    # Nothing is written, so the same --out works once the data is fixed.
    assert not out.exists()


def test_small_data_warns_about_winners(tmp_path, capsys):
    data = sample_csv(tmp_path / "small.csv", 80)
    out = tmp_path / "run"
    argv = ["run", "--budget", "quick", "--data", str(data)]
    argv += ["--methods", "random", "bayesian"]
    code = main([*argv, "--out", str(out), "--no-progress", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: a test part has only" in captured.err
    # The summary names every counted metric in the report's words.
    for label in ("test RMSE (eV/atom)", "vulnerability (eV/atom)", "chemsys hold-out"):
        assert label in captured.out
    assert "one seed: ties were judged by the 0.5 % resolution" in captured.out
    assert (
        "Test parts: 8 compositions (random split)" in (out / "report.md").read_text()
    )


def test_one_method_summary_values():
    report = {
        "methods": ["agent"],
        "summary": {
            "test_rmse": {"agent": {"mean": 0.41234, "std": 0.0123, "n": 3}},
            "vulnerability": {"agent": {"mean": 0.02, "std": None, "n": 1}},
            "robustness_radius": {"agent": {"mean": None, "std": None, "n": 0}},
        },
    }
    own = run_cli._own_value
    assert own(report, "test_rmse") == "0.4123 ± 0.012 over 3 seeds (DQN agent)"
    assert own(report, "vulnerability") == "0.02 (DQN agent)"
    assert own(report, "robustness_radius") == "n/a (DQN agent)"


def test_summary_line_names_methods():
    tie = {"winner": "random", "tie": True, "tied_with": ["bayesian", "agent"]}
    expected = "tie: random search, Bayesian optimisation and DQN agent"
    assert run_cli._describe(tie) == expected
    win = {"winner": "agent", "tie": False, "tied_with": [], "spread_assessed": True}
    assert run_cli._describe(win) == "DQN agent wins"
    lead = {**win, "spread_assessed": False}
    assert run_cli._describe(lead) == "DQN agent leads"
    none = {"winner": None, "tie": False, "tied_with": []}
    assert run_cli._describe(none) == "n/a"


def test_csv_with_other_column_names(tmp_path, capsys):
    """The run records --formula-column and --target-column for --resume."""
    import pandas as pd

    data = sample_csv(tmp_path / "small.csv", 80)
    renamed = tmp_path / "renamed.csv"
    pd.read_csv(data).rename(
        columns={"formula": "composition", "target": "e_form"}
    ).to_csv(renamed, index=False)
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps(TINY_BUDGET))
    out = tmp_path / "run"
    argv = [
        "run", "--budget", str(budget), "--data", str(renamed), "--methods", "random",
        "--no-progress", "--threads", "1", "--out", str(out),
    ]
    assert main(argv) == 2
    assert "--formula-column and --target-column" in capsys.readouterr().err
    columns = ["--formula-column", "composition", "--target-column", "e_form"]
    assert main([*argv, *columns]) == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["formula_column"] == "composition"
    assert run["target_column"] == "e_form"
    before = (out / "report.json").read_text()
    code = main(["run", "--out", str(out), "--resume", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["results"] == json.loads(
        before
    )["results"]


def test_relative_data_path_resumes_elsewhere(tmp_path, monkeypatch, capsys):
    data = sample_csv(tmp_path / "small.csv", 80)
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps(TINY_BUDGET))
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    argv = [
        "run", "--budget", str(budget), "--data", "small.csv", "--methods", "random",
        "--no-progress", "--threads", "1", "--out", str(out),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["data"] == str(data.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = main(["run", "--out", str(out), "--resume", "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_agent_of_other_size_rejected_first(tmp_path, budget_file, capsys):
    from dvmrl.agent import DQNAgent

    agent_file = tmp_path / "small.pt"
    DQNAgent(10, 18).save(agent_file)
    out = tmp_path / "o"
    argv = ["run", "--budget", budget_file, "--methods", "random", "agent"]
    code = main([*argv, "--agent", str(agent_file), "--out", str(out), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "the agent expects 10 observation entries and 18 actions" in err
    # The check runs before any unit, so no search has started.
    assert not (out / "state.json").exists()


def test_run_one_chemical_system_rejected(tmp_path, capsys):
    # Enough compositions for the random split, but one chemical system,
    # which the chemsys retraining cannot split.
    csv = tmp_path / "one_system.csv"
    rows = [f"Ni{i}Al{i + 1},{-0.01 * i}" for i in range(1, 31)]
    csv.write_text("formula,target\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    assert main(["run", "--data", str(csv), "--budget", "quick", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "the chemsys split (it retrains the chosen models on it)" in err
    assert "more chemical systems" in err
    assert "test_fraction" not in err


def test_run_out_broken_link_named(tmp_path, capsys):
    link = tmp_path / "dang"
    link.symlink_to(tmp_path / "nowhere" / "deep")
    assert main(["run", "--budget", "quick", "--out", str(link)]) == 2
    err = capsys.readouterr().err
    assert f"--out {link} is a symbolic link to" in err
    assert "which does not exist or loops" in err


def test_run_records_stated_target_kind(tmp_path):
    from conftest import write_fetched_csv
    from dvmrl.cli import build_parser
    from dvmrl.cli._common import UsageError

    csv = write_fetched_csv(tmp_path, "energy_above_hull")
    parser = build_parser()
    base = ["run", "--data", str(csv), "--out", str(tmp_path / "out")]
    args = parser.parse_args(base)
    run_cli._fill_defaults(args)
    assert args.target_kind == "energy_above_hull"
    args = parser.parse_args([*base, "--target-kind", "formation_energy"])
    with pytest.raises(UsageError, match="states that its targets are energy_above"):
        run_cli._fill_defaults(args)
    args = parser.parse_args(["run", "--data", "mp-energy-above-hull", "--out", "x"])
    run_cli._fill_defaults(args)
    assert args.target_kind == "energy_above_hull"


def test_sigterm_during_start_up_exits_130(monkeypatch, capsys):
    # SIGTERM while the parser imports the subcommands gets the Ctrl-C exit
    # too, instead of ending the process with the signal.
    import dvmrl.cli

    real_build = dvmrl.cli.build_parser

    def build_and_terminate():
        os.kill(os.getpid(), signal.SIGTERM)
        return real_build()

    monkeypatch.setattr(dvmrl.cli, "build_parser", build_and_terminate)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["info"]) == 130
    assert "dvmrl: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_ends_command_like_ctrl_c(tmp_path):
    # Every command, not only train and run, turns SIGTERM into the Ctrl-C
    # exit: code 130 and one line on stderr. The signal goes out once the
    # first checkpoint shows that the command is past its start-up.
    out = tmp_path / "agent.pt"
    process = subprocess.Popen(
        [sys.executable, "-m", "dvmrl", "agent", "train", "--episodes", "200",
         "--checkpoint-every", "1", "--out", str(out)],
        env=child_environment(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "agent.progress.json").exists():
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "dvmrl agent train: interrupted" in err
