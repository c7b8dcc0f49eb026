"""The backend entry (xla_loop_backend/backend.py): registration, device default, and the
no-silent-host-loop policy."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from loop_testing import check_against_eager, xla_device
from torch._higher_order_ops.scan import scan

import xla_loop_backend
from xla_loop_backend import LoopFallbackWarning, metrics, while_loop


def _run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_backend_found_by_entry_point_without_import_and_after_import():
    code = """
        import sys, torch, torch_xla
        from torch._higher_order_ops.while_loop import while_loop
        f = lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x + 1), (n, x))
        dev = torch_xla.device()
        assert "xla_loop_backend" not in sys.modules
        out = torch.compile(f, backend="xla_loop", fullgraph=True)(torch.tensor(4, device=dev), torch.zeros(2, device=dev))
        print(out[1].cpu().tolist())
        import xla_loop_backend  # importing after lookup must not register it twice
        torch._dynamo.reset()
        out = torch.compile(f, backend="xla_loop")(torch.tensor(2, device=dev), torch.zeros(2, device=dev))
        print(out[1].cpu().tolist(), "xla_loop" in torch._dynamo.list_backends())
    """
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["[4.0, 4.0]", "[2.0, 2.0] True"]


def test_pjrt_device_defaults_to_cpu():
    env = {k: v for k, v in os.environ.items() if k != "PJRT_DEVICE"}
    result = subprocess.run(
        [sys.executable, "-c", "import os, xla_loop_backend; print(os.environ['PJRT_DEVICE'])"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "CPU"
    kept = _run_python("import os, xla_loop_backend; print(os.environ['PJRT_DEVICE'])", {"PJRT_DEVICE": "CPU"})
    assert kept.stdout.strip() == "CPU"


def _scan_program(init, xs):
    def combine(carry, x):
        nxt = carry + x
        return nxt, nxt.clone()

    return scan(combine, init, xs)


def test_loop_without_rule_is_an_error_under_fullgraph():
    compiled = torch.compile(_scan_program, backend="xla_loop", fullgraph=True)
    dev = xla_device()
    with pytest.raises(Exception, match="no lowering for `torch.ops.higher_order.scan`"):
        compiled(torch.zeros(3, device=dev), torch.ones(4, 3, device=dev))


def test_loop_without_rule_warns_and_still_computes_without_fullgraph():
    before = metrics.counter_value(metrics.HOST_LOOP_FALLBACKS)
    with pytest.warns(LoopFallbackWarning, match="scan"):
        check_against_eager(_scan_program, torch.zeros(3), torch.ones(4, 3), fullgraph=False)
    assert metrics.counter_value(metrics.HOST_LOOP_FALLBACKS) > before


def test_eager_while_loop_on_xla_tensors_warns():
    dev = xla_device()
    with pytest.warns(LoopFallbackWarning, match="outside a compiled graph"):
        i, x = xla_loop_backend.while_loop(
            lambda i, x: i > 0, lambda i, x: (i - 1, x + 1), (torch.tensor(3, device=dev), torch.zeros(2, device=dev))
        )
    assert x.cpu().tolist() == [3.0, 3.0]


def test_eager_while_loop_on_cpu_does_not_warn(recwarn):
    while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x + 1), (torch.tensor(3), torch.zeros(2)))
    assert not [w for w in recwarn if issubclass(w.category, LoopFallbackWarning)]
