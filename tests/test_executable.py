"""executable.py: every graph is traced once on stand-ins, keyed by its whole HLO, compiled
by xla_loop and called directly; whatever it holds (constants, CPU tensors, numbers, random
ops, inputs it updates), it gives eager's results, and a later call only runs it."""
from __future__ import annotations

import pytest
import torch
import torch_xla

from loop_testing import MetricsDelta, xla_device
from xla_loop_backend import metrics
from xla_loop_backend.call import GraphCall
from xla_loop_backend.executable import _PROGRAMS, Executable, _parameter_order
from xla_loop_backend.lowering.driver import LoweredGraph


def _call(fn):
    return GraphCall(LoweredGraph(torch.fx.symbolic_trace(fn), 0))


def _on_device(*tensors):
    moved = [t.to(xla_device()) for t in tensors]
    torch_xla.sync()
    return moved


def test_a_graph_runs_as_its_own_executable_and_later_calls_only_run_it():
    call = _call(lambda x, w: (torch.tanh(x @ w), x.sum()))
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    xd, wd = _on_device(x, w)
    out = call(xd, wd)
    assert isinstance(call.only, Executable)
    torch.testing.assert_close(out[0].cpu(), torch.tanh(x @ w), rtol=1e-5, atol=1e-5)
    x2 = torch.randn(4, 8)
    (x2d,) = _on_device(x2)
    with MetricsDelta() as delta:
        out = call(x2d, wd)
        torch_xla._XLAC._xla_wait_device_ops([])
    assert delta.compiles == 0 and delta.executions == 1 and delta.host_syncs == 0 and delta.transfers_from_device == 0
    torch.testing.assert_close(out[0].cpu(), torch.tanh(x2 @ w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1].cpu(), x2.sum(), rtol=1e-5, atol=1e-5)


def test_outputs_xla_does_not_return_are_put_back():
    # an input returned as it is, the same tensor twice, a None, a number, a single value
    def fn(x, y):
        z = torch.sin(x)
        return (y, z, z, None, x * 2, 7)

    call = _call(fn)
    x, y = torch.randn(3), torch.randn(3)
    xd, yd = _on_device(x, y)
    for _ in range(2):
        out = call(xd, yd)
        assert isinstance(out, tuple) and len(out) == 6
        assert out[0] is yd and out[1] is out[2] and out[3] is None and out[5] == 7
        torch.testing.assert_close(out[1].cpu(), torch.sin(x))
        torch.testing.assert_close(out[4].cpu(), x * 2)
    single = _call(lambda x: torch.cos(x))
    torch.testing.assert_close(single(xd).cpu(), torch.cos(x))


def test_two_outputs_with_one_value_come_back_in_their_places():
    # (torch_xla's bridge returned them out of order when their values were equal)
    call = _call(lambda x: (x.clone(), torch.full((2,), 2.0, device=x.device), x.clone() * 1, x + 1))
    (xd,) = _on_device(torch.full((2,), 2.0))
    out = [t.cpu().tolist() for t in call(xd)]
    assert out == [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0], [3.0, 3.0]]


def test_an_input_still_pending_is_computed_before_the_call():
    call = _call(lambda x: x * 3)
    base = torch.randn(5)
    (xd,) = _on_device(base)
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

    call = GraphCall(LoweredGraph(torch.fx.symbolic_trace(Holder()), 0))
    x = torch.randn(2, 4)
    out = call(x.to(xla_device()))
    assert isinstance(call.only, Executable) and any(kind == 1 for kind, _ in call.only.sources)
    torch.testing.assert_close(out.cpu(), x @ w, rtol=1e-5, atol=1e-5)


def test_graphs_that_differ_only_in_which_input_an_op_reads_run_their_own_programs():
    # pytorch/xla#8353: torch_xla's graph hash is blind to this, and its bridge ran the
    # first graph's executable for the second. xla_loop's key is the whole HLO.
    x, y = torch.randn(5), torch.randn(5)
    xd, yd = _on_device(x, y)
    first = _call(lambda x, y: torch.sin(x) * y + x)
    second = _call(lambda x, y: torch.sin(x) * y + y)
    torch.testing.assert_close(first(xd, yd).cpu(), torch.sin(x) * y + x)
    torch.testing.assert_close(second(xd, yd).cpu(), torch.sin(x) * y + y)
    assert first.only.key != second.only.key


