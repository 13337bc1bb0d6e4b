"""Tests of checkpoints: round trip, provenance, rejection of bad files, resume."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import struct
import zipfile

import numpy as np
import pytest
import torch

import dvmrl
from dvmrl import datasets
from dvmrl.featurize import CompositionBatch, featurize
from dvmrl.model import ModelConfig
from dvmrl.training import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointNotFoundError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    read_checkpoint,
)
from dvmrl.training.checkpoint import HEADER_KEY

SMALL = ModelConfig(
    hidden=16,
    layers=2,
    gate_hidden=16,
    msg_hidden=16,
    head_hidden=16,
    head_layers=2,
    dropout=0.1,
)


@pytest.fixture(scope="module")
def data():
    frame = datasets.load("mp-formation-energy")
    rows = np.random.default_rng(1).choice(len(frame), size=400, replace=False)
    subset = frame.iloc[rows]
    x = featurize(subset["formula"].tolist())
    y = subset["target"].to_numpy()
    return x[:320], y[:320], x[320:], y[320:]


# The header of a version-1 file written before the tensor digest existed.
NO_DIGEST_HEADER = json.dumps({"format": "dvmrl-checkpoint", "format_version": 1})


def _trainer(data, **options) -> Trainer:
    settings = {"epochs": 6, "batch_size": 64, "lr": 3e-3, "seed": 2, **options}
    return Trainer(SMALL, TrainConfig(**settings), *data)


def _weights(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    trainer = _trainer(data, epochs=2)
    trainer.fit()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    trainer.save(path, metadata={"split": "random", "split_fingerprint": "abc123"})
    return trainer, path


class _RunsCode:
    """A pickled object whose unpickling would write a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_round_trip_predictions(data, saved):
    trainer, path = saved
    model, _ = load_checkpoint(path)
    batch = data[2]
    with torch.no_grad():
        loaded = model(batch.element_index, batch.frac.float(), batch.mask)
    np.testing.assert_array_equal(loaded.double().numpy(), trainer.predict(batch))


def test_loaded_model_eval_mode(saved):
    model, _ = load_checkpoint(saved[1])
    assert not model.training
    assert model.config == SMALL


def test_metadata_user_keys(saved):
    _, metadata = load_checkpoint(saved[1])
    assert metadata["split"] == "random"
    assert metadata["split_fingerprint"] == "abc123"


def test_metadata_arrays_become_lists(data, tmp_path):
    trainer = _trainer(data, epochs=1)
    metadata = {
        "rows": np.array([3, 1, 2]),
        "grid": torch.tensor([[0.5, 1.0]]),
        "count": np.int64(7),
        "scalar": torch.tensor(0.25),
        "empty": np.array([]),
    }
    path = trainer.save(tmp_path / "model.pt", metadata=metadata)
    _, loaded = load_checkpoint(path)
    assert loaded["rows"] == [3, 1, 2]
    assert loaded["grid"] == [[0.5, 1.0]]
    assert loaded["count"] == 7
    assert loaded["scalar"] == 0.25
    assert loaded["empty"] == []


def test_metadata_contents(data, saved):
    trainer, path = saved
    _, metadata = load_checkpoint(path)
    assert metadata["model_config"] == SMALL.to_dict()
    assert metadata["train_config"]["seed"] == 2
    assert metadata["target_scaling"]["mean"] == pytest.approx(data[1].mean(), rel=1e-6)
    assert metadata["target_scaling"]["unit"] == "eV/atom"
    assert metadata["epochs_done"] == 2
    assert len(metadata["history"]) == 2
    assert metadata["format_version"] == FORMAT_VERSION
    assert metadata["data_fingerprint"]["n_train"] == 320


def test_provenance(saved):
    _, metadata = load_checkpoint(saved[1])
    provenance = metadata["provenance"]
    assert provenance["dvmrl_version"] == dvmrl.__version__
    assert provenance["torch_version"] == torch.__version__
    assert provenance["build_info"]["version"] == dvmrl.build_info()["version"]
    assert isinstance(provenance["command"], list)
    assert provenance["format_version"] == FORMAT_VERSION


