"""xla_loop_cpu_defaults.py: the CPU defaults hold when torch_xla's client starts, whatever
the order of imports, and never override what the user set.

Each case runs in a fresh process (the client starts once per process). The program
checks the environment just before its first use of the device, while the client has not
started yet (`_xla_runtime_is_initialized`): that is the environment the client reads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

DEFAULTS = {"multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false", "PJRT_CPU_ASYNC_CLIENT": "0", "XLA_THREAD_POOL_SIZE": "1"}
SET_BY_US = ("XLA_FLAGS", "PJRT_CPU_ASYNC_CLIENT", "XLA_THREAD_POOL_SIZE", "XLA_LOOP_CPU_DEFAULTS", "XLA_REGISTER_INSTALLED_PLUGINS")

REPORT = """
def report():
    import json, os, torch_xla
    assert not torch_xla._XLAC._xla_runtime_is_initialized(), "the client started too early for this check"
    env = {k: os.environ.get(k) for k in ("XLA_FLAGS", "PJRT_CPU_ASYNC_CLIENT", "XLA_THREAD_POOL_SIZE")}
    print("ENV " + json.dumps(env), flush=True)
"""

# The import orders users have. Each program reports the environment right before the client
# starts, then compiles and runs a loop with the backend (checked against eager).
PROGRAMS = {
    # README's first line: torch.compile finds the backend by name; nothing imported.
    "no import, backend by name": """
        import torch, torch_xla
        report()
        x = torch.ones(3, device=torch_xla.device())
        f = torch.compile(lambda x: torch.sin(x) * 2, backend="xla_loop")
    """,
    # The user starts the client (moves data to the device) before the backend is named.
    "torch_xla first, device used, then the backend": """
        import torch, torch_xla
        report()
        x = torch.ones(3, device=torch_xla.device())
        torch_xla.sync()
        f = torch.compile(lambda x: torch.sin(x) * 2, backend="xla_loop")
    """,
    "xla_loop_backend first": """
        import xla_loop_backend as xl
        import torch, torch_xla
        report()
        x = torch.ones(3, device=torch_xla.device())
        f = xl.compile(lambda x: torch.sin(x) * 2)
    """,
    "torch_xla, then xla_loop_backend, then the device": """
        import torch, torch_xla
        import xla_loop_backend as xl
        report()
        x = torch.ones(3, device=torch_xla.device())
        f = xl.compile(lambda x: torch.sin(x) * 2)
    """,
}
CHECK = """
        torch.testing.assert_close(f(x).cpu(), torch.sin(torch.ones(3)) * 2)
        print("RAN", flush=True)
"""


def _run(body: str, **env: str) -> dict[str, str | None]:
    clean = {k: v for k, v in os.environ.items() if k not in SET_BY_US}
    clean.update(env)
    clean.setdefault("PJRT_DEVICE", "CPU")
    code = REPORT + textwrap.dedent(body) + textwrap.dedent(CHECK)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=clean)
    assert result.returncode == 0 and "RAN" in result.stdout, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("ENV "))
    return json.loads(line[4:])


@pytest.mark.parametrize("order", list(PROGRAMS))
def test_the_defaults_hold_when_the_client_starts_whatever_the_import_order(order):
    env = _run(PROGRAMS[order])
    assert DEFAULTS["multi_thread_eigen"] in (env["XLA_FLAGS"] or "")
    assert env["PJRT_CPU_ASYNC_CLIENT"] == DEFAULTS["PJRT_CPU_ASYNC_CLIENT"]
    assert env["XLA_THREAD_POOL_SIZE"] == DEFAULTS["XLA_THREAD_POOL_SIZE"]


def test_what_the_user_set_is_kept():
    env = _run(
        PROGRAMS["no import, backend by name"],
        XLA_FLAGS="--xla_cpu_multi_thread_eigen=true",
        PJRT_CPU_ASYNC_CLIENT="1",
        XLA_THREAD_POOL_SIZE="4",
    )
    assert "--xla_cpu_multi_thread_eigen=true" in env["XLA_FLAGS"] and "multi_thread_eigen=false" not in env["XLA_FLAGS"]
    assert env["PJRT_CPU_ASYNC_CLIENT"] == "1" and env["XLA_THREAD_POOL_SIZE"] == "4"


def test_they_can_be_turned_off():
    env = _run(PROGRAMS["no import, backend by name"], XLA_LOOP_CPU_DEFAULTS="0")
    assert "multi_thread_eigen" not in (env["XLA_FLAGS"] or "")
    assert env["PJRT_CPU_ASYNC_CLIENT"] is None and env["XLA_THREAD_POOL_SIZE"] is None


def test_without_torch_xlas_plugin_entry_points_importing_the_package_first_still_sets_them():
    env = _run(PROGRAMS["xla_loop_backend first"], XLA_REGISTER_INSTALLED_PLUGINS="0")
    assert DEFAULTS["multi_thread_eigen"] in (env["XLA_FLAGS"] or "")
    assert env["PJRT_CPU_ASYNC_CLIENT"] == "0"


@pytest.mark.parametrize("device", ["TPU", "CUDA", "NEURON"])
def test_nothing_is_set_for_other_devices(device, monkeypatch):
    import xla_loop_cpu_defaults

    for name in SET_BY_US:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PJRT_DEVICE", device)
    xla_loop_cpu_defaults.apply()
    assert all(os.environ.get(name) is None for name in ("XLA_FLAGS", "PJRT_CPU_ASYNC_CLIENT", "XLA_THREAD_POOL_SIZE"))
