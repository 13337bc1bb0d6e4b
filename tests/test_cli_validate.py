import json
import logging
import re

import numpy as np
import pandas as pd
import pytest

from dvmrl.cli import main
from dvmrl.compositions import parse
from dvmrl.datasets import load
from dvmrl.featurize import featurize
from dvmrl.model import ModelConfig
from dvmrl.splits import make_split
from dvmrl.training import TrainConfig, Trainer

FAST = [
    "--max-compositions",
    "12",
    "--steps",
    "5",
    "--starts",
    "1",
    "--bisection-steps",
    "3",
    "--shift-samples",
    "60",
    "--shift-folds",
    "2",
    "--validation-size",
    "20",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("validate")
    df = (
        load("mp-formation-energy").sample(n=400, random_state=0).reset_index(drop=True)
    )
    data = folder / "alloys.csv"
    df[["formula", "target"]].to_csv(data, index=False)
    split = make_split(df, "random", seed=0)
    batch = featurize(df["formula"].tolist())
    targets = df["target"].to_numpy()
    config = ModelConfig(
        hidden=8, layers=1, gate_hidden=8, msg_hidden=8, head_hidden=8, head_layers=1
    )
    trainer = Trainer(
        config,
        TrainConfig(epochs=2, batch_size=64),
        batch[split.train],
        targets[split.train],
        batch[split.val],
        targets[split.val],
    )
    trainer.fit()
    path = folder / "model.pt"
    trainer.save(path, metadata={"data": str(data), "split": "random", "seed": 0})
    return path


@pytest.fixture(scope="module")
def report(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    code = main(["validate", str(checkpoint), "--out", str(out), *FAST])
    return code, out


def test_validate_exit_code(report):
    assert report[0] == 0


def test_validate_report_keys(report):
    data = json.loads((report[1] / "report.json").read_text())
    for key in (
        "robustness_radius",
        "robustness_radius_l2",
        "vulnerability",
        "epsilon",
        "tau",
        "floor",
        "n_compositions",
        "shift_auc",
        "compositions",
    ):
        assert key in data, key


def test_validate_report_values(report):
    data = json.loads((report[1] / "report.json").read_text())
    assert data["n_compositions"] == 12
    assert len(data["compositions"]) == 12
    assert 0.0 < data["robustness_radius"] <= 0.25
    assert data["vulnerability"] >= 0.0
    assert "adversarial: train vs validation set" in data["shift_auc"]
    assert "chemsys: train vs test" in data["shift_auc"]


def test_validate_names_holdout_element(report):
    data = json.loads((report[1] / "report.json").read_text())
    element = data["shift_holdout_element"]
    rows = [row for row in data["shift_splits"] if row["split"] == "element"]
    assert isinstance(element, str)
    assert data["holdout_element"] is None
    assert f"element ({element} held out): train vs test" in data["shift_auc"]
    assert rows[0]["holdout_element"] == element


def test_validate_other_split_warns(checkpoint, tmp_path, caplog):
    argv = ["validate", str(checkpoint), "--out", str(tmp_path), "--split", "chemsys"]
    with caplog.at_level(logging.WARNING):
        code = main([*argv, "--holdout-element", "Ni", "--strategy", "random", *FAST])
    data = json.loads((tmp_path / "report.json").read_text())
    assert code == 0
    # The checkpoint trained on the random split, so the chemsys test part overlaps.
    pattern = r"trained on the random split, so \d+ of the \d+ test"
    assert re.search(pattern, caplog.text)
    assert "pass --split random" in caplog.text
    # With a split other than element, --holdout-element sets the shift table's.
    assert data["holdout_element"] is None
    assert data["shift_holdout_element"] == "Ni"


def test_validate_element_split_holdout(checkpoint, tmp_path, capsys):
    code = main(
        [
            "validate",
            str(checkpoint),
            "--out",
            str(tmp_path),
            "--split",
            "element",
            "--holdout-element",
            "Ni",
            "--strategy",
            "random",
            *FAST,
        ]
    )
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "report.json").read_text())
    assert code == 0
    assert data["holdout_element"] == "Ni"
    assert data["shift_holdout_element"] == "Ni"
    # The checkpoint was trained on the random split: Ni comes from the option.
    assert data["shift_holdout_source"] == "--holdout-element"
    assert "element (Ni held out): train vs test" in printed


