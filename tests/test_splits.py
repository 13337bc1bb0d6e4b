"""Splits: disjoint parts, determinism, a test part independent of the run seed."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest

from dvmrl import datasets, splits
from dvmrl.cli import main
from dvmrl.compositions import format_formula, parse
from dvmrl.datasets.filters import hume_rothery_passing_rows

CASES = [
    ("random", None),
    ("chemsys", None),
    ("element", "Ni"),
    ("binary-to-ternary", None),
]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return datasets.load("mp-formation-energy")


def _split(frame, kind, holdout, seed=0, **kwargs):
    return splits.make_split(frame, kind, seed=seed, holdout_element=holdout, **kwargs)


def _contains(frame, rows, element):
    return frame["chemsys"].iloc[rows].str.split("-").map(lambda s: element in s)


@pytest.mark.parametrize(("kind", "holdout"), CASES)
def test_parts_disjoint(frame, kind, holdout):
    split = _split(frame, kind, holdout)
    assert len(np.intersect1d(split.train, split.val)) == 0
    assert len(np.intersect1d(split.train, split.test)) == 0
    assert len(np.intersect1d(split.val, split.test)) == 0
    union = np.concatenate([split.train, split.val, split.test])
    assert len(union) == len(frame)
    assert len(np.unique(union)) == len(frame)


@pytest.mark.parametrize(("kind", "holdout"), CASES)
def test_parts_int64_sorted(frame, kind, holdout):
    split = _split(frame, kind, holdout)
    for part in (split.train, split.val, split.test):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)
    assert len(split.train) > 0
    assert len(split.val) > 0
    assert len(split.test) > 0


@pytest.mark.parametrize(("kind", "holdout"), CASES)
def test_split_deterministic(frame, kind, holdout):
    first = _split(frame, kind, holdout, seed=5)
    second = _split(frame, kind, holdout, seed=5)
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.val, second.val)
    np.testing.assert_array_equal(first.test, second.test)
    assert first.fingerprint() == second.fingerprint()


@pytest.mark.parametrize(("kind", "holdout"), CASES)
def test_test_part_ignores_seed(frame, kind, holdout):
    base = _split(frame, kind, holdout, seed=0)
    for seed in (1, 7, 12345):
        other = _split(frame, kind, holdout, seed=seed)
        np.testing.assert_array_equal(base.test, other.test)
        assert not np.array_equal(base.val, other.val)
        assert base.fingerprint() != other.fingerprint()


@pytest.mark.parametrize(("kind", "holdout"), CASES)
def test_vendored_splits_are_not_lopsided(frame, kind, holdout, caplog):
    with caplog.at_level(logging.WARNING, logger="dvmrl.splits"):
        _split(frame, kind, holdout)
    assert caplog.text == ""


def _systems_frame(counts: dict[str, int]) -> pd.DataFrame:
    """Return a frame with ``counts[system]`` distinct binaries of each system."""
    rows = []
    for system, count in counts.items():
        first, second = system.split("-")
        rows += [f"{first}{i + 1}{second}{i + 2}" for i in range(count)]
    table = pd.DataFrame({"formula": rows, "target": np.zeros(len(rows))})
    table["chemsys"] = ["-".join(sorted(parse(f))) for f in rows]
    table["n_elements"] = 2
    return table


def test_lopsided_splits_warn(caplog):
    # One chemical system with most rows overshoots the chemsys test part.
    others = ("Co", "Cu", "Ti", "V", "Cr", "Mn", "Zn", "Mo", "W", "Nb")
    dominant = _systems_frame({"Al-Ni": 39, **{f"{a}-Fe": 1 for a in others}})
    with caplog.at_level(logging.WARNING, logger="dvmrl.splits"):
        split = splits.make_split(dominant, "chemsys", seed=0)
    # The fixed test seed draws Al-Ni into the test part of these 49 rows.
    assert len(split.test) == 40
    assert "puts 40 of 49 rows (82 %) in the test part" in caplog.text
    caplog.clear()
    # Holding out an element of most rows leaves few training rows.
    with caplog.at_level(logging.WARNING, logger="dvmrl.splits"):
        splits.make_split(dominant, "element", seed=0, holdout_element="Ni")
    assert "rows for training against 39 in the test part" in caplog.text


def test_lopsided_validation_part_warns(caplog):
    # The validation part takes whole systems too: seed 1 draws Al-Ni into it.
    others = ("Co", "Cu", "Ti", "V", "Cr", "Mn", "Zn", "Mo", "W", "Nb")
    others += ("Ta", "Hf", "Zr", "Sc", "Y", "Ag", "Au", "Pd", "Pt", "Rh")
    frame = _systems_frame({"Al-Ni": 30, **{f"{a}-Fe": 1 for a in others}})
    with caplog.at_level(logging.WARNING, logger="dvmrl.splits"):
        split = splits.make_split(frame, "chemsys", seed=1)
    assert len(split.val) == 30
    assert "puts 30 of 50 rows (60 %) in the validation part" in caplog.text
    assert "val_fraction asks for about 5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dvmrl.splits"):
        split = splits.make_split(frame, "chemsys", seed=0)
    assert len(split.val) == 5
    assert caplog.text == ""


def test_random_sizes(frame):
    split = _split(frame, "random", None, test_fraction=0.2, val_fraction=0.15)
    assert len(split.test) == round(0.2 * len(frame))
    assert len(split.val) == round(0.15 * len(frame))


def test_chemsys_whole_systems(frame):
    split = _split(frame, "chemsys", None)
    systems = [
        set(frame["chemsys"].iloc[part])
        for part in (split.train, split.val, split.test)
    ]
    assert not systems[0] & systems[1]
    assert not systems[0] & systems[2]
    assert not systems[1] & systems[2]
    # Whole systems overshoot the share by less than one system's rows.
    assert 0.1 * len(frame) <= len(split.test) < 0.1 * len(frame) + 50


def test_element_holdout_rows(frame):
    split = _split(frame, "element", "Ni")
    assert _contains(frame, split.test, "Ni").all()
    assert not _contains(frame, split.train, "Ni").any()
    assert not _contains(frame, split.val, "Ni").any()
    assert len(split.test) == _contains(frame, np.arange(len(frame)), "Ni").sum()
    assert split.holdout_element == "Ni"


def test_binary_to_ternary_parts(frame):
    split = _split(frame, "binary-to-ternary", None)
    n_elements = frame["n_elements"].to_numpy()
    assert set(n_elements[split.train]) == {2}
    assert set(n_elements[split.val]) == {2}
    assert set(n_elements[split.test]) == {3}
    assert len(split.val) == round(0.1 * (n_elements == 2).sum())


def test_binary_to_ternary_skips_quaternaries():
    small = pd.DataFrame(
        {
            "formula": ["AlNi", "CuZn", "FeNi", "AlNiTi", "AlCoCrNi", "MgZn2"],
            "chemsys": ["Al-Ni", "Cu-Zn", "Fe-Ni", "Al-Ni-Ti", "Al-Co-Cr-Ni", "Mg-Zn"],
            "n_elements": [2, 2, 2, 3, 4, 2],
            "target": [0.0] * 6,
        }
    )
    split = splits.make_split(small, "binary-to-ternary", val_fraction=0.25)
    assert split.test.tolist() == [3]
    parts = np.concatenate([split.train, split.val, split.test])
    assert 4 not in parts


def test_test_fraction_changes_test(frame):
    small = _split(frame, "random", None, test_fraction=0.1)
    large = _split(frame, "random", None, test_fraction=0.2)
    assert len(large.test) > len(small.test)


def test_fingerprint_tracks_data(frame):
    base = _split(frame, "random", None)
    changed = frame.copy()
    changed.loc[0, "target"] += 1e-6
    other = _split(changed, "random", None)
    np.testing.assert_array_equal(base.test, other.test)
    assert base.data_fingerprint != other.data_fingerprint
    assert base.fingerprint() != other.fingerprint()


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_save_load_roundtrip(frame, tmp_path, suffix):
    split = _split(frame, "element", "Ni", seed=3)
    path = tmp_path / f"split{suffix}"
    split.save(path)
    loaded = splits.load_split(path)
    np.testing.assert_array_equal(loaded.train, split.train)
    np.testing.assert_array_equal(loaded.val, split.val)
    np.testing.assert_array_equal(loaded.test, split.test)
    assert loaded.kind == "element"
    assert loaded.seed == 3
    assert loaded.holdout_element == "Ni"
    assert loaded.fingerprint() == split.fingerprint()
    assert not list(tmp_path.glob(".*tmp"))


def test_load_tampered_split(frame, tmp_path):
    path = tmp_path / "split.json"
    _split(frame, "random", None).save(path)
    record = json.loads(path.read_text())
    record["test"] = record["test"][:-1]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="fingerprint does not match its indices"):
        splits.load_split(path)


@pytest.mark.parametrize("content", ['{"a": 1}', "[1, 2, 3]"])
def test_load_foreign_json(tmp_path, content):
    path = tmp_path / "other.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="is not a split file of `dvmrl data split`"):
        splits.load_split(path)


def test_load_foreign_npz(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(ValueError, match="is not a split file of `dvmrl data split`"):
        splits.load_split(path)


def test_save_bad_suffix(frame, tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.npz or \.json"):
        _split(frame, "random", None).save(tmp_path / "split.txt")


@pytest.mark.parametrize(
    ("kind", "holdout", "kwargs", "message"),
    [
        ("stratified", None, {}, "unknown split kind 'stratified'"),
        ("element", None, {}, r"needs holdout_element \(--holdout-element\)"),
        ("element", "Xx", {}, "unknown element symbol 'Xx'"),
        ("element", "ni", {}, r"unknown element symbol 'ni'.*did you mean 'Ni'"),
        ("element", "D", {}, r"'D' is the isotope symbol for deuterium"),
        ("element", "Og", {}, r"'Og' is beyond the element table"),
        ("element", "O", {}, "no composition in the data contains 'O'"),
        ("random", "Ni", {}, "applies only to the element split"),
        ("random", None, {"test_fraction": 1.0}, r"test_fraction must be in \[0, 1\)"),
        ("random", None, {"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\)"),
        (
            "random",
            None,
            {"test_fraction": 0.5, "val_fraction": 0.5},
            "must be below 1 to leave training rows",
        ),
        ("random", None, {"seed": -1}, "seed must be an integer >= 0, got -1"),
        # int() would read these as seed 1 without a word.
        ("random", None, {"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
        ("random", None, {"seed": True}, "seed must be an integer >= 0, got True"),
    ],
)
def test_split_errors(frame, kind, holdout, kwargs, message):
    with pytest.raises(ValueError, match=message):
        splits.make_split(frame, kind, holdout_element=holdout, **kwargs)


def test_binary_to_ternary_ignores_test_share(frame):
    # The test part is every ternary, so only the validation share limits training.
    split = splits.make_split(frame, "binary-to-ternary", val_fraction=0.9)
    binaries = int((frame["n_elements"] == 2).sum())
    assert len(split.val) == round(0.9 * binaries)
    assert len(split.train) == binaries - len(split.val)


def test_split_rows_subset(frame):
    rows = np.arange(0, len(frame), 3)
    split = splits.make_split(frame, "chemsys", seed=2, rows=rows)
    direct = splits.make_split(frame.iloc[rows].reset_index(drop=True), "chemsys", 2)
    np.testing.assert_array_equal(split.train, rows[direct.train])
    np.testing.assert_array_equal(split.val, rows[direct.val])
    np.testing.assert_array_equal(split.test, rows[direct.test])
    assert split.data_fingerprint == splits.data_fingerprint(frame)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([0, 1, 1, 2], "must not repeat a position"),
        ([0, 1, 10**9], "must be positions in the data frame"),
        ([-1, 0, 1], "must be positions in the data frame"),
        ([0.5, 1.0, 2.0], "1-D array of integer positions"),
    ],
)
def test_split_rows_invalid(frame, rows, message):
    with pytest.raises(ValueError, match=message):
        splits.make_split(frame, "random", rows=np.array(rows))


def test_save_json_strict(frame, tmp_path):
    path = tmp_path / "split.json"
    splits.make_split(frame, "random").save(path)

    def reject(name):
        raise ValueError(f"{name} is not valid JSON")

    record = json.loads(path.read_text(), parse_constant=reject)
    assert record["kind"] == "random"


def test_binary_to_ternary_needs_ternaries(frame):
    binaries = frame[frame["n_elements"] == 2].reset_index(drop=True)
    with pytest.raises(ValueError, match="the data contain no ternaries"):
        splits.make_split(binaries, "binary-to-ternary")


def test_element_in_every_row():
    small = pd.DataFrame(
        {
            "formula": ["AlNi", "FeNi", "Ni3Ti"],
            "chemsys": ["Al-Ni", "Fe-Ni", "Ni-Ti"],
            "n_elements": [2, 2, 2],
            "target": [0.0] * 3,
        }
    )
    with pytest.raises(ValueError, match="every composition contains 'Ni'"):
        splits.make_split(small, "element", holdout_element="Ni")


def test_missing_columns():
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['chemsys'"):
        splits.make_split(pd.DataFrame({"formula": ["AlNi"] * 4}), "random")


# ---------------------------------------------------------------------------
# CLI


def test_cli_split_npz(frame, tmp_path, capsys):
    out = tmp_path / "split.npz"
    argv = ["data", "split", "mp-formation-energy", "--split", "chemsys", "--seed", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    expected = splits.make_split(frame, "chemsys", seed=4)
    with np.load(out, allow_pickle=False) as archive:
        np.testing.assert_array_equal(archive["test"], expected.test)
        np.testing.assert_array_equal(archive["train"], expected.train)
        meta = json.loads(str(archive["meta"]))
    assert meta["fingerprint"] == expected.fingerprint()


def test_cli_split_unwritable_out(tmp_path, capsys, monkeypatch):
    """An --out that cannot be written exits 2 and names the reason."""
    import os

    argv = ["data", "split", "mp-formation-energy", "--split", "random", "--out"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([*argv, str(blocker / "split.json")]) == 2
    assert f"{blocker} is a file, so nothing can be written" in capsys.readouterr().err
    folder = tmp_path / "split.json"
    folder.mkdir()
    assert main([*argv, str(folder)]) == 2
    assert f"such as {folder / 'split.json'}" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Root may write anywhere, so the folder is made read-only for the check.
    monkeypatch.setattr(
        os, "access", lambda path, mode: path != locked and real_access(path, mode)
    )
    assert main([*argv, str(locked / "split.json")]) == 2
    assert f"the folder {locked} is not writable" in capsys.readouterr().err


def test_cli_split_json(tmp_path):
    out = tmp_path / "split.json"
    argv = ["data", "split", "oqmd-formation-energy", "--split", "element"]
    assert main([*argv, "--holdout-element", "Ni", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "element"
    assert record["holdout_element"] == "Ni"
    assert len(record["test"]) > 0


def test_cli_split_screen(tmp_path, capsys):
    out = tmp_path / "split.json"
    argv = [
        "data",
        "split",
        "mp-energy-above-hull",
        "--split",
        "random",
        "--hume-rothery",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    assert "Hume-Rothery screen on: kept" in capsys.readouterr().out
    full = datasets.load("mp-energy-above-hull")
    passing, screen = hume_rothery_passing_rows(full)
    loaded = splits.load_split(out)
    indices = np.concatenate([loaded.train, loaded.val, loaded.test])
    # The indices are rows of the whole data set, not of the screened table.
    assert indices.max() >= len(passing)
    np.testing.assert_array_equal(np.sort(indices), passing)
    assert loaded.data_fingerprint == splits.data_fingerprint(full)
    assert loaded.params["hume_rothery_screen"] == screen


def test_cli_split_screen_csv_rows(tmp_path):
    # Rows 0 and 2 (Al-Ca, Cs-Fe) fail the screen on size and electronegativity.
    formulas = ["AlCa", "FeNi", "CsFe", "CoNi", "CrFe", "CuNi", "FeMn", "CoFe"]
    text = "".join(f"{formula},-0.{i}\n" for i, formula in enumerate(formulas))
    path = tmp_path / "alloys.csv"
    path.write_text("formula,target\n" + text)
    out = tmp_path / "split.json"
    argv = ["data", "split", str(path), "--split", "random", "--hume-rothery"]
    assert main([*argv, "--test-fraction", "0.2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    indices = sorted(record["train"] + record["val"] + record["test"])
    assert indices == [1, 3, 4, 5, 6, 7]
    assert record["params"]["hume_rothery_screen"]["rows_before"] == 8
    assert record["params"]["hume_rothery_screen"]["rows_after"] == 6


def test_cli_split_records_screen_off(tmp_path):
    out = tmp_path / "split.json"
    argv = ["data", "split", "mp-formation-energy", "--split", "random"]
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["params"]["hume_rothery_screen"] is None


def test_cli_split_threshold_needs_screen(tmp_path, capsys):
    out = tmp_path / "split.json"
    argv = ["data", "split", "mp-formation-energy", "--split", "random"]
    assert main([*argv, "--max-size-mismatch", "0.01", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--max-size-mismatch 0.01 applies only with --hume-rothery" in err
    assert not out.exists()


def test_cli_split_too_few_rows(tmp_path, capsys):
    path = tmp_path / "n3.csv"
    path.write_text("formula,target\nFeNi,0.1\nCoNi,0.2\nAlNi,0.3\n")
    out = tmp_path / "x.json"
    argv = ["data", "split", str(path), "--split", "random", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the 3 compositions are too few for a test part" in err
    assert "pass --test-fraction 0.17 or more" in err
    assert "at least 6 compositions" in err
    assert "such as 0.1" not in err
    assert main([*argv, "--test-fraction", "0.17", "--val-fraction", "0.17"]) == 0
    sizes = {
        part: len(rows)
        for part, rows in json.loads(out.read_text()).items()
        if part in ("train", "val", "test")
    }
    assert sizes == {"train": 1, "val": 1, "test": 1}


def _split_error(tmp_path, capsys, formulas: str, *options: str) -> str:
    """Run data split on three rows of ``formulas``; check exit 2, return stderr."""
    path = tmp_path / "n3.csv"
    targets = (0.1, 0.2, 0.3)
    rows = [f"{f},{t}" for f, t in zip(formulas.split(), targets, strict=True)]
    path.write_text("formula,target\n" + "\n".join(rows) + "\n")
    argv = ["data", "split", str(path), *options, "--out", str(tmp_path / "x.json")]
    assert main(argv) == 2
    return capsys.readouterr().err


def test_cli_split_no_room_for_validation(tmp_path, capsys):
    # The one row outside the held-out Zn cannot make a training and a
    # validation part, so no --val-fraction is suggested.
    options = ["--split", "element", "--holdout-element", "Zn"]
    err = _split_error(tmp_path, capsys, "FeNi ZnCo ZnNi", *options)
    assert "leaves 1 training row and no validation row" in err
    assert "pass --val-fraction 0 for no validation part" in err
    assert "or more" not in err
    assert "--test-fraction" not in err


def test_cli_split_random_no_room_names_test_fraction(tmp_path, capsys):
    # Two of three rows go to the test part, so a lower --test-fraction helps.
    options = ["--split", "random", "--test-fraction", "0.67"]
    err = _split_error(tmp_path, capsys, "FeNi ZnCo ZnNi", *options)
    assert "leaves 1 training row and no validation row" in err
    assert "no validation part, lower --test-fraction, or use more data" in err


def test_cli_split_too_few_for_validation(tmp_path, capsys):
    options = ["--split", "random", "--test-fraction", "0.3"]
    err = _split_error(tmp_path, capsys, "FeNi CoNi AlNi", *options)
    assert "too few for a validation part at --val-fraction 0.1" in err
    assert "pass --val-fraction 0.17 or more, or 0 for no validation part" in err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "argument --seed: expected an integer >= 0, got -1"),
        ("-1e3", "argument --seed: expected an integer, got '-1e3'"),
        ("x", "argument --seed: expected an integer, got 'x'"),
    ],
)
def test_cli_split_bad_seed(tmp_path, capsys, value, message):
    argv = ["data", "split", "mp-formation-energy", "--split", "random"]
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--seed", value, "--out", str(tmp_path / "s.json")])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_split_negative_threshold(tmp_path, capsys):
    argv = ["data", "split", "mp-formation-energy", "--split", "random"]
    argv += ["--hume-rothery", "--max-size-mismatch", "-1e-3"]
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--out", str(tmp_path / "s.json")])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "argument --max-size-mismatch: expected a finite number >= 0" in err
    assert "expected one argument" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--split", "element"], "--split element needs --holdout-element X"),
        (
            ["--split", "random", "--holdout-element", "Ni"],
            "applies only to --split element",
        ),
        (
            ["--split", "element", "--holdout-element", "Og"],
            "'Og' is beyond the element table",
        ),
        (
            ["--split", "element", "--holdout-element", "He"],
            "no composition in the data",
        ),
        (
            ["--split", "random", "--test-fraction", "0.6", "--val-fraction", "0.5"],
            "--test-fraction 0.6 and --val-fraction 0.5 add up to 1.1, which "
            "leaves no training rows",
        ),
        (
            ["--split", "binary-to-ternary", "--test-fraction", "0.3"],
            "--test-fraction applies only to --split random and chemsys",
        ),
        (
            ["--split", "element", "--holdout-element", "Ni", "--test-fraction", "0.1"],
            "--test-fraction applies only to --split random and chemsys",
        ),
        (
            ["--split", "random", "--test-fraction", "1e-6"],
            r"the 18400 compositions are too few for a test part at --test-fraction "
            r"1e-06.*pass --test-fraction 0\.01 or more, or use at least 500001",
        ),
        (
            ["--split", "chemsys", "--test-fraction", "0"],
            "--test-fraction 0 gives an empty test part",
        ),
        (
            ["--split", "random", "--val-fraction", "1e-6"],
            r"too few for a validation part at --val-fraction 1e-06.*"
            r"pass --val-fraction 0\.01 or more",
        ),
    ],
)
def test_cli_split_errors(tmp_path, capsys, extra, message):
    argv = [
        "data",
        "split",
        "mp-formation-energy",
        *extra,
        "--out",
        str(tmp_path / "s.npz"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dvmrl data split: error:")
    assert re.search(message, err)
    assert not (tmp_path / "s.npz").exists()


def test_cli_split_bad_out(tmp_path, capsys):
    argv = ["data", "split", "mp-formation-energy", "--split", "random"]
    assert main([*argv, "--out", str(tmp_path / "s.csv")]) == 2
    assert "must end in .npz or .json" in capsys.readouterr().err


def test_cli_split_unknown_kind(tmp_path, capsys):
    argv = ["data", "split", "mp-formation-energy", "--split", "kfold"]
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--out", str(tmp_path / "s.npz")])
    assert caught.value.code == 2
    assert "invalid choice: 'kfold'" in capsys.readouterr().err


def test_cli_split_fraction_option_range(tmp_path, capsys):
    argv = ["data", "split", "mp-formation-energy", "--split", "random"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--test-fraction", "1.5", "--out", str(tmp_path / "s.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --test-fraction: expected a fraction in [0, 1), got 1.5" in err


@pytest.mark.parametrize("kind", ["random", "element"])
def test_repeated_compositions_stay_in_one_part(frame, tmp_path, kind):
    # Each of 300 compositions appears twice (once written in reverse order),
    # as polymorphs of a user's file would.
    rows = frame.iloc[:300]
    reversed_formulas = [
        "".join(reversed(re.findall(r"[A-Z][a-z]?[0-9.]*", formula)))
        for formula in rows["formula"]
    ]
    table = pd.DataFrame(
        {
            "formula": [*rows["formula"], *reversed_formulas],
            "target": [*rows["target"], *(rows["target"] + 0.01)],
        }
    )
    path = tmp_path / "polymorphs.csv"
    table.to_csv(path, index=False)
    data = datasets.load_csv(path)
    holdout = "Ni" if kind == "element" else None
    split = splits.make_split(data, kind, seed=3, holdout_element=holdout)
    keys = data["composition"].to_numpy()
    parts = [set(keys[split.train]), set(keys[split.val]), set(keys[split.test])]
    assert not parts[0] & parts[1]
    assert not parts[0] & parts[2]
    assert not parts[1] & parts[2]
    assert len(split.test) > 0
    assert len(split.val) > 0


def test_repeated_compositions_python_frame(frame):
    # The four documented columns alone, without the column that load_csv
    # adds: each composition twice, once written in reverse order.
    rows = frame.iloc[:300]
    reversed_formulas = [
        "".join(reversed(re.findall(r"[A-Z][a-z]?[0-9.]*", formula)))
        for formula in rows["formula"]
    ]
    table = pd.concat([rows, rows.assign(formula=reversed_formulas)])
    table = table[["formula", "chemsys", "n_elements", "target"]].reset_index(drop=True)
    split = splits.make_split(table, "random", seed=3)
    keys = np.array(
        [format_formula(parse(f), digits=12) for f in table["formula"]], dtype=str
    )
    parts = [set(keys[split.train]), set(keys[split.val]), set(keys[split.test])]
    assert not parts[0] & parts[2]
    assert not parts[1] & parts[2]
    assert not parts[0] & parts[1]
    assert splits.repeated_compositions(rows) is None
    # A formula that does not parse keeps its text as its key.
    odd = table.assign(formula=["Fe50Ni50%", *table["formula"][1:]])
    assert len(splits.make_split(odd, "random", seed=3).test) > 0


def test_empty_training_part_names_parameters():
    # One composition repeated: the test part takes its only group.
    frame = pd.DataFrame(
        {
            "formula": ["Ni3Al"] * 30,
            "chemsys": ["Al-Ni"] * 30,
            "n_elements": [2] * 30,
            "target": np.linspace(-0.4, -0.1, 30),
        }
    )
    expected = "leaves no training rows"
    with pytest.raises(splits.EmptyTrainingPartError, match=expected) as err:
        splits.make_split(frame, "chemsys", seed=0)
    assert "take whole chemical systems, and the data have only 1" in str(err.value)
    assert "lower test_fraction or val_fraction" in str(err.value)
    assert "--" not in str(err.value)
