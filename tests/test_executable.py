"""executable.py: a lowered graph is traced once and its executable called directly; where
that path does not apply (CPU fallback ops, RNG, a mutated input, SPMD: tests/test_spmd.py)
the bridge compiles it, and every case gives eager's results."""
from __future__ import annotations

import torch
import torch_xla

from loop_testing import MetricsDelta, xla_device
from xla_loop_backend.call import BridgeCall
from xla_loop_backend.executable import Executable, trace_once
from xla_loop_backend.lowering.driver import LoweredGraph


def _call(fn):
    return BridgeCall(LoweredGraph(torch.fx.symbolic_trace(fn), 0))


def test_a_plain_graph_runs_its_own_executable_and_later_calls_only_run_it():
    call = _call(lambda x, w: (torch.tanh(x @ w), x.sum()))
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    xd, wd = x.to(xla_device()), w.to(xla_device())
    torch_xla.sync()
    out = call(xd, wd)
    assert isinstance(call.compiled, Executable)
    torch.testing.assert_close(out[0].cpu(), torch.tanh(x @ w), rtol=1e-5, atol=1e-5)
    x2 = torch.randn(4, 8)
    x2d = x2.to(xla_device())
    torch_xla.sync()
    with MetricsDelta() as delta:
        out = call(x2d, wd)
        torch_xla._XLAC._xla_wait_device_ops([])
    assert delta.compiles == 0 and delta.executions == 1 and delta.host_syncs == 0 and delta.transfers_from_device == 0
    torch.testing.assert_close(out[0].cpu(), torch.tanh(x2 @ w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1].cpu(), x2.sum(), rtol=1e-5, atol=1e-5)


def test_outputs_xla_does_not_return_are_put_back():
    # an input returned as it is, the same tensor twice, a None, a single value
    def fn(x, y):
        z = torch.sin(x)
        return (y, z, z, None, x * 2)

    call = _call(fn)
    x, y = torch.randn(3), torch.randn(3)
    xd, yd = x.to(xla_device()), y.to(xla_device())
    for _ in range(2):
        out = call(xd, yd)
        assert isinstance(call.compiled, Executable) and isinstance(out, tuple) and len(out) == 5
        assert out[0] is yd and out[1] is out[2] and out[3] is None
        torch.testing.assert_close(out[1].cpu(), torch.sin(x))
        torch.testing.assert_close(out[4].cpu(), x * 2)
    single = _call(lambda x: torch.cos(x))
    torch.testing.assert_close(single(xd).cpu(), torch.cos(x))


def test_an_input_still_pending_is_computed_before_the_call():
    call = _call(lambda x: x * 3)
    base = torch.randn(5)
    xd = base.to(xla_device())
    torch_xla.sync()
    call(xd)
    pending = xd + 1  # lazy: not a device buffer yet
    torch.testing.assert_close(call(pending).cpu(), (base + 1) * 3)


def test_a_constant_the_graph_holds_is_a_parameter_of_its_own():
    w = torch.randn(4, 4)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", w.to(xla_device()))

        def forward(self, x):
            return x @ self.w

    call = BridgeCall(LoweredGraph(torch.fx.symbolic_trace(Holder()), 0))
    x = torch.randn(2, 4)
    out = call(x.to(xla_device()))
    assert isinstance(call.compiled, Executable)
    torch.testing.assert_close(out.cpu(), x @ w, rtol=1e-5, atol=1e-5)


def test_a_graph_with_an_op_torch_xla_runs_on_the_cpu_goes_through_the_bridge():
    # (traced on the device, lgamma would run on the CPU once and be baked in as a constant)
    call = _call(lambda x: torch.lgamma(x) + 1)
    for _ in range(2):
        x = torch.rand(4) + 0.5
        out = call(x.to(xla_device()))
        assert call.compiled is not None and not isinstance(call.compiled, Executable)
        torch.testing.assert_close(out.cpu() if isinstance(out, torch.Tensor) else out[0].cpu(), torch.lgamma(x) + 1)


def test_a_graph_that_draws_random_numbers_goes_through_the_bridge_and_draws_anew_each_call():
    call = _call(lambda x: x + torch.rand(x.shape, device=x.device))
    xd = torch.zeros(64, device=xla_device())
    first, second = (call(xd) for _ in range(2))
    first, second = (t if isinstance(t, torch.Tensor) else t[0] for t in (first, second))
    assert not isinstance(call.compiled, Executable)
    assert not torch.equal(first.cpu(), second.cpu())


def test_a_graph_that_updates_an_input_goes_through_the_bridge():
    def fn(x, y):
        x.add_(1)
        return y * 2

    call = _call(fn)
    x, y = torch.zeros(3), torch.randn(3)
    xd, yd = x.to(xla_device()), y.to(xla_device())
    out = call(xd, yd)
    assert not isinstance(call.compiled, Executable)
    torch.testing.assert_close((out if isinstance(out, torch.Tensor) else out[0]).cpu(), y * 2)
    torch.testing.assert_close(xd.cpu(), x + 1)


def test_args_that_are_not_xla_tensors_are_left_to_the_bridge():
    gm = torch.fx.symbolic_trace(lambda x, k: x * k)
    xd = torch.ones(2, device=xla_device())
    assert trace_once(gm, [xd, 3], [xd, 3]) is None
    assert trace_once(gm, [torch.ones(2), torch.ones(2)], [torch.ones(2), torch.ones(2)]) is None
