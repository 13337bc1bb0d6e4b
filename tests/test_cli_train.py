from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import dvmrl
from dvmrl.cli import EXIT_BROKEN_PIPE, main

METRIC_KEYS = (
    "rmse",
    "mae",
    "r2",
    "max_error",
    "gcv_score",
    "accuracy",
    "precision",
    "recall",
    "f1",
)
# One small model: the default ensemble would train every run several times.
TINY = [
    "--hidden", "8", "--layers", "1", "--batch-size", "64", "--threads", "1",
    "--members", "1",
]


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    from dvmrl.datasets import load

    df = load("mp-formation-energy").sample(n=300, random_state=1)
    path = tmp_path_factory.mktemp("data") / "alloys.csv"
    df[["formula", "target"]].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_csv):
    out = tmp_path_factory.mktemp("run") / "run"
    code = main(
        [
            "train",
            "--data",
            str(data_csv),
            "--epochs",
            "2",
            "--device",
            "cpu",
            "--no-heteroscedastic",
            *TINY,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_single_model_warns_ensemble_options(data_csv, tmp_path, caplog):
    argv = ["train", "--data", str(data_csv), "--epochs", "1", "--device", "cpu"]
    argv += [*TINY, "--jobs", "2", "--member-divisions", "shared"]
    with caplog.at_level(logging.WARNING, logger="dvmrl"):
        code = main([*argv, "--out", str(tmp_path / "run")])
    assert code == 0
    assert (
        "ignored --jobs and --member-divisions, which only an ensemble uses"
        in caplog.text
    )


def _train_elements(path) -> set[str]:
    frame = pd.read_csv(path)
    from dvmrl.compositions import parse

    return {symbol for formula in frame["formula"] for symbol in parse(formula)}


def test_train_writes_model_and_metrics(trained):
    assert (trained / "model.pt").is_file()
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in metrics
    assert metrics["epochs_done"] == 2


def test_train_records_provenance(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    provenance = metrics["provenance"]
    assert provenance["dvmrl_version"]
    assert "torch_version" in provenance
    assert "cpu_isa" in provenance["build_info"]
    assert len(provenance["split_fingerprint"]) > 8


def test_train_rejects_existing_run(trained, data_csv):
    before = (trained / "model.pt").read_bytes()
    code = main(
        [
            "train",
            "--data",
            str(data_csv),
            "--epochs",
            "1",
            *TINY,
            "--out",
            str(trained),
        ]
    )
    assert code == 2
    assert (trained / "model.pt").read_bytes() == before


def test_train_existing_run_message(trained, data_csv, capsys):
    main(["train", "--data", str(data_csv), *TINY, "--out", str(trained)])
    assert "pass --resume" in capsys.readouterr().err


def test_train_out_under_file(tmp_path, data_csv, monkeypatch, capsys):
    from dvmrl.cli import train as train_cli

    def fail_load(*args, **kwargs):
        raise AssertionError("the data was loaded before the --out check")

    monkeypatch.setattr(train_cli, "_load_data", fail_load)
    blocker = tmp_path / "existing_file"
    blocker.write_text("")
    out = blocker / "sub"
    code = main(["train", "--data", str(data_csv), *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--out {out}: {blocker} is a file" in err


def test_train_states_tolerance(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["accuracy_tolerance_ev_per_atom"] == 0.05
    assert metrics["stability_threshold_ev_per_atom"] == 0.0


def test_resume_rejects_changed_config(trained, capsys):
    code = main(["train", "--resume", "--hidden", "16", "--out", str(trained)])
    assert code == 2
    assert "--hidden 16" in capsys.readouterr().err


def test_resume_accepts_same_config(trained, capsys):
    code = main(["train", "--resume", "--hidden", "8", "--out", str(trained)])
    assert code == 0
    assert "complete" in capsys.readouterr().out


def test_resume_run_without_loss_field(trained, tmp_path, capsys):
    # run.json of a version before the loss option: it trained with mse.
    import shutil

    out = tmp_path / "old"
    shutil.copytree(trained, out)
    run = json.loads((out / "run.json").read_text())
    del run["train"]["loss"]
    del run["train"]["huber_delta"]
    (out / "run.json").write_text(json.dumps(run))
    assert main(["train", "--resume", "--loss", "mse", "--out", str(out)]) == 0
    assert "complete" in capsys.readouterr().out
    code = main(["train", "--resume", "--loss", "l1", "--out", str(out)])
    assert code == 2
    assert "--loss 'l1' (the run in" in capsys.readouterr().err


def test_resume_threshold_data_default(trained, capsys):
    # run.json stores no threshold when the run took the data set's default,
    # 0 eV/atom for formation energies.
    assert json.loads((trained / "run.json").read_text())["stability_threshold"] is None
    argv = ["train", "--resume", "--out", str(trained)]
    assert main([*argv, "--stability-threshold", "0"]) == 0
    assert "complete" in capsys.readouterr().out
    assert main([*argv, "--stability-threshold", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--stability-threshold 0.1 (the run in" in err
    assert "used 0.0, the default of its data" in err


def test_resume_of_complete_run(trained, capsys):
    code = main(["train", "--resume", "--out", str(trained)])
    assert code == 0
    assert "complete" in capsys.readouterr().out


def test_resume_without_run(tmp_path, capsys):
    code = main(["train", "--resume", "--out", str(tmp_path / "empty")])
    assert code == 2
    assert "no resumable run" in capsys.readouterr().err


def _interrupt_before_first_state(out, data_csv, monkeypatch):
    """Run train into ``out`` with Ctrl-C while the model is built."""
    import dvmrl.cli.train as train_cli

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    argv = ["train", "--data", str(data_csv), "--epochs", "1", *TINY]
    with monkeypatch.context() as patch:
        patch.setattr(train_cli, "_fit_member", interrupt)
        assert main([*argv, "--out", str(out)]) == 130


def test_train_out_broken_link_named(tmp_path, data_csv, capsys):
    link = tmp_path / "dang"
    link.symlink_to(tmp_path / "nowhere" / "deep")
    argv = ["train", "--data", str(data_csv), "--epochs", "1", *TINY]
    assert main([*argv, "--out", str(link)]) == 2
    err = capsys.readouterr().err
    assert f"cannot use path '{link}': it is a symbolic link to" in err
    assert "which does not exist or loops" in err


def test_long_out_path_not_resumable(tmp_path, data_csv, capsys):
    # Rejected before anything is written, so there is nothing to resume.
    out = tmp_path / ("x" * 300)
    argv = ["train", "--data", str(data_csv), "--epochs", "1", *TINY]
    assert main([*argv, "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "File name too long" in err
    assert "choose a shorter path" in err
    assert "--resume" not in err


def test_resume_hint_quotes_path(tmp_path, data_csv, monkeypatch, capsys):
    # The hint is a command to paste, so a folder name with a space is quoted.
    out = tmp_path / "my run"
    _interrupt_before_first_state(out, data_csv, monkeypatch)
    err = capsys.readouterr().err
    assert f"continue with: dvmrl train --resume --out '{out}'" in err


def test_resume_interrupted_before_first_state(
    tmp_path, data_csv, monkeypatch, capsys
):
    # Ctrl-C after run.json is written but before the first state is saved
    # (while the model is built) leaves run.json without last.pt.
    out = tmp_path / "run"
    _interrupt_before_first_state(out, data_csv, monkeypatch)
    assert f"continue with: dvmrl train --resume --out {out}" in capsys.readouterr().err
    assert (out / "run.json").exists()
    assert not (out / "last.pt").exists()
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert (out / "model.pt").exists()
    assert json.loads((out / "metrics.json").read_text())["epochs_done"] == 1


def test_resume_damaged_state_message(
    tmp_path, data_csv, monkeypatch, capsys
):
    out = tmp_path / "run"
    _interrupt_before_first_state(out, data_csv, monkeypatch)
    (out / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the training state of this run is damaged" in err
    assert f"delete {out / 'last.pt'}" in err
    assert "pass a model.pt" not in err
    (out / "last.pt").unlink()
    assert main(["train", "--resume", "--out", str(out)]) == 0


def _fit_stopped_after_one_epoch():
    """Return Trainer.fit changed to act as Ctrl-C after the first epoch."""
    from dvmrl.training import Trainer

    original_fit = Trainer.fit

    def interrupted_fit(self, *args, progress=None, **kwargs):
        def stop_after_first(record):
            progress(record)
            raise KeyboardInterrupt

        return original_fit(self, *args, progress=stop_after_first, **kwargs)

    return interrupted_fit


def test_resume_after_the_data_file_moved(tmp_path, data_csv, monkeypatch, capsys):
    from dvmrl.training import Trainer

    csv = tmp_path / "alloys.csv"
    csv.write_bytes(data_csv.read_bytes())
    out = tmp_path / "run"
    argv = ["train", "--data", str(csv), "--epochs", "2", *TINY, "--out", str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "fit", _fit_stopped_after_one_epoch())
        assert main(argv) == 130
    moved = csv.rename(tmp_path / "moved.csv")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out)]) == 2
    assert "pass --data with its new path" in capsys.readouterr().err
    # A file with other rows is refused by the training state's fingerprints.
    other = tmp_path / "other.csv"
    frame = pd.read_csv(moved)
    frame.assign(target=frame["target"] + 0.5).to_csv(other, index=False)
    assert main(["train", "--resume", "--data", str(other), "--out", str(out)]) == 2
    assert "data differ from those checkpoint" in capsys.readouterr().err
    resume = ["train", "--resume", "--data", str(moved), "--out", str(out)]
    assert main(resume) == 0
    assert json.loads((out / "run.json").read_text())["data"] == str(moved.resolve())
    assert json.loads((out / "metrics.json").read_text())["epochs_done"] == 2
    # A complete run stays complete when its data file moves again.
    moved.rename(tmp_path / "moved_again.csv")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert "is complete" in capsys.readouterr().out


def test_interrupt_then_resume(tmp_path, data_csv, monkeypatch):
    from dvmrl.training import Trainer

    out = tmp_path / "run"
    args = ["train", "--data", str(data_csv), "--epochs", "3", *TINY, "--out", str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "fit", _fit_stopped_after_one_epoch())
        assert main(args) == 130
    assert (out / "last.pt").is_file()
    assert not (out / "model.pt").exists()

    assert main(["train", "--resume", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_done"] == 3


def test_resume_rejects_member_of_other_data(
    tmp_path, data_csv, capsys
):
    # Both members finished and the run stopped before combining them; then
    # the data file changed. Member 0 is not trained again, so the resume
    # must not combine it with a member trained on the edited data.
    csv = tmp_path / "alloys.csv"
    original = pd.read_csv(data_csv)
    original.to_csv(csv, index=False)
    out = tmp_path / "run"
    argv = ["train", "--data", str(csv), "--epochs", "1", "--hidden", "8"]
    argv += ["--layers", "1", "--threads", "1", "--members", "2", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    for path in (out / "model.pt", out / "metrics.json", out / "member1" / "model.pt"):
        path.unlink()
    edited = original.assign(target=original["target"] + 0.5)
    edited.to_csv(csv, index=False)
    assert main(["train", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "member 0 in" in err
    assert "trained on other train and val data" in err
    assert not (out / "model.pt").exists()
    # With the original data back, the same resume completes the run.
    original.to_csv(csv, index=False)
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert (out / "model.pt").exists()


def test_new_run_rejects_stale_members(tmp_path, data_csv, capsys):
    # A member folder whose run.json was deleted would otherwise count as a
    # finished member of the new run.
    out = tmp_path / "run"
    (out / "member0").mkdir(parents=True)
    (out / "member0" / "model.pt").write_bytes(b"left from another run")
    argv = ["train", "--data", str(data_csv), "--epochs", "1", *TINY[:-2]]
    assert main([*argv, "--members", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already contains a run (member0/model.pt)" in err
    assert (out / "member0" / "model.pt").read_bytes() == b"left from another run"
    # Folders that only start with "member" are no member folders.
    other = tmp_path / "other"
    (other / "members_backup").mkdir(parents=True)
    (other / "members_backup" / "model.pt").write_bytes(b"a user's file")
    assert main([*argv, "--members", "2", "--out", str(other)]) == 0


def test_predict_input_rejects_repeated_columns(trained, tmp_path, capsys):
    model = str(trained / "model.pt")
    repeated_formula = tmp_path / "formulas.csv"
    repeated_formula.write_text("formula,formula\nNi3Al,FeNi\n")
    assert main(["predict", model, "--input", str(repeated_formula)]) == 2
    assert "has 2 columns named 'formula'" in capsys.readouterr().err
    # Another repeated column matters only when --output copies it.
    repeated_other = tmp_path / "other.csv"
    repeated_other.write_text("formula,x,x\nNi3Al,1,2\n")
    output = tmp_path / "out.csv"
    argv = ["predict", model, "--input", str(repeated_other)]
    assert main([*argv, "--output", str(output)]) == 2
    assert "has 2 columns named 'x'" in capsys.readouterr().err
    assert not output.exists()
    assert main(argv) == 0
    assert "Ni3Al" in capsys.readouterr().out


def test_train_hull_csv_target_kind(tmp_path, capsys, caplog):
    from dvmrl.datasets import load

    hull = load("mp-energy-above-hull").sample(n=200, random_state=2)
    csv = tmp_path / "hull.csv"
    hull[["formula", "target"]].to_csv(csv, index=False)
    out = tmp_path / "run"
    argv = ["train", "--data", str(csv), "--epochs", "1", *TINY]
    with caplog.at_level(logging.WARNING, logger="dvmrl"):
        code = main([*argv, "--target-kind", "energy_above_hull", "--out", str(out)])
    assert code == 0
    assert "as energies above the convex hull are" not in caplog.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stability_threshold"] == 0.025
    assert metrics["target_kind"] == "energy_above_hull"
    assert "0.025 eV/atom above the convex hull" in capsys.readouterr().out
    # evaluate reads the checkpoint's kind for its own data, and for a copy.
    assert main(["evaluate", str(out / "model.pt"), "--out", str(tmp_path / "e")]) == 0
    assert "0.025 eV/atom above the convex hull" in capsys.readouterr().out
    copy = tmp_path / "copy.csv"
    copy.write_bytes(csv.read_bytes())
    caplog.clear()
    argv = ["evaluate", str(out / "model.pt"), "--data", str(copy)]
    with caplog.at_level(logging.WARNING, logger="dvmrl"):
        assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    assert "0.025 eV/atom above the convex hull" in capsys.readouterr().out
    assert "--target-kind energy_above_hull" not in caplog.text
    resume = ["train", "--resume", "--target-kind", "formation_energy"]
    assert main([*resume, "--out", str(out)]) == 2
    assert "--target-kind 'formation_energy'" in capsys.readouterr().err


def test_evaluate_target_kind_sets_threshold(tmp_path, capsys, caplog):
    from dvmrl.datasets import load

    hull = load("mp-energy-above-hull").sample(n=200, random_state=3)
    csv = tmp_path / "hull.csv"
    hull[["formula", "target"]].to_csv(csv, index=False)
    out = tmp_path / "run"
    argv = ["train", "--data", str(csv), "--epochs", "1", *TINY, "--out", str(out)]
    # Trained without --target-kind, the run reads the file as formation energies.
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["stability_threshold"] == 0.0
    evaluate = ["evaluate", str(out / "model.pt"), "--target-kind", "energy_above_hull"]
    assert main([*evaluate, "--out", str(tmp_path / "e")]) == 0
    evaluation = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert evaluation["stability_threshold"] == 0.025
    assert "0.025 eV/atom above the convex hull" in capsys.readouterr().out


def test_run_config_records_stated_target_kind(tmp_path, caplog):
    from conftest import write_fetched_csv
    from dvmrl.cli._common import UsageError
    from dvmrl.cli.train import _build_run_config

    vendored = _build_run_config({"data": "mp-energy-above-hull"})
    assert vendored["target_kind"] == "energy_above_hull"
    # A file of dvmrl data fetch states its kind in the .json file beside it.
    csv = write_fetched_csv(tmp_path, "energy_above_hull")
    assert _build_run_config({"data": str(csv)})["target_kind"] == "energy_above_hull"
    with pytest.raises(UsageError, match="its targets are energy_above_hull"):
        _build_run_config({"data": str(csv), "target_kind": "formation_energy"})
    plain = tmp_path / "plain.csv"
    plain.write_text("formula,target\nNi3Al,-0.4\n")
    assert _build_run_config({"data": str(plain)})["target_kind"] == "formation_energy"
    # An edited fetched file: the loader warns about its .json file, this
    # look does not, so the warning appears once.
    csv.write_text("formula,target\nNi3Al,0.1\n")
    with caplog.at_level(logging.WARNING, logger="dvmrl"):
        edited = _build_run_config({"data": str(csv)})
    assert edited["target_kind"] == "formation_energy"
    assert "describes another version" not in caplog.text


def test_train_warns_one_test_composition(tmp_path, caplog):
    # Ten compositions, three polymorph rows each: the 10 % test part is the
    # three rows of one composition.
    rows = []
    for i in range(1, 11):
        rows += [f"Ni{i}Al{i + 1},{-0.1 * i + 0.01 * k}" for k in range(3)]
    csv = tmp_path / "polymorphs.csv"
    csv.write_text("formula,target\n" + "\n".join(rows) + "\n")
    argv = ["train", "--data", str(csv), "--epochs", "1", *TINY]
    with caplog.at_level(logging.INFO, logger="dvmrl"):
        assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert "24 train, 3 validation, 3 test rows" in caplog.text
    assert "the 3 test rows all hold one composition" in caplog.text


def test_negative_hull_targets_warn(tmp_path, caplog):
    from dvmrl.datasets import resolve_data

    csv = tmp_path / "formation.csv"
    csv.write_text("formula,target\nNi3Al,-0.4\nFeNi,0.02\nCuZn,0.0\n")
    with caplog.at_level(logging.WARNING, logger="dvmrl"):
        resolve_data(csv, target_kind="energy_above_hull")
    assert "1 of 3 targets are below 0 eV/atom" in caplog.text
    # The advice applies wherever the kind came from: the option or a checkpoint.
    assert "pass --target-kind formation_energy" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dvmrl"):
        resolve_data(csv, target_kind="formation_energy")
    assert "below 0 eV/atom" not in caplog.text


def test_target_kind_rejected_for_vendored_data(tmp_path, capsys):
    argv = ["train", "--target-kind", "energy_above_hull", *TINY]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--target-kind applies only to a CSV file" in err


def test_train_rejects_nan_target(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("formula,target\nAl3Ni,-0.4\nCuZn,nan\nFeNi,abc\n")
    code = main(["train", "--data", str(path), *TINY, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "line 3" in err
    assert "line 4" in err


def test_train_rejects_missing_column(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("formula,energy\nAl3Ni,-0.4\n")
    code = main(["train", "--data", str(path), *TINY, "--out", str(tmp_path / "out")])
    assert code == 2
    assert "'target'" in capsys.readouterr().err


def test_train_element_split_needs_element(tmp_path, data_csv, capsys):
    code = main(
        [
            "train",
            "--data",
            str(data_csv),
            "--split",
            "element",
            *TINY,
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "--holdout-element" in capsys.readouterr().err


def test_evaluate_writes_parity_plot(trained, tmp_path, capsys):
    code = main(["evaluate", str(trained / "model.pt"), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "parity.png").read_bytes()[:4] == b"\x89PNG"
    assert "rmse" in out
    assert "test part of the random split" in out


def test_evaluate_matches_train_metrics(trained, tmp_path):
    main(["evaluate", str(trained / "model.pt"), "--out", str(tmp_path)])
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    assert evaluation["rmse"] == pytest.approx(metrics["rmse"], rel=1e-5)


def test_evaluate_moved_data_test_part(trained, data_csv, tmp_path, capsys):
    # The data file moved after training. --data with its new path contains
    # the same rows, so the score is that of the test part, not of every row.
    moved = tmp_path / "moved.csv"
    moved.write_bytes(data_csv.read_bytes())
    argv = ["evaluate", str(trained / "model.pt"), "--data", str(moved)]
    assert main([*argv, "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "test part of the random split" in out
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    assert evaluation["n"] == metrics["n"]
    assert evaluation["rmse"] == pytest.approx(metrics["rmse"], rel=1e-5)


@pytest.mark.parametrize(
    ("kind", "threshold", "ending"),
    [
        ("formation_energy", 0.0, "<= 0 eV/atom (for formation energies: against "
         "the elements, not the convex hull)"),
        ("energy_above_hull", 0.025, "<= 0.025 eV/atom above the convex hull"),
        # A user's threshold other than the kind's own: the reference is unknown.
        ("formation_energy", 0.025, "<= 0.025 eV/atom"),
    ],
)  # fmt: skip
def test_metric_table_names_the_stability_reference(kind, threshold, ending):
    from dvmrl.cli.train import _format_metrics
    from dvmrl.metrics import regression_metrics

    metrics = regression_metrics([-0.2, 0.01, 0.3], [-0.1, 0.0, 0.2], threshold)
    table = _format_metrics(metrics, "title", threshold, kind)
    precision = next(line for line in table.splitlines() if "precision" in line)
    assert precision.endswith(ending)


def test_evaluate_states_tolerance(trained, tmp_path, capsys):
    main(["evaluate", str(trained / "model.pt"), "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    accuracy = next(line for line in lines if line.split()[0] == "accuracy")
    precision = next(line for line in lines if line.split()[0] == "precision")
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert "fraction of predictions within 0.05 eV/atom" in accuracy
    assert "target <= 0 eV/atom" in precision
    assert evaluation["accuracy_tolerance_ev_per_atom"] == 0.05


def test_evaluate_out_under_file(trained, tmp_path, capsys):
    blocker = tmp_path / "existing_file"
    blocker.write_text("")
    out = blocker / "sub"
    code = main(["evaluate", str(trained / "model.pt"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert f"{blocker} is a file" in captured.err
    assert "rmse" not in captured.out


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs the Linux /proc")
def test_evaluate_out_uncreatable_folder(trained, capsys):
    # os.access reports /proc writable to root, but no folder can be created
    # there. The check must catch that before scoring.
    code = main(["evaluate", str(trained / "model.pt"), "--out", "/proc/dvmrl-eval"])
    captured = capsys.readouterr()
    assert code == 2
    assert "--out /proc/dvmrl-eval" in captured.err
    assert "pass a path in a writable folder" in captured.err
    assert "rmse" not in captured.out


def _copy_csv(source, folder):
    """Write the same compositions with the last target moved by 1 meV/atom.

    An exact copy contains the rows the model trained on and counts as its
    own data. This one is other data that shares every composition.
    """
    frame = pd.read_csv(source)
    frame.loc[frame.index[-1], "target"] += 0.001
    copy = folder / "copy.csv"
    frame.to_csv(copy, index=False)
    return copy


def test_evaluate_warns_training_overlap(trained, data_csv, tmp_path, capsys):
    copy = _copy_csv(data_csv, tmp_path)
    code = main(
        [
            "evaluate",
            str(trained / "model.pt"),
            "--data",
            str(copy),
            "--out",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    n_train = json.loads((trained / "metrics.json").read_text())["n_train"]
    assert code == 0
    assert f"{n_train} of 300 rows have a composition of the training pool" in err
    assert "--exclude-training" in err


def test_evaluate_exclude_training(trained, data_csv, tmp_path):
    copy = _copy_csv(data_csv, tmp_path)
    model = str(trained / "model.pt")
    args = ["--data", str(copy), "--exclude-training", "--out", str(tmp_path)]
    assert main(["evaluate", model, *args]) == 0
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    assert evaluation["n"] == metrics["n_test"]
    assert evaluation["rmse"] == pytest.approx(metrics["rmse"], rel=1e-5)


def test_evaluate_overlap_old_checkpoint(tmp_path, data_csv, monkeypatch, capsys):
    from dvmrl.cli import train as train_cli

    # A checkpoint without stored compositions, as dvmrl train wrote before.
    with monkeypatch.context() as patch:
        patch.setattr(train_cli, "_pool_compositions", lambda df, split: {})
        out = tmp_path / "run"
        args = ["--data", str(data_csv), "--epochs", "1", *TINY, "--out", str(out)]
        assert main(["train", *args]) == 0
    capsys.readouterr()
    copy = _copy_csv(data_csv, tmp_path)
    main(["evaluate", str(out / "model.pt"), "--data", str(copy), "--out", str(out)])
    err = capsys.readouterr().err
    n_train = json.loads((out / "metrics.json").read_text())["n_train"]
    assert f"{n_train} of 300 rows have a composition of the training pool" in err


def test_evaluate_missing_checkpoint(tmp_path, capsys):
    code = main(["evaluate", str(tmp_path / "missing.pt")])
    assert code == 2
    assert "not found" in capsys.readouterr().err


def test_predict_warns_other_units(tmp_path, data_csv, capsys):
    # A model trained on targets in kJ/mol predicts in kJ/mol.
    frame = pd.read_csv(data_csv)
    frame["target"] *= 96.485
    csv = tmp_path / "kj.csv"
    frame.to_csv(csv, index=False)
    out = tmp_path / "run"
    argv = ["train", "--data", str(csv), "--epochs", "1", *TINY, "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["predict", str(out / "model.pt"), "Ni3Al", "FeNi"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"\d+ predictions? beyond 10 eV/atom in magnitude", err)


def test_predict_checkpoint_folder(trained, capsys):
    code = main(["predict", str(trained), "Al3Ni"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"is a folder; pass the checkpoint file in it, such as {trained}" in err


def test_predict_prints_units(trained, capsys):
    code = main(["predict", str(trained / "model.pt"), "Al3Ni", "CuZn"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert "prediction_kj_per_mol" in lines[0]
    row = lines[1].split()
    assert row[0] == "Al3Ni"
    assert row[1] == "Al0.75Ni0.25"
    # The table shows 4 decimals, so kJ/mol carries up to 0.00005 * 96.485 of rounding.
    assert float(row[3]) == pytest.approx(float(row[2]) * 96.485, abs=0.01)


def test_predict_into_closed_pipe(trained):
    # The reader closes the pipe before the child writes (importing torch
    # alone takes longer), as `dvmrl predict ... | head -0` would.
    env = dict(os.environ)
    package_root = str(Path(dvmrl.__file__).resolve().parents[1])
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "dvmrl", "predict", str(trained / "model.pt")]
    process = subprocess.Popen(
        [*command, "Al3Ni", "CuZn", "--threads", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(timeout=120) == EXIT_BROKEN_PIPE
    assert "internal error" not in stderr
    assert "BrokenPipeError" not in stderr


def test_predict_warns_unseen_element(trained, data_csv, capsys):
    seen = _train_elements(data_csv)
    from dvmrl.elements import ELEMENTS, is_metal

    unseen = next(s for s in ELEMENTS if is_metal(s) and s not in seen)
    main(["predict", str(trained / "model.pt"), f"Ni{unseen}"])
    err = capsys.readouterr().err
    assert "extrapolation outside the training domain" in err
    assert f"never seen in training ({unseen})" in err


def test_predict_hints_alloy_notation(trained, capsys):
    model = str(trained / "model.pt")
    assert main(["predict", model, "(CoNi)90Al10", "(CoNi)2Al"]) == 0
    err = capsys.readouterr().err
    assert "(CoNi)90Al10 was read in standard notation" in err
    assert "pass --alloy-notation" in err
    # (CoNi)2Al is not valid alloy notation, so it is not ambiguous.
    assert "(CoNi)2Al was read" not in err
    assert main(["predict", model, "--alloy-notation", "(CoNi)90Al10"]) == 0
    assert "was read in standard notation" not in capsys.readouterr().err


def test_predict_caps_domain_warnings(trained, tmp_path, capsys):
    """A long input prints ten domain warnings and the count of the others."""
    from dvmrl.cli.train import MAX_DOMAIN_WARNINGS

    path = tmp_path / "many.csv"
    rows = [f"Al{a}Co{b}Cr{c}FeNi" for a in range(1, 5) for b in (1, 2) for c in (1, 2)]
    path.write_text("formula\n" + "\n".join(rows) + "\n")
    assert main(["predict", str(trained / "model.pt"), "--input", str(path)]) == 0
    captured = capsys.readouterr()
    warning_count = captured.err.count("but training compositions have at most")
    assert warning_count == MAX_DOMAIN_WARNINGS
    assert f"{len(rows) - MAX_DOMAIN_WARNINGS} more warnings" in captured.err
    assert all(row in captured.out for row in rows)


def test_predict_warns_element_count(trained, capsys):
    main(["predict", str(trained / "model.pt"), "AlCoCrFeNi"])
    assert "5 elements" in capsys.readouterr().err


def test_predict_csv_round_trip(trained, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("formula,note\nAl3Ni,a\nFe2Ti,b\n")
    target = tmp_path / "out.csv"
    code = main(
        [
            "predict",
            str(trained / "model.pt"),
            "--input",
            str(source),
            "--output",
            str(target),
        ]
    )
    table = pd.read_csv(target)
    assert code == 0
    assert table["formula"].tolist() == ["Al3Ni", "Fe2Ti"]
    assert table["composition"].tolist() == [
        "Al0.75Ni0.25",
        "Ti0.3333333333333333Fe0.6666666666666666",
    ]
    assert "uncertainty_ev_per_atom" not in table.columns


def _predict_to(trained, output):
    checkpoint = str(trained / "model.pt")
    return main(["predict", checkpoint, "Al3Ni", "--output", str(output)])


def test_predict_output_through_symlink(trained, tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    assert _predict_to(trained, link) == 0
    assert link.is_symlink()
    assert pd.read_csv(real)["formula"].tolist() == ["Al3Ni"]


def test_predict_output_into_fifo(trained, fifo_reader):
    fifo, received, reader = fifo_reader
    code = _predict_to(trained, fifo)
    reader.join(timeout=60)
    assert code == 0
    assert fifo.exists()
    assert not fifo.is_file()
    assert received[0].startswith("formula,")


def test_predict_output_mode_follows_umask(trained, tmp_path):
    previous = os.umask(0o022)
    try:
        assert _predict_to(trained, tmp_path / "out.csv") == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == 0o644


def test_predict_output_full_device(trained, tmp_path, capsys):
    # A private node of the Linux full device (char 1, 7): every write fails
    # with ENOSPC. Creating it needs root, as in CI.
    import stat

    full = tmp_path / "full"
    try:
        os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except (PermissionError, AttributeError):
        pytest.skip("creating a device node needs root on Linux")
    code = _predict_to(trained, full)
    err = capsys.readouterr().err
    assert code == 1
    assert f"No space left on device: {full}" in err
    assert full.is_char_device()


def test_predict_input_other_separator(trained, tmp_path, capsys):
    model = str(trained / "model.pt")
    for name, text, separator in (
        ("semicolons.csv", "formula;note\nNi3Al;a\n", "semicolons"),
        ("decimal_commas.csv", "formula;target\nNi3Al;-0,4\n", "semicolons"),
        ("tabs.csv", "formula\tnote\nNi3Al\ta\n", "tabs"),
    ):
        source = tmp_path / name
        source.write_text(text)
        assert main(["predict", model, "--input", str(source)]) == 2
        err = capsys.readouterr().err
        assert f"seems to separate its fields with {separator}" in err
        # The column name that contains the separator is no fix to offer.
        assert "--formula-column" not in err


def test_predict_end_of_options_marker(trained, capsys):
    assert main(["predict", str(trained / "model.pt"), "--", "Ni3Al", "FeNi"]) == 0
    out = capsys.readouterr().out
    assert "Ni3Al" in out
    assert "FeNi" in out


def test_empty_formula_column_option(trained, tmp_path, capsys):
    source = tmp_path / "in.csv"
    source.write_text(",target\nNi3Al,-0.4\n")
    predict = ["predict", str(trained / "model.pt"), "--input", str(source)]
    info = ["data", "info", str(source)]
    for argv in ([*predict, "--formula-column", ""], [*info, "--formula-column", " "]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--formula-column: expected the name of a column" in err


def test_predict_unknown_element(trained, capsys):
    code = main(["predict", str(trained / "model.pt"), "Al3Ni", "Xq2Fe"])
    err = capsys.readouterr().err
    assert code == 2
    assert "argument 2" in err
    assert "1 invalid formula:" in err


def test_predict_unknown_element_csv(trained, tmp_path, capsys):
    source = tmp_path / "in.csv"
    source.write_text("formula\nXq2Fe\nAl3Ni\nZz\n")
    code = main(["predict", str(trained / "model.pt"), "--input", str(source)])
    err = capsys.readouterr().err
    assert code == 2
    assert "2 invalid formulas:" in err
    assert "line 4 ('Zz')" in err


def test_predict_warns_single_element(trained, capsys):
    main(["predict", str(trained / "model.pt"), "Ni"])
    err = capsys.readouterr().err
    assert "1 element, but training compositions have at least 2" in err
    assert "extrapolation outside the training domain" in err
    assert "pure element is 0 eV/atom" in err


def test_predict_binary_no_warning(trained, capsys):
    main(["predict", str(trained / "model.pt"), "Al3Ni"])
    assert "warning" not in capsys.readouterr().err


def test_predict_shows_alloy_reading(trained, capsys):
    model = str(trained / "model.pt")
    main(["predict", model, "--alloy-notation", "(AlNi)90Fe10"])
    alloy = capsys.readouterr().out.splitlines()[1].split()
    main(["predict", model, "(AlNi)90Fe10"])
    plain = capsys.readouterr().out.splitlines()[1].split()
    assert alloy[1] == "Al0.45Fe0.1Ni0.45"
    assert plain[1] != alloy[1]


def test_predict_output_under_file(trained, tmp_path, capsys):
    blocker = tmp_path / "good.csv"
    blocker.write_text("x\n")
    target = blocker / "x.csv"
    code = main(
        ["predict", str(trained / "model.pt"), "Al3Ni", "--output", str(target)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"{blocker} is a file" in err
    assert "File exists" not in err


def test_predict_output_is_folder(trained, tmp_path, capsys):
    code = main(
        ["predict", str(trained / "model.pt"), "Al3Ni", "--output", str(tmp_path)]
    )
    assert code == 2
    assert "is a folder" in capsys.readouterr().err


def test_predict_empty_file(trained, tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text("")
    code = main(["predict", str(trained / "model.pt"), "--input", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "is empty: expected a header line naming a 'formula' column" in err
    assert "target" not in err


def test_predict_missing_column(trained, tmp_path, capsys):
    path = tmp_path / "in.csv"
    path.write_text("composition\nAl3Ni\n")
    code = main(["predict", str(trained / "model.pt"), "--input", str(path)])
    assert code == 2
    assert "missing column 'formula'" in capsys.readouterr().err


def test_predict_warns_dilute_element(trained, capsys):
    code = main(["predict", str(trained / "model.pt"), "Ni1e30Al", "Ni3Al"])
    err = capsys.readouterr().err
    assert code == 0
    assert "Ni1e30Al: Al has an atomic fraction of 1e-30, below the smallest" in err
    assert "Ni3Al:" not in err


def test_evaluate_one_row_part(trained, data_csv, tmp_path, capsys):
    small = tmp_path / "small.csv"
    small.write_text("".join(data_csv.read_text().splitlines(keepends=True)[:8]))
    argv = ["evaluate", str(trained / "model.pt"), "--data", str(small)]
    code = main([*argv, "--split", "random", "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2
    assert "the test part of the random split has 1 composition" in err
    assert "pass a larger --data file or another --split" in err


@pytest.mark.parametrize(
    ("trained_alloy", "own_data", "option", "expected"),
    [
        (True, True, None, True),  # own data: read as in training
        (True, False, None, False),  # another file: standard unless asked
        (True, False, True, True),
        (False, False, True, True),
        (False, True, None, False),
    ],
)
def test_scored_alloy_notation(trained_alloy, own_data, option, expected):
    # The checkpoint's notation belongs to its own data file, as its column
    # names do; another file used to be read in it silently.
    from types import SimpleNamespace

    from dvmrl.cli.train import scored_alloy_notation

    args = SimpleNamespace(alloy_notation=option)
    metadata = {"alloy_notation": trained_alloy}
    assert scored_alloy_notation(args, metadata, own_data, "x.csv") is expected


def test_evaluate_alloy_notation_mismatch(trained, capsys):
    code = main(["evaluate", str(trained / "model.pt"), "--alloy-notation"])
    err = capsys.readouterr().err
    assert code == 2
    assert "read in standard notation" in err
    assert "leave --alloy-notation out" in err


def test_recorded_data_moved(tmp_path):
    from dvmrl.cli.train import check_recorded_data

    check_recorded_data("mp-formation-energy")
    with pytest.raises(FileNotFoundError, match="pass --data with its new path"):
        check_recorded_data(str(tmp_path / "moved.csv"))


def test_predict_formula_column_needs_input(trained, capsys):
    argv = ["predict", str(trained / "model.pt"), "--formula-column", "f", "Al3Ni"]
    code = main(argv)
    assert code == 2
    assert "names a column of an --input CSV file" in capsys.readouterr().err


def test_evaluate_rejects_csv_options(trained, capsys):
    argv = ["evaluate", str(trained / "model.pt"), "--data", "mp-formation-energy"]
    argv += ["--target-column", "y"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "--target-column applies only to a CSV file, not to the vendored" in err


def test_predict_missing_column_guess(trained, tmp_path, capsys):
    path = tmp_path / "in.csv"
    path.write_text("Formula,note\nAl3Ni,x\n")
    code = main(["predict", str(trained / "model.pt"), "--input", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "did you mean 'Formula'?" in err
    assert "--formula-column Formula" in err


def test_predict_needs_one_source(trained, capsys):
    code = main(["predict", str(trained / "model.pt")])
    assert code == 2
    assert "exactly one" in capsys.readouterr().err


def test_heteroscedastic_uncertainty(tmp_path, data_csv, capsys, caplog):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(data_csv),
            "--epochs",
            "1",
            "--heteroscedastic",
            *TINY,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    # The stored train.loss does not apply to this head, so "objective" differs.
    assert json.loads((out / "run.json").read_text())["objective"] == "gaussian_nll"
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="dvmrl"):
        main(["predict", str(out / "model.pt"), "Al3Ni"])
    lines = capsys.readouterr().out.splitlines()
    assert "uncertainty_ev_per_atom" in lines[0]
    assert float(lines[1].split()[4]) > 0.0
    # One model: the column is its head's predicted spread, not a members' one.
    notes = " ".join(r.getMessage() for r in caplog.records)
    assert "that the model's heteroscedastic head predicts" in notes
    assert "members" not in notes


@pytest.mark.parametrize(
    ("options", "objective"),
    [
        ([], "huber (delta 0.1 eV/atom)"),
        (["--loss", "l1"], "l1"),
        (["--loss", "mse"], "mse"),
    ],
)
def test_run_records_objective(tmp_path, data_csv, options, objective):
    out = tmp_path / "run"
    argv = ["train", "--data", str(data_csv), "--epochs", "1", *options, *TINY]
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["objective"] == objective


def test_train_out_is_file(tmp_path, data_csv, capsys):
    out = tmp_path / "existing_file"
    out.write_text("")
    code = main(["train", "--data", str(data_csv), *TINY, "--out", str(out)])
    assert code == 2
    assert "the path is a file, not a folder" in capsys.readouterr().err


def test_train_fraction_and_average_options(tmp_path, data_csv):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(data_csv),
            "--epochs",
            "1",
            "--fraction-hidden",
            "0",
            "--ema-decay",
            "0.5",
            "--monitor",
            "val_mae",
            *TINY,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["fraction_hidden"] == 0
    assert run["train"]["ema_decay"] == 0.5
    assert run["train"]["monitor"] == "val_mae"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["monitor"] == "val_mae"


def test_train_huber_loss_option(tmp_path, data_csv):
    out = tmp_path / "run"
    argv = ["train", "--data", str(data_csv), "--epochs", "1", *TINY]
    code = main([*argv, "--loss", "huber", "--huber-delta", "0.1", "--out", str(out)])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["loss"] == "huber"
    assert run["train"]["huber_delta"] == 0.1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["loss"] == "huber"


@pytest.mark.parametrize(
    ("other", "fix"),
    [
        (["--loss", "mse"], "drop --huber-delta or pass --loss huber"),
        # --loss huber would be refused next to --heteroscedastic.
        (["--heteroscedastic"], "or drop --heteroscedastic for a Huber loss"),
    ],
)
def test_train_huber_delta_needs_huber(tmp_path, data_csv, capsys, other, fix):
    argv = ["train", "--data", str(data_csv), "--huber-delta", "0.3", *other]
    code = main([*argv, *TINY, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--huber-delta applies to --loss huber" in err
    assert fix in err


def test_train_robust_loss_needs_single_output(tmp_path, data_csv, capsys):
    argv = ["train", "--data", str(data_csv), "--loss", "l1", "--heteroscedastic"]
    code = main([*argv, *TINY, "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--loss l1 applies to a single-output head" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--fraction-hidden", "-1", "expected an integer >= 0, got -1"),
        ("--ema-decay", "1", "expected a fraction in [0, 1), got 1"),
        ("--monitor", "rmse", "invalid choice: 'rmse'"),
        ("--ema-decay", "-0.1", "expected a fraction in [0, 1), got -0.1"),
        ("--ema-decay", "nan", "expected a fraction in [0, 1), got nan"),
        ("--dropout", "abc", "expected a fraction in [0, 1), got 'abc'"),
        ("--loss", "hinge", "invalid choice: 'hinge'"),
        ("--huber-delta", "0", "expected a finite number > 0, got 0"),
        ("--huber-delta", "-1", "expected a finite number > 0, got -1"),
        ("--huber-delta", "inf", "expected a finite number > 0, got inf"),
    ],
)
def test_train_rejects_bad_new_options(
    tmp_path, data_csv, capsys, option, value, message
):
    argv = ["train", "--data", str(data_csv), option, value, "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_predict_table_rounds_composition(trained, tmp_path, capsys):
    code = main(["predict", str(trained / "model.pt"), "AlNi2"])
    row = capsys.readouterr().out.splitlines()[1].split()
    assert code == 0
    assert row[:2] == ["AlNi2", "Al0.3333Ni0.6667"]
    # The CSV keeps the exact fractions.
    out = tmp_path / "p.csv"
    argv = ["predict", str(trained / "model.pt"), "AlNi2", "--output", str(out)]
    assert main(argv) == 0
    assert "Al0.3333333333333333Ni0.6666666666666666" in out.read_text()


def test_interrupt_while_parser_loads(monkeypatch, capsys):
    import dvmrl.cli

    def interrupted_build():
        raise KeyboardInterrupt

    # Ctrl-C while the subcommand modules import PyTorch raises here.
    monkeypatch.setattr(dvmrl.cli, "build_parser", interrupted_build)
    assert main(["train", "--out", "x"]) == 130
    err = capsys.readouterr().err
    assert err == "dvmrl: interrupted\n"


# Metallic binaries and a ternary, as a user's small CSV would list them.
SMALL_ROWS = [
    ("FeNi", -0.05), ("Ni3Al", -0.42), ("CuZn", -0.12), ("AlNi", -0.6),
    ("Fe3Al", -0.2), ("CoTi", -0.4), ("NiTi", -0.35), ("Cu3Au", -0.07),
    ("AlCo", -0.55), ("FeCo", -0.03), ("NiZr", -0.5), ("CuTi", -0.15),
    ("AlCuNi", -0.3),
]


@pytest.mark.parametrize(
    ("rows", "sizes", "need"),
    [
        (13, "11 training, 1 validation and 1 test rows", "at least 2 test rows"),
        (4, "4 training, 0 validation and 0 test rows", "at least 1 validation row"),
    ],
)
def test_train_too_few_rows(tmp_path, capsys, rows, sizes, need):
    path = tmp_path / "small.csv"
    frame = pd.DataFrame(SMALL_ROWS[:rows], columns=["formula", "target"])
    frame.to_csv(path, index=False)
    out = tmp_path / "run"
    args = ["--data", str(path), "--epochs", "2", *TINY, "--out", str(out)]
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path}: the random split of {rows} rows has {sizes}" in err
    assert need in err
    assert "it needs at least 15 rows" in err
    assert "--split element --holdout-element X" in err
    assert not out.exists()


def test_train_too_few_rows_element_split(tmp_path, capsys):
    path = tmp_path / "small.csv"
    pd.DataFrame(SMALL_ROWS, columns=["formula", "target"]).to_csv(path, index=False)
    out = tmp_path / "run"
    split = ["--split", "element", "--holdout-element", "Au"]
    code = main(["train", "--data", str(path), *split, *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "1 test rows" in err
    assert "pass a --holdout-element that at least 2 rows contain" in err
    assert not out.exists()


def test_train_diverged_is_usage_error(tmp_path, data_csv, capsys):
    out = tmp_path / "run"
    args = ["--data", str(data_csv), "--epochs", "1", "--lr", "1e6", *TINY]
    code = main(["train", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "internal error" not in err
    assert "training diverged" in err
    assert "with --lr 1e+06" in err
    assert "gradient clipping is already on at norm 5" in err
    assert "enable gradient clipping" not in err
    assert f"lower --lr (default 0.001) in another --out, or delete {out}" in err


def test_evaluate_warns_other_target_kind(trained, tmp_path, capsys, monkeypatch):
    import dvmrl.plotting

    labels = []
    real_plot = dvmrl.plotting.parity_plot

    def recording_plot(*args, **kwargs):
        labels.append((kwargs["quantity"], kwargs["predicted_quantity"]))
        return real_plot(*args, **kwargs)

    # evaluate imports the plotting functions when it runs.
    monkeypatch.setattr(dvmrl.plotting, "parity_plot", recording_plot)
    model = str(trained / "model.pt")
    data = ["--data", "mp-energy-above-hull", "--threads", "1"]
    code = main(["evaluate", model, *data, "--out", str(tmp_path)])
    captured = capsys.readouterr()
    # The vertical axis names the model's property, the horizontal the data's.
    assert labels == [("energy above hull", "formation energy")]
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert code == 0
    assert "(formation energy), but --data mp-energy-above-hull" in captured.err
    assert "has energy above hull targets" in captured.err
    assert "stable means target <= 0.025 eV/atom" in captured.out
    assert evaluation["stability_threshold"] == 0.025
    assert evaluation["target_kind"] == "energy_above_hull"
    assert evaluation["model_target_kind"] == "formation_energy"


def test_evaluate_rejects_contradicting_fetched_kind(trained, tmp_path, capsys):
    from conftest import write_fetched_csv

    csv = str(write_fetched_csv(tmp_path, "energy_above_hull"))
    argv = ["evaluate", str(trained / "model.pt"), "--data", csv]
    code = main([*argv, "--target-kind", "formation_energy", "--out", str(tmp_path)])
    assert code == 2
    assert "states that its targets are energy_above_hull" in capsys.readouterr().err


def test_evaluate_warns_other_data(trained, data_csv, tmp_path, capsys):
    copy = _copy_csv(data_csv, tmp_path)
    code = main(["evaluate", str(trained / "model.pt"), "--data", str(copy)])
    err = capsys.readouterr().err
    assert code == 0
    assert f"trained on {data_csv.resolve()} (formation energy)" in err
    assert f"--data {copy} (formation energy) is other data" in err


def test_evaluate_own_data_not_warned(trained, tmp_path, capsys):
    main(["evaluate", str(trained / "model.pt"), "--out", str(tmp_path)])
    assert "other data" not in capsys.readouterr().err


@pytest.fixture
def changed_run(tmp_path, data_csv):
    """A run whose CSV is then rewritten with its rows in reverse order."""
    copy = _copy_csv(data_csv, tmp_path)
    out = tmp_path / "run"
    args = ["--data", str(copy), "--epochs", "1", *TINY, "--out", str(out)]
    assert main(["train", *args]) == 0
    frame = pd.read_csv(copy)
    frame.iloc[::-1].to_csv(copy, index=False)
    return out, copy


def test_evaluate_rejects_changed_data(changed_run, capsys):
    out, copy = changed_run
    capsys.readouterr()
    code = main(["evaluate", str(out / "model.pt")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{copy}: the data changed since training" in err
    assert "restore the data as they were for training" in err
    assert "pass --split random" in err
    assert not (out / "evaluation.json").exists()


def test_evaluate_changed_data_explicit_split(changed_run, capsys):
    out, _ = changed_run
    capsys.readouterr()
    code = main(["evaluate", str(out / "model.pt"), "--split", "random"])
    err = capsys.readouterr().err
    assert code == 0
    assert "have a composition of the training pool" in err


@pytest.mark.parametrize(
    ("formula", "element"),
    [("FeNiAr", "Ar is not a metal"), ("FeNiHe", "He is not a metal"),
     ("FeNi3.H2O", "H, O are not metals")],
)
def test_predict_rejects_non_metal(trained, capsys, formula, element):
    code = main(["predict", str(trained / "model.pt"), "Al3Ni", formula])
    captured = capsys.readouterr()
    assert code == 2
    assert f"argument 2 ({formula!r})" in captured.err
    assert element in captured.err
    assert captured.out == ""


def test_predict_rejects_non_metal_csv(trained, tmp_path, capsys):
    source = tmp_path / "in.csv"
    source.write_text("formula\nAl3Ni\nFeNiAr\n")
    code = main(["predict", str(trained / "model.pt"), "--input", str(source)])
    err = capsys.readouterr().err
    assert code == 2
    assert "line 3 ('FeNiAr')" in err
    assert "Ar is not a metal" in err


def test_predict_input_names_file_lines(trained, tmp_path, capsys):
    # Blank lines count, so the message points at the line an editor shows.
    source = tmp_path / "in.csv"
    source.write_text("formula\nAl3Ni\n\n\nFeXx\n")
    code = main(["predict", str(trained / "model.pt"), "--input", str(source)])
    err = capsys.readouterr().err
    assert code == 2
    assert "line 5 ('FeXx')" in err


def test_negative_threshold_in_exponent_form(trained, tmp_path, capsys):
    # argparse alone reads -1e9 as an option name.
    model = str(trained / "model.pt")
    code = main(
        ["evaluate", model, "--stability-threshold", "-1e9", "--out", str(tmp_path)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "expected one argument" not in captured.err
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["stability_threshold"] == -1e9


def test_predict_without_arguments(capsys):
    code = main(["predict"])
    err = capsys.readouterr().err
    assert code == 2
    assert "missing CHECKPOINT and FORMULA... or --input FILE.csv" in err
    assert "required: CHECKPOINT, FORMULA" not in err


def test_predict_input_is_folder(trained, tmp_path, capsys):
    code = main(["predict", str(trained / "model.pt"), "--input", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--input {tmp_path}: the path is a folder" in err
    assert "not found" not in err


def test_predict_empty_output_path(trained, capsys):
    code = main(["predict", str(trained / "model.pt"), "Al3Ni", "--output", ""])
    captured = capsys.readouterr()
    assert code == 2
    assert "--output is empty" in captured.err
    assert captured.out == ""


def test_train_logs_epochs_without_bar(tmp_path, data_csv, caplog, monkeypatch):
    # stderr is not a terminal under pytest, so no bar is drawn and the
    # epochs reach the log instead (here every epoch, with no time limit).
    import dvmrl.cli.train as train_cli

    monkeypatch.setattr(train_cli, "PROGRESS_LOG_SECONDS", 0)
    args = ["--data", str(data_csv), "--epochs", "2", *TINY, "--no-progress"]
    with caplog.at_level(logging.INFO, logger="dvmrl"):
        code = main(["train", *args, "--out", str(tmp_path / "run")])
    messages = [record.getMessage() for record in caplog.records]
    assert code == 0
    assert any(m.startswith("epoch 1 of at most 2: train loss") for m in messages)
    assert any(m.startswith("epoch 2 of at most 2: train loss") for m in messages)


def test_threads_above_cores_warned(trained, caplog):
    from dvmrl._runtime import _available_cores

    too_many = _available_cores() + 1
    with caplog.at_level(logging.WARNING, logger="dvmrl"):
        code = main(
            ["predict", str(trained / "model.pt"), "Al3Ni", "--threads", str(too_many)]
        )
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert code == 0
    assert f"--threads {too_many} exceeds the {too_many - 1} CPU cores" in messages


def test_omp_threads_above_cores_warned(trained, caplog, monkeypatch):
    # The default thread count comes from OMP_NUM_THREADS, which is checked
    # against the cores as --threads is.
    from dvmrl._runtime import _available_cores

    too_many = _available_cores() + 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(too_many))
    with caplog.at_level(logging.WARNING, logger="dvmrl"):
        code = main(["predict", str(trained / "model.pt"), "Al3Ni"])
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert code == 0
    expected = f"OMP_NUM_THREADS={too_many} exceeds the {too_many - 1} CPU cores"
    assert expected in messages


def test_predict_output_keeps_input_columns(trained, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("sample,formula,composition\nS1,Al3Ni,cast\nS2,Fe2Ti,milled\n")
    target = tmp_path / "out.csv"
    argv = ["predict", str(trained / "model.pt"), "--input", str(source)]
    code = main([*argv, "--output", str(target)])
    table = pd.read_csv(target)
    assert code == 0
    assert table["sample"].tolist() == ["S1", "S2"]
    # The input's "composition" would clash with the predictions' own column.
    assert table["composition_input"].tolist() == ["cast", "milled"]
    assert table["composition"].tolist()[0] == "Al0.75Ni0.25"


@pytest.mark.parametrize(
    ("column", "written_as"),
    [
        ("alloy", "alloy"),
        ("composition", "composition_input"),
        ("Composition", "Composition_input"),
    ],
)
def test_predict_keeps_formula_column_name(trained, tmp_path, column, written_as):
    source = tmp_path / "in.csv"
    source.write_text(f"id,{column},dH\n1,Al3Ni,-0.4\n2,Fe2Ti,-0.3\n")
    target = tmp_path / "out.csv"
    argv = ["predict", str(trained / "model.pt"), "--input", str(source)]
    code = main([*argv, "--formula-column", column, "--output", str(target)])
    table = pd.read_csv(target)
    assert code == 0
    assert list(table.columns)[0] == written_as
    assert table[written_as].tolist() == ["Al3Ni", "Fe2Ti"]
    assert table["composition"].tolist()[0] == "Al0.75Ni0.25"
    assert "formula" not in table.columns
    assert table["dH"].tolist() == [-0.4, -0.3]


def test_csv_with_other_column_names(tmp_path, data_csv, capsys):
    """Train, evaluate and resume on a CSV whose columns have other names.

    The run and the checkpoint record the names, so evaluate and --resume
    read the same file without the options.
    """
    frame = pd.read_csv(data_csv).rename(
        columns={"formula": "composition", "target": "e_form"}
    )
    frame["note"] = "made up"
    path = tmp_path / "renamed.csv"
    frame[["note", "e_form", "composition"]].to_csv(path, index=False)
    out = tmp_path / "run"
    columns = ["--formula-column", "composition", "--target-column", "e_form"]
    args = ["--data", str(path), "--epochs", "1", *TINY, "--out", str(out)]
    assert main(["train", *args, *columns]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["formula_column"] == "composition"
    assert run["target_column"] == "e_form"
    metrics = json.loads((out / "metrics.json").read_text())

    capsys.readouterr()
    assert main(["evaluate", str(out / "model.pt"), "--out", str(tmp_path)]) == 0
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["rmse"] == pytest.approx(metrics["rmse"], rel=1e-5)

    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert "is complete" in capsys.readouterr().out
    code = main(["train", "--resume", "--target-column", "target", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "--target-column 'target' (the run in" in err
    assert "used 'e_form'" in err


def test_csv_column_names_needed(tmp_path, data_csv, capsys):
    """Without the options the error names the missing columns and the options."""
    path = tmp_path / "renamed.csv"
    pd.read_csv(data_csv).rename(columns={"target": "e_form"}).to_csv(path, index=False)
    code = main(["train", "--data", str(path), *TINY, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "no column(s) 'target'" in err
    assert "--formula-column and --target-column" in err
    assert not (tmp_path / "out" / "run.json").exists()


def test_resume_run_without_column_fields(trained, tmp_path, capsys):
    """A run.json from before the column options reads the default columns."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    run = json.loads((copy / "run.json").read_text())
    del run["formula_column"], run["target_column"]
    (copy / "run.json").write_text(json.dumps(run))
    code = main(
        ["train", "--resume", "--formula-column", "formula", "--out", str(copy)]
    )
    assert code == 0
    assert "is complete" in capsys.readouterr().out


def test_metrics_table_marks_undefined_ratios():
    from dvmrl.cli.train import _format_metrics
    from dvmrl.metrics import regression_metrics

    # Energies above hull scored at threshold 0 by a model that predicts
    # nothing stable: precision is 0 / 0.
    metrics = regression_metrics([0.0, 0.0, 0.1], [0.02, 0.03, 0.09])
    table = _format_metrics(metrics, "test", threshold=0.0)
    line = next(x for x in table.splitlines() if x.strip().startswith("precision"))
    assert "(undefined: no composition predicted stable, shown as 0)" in line
    recall = next(x for x in table.splitlines() if x.strip().startswith("recall"))
    assert "undefined" not in recall


def test_metrics_table_flags_small_test_part():
    from dvmrl.cli.train import _format_metrics
    from dvmrl.metrics import regression_metrics

    few = _format_metrics(regression_metrics([0.1, -0.2], [0.1, -0.1]), "test", 0.0)
    assert "only 2 compositions scored" in few
    targets = [0.01 * i for i in range(100)]
    many = _format_metrics(regression_metrics(targets, targets), "test", 0.0)
    assert "scored, so a few" not in many


def test_predict_flags_negative_hull_energies(trained, monkeypatch, capsys):
    import numpy as np

    import dvmrl.cli.train as train_cli

    real_load = train_cli.load_model

    def as_hull_model(*args, **kwargs):
        model, metadata = real_load(*args, **kwargs)
        return model, {**metadata, "target_kind": "energy_above_hull"}

    def predict(model, batch, device, with_variance):
        return np.array([-0.02, 0.05]), None

    monkeypatch.setattr(train_cli, "load_model", as_hull_model)
    monkeypatch.setattr(train_cli, "_predict", predict)
    assert main(["predict", str(trained / "model.pt"), "Ni3Al", "NiAl"]) == 0
    err = capsys.readouterr().err
    assert "1 prediction of the energy above the hull lies below 0 eV/atom" in err


def test_train_folder_in_use_rejected(data_csv, tmp_path, capsys):
    from dvmrl._files import FolderLock

    out = tmp_path / "run"
    out.mkdir()
    argv = ["train", "--data", str(data_csv), "--epochs", "1", "--device", "cpu"]
    with FolderLock(out):
        code = main([*argv, *TINY, "--out", str(out)])
    assert code == 2
    assert "is in use by another dvmrl process" in capsys.readouterr().err
    assert not any(out.iterdir())
    assert main([*argv, *TINY, "--out", str(out)]) == 0


def test_resume_of_other_command_folder_rejected(tmp_path, capsys):
    run_folder = tmp_path / "main-job"
    run_folder.mkdir()
    (run_folder / "run.json").write_text('{"format": "dvmrl-run", "signature": {}}')
    code = main(["train", "--resume", "--out", str(run_folder)])
    assert code == 2
    assert "continue it with dvmrl run --resume --out" in capsys.readouterr().err

    train_folder = tmp_path / "train"
    train_folder.mkdir()
    (train_folder / "run.json").write_text('{"data": "mp-formation-energy", "train": {}}')
    code = main(["run", "--resume", "--out", str(train_folder)])
    assert code == 2
    assert "continue it with dvmrl train --resume --out" in capsys.readouterr().err


def test_train_single_composition_names_fix(tmp_path, capsys):
    # Repeats of one composition form one group, which the test part takes.
    path = tmp_path / "single.csv"
    targets = [-0.4 + 0.01 * i for i in range(30)]
    frame = pd.DataFrame({"formula": ["Ni3Al"] * 30, "target": targets})
    frame.to_csv(path, index=False)
    out = tmp_path / "run"
    code = main(["train", "--data", str(path), *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "the random split of 30 rows leaves no training rows" in err
    assert "add rows of other compositions" in err
    assert "--test-fraction" not in err
    assert not out.exists()


def test_write_failure_names_resume(tmp_path, monkeypatch, capsys):
    # A full disk during training: the message names how to continue. The
    # failing write is a stand-in, and the handler is the real one of dvmrl.cli.
    import dvmrl.cli.train as train_cli

    def disk_full(args):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "last.pt"))

    monkeypatch.setattr(train_cli, "run_train", disk_full)
    # The advice needs a run to continue: the folder contains run.json.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text("{}")
    code = main(["train", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "No space left on device" in err
    assert "continue the run with the same command and --resume" in err
    # An output folder that was never created contains nothing to continue.
    assert main(["train", "--out", str(tmp_path / "new")]) == 1
    assert "--resume" not in capsys.readouterr().err
    # predict has no --resume, so its message has no such hint.
    monkeypatch.setattr(train_cli, "run_predict", disk_full)
    assert main(["predict", "model.pt", "NiAl"]) == 1
    assert "--resume" not in capsys.readouterr().err


def test_scored_columns_take_kind_from_data_info():
    # A checkpoint whose metadata states its kind only in data_info scores
    # other files as that kind, as one with the top-level key does.
    import argparse

    from dvmrl.cli.train import scored_csv_columns

    args = argparse.Namespace(target_kind=None)
    only_info = {"data_info": {"target_kind": "energy_above_hull"}}
    columns = scored_csv_columns(only_info, own_data=False, args=args)
    assert columns["target_kind"] == "energy_above_hull"
    top_level = {"target_kind": "energy_above_hull"}
    assert scored_csv_columns(top_level, own_data=False, args=args) == columns
    args = argparse.Namespace(target_kind="formation_energy")
    columns = scored_csv_columns(only_info, own_data=False, args=args)
    assert columns["target_kind"] == "formation_energy"


def test_removed_out_stops_before_next_state(tmp_path, data_csv, monkeypatch, capsys):
    # The folder goes during the second epoch: the fit stops before that
    # epoch's state file would recreate it.
    import shutil

    from dvmrl.training import trainer as trainer_module

    out = tmp_path / "out"
    run_epoch = trainer_module.Trainer._run_epoch

    def run_then_remove(self):
        record = run_epoch(self)
        if self.epochs_done == 2:
            shutil.rmtree(out)
        return record

    monkeypatch.setattr(trainer_module.Trainer, "_run_epoch", run_then_remove)
    argv = ["train", "--data", str(data_csv), "--epochs", "3", *TINY]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"--out {out} was removed or replaced while this command ran" in err
    assert "start it again in a new or empty --out" in err
    assert not out.exists()


def test_removed_out_stops_train(tmp_path, data_csv, monkeypatch, capsys):
    # The output folder is deleted while the model trains: the run stops
    # before it writes a model into a recreated, unlocked folder.
    import shutil

    import dvmrl.cli.train as train_cli

    out = tmp_path / "out"
    fit_member = train_cli._fit_member

    def fit_then_remove(*args, **kwargs):
        trainer = fit_member(*args, **kwargs)
        shutil.rmtree(out)
        return trainer

    monkeypatch.setattr(train_cli, "_fit_member", fit_then_remove)
    argv = ["train", "--data", str(data_csv), "--epochs", "1", *TINY]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"--out {out} was removed or replaced while this command ran" in err
    assert "--resume" not in err
    assert not (out / "model.pt").exists()


@pytest.mark.parametrize("name", ["out.csv.gz", "out.csv.bz2", "out.csv.xz", "out.zip"])
def test_predict_output_compressed_by_suffix(trained, tmp_path, name):
    # The file is compressed as its suffix names, so --input reads it back.
    target = tmp_path / name
    assert _predict_to(trained, target) == 0
    assert not target.read_bytes().startswith(b"formula,")
    assert pd.read_csv(target)["formula"].tolist() == ["Al3Ni"]
    again = tmp_path / "again.csv"
    argv = ["predict", str(trained / "model.pt"), "--input", str(target)]
    assert main([*argv, "--output", str(again)]) == 0
    assert pd.read_csv(again)["formula"].tolist() == ["Al3Ni"]


def test_predict_output_over_input_refused(trained, tmp_path, capsys):
    source = tmp_path / "in.csv"
    source.write_text("formula\nAl3Ni\n")
    argv = ["predict", str(trained / "model.pt"), "--input", str(source)]
    code = main([*argv, "--output", str(tmp_path / "." / "in.csv")])
    err = capsys.readouterr().err
    assert code == 2
    assert "is the --input file, which the predictions would replace" in err
    assert source.read_text() == "formula\nAl3Ni\n"


def test_uncertainty_note_names_members():
    from dvmrl.cli.train import _uncertainty_note
    from dvmrl.model import CompositionMPNN, ModelConfig
    from dvmrl.training import EnsembleModel

    config = ModelConfig(hidden=8, layers=1, heteroscedastic=False)
    members = [CompositionMPNN(config, seed=seed) for seed in range(2)]
    note = _uncertainty_note(EnsembleModel(members))
    assert "spread (a standard deviation) of the ensemble members' predictions" in note
    assert "heteroscedastic" not in note


@pytest.mark.parametrize("name", ["mp-formation-energy", "oqmd-formation-energy"])
def test_data_reference_keeps_vendored_name(name, tmp_path, monkeypatch):
    # resolve_data loads the vendored set for its name even when a file of
    # that name lies in the working folder, so the recorded reference (and
    # what a run loads through it) must be the name, not that file's path.
    from dvmrl.cli._common import data_reference

    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text("formula,target\nNi3Al,-0.4\n")
    assert data_reference(name) == name
    assert data_reference("") == ""
    assert data_reference("alloys.csv") == str(tmp_path / "alloys.csv")
    (tmp_path / "mine").write_text("formula,target\n")
    assert data_reference("mine") == str(tmp_path / "mine")