def test_validate_radius_is_mean(report):
    data = json.loads((report[1] / "report.json").read_text())
    radii = [row["robustness_radius"] for row in data["compositions"]]
    assert data["robustness_radius"] == pytest.approx(np.mean(radii))
    radii_l2 = [row["robustness_radius_l2"] for row in data["compositions"]]
    assert data["robustness_radius_l2"] == pytest.approx(np.mean(radii_l2))
    # A capped composition of K elements gets the L2 norm that the r_max box
    # contains, r_max * sqrt(K / (K - 1)).
    capped = [row for row in data["compositions"] if not row["reached_tau"]]
    assert capped
    for row in capped:
        k = int(featurize([row["formula"]]).mask.sum())
        expected = data["r_max"] * np.sqrt(k / (k - 1))
        assert row["robustness_radius_l2"] == pytest.approx(expected)


def test_validate_writes_plots(report):
    for name in ("robustness_radius.png", "most_vulnerable.png"):
        assert (report[1] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_prints_table(checkpoint, tmp_path, capsys):
    code = main(
        [
            "validate",
            str(checkpoint),
            "--out",
            str(tmp_path),
            "--strategy",
            "random",
            *FAST,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "vulnerability" in printed
    # The targets of a user's CSV file are reference values, not DFT ones.
    assert re.search(r"formula +reference +predicted +change eV/atom +radius", printed)
    assert "radius: the smallest box radius that moves it by tau" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["target_label"] == "reference"
    top = max(report["compositions"], key=lambda row: abs(row["change"]))
    assert f"{top['target']:>9.3f} {top['prediction']:>9.3f}" in printed
    assert "random: train vs validation set" in printed
    assert "shift detection (0.5: no shift, 1: full shift)" in printed
    assert f"wrote {tmp_path / 'report.json'}, " in printed
    # The checkpoint's random split names no element, so the default is explained.
    element = report["shift_holdout_element"]
    assert f"The element split holds out {element}, the element whose" in printed
    # Those two splits separate the sets by their elements by construction.
    assert f"element ({element} held out) and binary-to-ternary: the parts" in printed
    assert "an AUC near 1 is expected there and is no warning" in printed


def test_validate_warns_whole_pool(checkpoint, tmp_path, caplog):
    # The validation pool of the 400 rows contains 40 compositions.
    with caplog.at_level(logging.WARNING, logger="dvmrl"):
        code = main(
            [
                "validate",
                str(checkpoint),
                "--out",
                str(tmp_path),
                *FAST,
                "--validation-size",
                "500",
            ]
        )
    assert code == 0
    assert "every strategy selects the whole pool" in caplog.text
    assert "pass a --validation-size from 2 to 39" in caplog.text
    report = json.loads((tmp_path / "report.json").read_text())
    sets = [sorted(indices) for indices in report["validation_sets"].values()]
    assert len(sets) == 4
    assert all(chosen == sets[0] for chosen in sets)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--epsilon", "0"], "--epsilon must lie in"),
        (["--epsilon", "1"], "--epsilon must lie in"),
        (["--tau", "-0.1"], "--tau must be a positive"),
        (["--floor", "0.5"], "K \\* floor"),
        (["--floor", "0"], "--floor must lie in \\(0, 1\\), got 0.0"),
        (
            ["--shift-samples", "10", "--shift-folds", "15"],
            "--shift-folds 15 exceeds --shift-samples 10",
        ),
        (["--strategy", "newest"], "unknown --strategy 'newest'"),
        (["--shift-samples", "5"], "--shift-samples must be >= 10, got 5"),
        (["--shift-samples", "0"], "--shift-samples must be >= 10, got 0"),
        # --holdout-element is checked before the search even when only the
        # shift table's element split uses it.
        (["--holdout-element", "Xx"], "unknown element symbol 'Xx'"),
        (["--holdout-element", "Cm"], "--holdout-element Cm occurs in no composition"),
        (
            ["--validation-size", "10", "--shift-folds", "20"],
            "--shift-folds 20 exceeds --validation-size 10",
        ),
    ],
)
def test_validate_bad_input(checkpoint, tmp_path, capsys, option, message):
    code = main(["validate", str(checkpoint), "--out", str(tmp_path), *FAST, *option])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_validate_alloy_notation_on_own_standard_data(checkpoint, tmp_path, capsys):
    # The model read its data in standard notation; alloy notation would read
    # those formulas as other compositions.
    argv = ["validate", str(checkpoint), "--alloy-notation", *FAST]
    code = main([*argv, "--out", str(tmp_path / "o")])
    assert code == 2
    assert "leave --alloy-notation out" in capsys.readouterr().err


def test_floor_checked_against_adversarial_anchors(checkpoint, tmp_path, capsys):
    # With Ni held out, the attacked test compositions are Ni binaries, for
    # which --floor 0.4 is fine, but the adversarial strategy perturbs
    # training compositions, ternaries among them: rejected before any work.
    df = load("mp-formation-energy")
    has_ni = df["chemsys"].str.split("-").apply(lambda systems: "Ni" in systems)
    parts = [
        df[(df["n_elements"] == 2) & has_ni].head(40),
        df[(df["n_elements"] == 2) & ~has_ni].head(150),
        df[(df["n_elements"] == 3) & ~has_ni].head(60),
    ]
    data = tmp_path / "ni.csv"
    pd.concat(parts)[["formula", "target"]].to_csv(data, index=False)
    argv = ["validate", str(checkpoint), "--data", str(data), "--split", "element"]
    argv += ["--holdout-element", "Ni", "--floor", "0.4", *FAST]
    code = main([*argv, "--strategy", "adversarial", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"--floor 0.4 exceeds 1/K for \w+ with 3 elements", err)
    assert "pass --floor <= 0.333333" in err
    assert not (tmp_path / "o").exists()


def test_validate_checks_out_first(checkpoint, tmp_path, capsys, monkeypatch):
    # The path is checked before the minutes of attacks, so a typo fails at once.
    import dvmrl.cli.train as train_cli

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr(train_cli, "load_model", never)
    blocker = tmp_path / "base.csv"
    blocker.write_text("formula,target\n")
    code = main(["validate", str(checkpoint), "--out", str(blocker / "x"), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert "--out" in err
    assert "is a file" in err


def test_validate_folder_in_use_rejected(checkpoint, tmp_path, capsys):
    # Another validate has the folder locked: this one stops before any attack.
    from dvmrl._files import FolderLock

    out = tmp_path / "v"
    out.mkdir()
    with FolderLock(out):
        code = main(["validate", str(checkpoint), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--out {out} is in use by another dvmrl process" in err
    assert "--resume" not in err
    assert not any(out.iterdir())


def test_validate_failure_removes_new_folder(checkpoint, tmp_path, capsys):
    out = tmp_path / "new"
    missing = str(tmp_path / "missing.csv")
    code = main(["validate", str(checkpoint), "--data", missing, "--out", str(out)])
    assert code == 2
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "content"),
    [("run.json", "{}"), ("report.json", '{"format": "dvmrl-report"}')],
)
def test_validate_keeps_other_outputs(checkpoint, tmp_path, capsys, name, content):
    (tmp_path / name).write_text(content)
    code = main(["validate", str(checkpoint), "--out", str(tmp_path), *FAST])
    assert code == 2
    assert "validate would overwrite report.json" in capsys.readouterr().err
    assert (tmp_path / name).read_text() == content
    assert len(list(tmp_path.iterdir())) == 1


def test_validate_checkpoint_folder(checkpoint, tmp_path, capsys):
    code = main(["validate", str(checkpoint.parent), "--out", str(tmp_path), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert f"is a folder; pass the checkpoint file in it, such as {checkpoint}" in err


def test_min_shift_samples_matches_shift():
    from dvmrl.cli.validate import MIN_SHIFT_SAMPLES
    from dvmrl.shift import MIN_SAMPLES

    assert MIN_SHIFT_SAMPLES == MIN_SAMPLES


def test_validate_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    code = main(["validate", str(bad), "--out", str(tmp_path / "out"), *FAST])
    assert code == 2
    assert "checkpoint" in capsys.readouterr().err


def test_validate_missing_checkpoint(tmp_path, capsys):
    code = main(["validate", str(tmp_path / "none.pt"), "--out", str(tmp_path), *FAST])
    assert code == 2
    assert "not found" in capsys.readouterr().err


def test_validate_help_names_values(capsys):
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    text = capsys.readouterr().out
    assert "CHECKPOINT" in text
    assert "--data NAME|PATH.csv" in text
    assert "--split {random,chemsys,element,binary-to-ternary}" in text
    assert "--holdout-element X" in text


def test_validate_csv_with_other_column_names(checkpoint, tmp_path, capsys):
    import pandas as pd

    original = checkpoint.parent / "alloys.csv"
    renamed = tmp_path / "renamed.csv"
    pd.read_csv(original).rename(
        columns={"formula": "composition", "target": "e_form"}
    ).to_csv(renamed, index=False)
    base = ["validate", str(checkpoint), "--data", str(renamed), *FAST]
    code = main([*base, "--out", str(tmp_path / "without")])
    err = capsys.readouterr().err
    assert code == 2
    assert "no column(s) 'formula', 'target'" in err
    assert "--formula-column and --target-column" in err
    columns = ["--formula-column", "composition", "--target-column", "e_form"]
    code = main([*base, *columns, "--out", str(tmp_path / "with")])
    assert code == 0
    assert (tmp_path / "with" / "report.json").is_file()


def test_validate_own_data_by_relative_path(checkpoint, tmp_path, capsys, monkeypatch):
    """The checkpoint's data file named by a relative path is its own data."""
    monkeypatch.chdir(checkpoint.parent)
    code = main(
        [
            "validate", str(checkpoint), "--data", "alloys.csv",
            "--out", str(tmp_path), *FAST,
        ]
    )
    assert code == 0
    assert "may share rows" not in capsys.readouterr().err


def test_validate_rejects_changed_data(tmp_path, capsys):
    """After the checkpoint's data changed, its test part is not the held-out one."""
    data = tmp_path / "alloys.csv"
    frame = load("mp-formation-energy").sample(n=200, random_state=4)
    frame[["formula", "target"]].to_csv(data, index=False)
    out = tmp_path / "run"
    tiny = ["--hidden", "8", "--layers", "1", "--members", "1", "--threads", "1"]
    args = ["train", "--data", str(data), "--epochs", "1", *tiny, "--out", str(out)]
    assert main(args) == 0
    frame.iloc[::-1][["formula", "target"]].to_csv(data, index=False)
    capsys.readouterr()
    base = ["validate", str(out / "model.pt"), *FAST]
    code = main([*base, "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert code == 2
    assert "the data changed since training" in err
    assert "pass --split random to attack the test part of the current rows" in err
    assert not (tmp_path / "refused" / "report.json").exists()
    code = main([*base, "--split", "random", "--out", str(tmp_path / "explicit")])
    assert code == 0, capsys.readouterr().err


def test_validate_warns_other_target_kind(tmp_path, caplog):
    hull = load("mp-energy-above-hull").sample(n=200, random_state=5)
    csv = tmp_path / "hull.csv"
    hull[["formula", "target"]].to_csv(csv, index=False)
    out = tmp_path / "hull_run"
    tiny = ["--hidden", "8", "--layers", "1", "--members", "1", "--threads", "1"]
    train = ["train", "--data", str(csv), "--epochs", "1", *tiny, "--out", str(out)]
    assert main([*train, "--target-kind", "energy_above_hull"]) == 0
    # A plain CSV file is read with the checkpoint's kind, a vendored set
    # with its own.
    argv = ["validate", str(out / "model.pt"), "--data", "mp-formation-energy", *FAST]
    with caplog.at_level(logging.WARNING, logger="dvmrl"):
        assert main([*argv, "--out", str(tmp_path / "report")]) == 0
    assert "the checkpoint predicts energy_above_hull" in caplog.text
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["target_kind"] == "formation_energy"
    assert report["model_target_kind"] == "energy_above_hull"


def _validate_rows(checkpoint, tmp_path, rows: list[str]) -> int:
    """Run validate on a CSV file of ``rows`` ("formula,target"); return the code."""
    csv = tmp_path / "rows.csv"
    csv.write_text("formula,target\n" + "\n".join(rows) + "\n")
    argv = ["validate", str(checkpoint), "--data", str(csv), *FAST]
    return main([*argv, "--out", str(tmp_path / "report")])


def test_validate_one_composition_names_its_options(checkpoint, tmp_path, capsys):
    rows = [f"Ni{3 * i}Al{i},{-0.4 + 0.001 * i}" for i in range(1, 21)]
    assert _validate_rows(checkpoint, tmp_path, rows) == 2
    err = capsys.readouterr().err
    assert "only 1 distinct compositions; pass another --split or more data" in err
    assert "val_fraction" not in err


def test_validate_skipped_element_split_not_described(checkpoint, tmp_path, capsys):
    # One chemical system: every element is in every row, so the shift
    # table skips the element split and names no held-out element.
    rows = [f"Ni{i}Al{i + 1},{-0.01 * i}" for i in range(1, 41)]
    assert _validate_rows(checkpoint, tmp_path, rows) == 0
    out = capsys.readouterr().out
    assert "random: train vs test" in out
    assert "The element split holds out" not in out


def test_validate_search_options_reach_strategy(checkpoint, tmp_path, monkeypatch):
    import dvmrl.adversarial

    real = dvmrl.adversarial.adversarial_search
    seen = []

    def recording(*args, **kwargs):
        seen.append((kwargs.get("steps"), kwargs.get("starts"), kwargs.get("lam")))
        return real(*args, **kwargs)

    monkeypatch.setattr(dvmrl.adversarial, "adversarial_search", recording)
    argv = ["validate", str(checkpoint), "--out", str(tmp_path), *FAST]
    code = main([*argv, "--strategy", "adversarial", "--steps", "3", "--lambda", "0.5"])
    assert code == 0
    # The vulnerability and the adversarial validation strategy search with
    # the command's settings. The robustness bisection drops the penalty,
    # which would keep compositions from reaching tau and inflate the radius.
    assert len(seen) > 2
    assert set(seen) == {(3, 1, 0.5), (3, 1, 0.0)}


def test_validate_radius_ignores_the_penalty(checkpoint, tmp_path):
    radii = []
    for lam in ("0", "4"):
        out = tmp_path / f"lambda{lam}"
        argv = ["validate", str(checkpoint), "--out", str(out), *FAST]
        assert main([*argv, "--lambda", lam, "--strategy", "random"]) == 0
        radii.append(json.loads((out / "report.json").read_text())["robustness_radius"])
    assert radii[0] == radii[1]


def test_distinct_alloy_rows_skip_singles_and_repeats():
    import pandas as pd

    from dvmrl.splits import distinct_alloy_rows

    formulas = ["Ni3Al", "Al", "NiAl", "Ni6Al2", "FeNi", "Ti", "Al1Ni1"]
    df = pd.DataFrame(
        {
            "formula": formulas,
            "n_elements": [len(parse(f)) for f in formulas],
            "target": np.zeros(len(formulas)),
        }
    )
    keep = distinct_alloy_rows(df, np.arange(len(formulas)))
    # Ni6Al2 repeats Ni3Al and Al1Ni1 repeats NiAl; Al and Ti cannot move.
    assert np.flatnonzero(keep).tolist() == [0, 2, 4]


def test_validate_report_states_its_settings(report):
    data = json.loads((report[1] / "report.json").read_text())
    # FAST passes --starts 1, which the search reads as 2.
    assert data["starts"] == 2
    assert data["bisection_steps"] == 3
    assert data["validation_size"] == 20
    assert (data["shift_samples"], data["shift_folds"]) == (60, 2)
    pool = "the validation part of the random split with seed 0"
    assert data["validation_pool"] == pool


@pytest.mark.parametrize("reached", [[True, True, False], [True] * 3, [False] * 3])
def test_histogram_marks_capped_radii(tmp_path, reached):
    # Capped radii get their own colour and a count in the legend, and a set
    # with no capped (or only capped) compositions still plots.
    from dvmrl.cli.validate import _histogram

    path = tmp_path / "radii.png"
    _histogram(np.array([0.05, 0.1, 0.25]), np.array(reached), 0.25, 0.05, path)
    assert path.stat().st_size > 0
