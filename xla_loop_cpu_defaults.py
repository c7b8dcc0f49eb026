"""xla_loop's CPU runtime defaults, in effect whatever the order of imports.

XLA reads its flags (`XLA_FLAGS`), and torch_xla the settings of its CPU client, once: when
the client starts, on the first use of the device. A default set after that does nothing.
So the defaults are set by whichever of these runs first, each before any client can start:

- `import torch_xla`: torch_xla loads every `torch_xla.plugins` entry point while it is
  imported, and xla_loop's distribution names `RuntimeDefaults` here as one
  (pyproject.toml). This covers a program that imports torch_xla, moves tensors to the
  device, and only then names the backend (`torch.compile(backend="xla_loop")` finds it by
  its own entry point, after the client started).
- `import xla_loop_backend` (its `_device.py`), for torch_xla started with
  `XLA_REGISTER_INSTALLED_PLUGINS=0`, which loads no entry points.

They apply only to the CPU device (`PJRT_DEVICE=CPU`, or unset where torch_xla will choose
the CPU: no TPU or Neuron runtime installed), and each only where the user set nothing:

- `--xla_cpu_multi_thread_eigen=false` in `XLA_FLAGS`: XLA runs matrix products on the
  thread that runs the program. torch_xla 2.9's XLA hands every dot to a thread pool, about
  1 us a dot: in a loop of small products that costs more than the loop.
- `PJRT_CPU_ASYNC_CLIENT=0`: the CPU client runs a program on the thread torch_xla executes
  it from, not on a thread of its own pool (one handoff a call fewer).
- `XLA_THREAD_POOL_SIZE=1`: torch_xla's own pool, which runs each execution, keeps one
  thread (its idle threads spin, on a core the calling thread then does not have).

This module is loaded by torch_xla in the middle of its own import: it imports nothing from
torch, torch_xla or xla_loop_backend at module level.
"""
from __future__ import annotations

import importlib.util
import os

SINGLE_THREADED_CPU_KERNELS = "--xla_cpu_multi_thread_eigen=false"
# Settings of torch_xla's CPU client: (variable, value).
CPU_CLIENT_DEFAULTS = (("PJRT_CPU_ASYNC_CLIENT", "0"), ("XLA_THREAD_POOL_SIZE", "1"))


def accelerator_runtime_installed() -> bool:
    """Whether a TPU or Neuron runtime is installed (torch_xla then picks that device when
    PJRT_DEVICE is unset, and the CPU otherwise)."""
    return importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("libneuronxla") is not None


def on_cpu() -> bool:
    """Whether torch_xla will run on the CPU device."""
    device = os.environ.get("PJRT_DEVICE")
    if device is not None:
        return device.upper().split("_")[0] == "CPU"
    return not accelerator_runtime_installed()


def apply() -> None:
    """Set each CPU default the user has not set (see the module docstring)."""
    if os.environ.get("XLA_LOOP_CPU_DEFAULTS", "1") == "0" or not on_cpu():
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {SINGLE_THREADED_CPU_KERNELS}".strip()
    for name, value in CPU_CLIENT_DEFAULTS:
        os.environ.setdefault(name, value)


def _plugin_base() -> type:
    from torch_xla.experimental.plugins import DevicePlugin

    return DevicePlugin


def RuntimeDefaults():  # noqa: N802  (torch_xla calls the entry point like a class)
    """The `torch_xla.plugins` entry point: torch_xla calls it while it is imported and
    registers what it returns as the plugin of a device named XLA_LOOP_CPU_DEFAULTS, which no
    program selects. Calling it applies the defaults."""
    apply()

    class _NoDevice(_plugin_base()):  # type: ignore[misc]
        def library_path(self) -> str:
            raise RuntimeError("xla_loop_cpu_defaults only sets CPU defaults; it is not a device")

    return _NoDevice()
