"""Runtime choices made before torch_xla starts its client, where the user made none: the
PJRT device here, and the CPU defaults for loops in `xla_loop_cpu_defaults.py` (which
torch_xla also applies itself when it is imported, through its plugin entry point)."""
from __future__ import annotations

import os
import sys

from xla_loop_cpu_defaults import accelerator_runtime_installed


def select_default_device() -> None:
    """Default PJRT_DEVICE to CPU when unset and no TPU/Neuron runtime is installed.

    torch_xla makes the same choice but logs a warning on every start; with a TPU or
    Neuron runtime present we leave the choice to torch_xla.
    """
    if "PJRT_DEVICE" in os.environ or "torch_xla" in sys.modules:
        return
    if not accelerator_runtime_installed():
        os.environ["PJRT_DEVICE"] = "CPU"
