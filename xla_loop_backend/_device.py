"""Pick the PJRT device before torch_xla initialises, when the user has chosen none."""
from __future__ import annotations

import importlib.util
import os
import sys


def select_default_device() -> None:
    """Default PJRT_DEVICE to CPU when unset and no TPU/Neuron runtime is installed.

    torch_xla makes the same choice but logs a warning on every start; with a TPU or
    Neuron runtime present we leave the choice to torch_xla.
    """
    if "PJRT_DEVICE" in os.environ or "torch_xla" in sys.modules:
        return
    if importlib.util.find_spec("libtpu") is None and importlib.util.find_spec("libneuronxla") is None:
        os.environ["PJRT_DEVICE"] = "CPU"
