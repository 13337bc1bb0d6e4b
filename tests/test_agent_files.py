"""Tests of reading damaged, foreign and pickled agent and replay-buffer files."""

import errno
import io
import json
import logging
import os
import pickle
import stat
import struct

import numpy as np
import pytest
import torch

from dvmrl.agent import AgentConfig, AgentFileError, DQNAgent, ReplayBuffer

SMALL = {"hidden": (8,), "stream_hidden": 8, "batch_size": 4, "seed": 3}


def make_agent(transitions=10):
    """Return a 3-observation, 4-action agent with filled buffer and one update."""
    agent = DQNAgent(3, 4, AgentConfig(**SMALL))
    rng = np.random.default_rng(0)
    for i in range(transitions):
        agent.observe(
            rng.normal(size=3),
            int(rng.integers(4)),
            float(rng.normal()),
            rng.normal(size=3),
            terminated=i % 5 == 4,
            truncated=False,
            next_action_mask=np.array([True, True, False, True]),
        )
    agent.update()
    return agent


@pytest.fixture()
def saved(tmp_path):
    """Return the agent and buffer files of a small trained agent."""
    agent = make_agent()
    agent.save(tmp_path / "a.pt", buffer_path=tmp_path / "b.npz")
    return tmp_path / "a.pt", tmp_path / "b.npz"


