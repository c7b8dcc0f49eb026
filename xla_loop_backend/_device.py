"""Runtime choices made before torch_xla starts its client, where the user made none:
the PJRT device, and the CPU defaults for loops (`xla_loop_cpu_defaults.py`, which torch_xla
also applies itself when it is imported, through its plugin entry point)."""
from __future__ import annotations

import importlib.util
import os
import sys

import xla_loop_cpu_defaults


def select_default_device() -> None:
    """Default PJRT_DEVICE to CPU when unset and no TPU/Neuron runtime is installed.

    torch_xla makes the same choice but logs a warning on every start; with a TPU or
    Neuron runtime present we leave the choice to torch_xla.
    """
    if "PJRT_DEVICE" in os.environ or "torch_xla" in sys.modules:
        return
    if importlib.util.find_spec("libtpu") is None and importlib.util.find_spec("libneuronxla") is None:
        os.environ["PJRT_DEVICE"] = "CPU"


def apply_cpu_defaults() -> None:
    """The CPU defaults, where the user set none (see `xla_loop_cpu_defaults`). Has an effect
    only before torch_xla's client starts."""
    xla_loop_cpu_defaults.apply()
