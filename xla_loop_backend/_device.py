"""Runtime choices made before torch_xla starts its client, where the user made none:
the PJRT device, and how the CPU runs small matrix products."""
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


SINGLE_THREADED_CPU_KERNELS = "--xla_cpu_multi_thread_eigen=false"


def use_single_threaded_cpu_kernels() -> None:
    """On the CPU device, run XLA's matrix products on the calling thread unless XLA_FLAGS
    says otherwise (``--xla_cpu_multi_thread_eigen=true`` restores the thread pool).

    torch_xla 2.9's XLA hands every dot to a thread pool, about 1 us per dot: in a loop of
    small products that handoff costs more than the loop itself (the overhead-bound loop of
    benchmarks/ runs 2.5x faster without it; the compute-bound one about the same on 2
    cores). XLA reads the flag when its client starts, so this must run before that.
    """
    if os.environ.get("PJRT_DEVICE", "").upper() != "CPU":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {SINGLE_THREADED_CPU_KERNELS}".strip()
