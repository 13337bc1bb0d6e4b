"""Shared option types and parsing rules of the command-line interface."""

from __future__ import annotations

import argparse
import json

import pytest

from dvmrl.cli import main
from dvmrl.cli._common import (
    NEGATIVE_NUMBER,
    accept_negative_numbers,
    finite_float,
    non_negative_int,
    seed_int,
)


def _threshold_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test", exit_on_error=False)
    accept_negative_numbers(parser)
    parser.add_argument("--stability-threshold", type=finite_float)
    parser.add_argument("--flag", action="store_true")
    return parser


@pytest.mark.parametrize(
    ("text", "value"),
    [("-1", -1.0), ("-1e9", -1e9), ("-2.5E-3", -2.5e-3), ("-.5", -0.5), ("-1.", -1.0)],
)
def test_negative_number_option_value(text, value):
    args = _threshold_parser().parse_args(["--stability-threshold", text])
    assert args.stability_threshold == value


def test_negative_infinity_reaches_type():
    with pytest.raises(argparse.ArgumentError, match="expected a finite number"):
        _threshold_parser().parse_args(["--stability-threshold", "-inf"])


def test_plain_parser_misreads_exponent():
    # The rule that accept_negative_numbers replaces, as CPython 3.11 has it.
    parser = argparse.ArgumentParser(prog="test", exit_on_error=False)
    parser.add_argument("--stability-threshold", type=finite_float)
    with pytest.raises(argparse.ArgumentError, match="expected one argument"):
        parser.parse_args(["--stability-threshold", "-1e9"])


def test_options_parse_beside_negative_values():
    args = _threshold_parser().parse_args(["--flag", "--stability-threshold=-1e9"])
    assert args.flag
    assert args.stability_threshold == -1e9


@pytest.mark.parametrize("text", ["-1e9", "-0.5", "-7", "-.5e+3", "-inf", "-NaN"])
def test_negative_number_pattern_matches(text):
    assert NEGATIVE_NUMBER.match(text)


@pytest.mark.parametrize("text", ["--seed", "-e9", "-1e", "-1_000", "-x", "1e9"])
def test_negative_number_pattern_rejects(text):
    assert not NEGATIVE_NUMBER.match(text)


def test_non_negative_int_accepts():
    assert non_negative_int("0") == 0
    assert non_negative_int("42") == 42


@pytest.mark.parametrize(
    ("text", "message"),
    [("-1", "expected an integer >= 0, got -1"), ("1.5", "expected an integer")],
)
def test_non_negative_int_rejects(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        non_negative_int(text)


def test_seed_int_bounds():
    assert seed_int("0") == 0
    assert seed_int(str(2**32 - 1)) == 2**32 - 1
    with pytest.raises(argparse.ArgumentTypeError, match="a seed from 0 to 4294967295"):
        seed_int(str(2**64))


def test_huge_seed_exits_2(tmp_path, capsys):
    out = tmp_path / "agent.pt"
    argv = ["agent", "train", "--episodes", "1", "--seed", str(2**64)]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--out", str(out)])
    assert stop.value.code == 2
    assert "a seed from 0 to 4294967295" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--out", ""],
        ["evaluate", "model.pt", "--out", " "],
        ["validate", "model.pt", "--out", ""],
        ["run", "--out", ""],
        ["data", "split", "mp-formation-energy", "--split", "random", "--out", ""],
    ],
)
def test_empty_output_path_rejected(command, capsys):
    # An empty path means the current folder, which the user did not ask for.
    with pytest.raises(SystemExit) as info:
        main(command)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--out: expected a path, got" in err