def test_element_table(saved):
    _, metadata = load_checkpoint(saved[1])
    table = metadata["element_table"]
    assert table["symbols"][25] == "Fe"
    assert len(table["values"]) == 103
    assert len(table["descriptor_names"]) == len(table["values"][0])


def test_training_domain(data, saved):
    _, metadata = load_checkpoint(saved[1])
    domain = metadata["training_domain"]
    x_train = data[0]
    assert domain["max_elements"] == int(x_train.mask.sum(dim=1).max())
    rows = torch.unique(x_train.element_index[x_train.mask]).tolist()
    assert len(domain["elements"]) == len(rows)


def test_json_entries_are_strings(saved):
    document = torch.load(saved[1], weights_only=True)
    assert isinstance(document["model_config"], str)
    assert isinstance(document["metadata"], str)
    assert json.loads(document[HEADER_KEY])["format_version"] == FORMAT_VERSION


def test_load_float64(saved):
    model, _ = load_checkpoint(saved[1], dtype=torch.float64)
    assert model.flat.dtype == torch.float64


def test_reserved_metadata_key(data, tmp_path):
    trainer = _trainer(data)
    with pytest.raises(ValueError, match="reserved"):
        trainer.save(tmp_path / "model.pt", metadata={"provenance": "mine"})


def test_atomic_write_leaves_no_temp(data, tmp_path):
    trainer = _trainer(data)
    trainer.save(tmp_path / "model.pt")
    trainer.save(tmp_path / "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


class _FullDisk:
    """A binary stream that fails like a full disk after ``room`` bytes."""

    def __init__(self, stream, room: int):
        self.stream, self.room = stream, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_failed_write_is_os_error(data, tmp_path, monkeypatch):
    """torch.save hides a failed write in a RuntimeError; the OSError comes back."""
    import dvmrl.training.checkpoint as ckpt

    real_write_atomic = ckpt.write_atomic

    def full_disk(path, write, **options):
        return real_write_atomic(
            path, lambda stream: write(_FullDisk(stream, 4096)), **options
        )

    monkeypatch.setattr(ckpt, "write_atomic", full_disk)
    path = tmp_path / "model.pt"
    with pytest.raises(OSError) as caught:
        _trainer(data).save(path)
    assert caught.value.errno == 28
    assert caught.value.filename == str(path)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def test_directory_not_a_file(tmp_path):
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)


def test_truncated_file(saved, tmp_path):
    data = saved[1].read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt.*its zip archive is truncated"):
        load_checkpoint(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "the file is empty"),
        (b"hello world\n", "it is not the zip archive that torch.save writes"),
        (pickle.dumps({"a": 1}), "it is a bare pickle stream"),
    ],
)
def test_unreadable_file_named(tmp_path, content, problem):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message
    assert problem in message
    # PyTorch's hint to load with weights_only=False would run the file's code.
    assert "weights_only" not in message


