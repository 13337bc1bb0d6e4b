"""Environment of the dvmrl commands that tests start as subprocesses."""

import os
from pathlib import Path

import dvmrl


def child_environment() -> dict[str, str]:
    """Return os.environ with the dvmrl of the tests first on PYTHONPATH.

    That is the source tree under PYTHONPATH=python, or the installed
    package in CI, whose compiled core is not in the source tree.
    """
    env = dict(os.environ)
    package_root = str(Path(dvmrl.__file__).resolve().parents[1])
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env
