"""Training through loops (xla_loop_backend/training.py): gradients through scan and
while_loop on the device, checked against the plain Python loop on CPU (torch 2.9's own
eager scan and while_loop autograd get some of these gradients wrong; see below)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_xla
from functorch.compile import make_boxed_func
from loop_testing import MetricsDelta, xla_device
from training_testing import (
    ResidualStepper,
    ScanRnn,
    StepperWithHead,
    assert_grads_close,
    grads,
    train_against_python_loops,
    train_step_against_python,
)
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

import xla_loop_backend
from xla_loop_backend import LoopFallbackWarning, LoopLoweringError


def test_rnn_over_a_sequence_with_scan():
    train_step_against_python(ScanRnn, lambda: (torch.zeros(3, 8), torch.randn(12, 3, 5)))


def test_residual_stepper_run_n_times_with_while_loop():
    train_step_against_python(ResidualStepper, lambda: (torch.tensor(7), torch.randn(4, 6)), max_iterations=16)


def test_torch_eager_while_loop_autograd_differs_from_python_loop():
    # The reason the reference is the Python loop: torch 2.9's eager while_loop autograd gets
    # closed-over parameter gradients wrong.
    torch.manual_seed(0)
    model = ResidualStepper()
    args = (torch.tensor(7), torch.randn(4, 6))
    model(*args).backward()
    eager_while = grads(model)
    model.zero_grad()
    model(*args, python=True).backward()
    assert not torch.allclose(eager_while["lin.weight"], grads(model)["lin.weight"], atol=1e-3)


class NestedLoops(torch.nn.Module):
    """A while_loop (tensor trip count) whose body runs a scan over a sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4) * 0.3)
        self.u = torch.nn.Parameter(torch.randn(4) * 0.1)

    def forward(self, n: torch.Tensor, h: torch.Tensor, xs: torch.Tensor, python: bool = False) -> torch.Tensor:
        def inner(h):
            if python:
                for x in xs:
                    h = torch.tanh(h @ self.w + x)
                return h
            h, _ = scan(lambda c, x: (torch.tanh(c @ self.w + x), c.sum()), h, xs)
            return h

        if python:
            for _ in range(int(n)):
                h = inner(h) + self.u
        else:
            start = torch.zeros((), dtype=torch.int64, device=h.device)
            _, h = while_loop(lambda i, h: i < n, lambda i, h: (i + 1, inner(h) + self.u), (start, h))
        return h.pow(2).sum()


def test_nested_loops():
    train_step_against_python(NestedLoops, lambda: (torch.tensor(3), torch.randn(2, 4), torch.randn(5, 2, 4)), max_iterations=6)


def test_fori_loop_with_tensor_bounds_trains():
    class Fori(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor([0.9, 1.1, 0.5]))

        def forward(self, n, x, python=False):
            if python:
                for i in range(int(n)):
                    x = x * self.a + 0.01 * i
            else:
                x = xla_loop_backend.fori_loop(0, n, lambda i, x: x * self.a + 0.01 * i.to(x.dtype), x)
            return x.sum()

    train_step_against_python(Fori, lambda: (torch.tensor(6), torch.randn(3)), max_iterations=8)


def test_trip_counts_reuse_the_executables_without_per_iteration_host_reads():
    torch.manual_seed(0)
    model = ResidualStepper().to(xla_device())
    compiled = xla_loop_backend.compile(model, fullgraph=True, max_iterations=32)
    x = torch.randn(4, 6, device=xla_device())
    compiled(torch.tensor(5, device=xla_device()), x).backward()  # compile forward and backward
    for n in (3, 20):
        model.zero_grad()
        n_dev = torch.tensor(n, device=xla_device())
        torch_xla.sync()
        with MetricsDelta() as delta:
            compiled(n_dev, x).backward()
            torch_xla.sync()
        assert delta.compiles == 0, f"n={n}: recompiled"
        # One read per call (the max_iterations check), whatever the trip count.
        assert delta.host_syncs == 1, f"n={n}: {delta.host_syncs} host reads"
        reference = copy.deepcopy(model).cpu()
        reference.zero_grad()
        reference(torch.tensor(n), x.cpu(), python=True).backward()
        assert_grads_close(grads(model), grads(reference))


def test_exceeding_max_iterations_is_an_error_then_the_process_still_works():
    torch.manual_seed(0)
    model = ResidualStepper().to(xla_device())
    compiled = xla_loop_backend.compile(model, fullgraph=True, max_iterations=4)
    x = torch.randn(4, 6, device=xla_device())
    with pytest.raises(LoopLoweringError, match=r"while_loop at training_testing.py:\d+: still running after max_iterations=4"):
        compiled(torch.tensor(9, device=xla_device()), x)
    loss = compiled(torch.tensor(4, device=xla_device()), x)  # at the bound: fine
    torch.testing.assert_close(loss.cpu(), model.cpu()(torch.tensor(4), x.cpu(), python=True).detach())