def rewrite_buffer(path, **changes):
    """Rewrite the buffer npz at ``path`` with some fields replaced."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def buffer_fields(path):
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name].copy() for name in data.files}


# ----------------------------------------------------------- agent file values


def test_agent_nan_weight_rejected(tmp_path):
    agent = make_agent()
    with torch.no_grad():
        agent.online.trunk[0].weight[0, 0] = float("nan")
    agent.save(tmp_path / "nan.pt")
    with pytest.raises(AgentFileError) as info:
        DQNAgent.load(tmp_path / "nan.pt")
    message = str(info.value)
    assert str(tmp_path / "nan.pt") in message
    assert "online.trunk.0.weight" in message
    assert "corrupt" in message
    assert "retrain the agent" in message


def test_agent_inf_target_rejected(tmp_path):
    agent = make_agent()
    with torch.no_grad():
        agent.target.advantage[2].bias[1] = float("inf")
    agent.save(tmp_path / "inf.pt")
    with pytest.raises(AgentFileError, match=r"tensor target\.advantage\.2\.bias"):
        DQNAgent.load(tmp_path / "inf.pt")


@pytest.mark.parametrize("scale", [1e38, 1e6])
def test_agent_huge_weights_rejected(tmp_path, scale):
    # Finite weights whose Q-values overflow, or exceed q_limit, which
    # training never lets them reach.
    agent = make_agent()
    with torch.no_grad():
        for parameter in agent.target.parameters():
            parameter.mul_(scale)
    agent.save(tmp_path / "huge.pt")
    with pytest.raises(AgentFileError) as info:
        DQNAgent.load(tmp_path / "huge.pt")
    message = str(info.value)
    assert "the target network gives |Q| = " in message
    assert "q_limit 10000" in message
    assert "corrupt" in message


def test_agent_nan_optimizer_state_rejected(tmp_path):
    agent = make_agent()
    state = agent.optimizer.state[agent.optimizer.param_groups[0]["params"][0]]
    state["exp_avg"][0, 0] = float("nan")
    agent.save(tmp_path / "opt.pt")
    with pytest.raises(AgentFileError, match=r"tensor optimizer\.state\.0\.exp_avg"):
        DQNAgent.load(tmp_path / "opt.pt")


def _rewrite_agent(path, change):
    """Apply ``change`` to the saved state dict of an agent file."""
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _set_config(state, **fields):
    header = json.loads(state["header_json"])
    header["config"].update(fields)
    state["header_json"] = json.dumps(header)


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (lambda s: _set_config(s, batch_size=2.5), "batch_size must be an integer"),
        (
            lambda s: _set_config(s, buffer_capacity=10**13),
            "buffer_capacity must be at most 10000000",
        ),
        (
            lambda s: _set_config(s, learning_starts=10**6),
            "so no gradient step would ever run",
        ),
        (
            lambda s: s.update(counters=torch.tensor([-3, 0, 1])),
            "negative step counters",
        ),
        (lambda s: s.update(metadata_json="[1, 2]"), "metadata_json contains list"),
        (lambda s: s.update(optimizer="adam"), "AttributeError"),
    ],
)
def test_agent_malformed_fields_named(saved, change, detail):
    path, _ = saved
    _rewrite_agent(path, change)
    with pytest.raises(AgentFileError, match="incompatible agent file") as info:
        DQNAgent.load(path)
    assert detail in str(info.value)


def test_agent_finite_file_loads(saved):
    agent_path, _ = saved
    agent = DQNAgent.load(agent_path)
    assert agent.gradient_steps == 1


def test_agent_full_disk_names_path(tmp_path, monkeypatch):
    # A stand-in for the temporary file's stream that fails as a full disk
    # does after 4 KB: torch.save's zip writer turns the OSError into a
    # RuntimeError that names no file.
    from dvmrl import _files

    class FullStream(io.BytesIO):
        def write(self, data):
            if self.tell() + len(data) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    def open_full(handle, *args, **kwargs):
        os.close(handle)
        return FullStream()

    monkeypatch.setattr(_files.os, "fdopen", open_full)
    agent = DQNAgent(3, 4, AgentConfig(**{**SMALL, "hidden": (256, 256)}))
    path = tmp_path / "agent.pt"
    with pytest.raises(OSError) as caught:
        agent.save(path)
    assert caught.value.strerror == "No space left on device"
    assert caught.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []


def test_agent_folder_named(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        DQNAgent.load(tmp_path)


# ------------------------------------------------------- unreadable agent files


def broken_agent_files(folder, good):
    """Write an empty, a truncated and a random-bytes agent file; return their paths."""
    data = good.read_bytes()
    files = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random": np.random.default_rng(1).bytes(600),
    }
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(content)
    return paths


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("empty", "the file is empty"),
        ("truncated", "truncated or corrupt"),
        ("random", "corrupt or of another format"),
    ],
)
def test_agent_unreadable_not_called_pickle(saved, tmp_path, name, problem):
    path = broken_agent_files(tmp_path, saved[0])[name]
    with pytest.raises(AgentFileError) as info:
        DQNAgent.load(path)
    message = str(info.value)
    assert str(path) in message
    assert problem in message
    assert "pickle" not in message
    assert "weights_only" not in message
    assert "will likely succeed" not in message


def _central_entries(data):
    """Return the offsets of the zip archive's central-directory entries."""
    offsets, start = [], 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        offsets.append(start)
        start += 4
    return offsets


@pytest.mark.parametrize("damage", ["member name not utf-8", "compression method"])
def test_agent_damaged_zip_directory_named(saved, tmp_path, damage):
    # zipfile raises UnicodeDecodeError and NotImplementedError for these,
    # not BadZipFile; both must still read as a damaged agent file.
    data = bytearray(saved[0].read_bytes())
    entries = _central_entries(data)
    if damage == "compression method":
        for offset in entries:
            struct.pack_into("<H", data, offset + 10, 99)
    else:
        data[entries[0] + 46 + 3] = 0xE4
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(AgentFileError, match="truncated or corrupt") as info:
        DQNAgent.load(path)
    assert str(path) in str(info.value)


def test_agent_raw_pickle_rejected_quietly(tmp_path, recwarn):
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"format": "dvmrl-dqn-agent", "x": 1}, protocol=4))
    with pytest.raises(AgentFileError) as info:
        DQNAgent.load(path)
    message = str(info.value)
    assert "pickled Python objects" in message
    assert "can run arbitrary code" in message
    assert "weights_only" not in message
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


class Payload:
    """An arbitrary Python object, which a data-only agent file never contains."""


