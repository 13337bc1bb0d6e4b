import subprocess
import sys
import json

import pytest

import dvmrl
from dvmrl import _core


def test_build_info_has_required_keys():
    info = dvmrl.build_info()
    for key in (
        "version",
        "compiler",
        "thread_backend",
        "num_threads",
        "cuda_compiled",
        "cuda_architectures",
        "gpu_usable",
        "torch_version",
    ):
        assert key in info, key
    assert info["version"] == dvmrl.__version__


def test_build_info_cuda_architectures_when_compiled():
    info = dvmrl.build_info()
    if info["cuda_compiled"]:
        assert info["cuda_architectures"] != ""
    else:
        assert info["cuda_architectures"] == ""
        assert info["gpu_usable"] is False


def test_set_num_threads_round_trip():
    before = dvmrl.get_num_threads()
    try:
        assert dvmrl.set_num_threads(1) == 1
        assert dvmrl.get_num_threads() == 1
        assert dvmrl.build_info()["num_threads"] == 1
        assert dvmrl.set_num_threads(3) == 3
        assert _core.get_num_threads() == 3
    finally:
        dvmrl.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_set_num_threads_rejects_bad_count(bad):
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        dvmrl.set_num_threads(bad)


def test_resolve_device_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        dvmrl.resolve_device("tpu")


def test_info_command_prints_json():
    result = subprocess.run(
        [sys.executable, "-m", "dvmrl", "info", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["version"] == dvmrl.__version__


def test_unknown_command_exits_2():
    result = subprocess.run(
        [sys.executable, "-m", "dvmrl", "no-such-command"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
