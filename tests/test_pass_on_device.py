"""passes/on_device.py: counters and constants made without `device=` (0-dim CPU tensors
Dynamo bakes into the graph) become device values, at top level and in every loop body and
branch; the programs users write with them give eager's results and gradients, and their
second call compiles nothing."""
from __future__ import annotations

import pytest
import torch
import torch_xla
from loop_testing import MetricsDelta, xla_device
from torch._higher_order_ops.cond import cond
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

import xla_loop_backend as xl
from xla_loop_backend.passes.on_device import PASS as ON_DEVICE


def test_factories_and_constants_on_the_cpu_move_to_the_device_in_every_subgraph():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    body = torch.fx.symbolic_trace(lambda x: x + 1)
    gm.add_module("body", body)
    body.register_buffer("_tensor_constant0", torch.tensor(2.0))
    graph = body.graph
    (placeholder,) = graph.find_nodes(op="placeholder")
    with graph.inserting_after(placeholder):
        constant = graph.get_attr("_tensor_constant0")
        zeros = graph.call_function(torch.ops.aten.zeros.default, ([],), {"dtype": torch.int64, "device": torch.device("cpu")})
    ON_DEVICE.run(gm)
    assert zeros.kwargs["device"].type == "xla" and zeros.kwargs["dtype"] is torch.int64
    assert body._tensor_constant0.device.type == "xla" and body._tensor_constant0.item() == 2.0
    assert constant.target == "_tensor_constant0"


def _counter():
    return torch.zeros((), dtype=torch.int64)  # no device=: a 0-dim CPU tensor


def _run_twice(fn, make_args, reference, compiled=None):
    """Compiled twice with new data each time: eager's results, and a second call that
    compiles nothing."""
    compiled = compiled or torch.compile(fn, backend="xla_loop", fullgraph=True)
    for call in range(2):
        args = make_args(call)
        expected = reference(*args)
        device_args = [a.to(xla_device()) if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args]
        with MetricsDelta() as delta:
            out = compiled(*device_args)
        for actual, wanted in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
            torch.testing.assert_close(actual.cpu(), wanted.cpu(), rtol=1e-5, atol=1e-5)
        if call == 1:
            assert delta.compiles == 0


def _python_while(n, x, step):
    i = 0
    while i < n:
        i, x = i + 1, step(x)
    return torch.tensor(i), x


def test_torchs_while_loop_with_a_counter_made_without_device():
    def f(x, n):
        return while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x * 1.5 + 1), (_counter(), x))

    _run_twice(
        f,
        lambda call: (torch.randn(3), torch.tensor(4 + call, device=xla_device())),
        lambda x, n: _python_while(int(n), x.cpu(), lambda x: x * 1.5 + 1),
    )


def test_a_cpu_counter_with_a_cond_in_the_body():
    def f(x, n):
        def body(i, x):
            return i + 1, cond(x.sum() > 0, lambda x: x * 0.5, lambda x: x + 1.0, (x,))

        return while_loop(lambda i, x: i < n, body, (_counter(), x))

    def step(x):
        return x * 0.5 if x.sum() > 0 else x + 1.0

    _run_twice(
        f,
        lambda call: (torch.randn(3) * (1 - 2 * call), torch.tensor(5, device=xla_device())),
        lambda x, n: _python_while(int(n), x.cpu(), step),
    )


def test_a_scan_whose_body_uses_a_cpu_constant():
    def f(h, xs):
        def combine(c, y):
            c = c * torch.tensor(0.5) + y
            return c, c.sum()

        return scan(combine, h, xs)

    def reference(h, xs):
        ys = []
        for y in xs:
            h = h * 0.5 + y
            ys.append(h.sum())
        return h, torch.stack(ys)

    _run_twice(f, lambda call: (torch.randn(3), torch.randn(6, 3)), reference)


def test_a_fori_loop_whose_body_uses_a_cpu_constant():
    def f(x):
        return xl.fori_loop(0, 5, lambda i, x: x * torch.tensor(2.0) - i, x)

    def reference(x):
        for i in range(5):
            x = x * 2.0 - i
        return x

    _run_twice(f, lambda call: (torch.randn(4),), reference)


def test_the_counter_comes_back_on_the_cpu_as_in_eager():
    def f(x):
        return while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, x + 1), (_counter(), x))

    i, x = torch.compile(f, backend="xla_loop", fullgraph=True)(torch.zeros(2, device=xla_device()))
    assert i.device.type == "cpu" and i.item() == 3 and x.device.type == "xla"


class _Stepper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, n):
        def body(i, h):
            return i + 1, torch.tanh(self.lin(h)) * torch.tensor(0.9)

        return while_loop(lambda i, h: i < n, body, (_counter(), x))[1] * torch.tensor(0.5)


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "default"])
def test_training_through_a_while_loop_with_a_cpu_counter(fullgraph):
    """Without fullgraph (what users get by default) the graph is also kept for an eager
    fallback: copying its CPU constant under AOTAutograd's fake mode crashed the compile."""
    torch.manual_seed(0)
    reference = _Stepper()
    model = _Stepper().to(xla_device())
    model.load_state_dict(reference.state_dict())
    compiled = torch.compile(model, backend="xla_loop", fullgraph=fullgraph)
    for call, n in enumerate((3, 5)):
        x = torch.randn(2, 4)
        reference.zero_grad()
        model.zero_grad()
        h = x
        for _ in range(n):
            h = torch.tanh(reference.lin(h)) * 0.9
        h = h * 0.5
        (h**2).sum().backward()
        with MetricsDelta() as delta:
            out = compiled(x.to(xla_device()), torch.tensor(n, device=xla_device()))
            (out**2).sum().backward()  # the loss outside the compiled function
            torch_xla.sync()
        torch.testing.assert_close(out.cpu(), h.detach(), rtol=1e-5, atol=1e-5)
        for name, p in reference.named_parameters():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad.cpu(), p.grad, rtol=1e-4, atol=1e-4)
        if call == 1:
            assert delta.compiles == 0


def test_a_cpu_tensor_of_more_than_0_dims_beside_xla_ones_is_refused_naming_the_line():
    # torch's device rule (torch_xla's eager mode moves the tensor instead): Dynamo refuses it
    def f(x):
        return x + torch.ones(3)

    with pytest.raises(Exception, match=r"(?s)two different devices.*test_pass_on_device.py"):
        torch.compile(f, backend="xla_loop", fullgraph=True)(torch.ones(3, device=xla_device()))
    # the process goes on
    assert torch.compile(lambda x: x * 2, backend="xla_loop")(torch.ones(2, device=xla_device())).cpu().tolist() == [2.0, 2.0]
