"""Build facts, thread settings and device selection shared by every module."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily, where it is used
    import torch

logger = logging.getLogger(__name__)

try:
    from dvmrl import _core
except ImportError as err:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "dvmrl._core, the compiled core, failed to import "
        f"({err}); reinstall with 'pip install .' from the source tree, or for "
        "development run scripts/dev_build.sh and set PYTHONPATH=python"
    ) from err


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def build_info() -> dict[str, Any]:
    """Report how the compiled core was built and what it can use now.

    Returns:
        dict: ``version``, ``compiler``, ``thread_backend``, ``num_threads``,
        ``cpu_isa`` (the SIMD variant the CPU kernels dispatch to),
        ``cuda_compiled``, ``cuda_architectures`` (comma-separated SM
        numbers), ``cuda_device_count``, ``gpu_usable`` (a CUDA device
        usable by both the core and PyTorch), plus the Python, PyTorch and
        platform versions.
    """
    import torch

    info = dict(_core.build_info())
    info["torch_version"] = torch.__version__
    info["torch_cuda_available"] = bool(torch.cuda.is_available())
    info["gpu_usable"] = bool(
        info["cuda_compiled"]
        and info["cuda_device_count"] > 0
        and info["torch_cuda_available"]
    )
    if info["gpu_usable"]:
        info["gpu_name"] = torch.cuda.get_device_name(0)
    info["python_version"] = platform.python_version()
    info["platform"] = platform.platform()
    info["torch_num_threads"] = torch.get_num_threads()
    return info


@contextlib.contextmanager
def torch_threads(count: int):
    """Set PyTorch's CPU intra-op threads for a block, then restore them.

    dvmrl's kernels keep their own thread count. Around them PyTorch runs
    only small ops. With passive waiting, each op that PyTorch splits wakes
    its other threads, which on a 2-core VM cost more than the split saved.
    So training epochs run those ops on one thread.
    """
    import torch

    before = torch.get_num_threads()
    if before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_threads() -> int:
    """Return the default thread count: OMP_NUM_THREADS, else the cores.

    Batch systems and job scripts set OMP_NUM_THREADS for every threaded
    library, so it counts when it is a positive integer (or a
    comma-separated list that starts with one). Otherwise the cores this
    process may run on count.
    """
    return int(_core.default_num_threads())


def get_num_threads() -> int:
    """Return the thread count of dvmrl's CPU kernels."""
    return int(_core.get_num_threads())


# Most threads set_num_threads accepts: far above any CPU's cores, and a
# count that both thread pools can start.
MAX_THREADS = 1024


def set_num_threads(n: int | None = None) -> int:
    """Set the threads used by dvmrl's kernels and by PyTorch on the CPU.

    Both pools get the same count. They take turns (a dvmrl kernel runs while
    PyTorch waits for it), so together they do not oversubscribe the cores.
    Results of dvmrl's kernels do not depend on the count. dvmrl's workers
    sleep when idle, but PyTorch's OpenMP workers spin unless
    OMP_WAIT_POLICY=PASSIVE is set before torch is imported; with more than
    one thread, small PyTorch ops between dvmrl calls can then run 10 to 100
    times slower on a loaded machine. dvmrl's trainer runs its small PyTorch
    ops on one thread for that reason.

    Args:
        n (int, optional): threads, at least 1. Default:
            :func:`default_threads`.

    Returns:
        int: the thread count now in force.

    Raises:
        ValueError: if ``n`` is not an integer in 1 .. MAX_THREADS.
    """
    import torch

    if n is None:
        n = default_threads()
    if int(n) != n or not 1 <= n <= MAX_THREADS:
        raise ValueError(
            f"threads must be an integer in 1 .. {MAX_THREADS}, got {n!r}; pass at "
            f"most the cores this process may use ({_available_cores()})"
        )
    n = int(n)
    _core.set_num_threads(n)
    torch.set_num_threads(n)
    return n


def resolve_device(device: str | torch.device | None = "auto"):
    """Turn a device name into a ``torch.device``, checking it is usable.

    Args:
        device (str or torch.device, optional): ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or ``"auto"`` (CUDA when a GPU is usable, else CPU);
            None means ``"auto"``. Default: ``"auto"``.

    Returns:
        torch.device: the device to compute on.

    Raises:
        ValueError: for an unknown device name.
        RuntimeError: when CUDA is requested but no GPU is usable.
    """
    import torch

    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.removeprefix("cuda").removeprefix(":")
        if name != "cuda" and not index.isdigit():
            raise ValueError(
                f"unknown device {device!r}; a GPU is named cuda or cuda:N with a "
                "device number N such as 0"
            )
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {device!r} requested but PyTorch sees no CUDA GPU; "
                "use the CPU (--device cpu, or device='cpu' in Python) or run on "
                "a GPU node"
            )
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise RuntimeError(
                f"device {device!r} requested but PyTorch sees {count} CUDA GPU(s), "
                f"cuda:0 .. cuda:{count - 1}; pass one of them"
            )
        return torch.device(name)
    raise ValueError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or auto")