def test_training_through_while_loop_needs_no_options():
    # torch.compile(model, backend="xla_loop"), nothing else: the loop runs its real trip
    # count on the device and keeps 32 checkpoints (passes/checkpointed_while.py), so 300
    # iterations recompute from them.
    torch.manual_seed(0)
    reference = StepperWithHead()
    model = copy.deepcopy(reference).to(xla_device())
    compiled = torch.compile(model, backend="xla_loop")
    x = torch.randn(4, 6)
    for n in (0, 1, 7, 300):
        reference.zero_grad()
        model.zero_grad()
        expected = reference(torch.tensor(n), x, python=True)
        expected.backward()
        loss = compiled(torch.tensor(n, device=xla_device()), x.to(xla_device()))
        loss.backward()
        torch.testing.assert_close(loss.detach().cpu(), expected.detach(), rtol=1e-4, atol=1e-4)
        assert_grads_close(grads(model), grads(reference))


def test_max_iterations_as_a_torch_compile_option():
    torch.manual_seed(0)
    model = ResidualStepper().to(xla_device())
    compiled = torch.compile(model, backend="xla_loop", fullgraph=True, options={"max_iterations": 8})
    compiled(torch.tensor(3, device=xla_device()), torch.randn(4, 6, device=xla_device())).backward()
    assert model.lin.weight.grad.abs().sum().item() > 0
    with pytest.raises(Exception, match="unknown options"):
        torch.compile(model, backend="xla_loop", options={"max_iteration": 8})(
            torch.tensor(3, device=xla_device()), torch.randn(4, 6, device=xla_device())
        )