def test_agent_pickled_object_named(tmp_path):
    path = tmp_path / "obj.pt"
    state = {"format": "dvmrl-dqn-agent", "obj": Payload()}
    torch.save(state, path, pickle_module=pickle)
    with pytest.raises(AgentFileError) as info:
        DQNAgent.load(path)
    message = str(info.value)
    assert "pickled objects are rejected" in message
    assert "Payload" in message
    assert "weights_only" not in message
    assert "trust" not in message


def test_agent_pickled_object_other_wording(tmp_path, monkeypatch):
    # Another PyTorch version may not name the global in its error, so the
    # loader must still call the file pickled rather than corrupt.
    path = tmp_path / "obj.pt"
    torch.save({"obj": Payload()}, path, pickle_module=pickle)

    def load(*args, **kwargs):
        raise pickle.UnpicklingError("Weights only load failed")

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(AgentFileError) as info:
        DQNAgent.load(path)
    message = str(info.value)
    assert "pickled Python objects" in message
    assert "not plain data" in message
    assert "corrupt" not in message


# ------------------------------------------------------------ buffer file values


def test_buffer_round_trip_after_wrap(tmp_path):
    buffer = ReplayBuffer(4, 2, 3)
    for i in range(6):
        buffer.add(np.full(2, i), i % 3, float(i), np.full(2, i + 1), False)
    buffer.save(tmp_path / "b.npz")
    loaded = ReplayBuffer.load(tmp_path / "b.npz")
    assert loaded.position == 2
    assert len(loaded) == 4
    np.testing.assert_array_equal(loaded.reward, buffer.reward)


@pytest.mark.parametrize(
    ("field", "make_bad", "expected"),
    [
        ("reward", lambda a: np.where(np.arange(len(a)) == 2, np.nan, a), "NaN or inf"),
        ("obs", lambda a: np.where(a > 0, np.inf, a).astype(np.float32), "NaN or inf"),
        ("next_obs", lambda a: a.astype(np.float64) * 1e300, "NaN or inf"),
        ("action", lambda a: np.where(np.arange(len(a)) == 1, 999, a), "action 999"),
        ("action", lambda a: a - 5, "outside [0, 4)"),
        ("action", lambda a: a.astype(np.float32), "expected an integer type"),
        ("terminated", lambda a: a.astype(np.float32) * 3, "expected bool"),
        ("next_mask", lambda a: a.astype(np.int64) * 7, "expected bool"),
        ("next_mask", lambda a: np.zeros_like(a), "masks every action"),
        ("reward", lambda a: a[:-1], "has shape"),
        ("obs", lambda a: a[:, :2], "has shape"),
    ],
)
def test_buffer_bad_values_rejected(saved, field, make_bad, expected):
    _, path = saved
    rewrite_buffer(path, **{field: make_bad(buffer_fields(path)[field])})
    with pytest.raises(AgentFileError) as info:
        ReplayBuffer.load(path)
    message = str(info.value)
    assert str(path) in message
    assert f"field {field!r}" in message
    assert expected in message


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ([50_000, 3, 4, 7, 10], "position 7"),
        ([50_000, 3, 4, 10, 60_000], "size 60000"),
        ([50_000, 3, 0, 10, 10], "n_actions 0"),
        ([10, 3, 4, 10, 10], "position 10"),
    ],
)
def test_buffer_bad_meta_rejected(saved, meta, expected):
    _, path = saved
    rewrite_buffer(path, meta=np.array(meta, dtype=np.int64))
    with pytest.raises(AgentFileError, match="field 'meta'") as info:
        ReplayBuffer.load(path)
    assert expected in str(info.value)


def test_buffer_bad_rng_state_rejected(saved):
    _, path = saved
    rewrite_buffer(path, rng_state=np.array("{not json"))
    with pytest.raises(AgentFileError, match="field 'rng_state'"):
        ReplayBuffer.load(path)