def test_the_same_graph_compiled_twice_compiles_once():
    x = torch.randn(6)
    (xd,) = _on_device(x)
    _call(lambda x: torch.cos(x) * 3)(xd)
    with MetricsDelta() as delta:
        out = _call(lambda x: torch.cos(x) * 3)(xd)
    assert delta.compiles == 0
    torch.testing.assert_close(out.cpu(), torch.cos(x) * 3)


def test_graphs_that_differ_only_in_a_constant_share_a_program_and_keep_their_values():
    def holder(value):
        class Holder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("c", torch.full((3,), value, device=xla_device()))

            def forward(self, x):
                return x * self.c

        return GraphCall(LoweredGraph(torch.fx.symbolic_trace(Holder()), 0))

    (xd,) = _on_device(torch.ones(3))
    a, b = holder(2.0), holder(5.0)
    assert a(xd).cpu().tolist() == [2.0] * 3
    assert b(xd).cpu().tolist() == [5.0] * 3
    assert a.only.key == b.only.key


def test_an_op_torch_xla_runs_on_the_cpu_runs_between_two_programs_with_each_calls_values():
    # (traced into one program, lgamma would run on the CPU once and be baked in as a constant)
    call = _call(lambda x: torch.lgamma(torch.sin(x) + 2) * 2)
    segmented = metrics.counter_value(metrics.GRAPHS_SEGMENTED)
    for _ in range(2):
        x = torch.rand(4)
        torch.testing.assert_close(call(x.to(xla_device())).cpu(), torch.lgamma(torch.sin(x) + 2) * 2)
    assert metrics.counter_value(metrics.GRAPHS_SEGMENTED) == segmented + 1


def test_random_ops_draw_anew_each_call_and_follow_the_seed():
    import torch_xla.core.xla_model as xm

    call = _call(lambda x: x + torch.rand(x.shape, device=x.device))
    xd = torch.zeros(64, device=xla_device())
    first, second = (call(xd).cpu() for _ in range(2))
    assert isinstance(call.only, Executable)
    assert not torch.equal(first, second)
    xm.set_rng_state(1234)
    again = call(xd).cpu()
    xm.set_rng_state(1234)
    assert torch.equal(again, call(xd).cpu())


def test_an_input_the_graph_updates_in_place_takes_its_new_value():
    def fn(x, y):
        x.add_(1)
        return y * 2

    call = _call(fn)
    x, y = torch.zeros(3), torch.randn(3)
    xd, yd = _on_device(x, y)
    for n in (1, 2):
        out = call(xd, yd)
        assert isinstance(call.only, Executable)
        torch.testing.assert_close(out.cpu(), y * 2)
        torch.testing.assert_close(xd.cpu(), x + n)


def test_python_number_inputs_get_a_program_per_value():
    gm = torch.fx.symbolic_trace(lambda x, k: x * k)
    for node in gm.graph.find_nodes(op="placeholder"):
        node.meta["val"] = 3 if node.name == "k" else torch.empty(2)
    call = GraphCall(LoweredGraph(gm, 0))
    xd = torch.ones(2, device=xla_device())
    assert call(xd, 3).cpu().tolist() == [3.0, 3.0]
    assert call(xd, 4).cpu().tolist() == [4.0, 4.0]
    assert call(xd, 3).cpu().tolist() == [3.0, 3.0]
    assert len(call.programs) == 2


def test_cpu_tensor_arguments_are_uploaded_every_call():
    call = _call(lambda x, n: x * n)
    xd = torch.ones(2, device=xla_device())
    assert call(xd, torch.tensor(3.0)).cpu().tolist() == [3.0, 3.0]
    assert call(xd, torch.tensor(5.0)).cpu().tolist() == [5.0, 5.0]


def test_two_arguments_on_one_device_buffer_stay_two_parameters():
    call = _call(lambda x, y: x * 2 + y)
    a = torch.randn(4)
    (ad,) = _on_device(a)
    torch.testing.assert_close(call(ad, ad.detach()).cpu(), a * 3)
    b = torch.randn(4)
    (bd,) = _on_device(b)
    torch.testing.assert_close(call(ad, bd).cpu(), a * 2 + b)