def test_optimizer_steps_reduce_the_loss_and_compile_once():
    torch.manual_seed(0)
    model = ResidualStepper().to(xla_device())
    compiled = xla_loop_backend.compile(model, fullgraph=True, max_iterations=12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(8, 6, device=xla_device())
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        loss = compiled(torch.tensor(4 + step % 5, device=xla_device()), x)
        loss.backward()
        optimizer.step()
        torch_xla.sync()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def _break_reasons_of_a_whole_training_step(backend):
    """Graph breaks Dynamo reports for a training step compiled whole (forward, loss,
    backward, optimizer step), and the weights after two steps."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(xla_device())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, y):
        loss = (model(x) - y).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend=backend)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 1, generator=g)  # (made on the CPU)
        compiled(x.to(xla_device()), y.to(xla_device()))
        torch_xla.sync()
    reasons = sorted(reason.splitlines()[0] for reason in counters["graph_break"])
    return reasons, [p.detach().cpu() for p in model.parameters()]


def test_a_whole_training_step_breaks_only_where_dynamo_breaks_it():
    """xla_loop adds no graph break around backward() and the optimizer: a step compiled
    whole breaks where Dynamo's own eager backend breaks it, and trains alike."""
    ours, trained = _break_reasons_of_a_whole_training_step("xla_loop")
    dynamos, reference = _break_reasons_of_a_whole_training_step("eager")
    assert ours == dynamos and any("backward" in reason for reason in ours), (ours, dynamos)
    for a, b in zip(trained, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class NestedWhile(torch.nn.Module):
    """A while_loop (n times) whose body runs a while_loop (m times)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.9, 1.05, 0.8]))
        self.b = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.05]))

    def forward(self, n, m, x, python=False):
        if python:
            for _ in range(int(n)):
                for _ in range(int(m)):
                    x = torch.tanh(x * self.w)
                x = x + self.b
            return x.pow(2).sum()

        def inner(x):
            start = torch.zeros((), dtype=torch.int64, device=x.device)
            return while_loop(lambda j, x: j < m, lambda j, x: (j + 1, torch.tanh(x * self.w)), (start, x))[1]

        start = torch.zeros((), dtype=torch.int64, device=x.device)
        _, x = while_loop(lambda i, x: i < n, lambda i, x: (i + 1, inner(x) + self.b), (start, x))
        return x.pow(2).sum()


def test_while_loop_nested_in_a_trained_while_loop():
    train_step_against_python(NestedWhile, lambda: (torch.tensor(3), torch.tensor(4), torch.randn(3)), max_iterations=5)


def test_inner_while_loop_exceeding_max_iterations_is_an_error():
    model = NestedWhile().to(xla_device())
    compiled = xla_loop_backend.compile(model, fullgraph=True, max_iterations=5)
    dev = xla_device()
    with pytest.raises(LoopLoweringError, match="still running after max_iterations=5"):
        compiled(torch.tensor(2, device=dev), torch.tensor(7, device=dev), torch.randn(3, device=dev))
    compiled(torch.tensor(2, device=dev), torch.tensor(5, device=dev), torch.randn(3, device=dev))


def _while_then_python(n, x, w, python=False):
    if python:
        for _ in range(int(n)):
            x = torch.tanh(x @ w)
    else:
        start = torch.zeros((), dtype=torch.int64, device=x.device)
        _, x = while_loop(lambda i, x: i < n, lambda i, x: (i + 1, torch.tanh(x @ w)), (start, x))
    return x.pow(2).sum()


def _scan_then_python(x, xs, w, python=False):
    if python:
        for s in xs:
            x = torch.tanh(x @ w) * 0.9 + s
    else:
        x, _ = scan(lambda c, s: (torch.tanh(c @ w) * 0.9 + s, c.sum()), x, xs)
    return x.pow(2).sum()


@pytest.mark.parametrize(
    "fn, make_args",
    [
        (_while_then_python, lambda: [torch.tensor(5), torch.randn(2, 4), torch.randn(4, 4) * 0.5]),
        (_scan_then_python, lambda: [torch.randn(2, 4), torch.randn(6, 2, 4), torch.randn(4, 4) * 0.5]),
    ],
)
def test_gradients_for_inputs(fn, make_args):
    torch.manual_seed(0)
    cpu = [t.requires_grad_() if t.is_floating_point() else t for t in make_args()]
    # (Device tensors first: a process whose first backward runs before the XLA runtime
    # has started cannot run an XLA backward later; torch's autograd engine asserts.)
    dev = [t.detach().to(xla_device()).requires_grad_(t.requires_grad) for t in cpu]
    fn(*cpu, python=True).backward()
    xla_loop_backend.compile(fn, fullgraph=True, max_iterations=8)(*dev).backward()
    for i, (a, b) in enumerate(zip(dev, cpu)):
        if b.requires_grad:
            torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"input {i}: {m}")


def test_buffers_that_require_grad():
    class WithBuffer(ResidualStepper):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("shift", torch.linspace(-0.5, 0.5, 6).requires_grad_())

        def step(self, x):
            return x + 0.1 * torch.tanh(self.lin(x) + self.shift)

    torch.manual_seed(0)
    reference = WithBuffer()
    model = copy.deepcopy(reference).to(xla_device())
    model.shift = model.shift.detach().requires_grad_()  # a leaf on the device, as a user would make it
    args = (torch.tensor(5), torch.randn(4, 6))
    reference(*args, python=True).backward()
    xla_loop_backend.compile(model, fullgraph=True, max_iterations=8)(*[a.to(xla_device()) for a in args]).backward()
    torch.testing.assert_close(model.shift.grad.cpu(), reference.shift.grad, rtol=1e-4, atol=1e-4)
    assert_grads_close(grads(model), grads(reference))


# The cases of "Training you can trust" (each failed or gave wrong gradients before the pass
# pipeline): gradients through nested loops equal the plain Python loops on CPU.
class WhileInScan(torch.nn.Module):
    """A while_loop, or a fori_loop with tensor bounds, in a trained scan's body."""

    def __init__(self, fori: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.9, 1.1, 0.7]))
        self.fori = fori

    def forward(self, n, h, xs, L):
        def inner(h):
            if self.fori:
                return L.fori_loop(0, n, lambda i, h: torch.tanh(h * self.w), h)
            start = torch.zeros((), dtype=torch.int64, device=h.device)
            return L.while_loop(lambda i, h: i < n, lambda i, h: (i + 1, torch.tanh(h * self.w)), (start, h))[1]

        h, _ = L.scan(lambda h, x: (inner(h) + x, h.sum()), h, xs)
        return h.pow(2).sum()


class ForiInScan(WhileInScan):
    def __init__(self):
        super().__init__(fori=True)


@pytest.mark.parametrize("model", [WhileInScan, ForiInScan])
def test_while_loop_in_a_trained_scan(model):
    train_against_python_loops(model, (torch.tensor(3), torch.randn(3), torch.randn(4, 3)))


class TwoForiLoops(torch.nn.Module):
    """Two fori_loops with tensor bounds in one trained graph, chained or with code between."""

    def __init__(self, between: bool = True):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.9, 1.1, 0.7]))
        self.between = between

    def forward(self, n, h, L):
        h = L.fori_loop(0, n, lambda i, h: torch.tanh(h * self.w), h)
        if self.between:
            h = h * 2 - h
        h = L.fori_loop(0, n, lambda i, h: h * self.w + 0.1, h)
        return h.pow(2).sum() + self.w.sum()


