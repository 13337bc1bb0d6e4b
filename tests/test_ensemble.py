"""Tests of dvmrl.training.ensemble: the mean model, its checkpoint, the CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dvmrl import datasets, defaults
from dvmrl.cli import main
from dvmrl.elements import ELEMENTS
from dvmrl.featurize import featurize
from dvmrl.model import CompositionMPNN, ModelConfig
from dvmrl.training import (
    CheckpointError,
    EnsembleModel,
    TrainConfig,
    Trainer,
    combine_checkpoints,
    load_checkpoint,
)
from dvmrl.training import trainer as trainer_module

SMALL = ModelConfig(
    hidden=16, layers=1, gate_hidden=8, msg_hidden=8, head_hidden=16, head_layers=1
)
FORMULAS = ["FeNi", "Al2Cu", "NiTiZr", "Fe3Al", "CuZn"]


def _members(count, config=SMALL, dtype=torch.float64):
    return [
        CompositionMPNN(config, seed=seed, dtype=dtype).eval() for seed in range(count)
    ]


def _batch():
    return featurize(FORMULAS).to(dtype=torch.float64)


def test_mean_of_members():
    members = _members(3)
    ensemble = EnsembleModel(members)
    batch = _batch()
    args = (batch.element_index, batch.frac, batch.mask)
    each = torch.stack([member(*args) for member in members])
    torch.testing.assert_close(ensemble(*args), each.mean(dim=0), atol=1e-12, rtol=0)
    mean, variance = ensemble.forward_with_variance(*args)
    torch.testing.assert_close(mean, each.mean(dim=0), atol=1e-12, rtol=0)
    expected = each.var(dim=0, unbiased=False)
    torch.testing.assert_close(variance, expected, atol=1e-12, rtol=0)
    assert bool((variance > 0).all())


def test_heteroscedastic_variance_adds_noise():
    config = ModelConfig(**{**SMALL.to_dict(), "heteroscedastic": True})
    members = _members(2, config)
    ensemble = EnsembleModel(members)
    batch = _batch()
    args = (batch.element_index, batch.frac, batch.mask)
    pairs = [member.forward_with_variance(*args) for member in members]
    means = torch.stack([mean for mean, _ in pairs])
    noise = torch.stack([variance for _, variance in pairs]).mean(dim=0)
    _, variance = ensemble.forward_with_variance(*args)
    expected = means.var(dim=0, unbiased=False) + noise
    torch.testing.assert_close(variance, expected, atol=1e-12, rtol=0)


def test_single_member_without_uncertainty():
    ensemble = EnsembleModel(_members(1))
    assert not ensemble.has_uncertainty
    batch = _batch()
    with pytest.raises(RuntimeError, match="no uncertainty"):
        ensemble.forward_with_variance(batch.element_index, batch.frac, batch.mask)


def test_frac_gradient_is_member_mean():
    members = _members(2)
    ensemble = EnsembleModel(members)
    batch = _batch()
    gradients = []
    for model in (ensemble, *members):
        frac = batch.frac.clone().requires_grad_(True)
        model(batch.element_index, frac, batch.mask).sum().backward()
        gradients.append(frac.grad)
    expected = (gradients[1] + gradients[2]) / 2
    torch.testing.assert_close(gradients[0], expected, atol=1e-12, rtol=0)


def test_members_must_match():
    other = ModelConfig(**{**SMALL.to_dict(), "hidden": 8})
    with pytest.raises(ValueError, match="members must share one config"):
        EnsembleModel([*_members(1), *_members(1, other)])
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleModel([])
    with pytest.raises(ValueError, match="dtype"):
        EnsembleModel(
            [*_members(1), *_members(1, dtype=torch.float32)],
        )


@pytest.fixture(scope="module")
def data():
    frame = datasets.load("mp-formation-energy")
    rows = np.random.default_rng(2).choice(len(frame), size=300, replace=False)
    subset = frame.iloc[rows]
    x = featurize(subset["formula"].tolist())
    y = subset["target"].to_numpy()
    return x[:240], y[:240], x[240:], y[240:]


def _trained(data, seed, config=SMALL):
    trainer = Trainer(config, TrainConfig(epochs=1, batch_size=64, seed=seed), *data)
    trainer.fit()
    return trainer


def test_checkpoint_round_trip(data, tmp_path):
    trainers = [_trained(data, seed) for seed in (0, 1)]
    paths = []
    for position, trainer in enumerate(trainers):
        paths.append(trainer.save(tmp_path / f"member{position}.pt"))
    combined = combine_checkpoints(paths, tmp_path / "ensemble.pt", {"note": "two"})
    model, metadata = load_checkpoint(combined)
    assert isinstance(model, EnsembleModel)
    assert len(model) == 2
    assert metadata["note"] == "two"
    x_val = data[2]
    expected = np.mean([trainer.predict(x_val) for trainer in trainers], axis=0)
    with torch.no_grad():
        got = model(x_val.element_index, x_val.frac.float(), x_val.mask)
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-6, rtol=0)


def test_single_model_checkpoint_stays_single(data, tmp_path):
    path = _trained(data, 0).save(tmp_path / "one.pt")
    model, _ = load_checkpoint(path)
    assert isinstance(model, CompositionMPNN)


def test_combine_rejects_other_config(data, tmp_path):
    other = ModelConfig(**{**SMALL.to_dict(), "hidden": 8})
    first = _trained(data, 0).save(tmp_path / "a.pt")
    second = _trained(data, 1, other).save(tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="another model_config"):
        combine_checkpoints([first, second], tmp_path / "ensemble.pt")


def test_combine_rejects_reserved_metadata(data, tmp_path):
    first = _trained(data, 0).save(tmp_path / "a.pt")
    second = _trained(data, 1).save(tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"metadata keys \['history'\] are reserved"):
        combine_checkpoints(
            [first, second], tmp_path / "ensemble.pt", metadata={"history": []}
        )
    assert not (tmp_path / "ensemble.pt").exists()


def test_combine_rejects_nested_repeated_or_overwritten(data, tmp_path):
    first = _trained(data, 0).save(tmp_path / "a.pt")
    second = _trained(data, 1).save(tmp_path / "b.pt")
    ensemble = combine_checkpoints([first, second], tmp_path / "ensemble.pt")
    # An ensemble as a member would keep only its first member.
    with pytest.raises(CheckpointError, match="ensemble checkpoint of 2 members"):
        combine_checkpoints([ensemble, first], tmp_path / "nested.pt")
    # A repeated member adds nothing and shrinks the spread to zero.
    with pytest.raises(CheckpointError, match="listed twice"):
        combine_checkpoints([first, tmp_path / "." / "a.pt"], tmp_path / "twice.pt")
    before = first.read_bytes()
    with pytest.raises(CheckpointError, match="is also a member checkpoint"):
        combine_checkpoints([first, second], first)
    assert first.read_bytes() == before
    for name in ("nested.pt", "twice.pt"):
        assert not (tmp_path / name).exists()


TINY = ["--hidden", "8", "--layers", "1", "--batch-size", "64", "--threads", "1"]


def test_cli_train_members(tmp_path, alloys_csv, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(alloys_csv), "--epochs", "1", "--members", "2"]
    assert main([*argv, *TINY, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["members"] == 2
    assert metrics["member_seeds"] == [0, 1]
    rows = metrics["member_metrics"]
    assert [row["member"] for row in rows] == [0, 1]
    assert all(row["epochs_done"] == 1 for row in rows)
    # The mean of two predictions cannot be worse than both of them.
    assert metrics["mae"] <= max(row["mae"] for row in rows)
    assert rows[0]["rmse"] != rows[1]["rmse"]
    for member in ("member0", "member1"):
        assert (out / member / "model.pt").is_file()
    model, metadata = load_checkpoint(out / "model.pt")
    assert isinstance(model, EnsembleModel)
    assert metadata["members"] == 2
    capsys.readouterr()
    assert main(["predict", str(out / "model.pt"), "Al3Ni"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "uncertainty_ev_per_atom" in lines[0]
    assert float(lines[1].split()[4]) > 0.0


def test_cli_train_default_members(tmp_path, alloys_csv):
    out = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(alloys_csv),
        "--epochs",
        "1",
        *TINY,
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["members"] == defaults.MEMBERS
    assert run["member_divisions"] == "own"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["member_seeds"] == list(range(defaults.MEMBERS))
    model, _ = load_checkpoint(out / "model.pt")
    assert len(model) == defaults.MEMBERS


def _interrupt_second_member(monkeypatch):
    """Interrupt Trainer.fit at the second member; return the original fit."""
    original_fit = Trainer.fit
    calls = []

    def fit_until_second_member(self, *args, **kwargs):
        calls.append(self.train_config.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit_until_second_member)
    return original_fit


def test_cli_members_resume(tmp_path, alloys_csv, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(alloys_csv), "--epochs", "1", "--members", "2"]
    original_fit = _interrupt_second_member(monkeypatch)
    assert main([*argv, *TINY, "--out", str(out)]) == 130
    state = out / "member1" / "last.pt"
    message = f"member 1: interrupted after 0 epochs; the state is in {state}\n"
    assert message in capsys.readouterr().err
    assert (out / "member0" / "model.pt").is_file()
    assert not (out / "model.pt").exists()

    monkeypatch.setattr(Trainer, "fit", original_fit)
    assert main(["train", "--resume", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["members"] == 2
    model, _ = load_checkpoint(out / "model.pt")
    assert len(model) == 2


def test_corrupt_member_state_rejected(data, tmp_path):
    paths = [_trained(data, seed).save(tmp_path / f"m{seed}.pt") for seed in (0, 1)]
    combined = combine_checkpoints(paths, tmp_path / "ensemble.pt")
    document = torch.load(combined, weights_only=True)
    document["member_states"] = [{"flat": "not a tensor"}]
    torch.save(document, tmp_path / "corrupt.pt")
    with pytest.raises(CheckpointError, match="state of member 1 is not a dict"):
        load_checkpoint(tmp_path / "corrupt.pt")


def test_combine_members_of_other_divisions(data, tmp_path):
    # Two members trained on different halves: other data fingerprints and
    # target scalings, which each member's state carries.
    x_train, y_train, x_val, y_val = data
    halves = [slice(0, 120), slice(120, 240)]
    trainers = []
    for seed, rows in enumerate(halves):
        config = TrainConfig(epochs=1, batch_size=64, seed=seed)
        trainer = Trainer(SMALL, config, x_train[rows], y_train[rows], x_val, y_val)
        trainer.fit()
        trainers.append(trainer)
    paths = [t.save(tmp_path / f"member{i}.pt") for i, t in enumerate(trainers)]
    scales = [float(t.model.target_mean) for t in trainers]
    assert scales[0] != scales[1]
    message = "another data_fingerprint.*same_division=False"
    with pytest.raises(CheckpointError, match=message):
        combine_checkpoints(paths, tmp_path / "ensemble.pt")
    combined = combine_checkpoints(paths, tmp_path / "ensemble.pt", same_division=False)
    model, metadata = load_checkpoint(combined)
    # The ensemble's domain is the union of the members' domains.
    domains = [trainer.training_domain() for trainer in trainers]
    assert set(domains[0]["elements"]) != set(domains[1]["elements"])
    domain = metadata["training_domain"]
    union = set(domains[0]["elements"]) | set(domains[1]["elements"])
    assert domain["elements"] == sorted(union, key=ELEMENTS.index)
    assert domain["max_elements"] == max(d["max_elements"] for d in domains)
    assert domain["min_fraction"] == min(d["min_fraction"] for d in domains)
    expected = np.mean([trainer.predict(x_val) for trainer in trainers], axis=0)
    with torch.no_grad():
        got = model(x_val.element_index, x_val.frac.float(), x_val.mask)
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-6, rtol=0)


def _member_metadata(out, member):
    _, metadata = load_checkpoint(out / f"member{member}" / "model.pt")
    return metadata


def test_cli_members_own_divisions(tmp_path, alloys_csv):
    out = tmp_path / "run"
    argv = ["train", "--data", str(alloys_csv), "--epochs", "1", "--members", "2"]
    assert main([*argv, *TINY, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["member_divisions"] == "own"
    first, second = (_member_metadata(out, member) for member in (0, 1))
    assert first["split_fingerprint"] != second["split_fingerprint"]
    assert first["training_compositions"] != second["training_compositions"]
    # The pool (training plus validation) and the test part are shared.
    pool = set(first["training_compositions"]) | set(first["validation_compositions"])
    other_pool = set(second["training_compositions"]) | set(
        second["validation_compositions"]
    )
    assert pool == other_pool
    _, ensemble = load_checkpoint(out / "model.pt")
    training = set(ensemble["training_compositions"])
    assert training == set(first["training_compositions"]) | set(
        second["training_compositions"]
    )
    assert not training & set(ensemble["validation_compositions"])
    assert training | set(ensemble["validation_compositions"]) == pool


def test_cli_members_shared_division(tmp_path, alloys_csv):
    out = tmp_path / "run"
    argv = ["train", "--data", str(alloys_csv), "--epochs", "1", "--members", "2"]
    shared = ["--member-divisions", "shared"]
    assert main([*argv, *shared, *TINY, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["member_divisions"] == "shared"
    first, second = (_member_metadata(out, member) for member in (0, 1))
    assert first["split_fingerprint"] == second["split_fingerprint"]


def test_cli_resume_ensemble_before_divisions(tmp_path, alloys_csv, monkeypatch):
    # A run.json written before --member-divisions existed: its members
    # shared one division, and the resumed member must get that division.
    out = tmp_path / "run"
    argv = ["train", "--data", str(alloys_csv), "--epochs", "1", "--members", "2"]
    shared = ["--member-divisions", "shared"]
    original_fit = _interrupt_second_member(monkeypatch)
    assert main([*argv, *shared, *TINY, "--out", str(out)]) == 130
    run = json.loads((out / "run.json").read_text())
    del run["member_divisions"]
    (out / "run.json").write_text(json.dumps(run))

    monkeypatch.setattr(Trainer, "fit", original_fit)
    assert main(["train", "--resume", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["member_divisions"] == "shared"


def test_cli_members_named_in_trainer_log(tmp_path, alloys_csv, monkeypatch, caplog):
    original_fit = Trainer.fit

    def fit_and_log(self, *args, **kwargs):
        # A line like the trainer's own early-stop message.
        trainer_module.logger.info("early stop after epoch %d", 1)
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit_and_log)
    out = tmp_path / "run"
    argv = ["train", "--data", str(alloys_csv), "--epochs", "1", "--members", "2"]
    # Other tests may leave the "dvmrl" logger at INFO, so set its level too.
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, "dvmrl"):
        assert main([*argv, *TINY, "--out", str(out)]) == 0
        # The prefix is gone once the members are done.
        trainer_module.logger.info("after")
    name = trainer_module.logger.name
    lines = [r.getMessage() for r in caplog.records if r.name == name]
    assert "member 0: early stop after epoch 1" in lines
    assert "member 1: early stop after epoch 1" in lines
    assert lines[-1] == "after"
    # The per-epoch lines of the command name the member too.
    epochs = [r.getMessage() for r in caplog.records if r.name == "dvmrl"]
    assert any(line.startswith("member 0: epoch 1: ") for line in epochs)
    assert any(line.startswith("member 1: epoch 1: ") for line in epochs)


def test_interrupt_after_state_write_counts_saved_epochs(
    tmp_path, alloys_csv, monkeypatch, capsys
):
    # Ctrl-C right after the third epoch's state was written, before that
    # epoch was reported: the message must count the epochs in the file,
    # which a resume continues from.
    original_save = Trainer.save

    def save_then_interrupt(self, path, *args, **kwargs):
        written = original_save(self, path, *args, **kwargs)
        if self.epochs_done == 3:
            raise KeyboardInterrupt
        return written

    monkeypatch.setattr(Trainer, "save", save_then_interrupt)
    out = tmp_path / "run"
    argv = ["train", "--data", str(alloys_csv), "--epochs", "6", "--members", "1"]
    assert main([*argv, *TINY, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted after 3 epochs; the state is in {out / 'last.pt'}" in err


def test_interrupt_after_out_removed_names_no_state(
    tmp_path, alloys_csv, monkeypatch, capsys
):
    # The output folder is deleted, then Ctrl-C stops the second member: no
    # state file is left to point to or to resume from.
    import shutil

    out = tmp_path / "run"
    original_fit = Trainer.fit
    calls = []

    def remove_then_interrupt(self, *args, **kwargs):
        calls.append(self.train_config.seed)
        if len(calls) == 2:
            shutil.rmtree(out)
            raise KeyboardInterrupt
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", remove_then_interrupt)
    argv = ["train", "--data", str(alloys_csv), "--epochs", "1", "--members", "2"]
    code = main([*argv, *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert "member 1: interrupted after 0 epochs; the output folder was removed" in err
    assert "so its state is not at" in err
    assert "the state is in" not in err
    assert "--resume" not in err, err
    assert f"--out {out} was removed or replaced while this command ran" in err
    assert code == 1
