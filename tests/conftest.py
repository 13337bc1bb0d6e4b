"""Shared fixtures: the device list, an untrained agent, a FIFO reader, a small CSV."""

from __future__ import annotations

import pytest
import torch

import dvmrl


def _cuda_usable() -> bool:
    info = dvmrl.build_info()
    return bool(info["gpu_usable"])


CUDA_USABLE = _cuda_usable()
DEVICES = ["cpu"] + (["cuda"] if CUDA_USABLE else [])

requires_cuda = pytest.mark.skipif(
    not CUDA_USABLE, reason="needs a CUDA GPU and a CUDA build of dvmrl._core"
)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device that both PyTorch and the compiled core can use."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def make_untrained_agent():
    """Return a function that saves an untrained agent of the tuning environment."""
    from dvmrl.agent import DQNAgent
    from dvmrl.env import ModelTuningEnv

    def make(path) -> str:
        # The smallest environment gives the observation and action sizes.
        env = ModelTuningEnv(
            train_size=60,
            val_pool_size=60,
            val_size=20,
            reward_size=20,
            probe_size=4,
            budget_epochs=1,
        )
        DQNAgent(env.observation_space.shape[0], env.action_space.n).save(path)
        return str(path)

    return make


@pytest.fixture
def fifo_reader(tmp_path):
    """Return a named pipe, the list its reader thread appends to, and the thread.

    The reader starts before the test writes, because opening a pipe for
    writing blocks until it has a reader.
    """
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(
        target=lambda: received.append(fifo.read_text()), daemon=True
    )
    reader.start()
    return fifo, received, reader


@pytest.fixture(scope="session")
def alloys_csv(tmp_path_factory):
    """Write a CSV of 240 random compositions of mp-formation-energy, return its path.

    The ensemble tests train several small members on it.
    """
    from dvmrl import datasets

    df = datasets.load("mp-formation-energy").sample(n=240, random_state=3)
    path = tmp_path_factory.mktemp("data") / "alloys.csv"
    df[["formula", "target"]].to_csv(path, index=False)
    return path


def write_fetched_csv(folder, target_kind: str):
    """Write a CSV file with the .json file beside it that dvmrl data fetch writes.

    The .json file states the target kind and the CSV text's SHA-256, which
    is what dvmrl checks before it trusts the kind.
    """
    import hashlib
    import json

    csv = folder / "fetched.csv"
    csv.write_text("formula,target\nNi3Al,0.0\nFeNi,0.05\n")
    sidecar = {
        "csv_sha256": hashlib.sha256(csv.read_bytes()).hexdigest(),
        "target_kind": target_kind,
    }
    (folder / "fetched.json").write_text(json.dumps(sidecar))
    return csv