class ChainedForiLoops(TwoForiLoops):
    def __init__(self):
        super().__init__(between=False)


@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("model", [TwoForiLoops, ChainedForiLoops])
def test_two_trained_fori_loops(model, n):
    train_against_python_loops(model, (torch.tensor(n), torch.randn(3)))


class InnerLoopWithoutGrad(torch.nn.Module):
    """An inner scan or static-bound fori_loop whose float carry starts without grad, in a
    trained while_loop, scan or fori_loop."""

    def __init__(self, outer: str = "while", inner: str = "fori"):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.9, 1.1, 0.7]))
        self.outer, self.inner = outer, inner

    def forward(self, n, h, xs, L):
        def step(h):
            acc = torch.zeros(3, device=h.device)  # no grad
            if self.inner == "fori":
                acc = L.fori_loop(0, 2, lambda j, a: torch.tanh(a + h * self.w), acc)
            else:
                acc, _ = L.scan(lambda a, x: (torch.tanh(a + h * self.w + x), a.sum()), acc, xs)
            return acc + 0.1 * h

        if self.outer == "while":
            start = torch.zeros((), dtype=torch.int64, device=h.device)
            h = L.while_loop(lambda i, h: i < n, lambda i, h: (i + 1, step(h)), (start, h))[1]
        elif self.outer == "fori":
            h = L.fori_loop(0, n, lambda i, h: step(h), h)
        else:
            h, _ = L.scan(lambda h, x: (step(h) + x, h.sum()), h, xs)
        return h.pow(2).sum()


@pytest.mark.parametrize("outer", ["while", "fori", "scan"])
@pytest.mark.parametrize("inner", ["fori", "scan"])
def test_inner_loop_whose_carry_starts_without_grad(outer, inner):
    class Model(InnerLoopWithoutGrad):
        def __init__(self):
            super().__init__(outer, inner)

    train_against_python_loops(Model, (torch.tensor(3), torch.randn(3), torch.randn(2, 3)))


class LayerNormAfterLoop(torch.nn.Module):
    def __init__(self, fori: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.9, 1.1, 0.7]))
        self.norm = torch.nn.LayerNorm(3)
        self.fori = fori

    def forward(self, n, h, L):
        if self.fori:
            h = L.fori_loop(0, n, lambda i, h: torch.tanh(h * self.w), h)
        else:
            start = torch.zeros((), dtype=torch.int64, device=h.device)
            h = L.while_loop(lambda i, h: i < n, lambda i, h: (i + 1, torch.tanh(h * self.w)), (start, h))[1]
        return self.norm(h).pow(2).sum()


@pytest.mark.parametrize("fori", [False, True])
def test_layer_norm_right_after_a_trained_loop(fori):
    class Model(LayerNormAfterLoop):
        def __init__(self):
            super().__init__(fori)

    train_against_python_loops(Model, (torch.tensor(3), torch.randn(2, 3)))


def test_a_model_that_requires_grad_evaluates_without_a_bound_and_without_backward():
    model = StepperWithHead().to(xla_device())
    compiled = xla_loop_backend.compile(model, fullgraph=True)
    x = torch.randn(4, 6)
    loss = compiled(torch.tensor(5, device=xla_device()), x.to(xla_device()))
    assert loss.requires_grad
    expected = copy.deepcopy(model).cpu()(torch.tensor(5), x, python=True)
    torch.testing.assert_close(loss.detach().cpu(), expected.detach(), rtol=1e-5, atol=1e-5)


def test_gradients_from_outputs_compile_once():
    # torch's own test pattern: torch.autograd.backward(outputs, ones). After the first call
    # nothing compiles; what compiles on the second call of a loop that does not reset its
    # gradients is the eager `grad += new` outside the compiled function, not the loop.
    dev = xla_device()
    w = torch.randn(2, 2, device=dev, requires_grad=True)
    compiled = torch.compile(lambda h, xs: scan(lambda h, x: (torch.tanh(h @ w + x), h.sum()), h, xs), backend="xla_loop", fullgraph=True)
    ones = [torch.ones(2, device=dev), torch.ones(5, device=dev)]
    h0 = torch.zeros(2, device=dev, requires_grad=True)
    xs = torch.randn(5, 2, device=dev, requires_grad=True)
    for call in range(3):
        w.grad = h0.grad = xs.grad = None
        torch_xla.sync()
        with MetricsDelta() as delta:
            torch.autograd.backward(list(compiled(h0, xs)), ones)
            torch_xla.sync()
        if call:
            assert (delta.compiles, delta.host_syncs) == (0, 0), f"call {call}"