def test_cli_predict_text_file(tmp_path, capsys):
    from dvmrl.cli import main

    path = tmp_path / "text.pt"
    path.write_text("hello world")
    assert main(["predict", str(path), "AlNi2"]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err
    assert f"checkpoint {path} is corrupt or not a dvmrl checkpoint" in err


def test_foreign_torch_file(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a dvmrl checkpoint"):
        load_checkpoint(path)


def test_newer_format_version(saved, tmp_path):
    document = torch.load(saved[1], weights_only=True)
    document[HEADER_KEY] = json.dumps(
        {"format": "dvmrl-checkpoint", "format_version": 99}
    )
    path = tmp_path / "future.pt"
    torch.save(document, path)
    with pytest.raises(CheckpointError, match="format version 99.*upgrade dvmrl"):
        load_checkpoint(path)


def test_weights_do_not_fit_config(saved, tmp_path):
    document = torch.load(saved[1], weights_only=True)
    config = json.loads(document["model_config"])
    config["hidden"] = 8
    document["model_config"] = json.dumps(config)
    path = tmp_path / "mismatch.pt"
    torch.save(document, path)
    with pytest.raises(CheckpointError, match="do not fit its config"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("metadata", ["split", "random"], "a JSON array, not a JSON object"),
        ("training_domain", "Ni Al", "a JSON string, not a JSON object"),
        ("history", {"epoch": 1}, "a JSON object, not a JSON array"),
    ],
)
def test_json_entry_of_wrong_kind(saved, tmp_path, key, value, kind):
    # The digest covers tensors only, so a damaged JSON entry still loads.
    document = torch.load(saved[1], weights_only=True)
    document[key] = json.dumps(value)
    path = tmp_path / "damaged.pt"
    torch.save(document, path)
    with pytest.raises(CheckpointError, match=f"entry '{key}' is {kind}"):
        load_checkpoint(path)


def test_trainer_state_without_epochs(saved, tmp_path, data):
    document = torch.load(saved[1], weights_only=True)
    state = json.loads(document["resume"]["trainer"])
    del state["epochs_done"]
    document["resume"]["trainer"] = json.dumps(state)
    path = tmp_path / "damaged.pt"
    torch.save(document, path)
    with pytest.raises(CheckpointError, match="corrupt resume state: KeyError"):
        Trainer.from_checkpoint(path, *data)


def _data_offset(archive_path, member):
    """Return the file offset of a stored (uncompressed) zip member's data."""
    with zipfile.ZipFile(archive_path) as archive:
        info = archive.getinfo(member)
    with open(archive_path, "rb") as stream:
        stream.seek(info.header_offset)
        header = stream.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def test_flipped_weight_bytes_rejected(saved, tmp_path):
    # torch.load does not check the zip checksums, so a damaged weight would
    # otherwise load and predict silently wrong numbers.
    path = tmp_path / "flipped.pt"
    shutil.copy(saved[1], path)
    with zipfile.ZipFile(path) as archive:
        members = [info for info in archive.infolist() if "/data/" in info.filename]
    largest = max(members, key=lambda info: info.file_size).filename
    offset, size = _data_offset(path, largest)
    with open(path, "r+b") as stream:
        stream.seek(offset + size // 2)
        byte = stream.read(1)
        stream.seek(offset + size // 2)
        stream.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "differ from the digest" in message
    assert "retrain with dvmrl train" in message


def test_changed_weights_rejected(saved, tmp_path):
    document = torch.load(saved[1], weights_only=True)
    document["model_state"]["flat"][0] += 1.0
    path = tmp_path / "changed.pt"
    torch.save(document, path)
    with pytest.raises(CheckpointError, match="differ from the digest"):
        load_checkpoint(path)


def test_nan_weights_without_digest_rejected(saved, tmp_path):
    # Files written before the digest existed are still checked for NaN.
    document = torch.load(saved[1], weights_only=True)
    document[HEADER_KEY] = json.dumps({"format": "dvmrl-checkpoint", "format_version": 1})
    document["model_state"]["flat"][3] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(document, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "tensor 'flat' of member 0 contains NaN or infinite values" in message


def test_file_without_digest_loads(saved, tmp_path):
    document = torch.load(saved[1], weights_only=True)
    document[HEADER_KEY] = json.dumps({"format": "dvmrl-checkpoint", "format_version": 1})
    path = tmp_path / "old.pt"
    torch.save(document, path)
    model, _ = load_checkpoint(path)
    reference, _ = load_checkpoint(saved[1])
    assert torch.equal(model.flat, reference.flat)


def test_pickled_object_in_torch_file(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({HEADER_KEY: "x", "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="pickled Python object"):
        load_checkpoint(path)
    assert not marker.exists()


def test_pickled_object_in_legacy_torch_file(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "legacy.pt"
    payload = {HEADER_KEY: "x", "payload": _RunsCode(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="pickled Python object"):
        load_checkpoint(path)
    assert not marker.exists()


def test_trainer_state_damaged(saved, tmp_path):
    document = torch.load(saved[1], weights_only=True)
    document["resume"] = {**document["resume"], "trainer": "{not json"}
    path = tmp_path / "damaged.pt"
    torch.save(document, path)
    with pytest.raises(CheckpointError, match="its trainer state is not valid JSON"):
        load_checkpoint(path)


def test_integer_flat_rejected(saved, tmp_path):
    document = torch.load(saved[1], weights_only=True)
    document[HEADER_KEY] = NO_DIGEST_HEADER
    flat = document["model_state"]["flat"]
    document["model_state"] = {**document["model_state"], "flat": flat.to(torch.int32)}
    path = tmp_path / "integer.pt"
    torch.save(document, path)
    with pytest.raises(CheckpointError, match="dtype torch.int32, not a floating"):
        load_checkpoint(path)


def test_ensemble_does_not_resume(saved, tmp_path, data):
    from dvmrl.training.checkpoint import MEMBER_STATES_KEY

    document = torch.load(saved[1], weights_only=True)
    document[HEADER_KEY] = NO_DIGEST_HEADER
    document[MEMBER_STATES_KEY] = [document["model_state"]]
    path = tmp_path / "ensemble.pt"
    torch.save(document, path)
    with pytest.raises(CheckpointError, match="is an ensemble of 2 members"):
        Trainer.from_checkpoint(path, *data)


def test_plain_pickle_file(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as handle:
        pickle.dump(_RunsCode(marker), handle)
    with pytest.raises(CheckpointError, match="pickled Python object"):
        load_checkpoint(path)
    assert not marker.exists()


def test_marker_payload_runs_when_unpickled(tmp_path):
    # The payload of the two tests above really runs code when unpickled
    # without restrictions, so their passing means it was rejected.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.read_text() == "ran"


def test_resume_exact(data, tmp_path):
    uninterrupted = _trainer(data)
    uninterrupted.set_sample_weights(np.linspace(0.5, 1.5, 320))
    uninterrupted.fit()

    path = tmp_path / "resume.pt"
    interrupted = _trainer(data)
    interrupted.set_sample_weights(np.linspace(0.5, 1.5, 320))

    def stop_after_three(record):
        if record["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(progress=stop_after_three, checkpoint=path)
    resumed = Trainer.from_checkpoint(path, *data)
    assert resumed.epochs_done == 3
    records = resumed.fit()
    assert [record["epoch"] for record in records] == [4, 5, 6]
    assert torch.equal(_weights(resumed), _weights(uninterrupted))
    assert resumed.best_epoch == uninterrupted.best_epoch
    history = [record["val_rmse"] for record in resumed.history]
    assert history == [record["val_rmse"] for record in uninterrupted.history]


def test_resume_after_early_stop(data, tmp_path):
    # A high learning rate and patience 1 stop the fit before its 30 epochs.
    options = {"epochs": 30, "patience": 1, "lr": 3e-2}
    uninterrupted = _trainer(data, **options)
    uninterrupted.fit()
    assert uninterrupted.epochs_done < 30
    path = tmp_path / "stopped.pt"
    stopped = _trainer(data, **options)
    stopped.fit(checkpoint=path)
    # The run was cut after its last checkpoint, before anything else ran.
    resumed = Trainer.from_checkpoint(path, *data)
    assert resumed.fit() == []
    assert resumed.epochs_done == uninterrupted.epochs_done
    assert torch.equal(_weights(resumed), _weights(uninterrupted))
    # Training on after the restore starts a new fit, as in the first process.
    continued = Trainer.from_checkpoint(path, *data)
    continued.train_epochs(1)
    assert continued.fit(), "a fit after more training must run epochs"


@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
@pytest.mark.parametrize("move", ["widen", "load_state"])
def test_resume_after_move_matches(data, tmp_path, ema_decay, move):
    def prepared():
        trainer = _trainer(data, ema_decay=ema_decay)
        trainer.train_epochs(1)
        earlier = trainer.current_state()
        trainer.train_epochs(1)
        if move == "widen":
            trainer.widen(hidden=20)
        else:
            trainer.load_state(earlier)
        return trainer

    uninterrupted = prepared()
    path = prepared().save(tmp_path / "moved.pt")
    uninterrupted.train_epochs(1)
    resumed = Trainer.from_checkpoint(path, *data)
    resumed.train_epochs(1)
    assert torch.equal(_weights(resumed), _weights(uninterrupted))


def test_resume_before_first_epoch(data, tmp_path):
    uninterrupted = _trainer(data)
    uninterrupted.fit()
    path = _trainer(data).save(tmp_path / "start.pt")
    resumed = Trainer.from_checkpoint(path, *data)
    assert resumed.epochs_done == 0
    resumed.fit()
    assert torch.equal(_weights(resumed), _weights(uninterrupted))


def test_resume_keeps_optimizer(data, tmp_path):
    trainer = _trainer(data)
    trainer.train_epochs(1)
    path = trainer.save(tmp_path / "model.pt")
    resumed = Trainer.from_checkpoint(path, *data)
    before = trainer._optimizer.state[trainer.model.flat]
    after = resumed._optimizer.state[resumed.model.flat]
    assert torch.equal(before["exp_avg_sq"], after["exp_avg_sq"])
    assert float(before["step"]) == float(after["step"])


def test_resume_other_data(data, tmp_path):
    trainer = _trainer(data)
    path = trainer.save(tmp_path / "model.pt")
    x_train, y_train, x_val, y_val = data
    with pytest.raises(CheckpointError, match="train data differ"):
        Trainer.from_checkpoint(path, x_train, y_train + 1.0, x_val, y_val)


def test_resume_with_float32_fractions_names_the_dtype(data, tmp_path):
    # The fingerprint hashes the fractions' bits, so a float32 copy of the
    # float64 fractions is other data, and the message names that cause.
    trainer = _trainer(data)
    path = trainer.save(tmp_path / "model.pt")
    x_train, y_train, x_val, y_val = data
    assert x_train.frac.dtype == torch.float64
    single = CompositionBatch(
        x_train.element_index, x_train.frac.float(), x_train.mask
    )
    with pytest.raises(CheckpointError, match="train data differ.*float32 copy"):
        Trainer.from_checkpoint(path, single, y_train, x_val, y_val)


def test_resume_without_state(data, tmp_path):
    trainer = _trainer(data)
    path = trainer.save(tmp_path / "model.pt", resume=False)
    with pytest.raises(CheckpointError, match="no resume state"):
        Trainer.from_checkpoint(path, *data)


def test_read_checkpoint_has_resume(saved):
    document = read_checkpoint(saved[1])
    resume = document["resume"]
    expected = {"emb_w", "emb_b", "emb_offset", "flat"}
    expected |= {"frac_w1", "frac_b1", "frac_w2", "frac_b2"}
    assert set(resume["optimizer"]) == expected
    assert resume["rng"]["shuffle"].dtype == torch.uint8


def test_interrupted_write_raises_keyboard_interrupt(tmp_path, monkeypatch):
    from dvmrl.training import checkpoint as checkpoint_module

    path = tmp_path / "state.pt"
    checkpoint_module.write_checkpoint(path, {"model_config": {}, "model_state": {}})
    before = path.read_bytes()

    def interrupted_save(document, handle):
        # torch.save's zip writer turns a Ctrl-C into a RuntimeError on exit.
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 771904 vs 771792") from None

    monkeypatch.setattr(checkpoint_module.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module.write_checkpoint(path, {"model_config": {}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_failed_write_keeps_its_error(tmp_path, monkeypatch):
    from dvmrl.training import checkpoint as checkpoint_module

    def failing_save(document, handle):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint_module.write_checkpoint(tmp_path / "x.pt", {"model_config": {}})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_mode_follows_umask(data, tmp_path):
    trainer = _trainer(data)
    previous = os.umask(0o027)
    try:
        trainer.save(tmp_path / "model.pt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model.pt").stat().st_mode) == 0o640


def test_checkpoint_through_symlink_keeps_link(data, tmp_path):
    trainer = _trainer(data)
    target = tmp_path / "store" / "model.pt"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "model.pt"
    link.symlink_to(target)
    trainer.save(link)
    assert link.is_symlink()
    assert target.read_bytes()[:2] == b"PK"
    model, _ = load_checkpoint(link)
    assert model.config == trainer.model.config


def test_load_device_names_and_dtype(saved):
    # "auto" resolves as everywhere else. A GPU requested on a machine
    # without one, or a dtype the kernels lack, gets a message with the fix.
    _, path = saved
    model, _ = load_checkpoint(path, device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            load_checkpoint(path, device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        load_checkpoint(path, device="gpu0")
    # None keeps the CPU default, as before device names were checked.
    model, _ = load_checkpoint(path, device=None)
    assert next(model.parameters()).device.type == "cpu"
    with pytest.raises(TypeError, match="torch.float32 or torch.float64"):
        load_checkpoint(path, dtype=torch.float16)


def test_trainer_accepts_auto_device(data):
    trainer = Trainer(SMALL, TrainConfig(epochs=1), *data, device="auto")
    assert trainer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