@pytest.mark.parametrize(
    "command",
    [
        ["train"],
        ["evaluate"],
        ["validate"],
        ["predict"],
        ["data", "info"],
        ["data", "split"],
    ],
)
def test_alloy_notation_help_states_rules(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the shares sum to 100 (at.%) or 1" in text
    assert "so Ni60Al10 is Ni6Al" in text


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--out", "unused"],
        ["validate", "model.pt"],
        ["agent", "train", "--episodes", "1", "--out", "unused.pt"],
        ["agent", "evaluate"],
        ["data", "split", "mp-formation-energy", "--split", "chemsys", "--out", "x"],
    ],
)
def test_negative_seed_names_the_option(command, capsys):
    with pytest.raises(SystemExit) as caught:
        main([*command, "--seed", "-1"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seed: expected an integer >= 0, got -1" in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (
            ["data", "info", "mp-formation-energy", "--formula-column", "f"],
            "--formula-column",
        ),
        (
            ["data", "split", "mp-formation-energy", "--split", "random"]
            + ["--alloy-notation", "--out", "s.json"],
            "--alloy-notation",
        ),
        (
            ["train", "--target-column", "y", "--formula-column", "f", "--out", "t"],
            "--formula-column and --target-column",
        ),
        (
            ["run", "--formula-column", "f", "--budget", "quick", "--out", "r"],
            "--formula-column",
        ),
    ],
)
def test_csv_options_rejected_for_vendored(argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {named} " in err
    assert "only to a CSV file, not to the vendored data set" in err
    assert "vendored data set 'mp-formation-energy'" in err
    assert list(tmp_path.iterdir()) == []


def test_data_info_empty_name(capsys):
    assert main(["data", "info", ""]) == 2
    assert "the data set name is empty" in capsys.readouterr().err


def test_data_info_counts_other_compositions(tmp_path, capsys):
    path = tmp_path / "mixed.csv"
    path.write_text("formula,target\nNiAl,-0.5\nAlCoNi,-0.3\nAlCoFeNi,-0.2\nFe,0.0\n")
    assert main(["data", "info", str(path)]) == 0
    out = capsys.readouterr().out
    counts = "rows 4 (1 binaries, 1 ternaries, 2 of one or of four and more elements)"
    assert counts in out
    assert main(["data", "info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["other_compositions"] == 2


def test_data_info_hull_counts_near_hull(capsys):
    # Rows at or below the threshold lie on or near the hull, not all on it.
    assert main(["data", "info", "mp-energy-above-hull"]) == 0
    out = capsys.readouterr().out
    assert "within 25 meV/atom of the hull (target <= 0.025 eV/atom):" in out


def test_info_hull_csv_target_kind(tmp_path, capsys, caplog):
    from dvmrl.datasets import load

    hull = load("mp-energy-above-hull").iloc[:200]
    path = tmp_path / "hull.csv"
    hull[["formula", "target"]].to_csv(path, index=False)
    assert main(["data", "info", str(path)]) == 0
    assert "--target-kind energy_above_hull" in caplog.text
    assert "stable against the elements" in capsys.readouterr().out
    caplog.clear()
    assert main(["data", "info", str(path), "--target-kind", "energy_above_hull"]) == 0
    assert "--target-kind energy_above_hull" not in caplog.text
    assert "within 25 meV/atom of the hull" in capsys.readouterr().out


def test_info_rejects_contradicting_fetched_kind(tmp_path, capsys):
    from conftest import write_fetched_csv

    csv = str(write_fetched_csv(tmp_path, "energy_above_hull"))
    assert main(["data", "info", csv, "--target-kind", "formation_energy"]) == 2
    assert "states that its targets are energy_above_hull" in capsys.readouterr().err
    assert main(["data", "info", csv, "--target-kind", "energy_above_hull"]) == 0


def test_info_rejects_vendored_target_kind(capsys):
    argv = ["data", "info", "mp-formation-energy", "--target-kind", "energy_above_hull"]
    assert main(argv) == 2
    assert "--target-kind applies only to a CSV file" in capsys.readouterr().err


def test_target_kinds_match_thresholds():
    # The CLI lists the kinds without importing the data package at start-up.
    from dvmrl.cli._common import TARGET_KINDS
    from dvmrl.datasets import STABILITY_THRESHOLDS

    assert TARGET_KINDS == tuple(STABILITY_THRESHOLDS)
