"""Shared fixtures: the device list and a seeded generator."""

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
