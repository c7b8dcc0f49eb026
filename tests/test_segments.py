"""segments.py: a graph with an op torch_xla runs on the CPU, or a tensor sized by a value
the graph computes, runs as device parts with host steps between them; results equal eager,
and a later call with the same sizes compiles nothing."""
from __future__ import annotations

import pytest
import torch
from loop_testing import MetricsDelta, xla_device
from torch._higher_order_ops.while_loop import while_loop_op

from xla_loop_backend import metrics
from xla_loop_backend.segments import parts


class IntCarry(torch.nn.Module):
    """torch's own `test_while_loop_op_int_carry_compile` (test/functorch/test_control_flow.py,
    WHILE_LOOP_TESTS["int_carry"]): a Python int carry whose result sizes a tensor made on
    the CPU."""

    def forward(self, x):
        def cond_fn(it, x):
            return it < x.shape[0]

        def body_fn(it, x):
            x_clone = x.clone()
            torch._check(it >= 0)
            torch._check(it < x.shape[0])
            x_clone.select(0, it).copy_(x_clone.select(0, it) + it)
            return it + 1, x_clone

        out_it, out_x = while_loop_op(cond_fn, body_fn, (0, x), tuple())
        torch._check(out_it > 0)
        return out_it + 1, out_it + out_x, out_it < x.shape[0], torch.ones(out_it * 2)


def _python_int_carry(x):
    x = x.clone()
    for it in range(x.shape[0]):
        x[it] += it
    it = x.shape[0]
    return it + 1, it + x, False, torch.ones(it * 2)


@pytest.mark.parametrize("dynamic", [False, True])
def test_torchs_int_carry_program_sizes_a_tensor_by_the_loops_result(dynamic):
    compiled = torch.compile(IntCarry(), backend="xla_loop", fullgraph=True, dynamic=dynamic)
    for call, rows in enumerate((2, 2, 4)):
        x = torch.randn(rows, 3)
        expected = _python_int_carry(x)
        with MetricsDelta() as delta:
            out = compiled(x.to(xla_device()))
        assert out[0] == expected[0] and type(out[0]) is int and out[2] is expected[2]
        torch.testing.assert_close(out[1].cpu(), expected[1])
        assert out[3].device.type == "cpu"  # (as eager makes it)
        torch.testing.assert_close(out[3], expected[3])
        if call == 1:
            assert delta.compiles == 0


def test_an_op_torch_xla_runs_on_the_cpu_between_loops():
    from torch._higher_order_ops.while_loop import while_loop

    def f(x, n):
        _, x = while_loop(lambda i, x: i < n, lambda i, x: (i + 1, torch.sin(x) + 1), (torch.zeros((), dtype=torch.int64, device=x.device), x))
        y = torch.lgamma(x)  # torch_xla runs it on the CPU
        _, y = while_loop(lambda i, y: i < n, lambda i, y: (i + 1, y * 0.5), (torch.zeros((), dtype=torch.int64, device=x.device), y))
        return y

    def reference(x, n):
        for _ in range(n):
            x = torch.sin(x) + 1
        y = torch.lgamma(x)
        for _ in range(n):
            y = y * 0.5
        return y

    compiled = torch.compile(f, backend="xla_loop", fullgraph=True)
    segmented = metrics.counter_value(metrics.GRAPHS_SEGMENTED)
    for call, n in enumerate((3, 5)):
        x = torch.rand(4) + 0.5
        with MetricsDelta() as delta:
            out = compiled(x.to(xla_device()), torch.tensor(n, device=xla_device()))
        torch.testing.assert_close(out.cpu(), reference(x, n), rtol=1e-5, atol=1e-5)
        if call == 1:
            assert delta.compiles == 0
    assert metrics.counter_value(metrics.GRAPHS_SEGMENTED) == segmented + 1


def test_an_item_sizes_a_tensor():
    def f(x, k):
        n = k.item()
        torch._check(n >= 0)
        return x.sum() + torch.arange(n, device=x.device).sum()

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(f, backend="xla_loop", fullgraph=True)
        x = torch.ones(3, device=xla_device())
        for k in (4, 6, 4):
            assert compiled(x, torch.tensor(k, device=xla_device())).item() == 3 + k * (k - 1) // 2


def test_an_item_used_as_a_value_stays_on_the_device():
    def f(x, k):
        return x * k.item()

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(f, backend="xla_loop", fullgraph=True)
        x = torch.ones(3, device=xla_device())
        compiled(x, torch.tensor(2.0, device=xla_device()))
        with MetricsDelta() as delta:
            out = compiled(x, torch.tensor(5.0, device=xla_device()))
        assert delta.host_syncs == 0 and delta.compiles == 0
        assert out.cpu().tolist() == [5.0] * 3


def test_parts_put_a_node_after_the_host_part_it_reads_and_after_the_size_it_needs():
    gm = torch.fx.symbolic_trace(lambda x: (torch.sin(x), torch.lgamma(x) * 2, torch.cos(x)))
    nodes = {n.name: n for n in gm.graph.nodes}
    part = parts(gm, {nodes["lgamma"]})
    assert part[nodes["sin"]] == 0 and part[nodes["cos"]] == 0
    assert part[nodes["lgamma"]] == 1 and part[nodes["mul"]] == 2