def test_a_scalar_argument_is_never_taken_for_a_constant_of_the_same_value():
    # torch_xla shares one buffer among scalar constants of one value; traced on it, an
    # argument equal to a constant of the graph would be baked in
    call = _call(lambda x, n: x * 3 + n)
    xd = torch.ones(2, device=xla_device())
    assert call(xd, torch.tensor(3.0).to(xla_device())).cpu().tolist() == [6.0, 6.0]
    assert call(xd, torch.tensor(7.0).to(xla_device())).cpu().tolist() == [10.0, 10.0]


def test_a_program_torch_xla_dropped_from_its_cache_is_compiled_again():
    call = _call(lambda x: torch.exp(x) - 1)
    x = torch.randn(3)
    (xd,) = _on_device(x)
    call(xd)
    executable = call.only
    executable.graph_hash = b"\x00" * len(executable.graph_hash) if isinstance(executable.graph_hash, bytes) else 0
    torch.testing.assert_close(call(xd).cpu(), torch.exp(x) - 1)
    assert _PROGRAMS[executable.key][0] == executable.graph_hash


def test_a_graph_that_computes_nothing_runs_no_program():
    call = _call(lambda x, y: (y, None, x))
    xd, yd = _on_device(torch.ones(1), torch.zeros(1))
    with MetricsDelta() as delta:
        out = call(xd, yd)
    assert out[0] is yd and out[1] is None and out[2] is xd
    assert delta.compiles == 0 and delta.executions == 0


def test_the_parameter_order_is_read_from_torch_xlas_ir():
    text = (
        "IR {\n  %0 = f32[4]{0} xla::device_data(), xla_shape=f32[4]{0}\n"
        "  %1 = f32[] xla::device_data(), xla_shape=f32[]\n"
        "  %2 = (f32[4]{0}) xla_loop::graph_ab(%1, %0), num_outputs=1, ROOT=0\n}\n"
    )
    assert _parameter_order(text, "xla_loop::graph_ab", 2) == [1, 0]
    with pytest.raises(AssertionError, match="cannot read"):
        _parameter_order(text, "xla_loop::graph_ab", 3)


# Two functions that differ only in which input the last op reads (pytorch/xla#8353).
def _reads_x(x, y):
    return torch.sin(x) * y + x


def _reads_y(x, y):
    return torch.sin(x) * y + y


def test_compiled_functions_differing_only_in_which_input_an_op_reads_get_their_own_programs():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    dev = xla_device()
    for fn in (_reads_x, _reads_y, _reads_x):
        out = torch.compile(fn, backend="xla_loop", fullgraph=True)(x.to(dev), y.to(dev))
        torch.testing.assert_close(out.cpu(), fn(x, y))


def test_a_function_compiled_again_reuses_its_program():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    dev = xla_device()
    torch.compile(_reads_y, backend="xla_loop", fullgraph=True)(x.to(dev), y.to(dev))
    torch._dynamo.reset()
    with MetricsDelta() as delta:
        out = torch.compile(_reads_y, backend="xla_loop", fullgraph=True)(x.to(dev), y.to(dev))
    torch.testing.assert_close(out.cpu(), _reads_y(x, y))
    assert delta.compiles == 0


class _ScaledAfter(torch.nn.Module):
    """A parameter the backward reads as it is (the gradient of `lin(x)` is `g * w`)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.lin = torch.nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.lin(x) * self.w


def test_the_optimizer_step_after_the_first_backward_compiles_once():
    """Tracing the backward looks up each argument's buffer, which left a parameter holding
    it (an IR node): torch_xla did not donate that buffer to the first optimizer update, so
    the second step compiled the update again, with the donation."""
    import xla_loop_backend as xl

    torch.manual_seed(0)
    model, reference = _ScaledAfter(), _ScaledAfter()
    reference.load_state_dict(model.state_dict())
    model.to(xla_device())
    compiled = xl.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    scale = torch.tensor(2.0)  # (made without device=, as users do)
    compiles = []
    for step in range(3):
        x = torch.randn(4, 8)
        with MetricsDelta() as delta:
            loss = (compiled(x.to(xla_device())) * scale.to(xla_device())).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            torch_xla.sync()
        compiles.append(delta.compiles)
        (reference(x) * scale).square().mean().backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        torch.testing.assert_close(model.w.detach().cpu(), reference.w.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.lin.weight.detach().cpu(), reference.lin.weight.detach(), rtol=1e-5, atol=1e-6)
    assert compiles[0] > 0 and compiles[1:] == [0, 0], compiles
