"""dvmrl: composition graph neural networks for alloy thermodynamics.

Models map a composition (element symbols and atomic fractions) to a DFT
property in eV/atom. The package adds adversarial and dynamic validation and
a meta-trained dueling double DQN agent that steers validation,
hyperparameters and architecture.
"""

from dvmrl._runtime import (
    build_info,
    get_num_threads,
    resolve_device,
    set_num_threads,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_info",
    "get_num_threads",
    "resolve_device",
    "set_num_threads",
]