def test_buffer_empty_terminal_mask_allowed(saved):
    # A terminal transition may have an empty next mask: nothing bootstraps.
    _, path = saved
    fields = buffer_fields(path)
    mask = fields["next_mask"]
    mask[fields["terminated"]] = False
    rewrite_buffer(path, next_mask=mask)
    assert len(ReplayBuffer.load(path)) == 10


# ------------------------------------------------------ unreadable buffer files


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "the file is empty"),
        (b"PK\x03\x04" + bytes(40), "truncated or corrupt"),
        (bytes(range(256)) * 3, "corrupt or of another format"),
    ],
)
def test_buffer_unreadable_not_called_pickle(tmp_path, content, problem):
    path = tmp_path / "b.npz"
    path.write_bytes(content)
    with pytest.raises(AgentFileError) as info:
        ReplayBuffer.load(path)
    message = str(info.value)
    assert str(path) in message
    assert problem in message
    assert "pickle" not in message
    assert "allow_pickle" not in message


def test_buffer_truncated_rejected(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AgentFileError, match="truncated or corrupt"):
        ReplayBuffer.load(path)


def test_buffer_raw_pickle_rejected(tmp_path):
    path = tmp_path / "b.npz"
    path.write_bytes(pickle.dumps({"format": "dvmrl-replay-buffer"}, protocol=4))
    with pytest.raises(AgentFileError) as info:
        ReplayBuffer.load(path)
    message = str(info.value)
    assert "pickled Python objects" in message
    assert "allow_pickle" not in message


def test_buffer_object_array_rejected(tmp_path):
    path = tmp_path / "b.npz"
    np.savez(path, format=np.array([{"a": 1}], dtype=object))
    with pytest.raises(AgentFileError) as info:
        ReplayBuffer.load(path)
    message = str(info.value)
    assert "field 'format' is an object array" in message
    assert "allow_pickle" not in message


# --------------------------------------------------- agent with its buffer file


def test_missing_buffer_warns(saved, caplog):
    agent_path, buffer_path = saved
    os.unlink(buffer_path)
    with caplog.at_level(logging.WARNING, logger="dvmrl.agent"):
        agent = DQNAgent.load(agent_path, buffer_path=buffer_path)
    assert len(agent.buffer) == 0
    assert str(buffer_path) in caplog.text
    assert "empty replay buffer" in caplog.text


def test_buffer_of_other_agent_rejected(saved):
    agent_path, buffer_path = saved
    ReplayBuffer(5, 2, 4).save(buffer_path)
    with pytest.raises(AgentFileError, match="belongs to another agent"):
        DQNAgent.load(agent_path, buffer_path=buffer_path)


def test_buffer_of_a_longer_run_rejected(saved, tmp_path):
    # The saved agent took 10 steps; a buffer with 12 transitions cannot be its.
    agent_path, _ = saved
    longer = tmp_path / "longer.npz"
    make_agent(transitions=12).save(tmp_path / "other.pt", buffer_path=longer)
    with pytest.raises(AgentFileError, match="contains 12 transitions, but the agent"):
        DQNAgent.load(agent_path, buffer_path=longer)
    # A buffer with fewer transitions (restarted after a lost file) is accepted.
    shorter = tmp_path / "shorter.npz"
    make_agent(transitions=6).save(tmp_path / "third.pt", buffer_path=shorter)
    assert len(DQNAgent.load(agent_path, buffer_path=shorter).buffer) == 6


def test_agent_missing_weight_one_line(saved):
    path, _ = saved
    state = torch.load(path, weights_only=True)
    del state["online"]["trunk.0.weight"]
    torch.save(state, path)
    with pytest.raises(AgentFileError) as info:
        DQNAgent.load(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"incompatible agent file {path}: RuntimeError:" in message
    assert "trunk.0.weight" in message
    assert "retrain the agent" in message


def test_agent_files_mode_follows_umask(tmp_path):
    agent = make_agent()
    previous = os.umask(0o027)
    try:
        agent.save(tmp_path / "a.pt", buffer_path=tmp_path / "b.npz")
    finally:
        os.umask(previous)
    for name in ("a.pt", "b.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640
