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
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

import xla_loop_backend
from xla_loop_backend import LoopFallbackWarning, LoopLoweringError
from xla_loop_backend.training import prepare_for_autograd


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().cpu().clone() for name, p in module.named_parameters()}


def _assert_grads_close(actual: dict, expected: dict, tol: float = 1e-4) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


class ScanRnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = torch.nn.GRUCell(5, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, h: torch.Tensor, xs: torch.Tensor, python: bool = False) -> torch.Tensor:
        def step(h, x):
            h = self.cell(x, h)
            return h, self.head(h).squeeze(-1)

        if python:
            ys = []
            for x in xs:
                h, y = step(h, x)
                ys.append(y)
            ys = torch.stack(ys)
        else:
            h, ys = scan(step, h, xs)
        return (ys**2).mean() + h.pow(2).mean()


class ResidualStepper(torch.nn.Module):
    """x <- x + 0.1 * tanh(W x + b), n times; n is a tensor input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.tanh(self.lin(x))

    def forward(self, n: torch.Tensor, x: torch.Tensor, python: bool = False) -> torch.Tensor:
        if python:
            for _ in range(int(n)):
                x = self.step(x)
        else:
            start = torch.zeros((), dtype=torch.int64, device=x.device)
            _, x = while_loop(lambda i, x: i < n, lambda i, x: (i + 1, self.step(x)), (start, x))
        return (x**2).sum()


def _train_step_against_python(model, make_args, max_iterations=None, tol=1e-4, remat=False):
    """One forward/backward compiled with xla_loop on the device vs the Python loop on CPU."""
    torch.manual_seed(0)
    reference = model()
    device_model = copy.deepcopy(reference).to(xla_device())
    cpu_args = make_args()
    loss = reference(*cpu_args, python=True)
    loss.backward()
    compiled = xla_loop_backend.compile(device_model, fullgraph=True, max_iterations=max_iterations, remat=remat)
    device_loss = compiled(*[a.to(xla_device()) for a in cpu_args])
    device_loss.backward()
    torch.testing.assert_close(device_loss.cpu(), loss.detach(), rtol=tol, atol=tol)
    _assert_grads_close(_grads(device_model), _grads(reference), tol)
    return reference, device_model, compiled


def test_rnn_over_a_sequence_with_scan():
    _train_step_against_python(ScanRnn, lambda: (torch.zeros(3, 8), torch.randn(12, 3, 5)))


def test_torch_scan_autograd_bug_is_worked_around():
    # pytorch/pytorch#184528: with an initial carry that does not require grad, torch 2.9's
    # scan autograd drops part of the closed-over parameters' gradient, eagerly too.
    torch.manual_seed(0)
    model = ScanRnn()
    args = (torch.zeros(3, 8), torch.randn(12, 3, 5))
    model(*args).backward()
    eager_scan = _grads(model)
    model.zero_grad()
    model(*args, python=True).backward()
    python = _grads(model)
    assert not torch.allclose(eager_scan["cell.weight_hh"], python["cell.weight_hh"], atol=1e-3), (
        "torch's scan autograd is right now: the workaround in training.py can go"
    )


def test_residual_stepper_run_n_times_with_while_loop():
    _train_step_against_python(ResidualStepper, lambda: (torch.tensor(7), torch.randn(4, 6)), max_iterations=16)


def test_torch_eager_while_loop_autograd_differs_from_python_loop():
    # The reason the reference is the Python loop: torch 2.9's eager while_loop autograd gets
    # closed-over parameter gradients wrong.
    torch.manual_seed(0)
    model = ResidualStepper()
    args = (torch.tensor(7), torch.randn(4, 6))
    model(*args).backward()
    eager_while = _grads(model)
    model.zero_grad()
    model(*args, python=True).backward()
    assert not torch.allclose(eager_while["lin.weight"], _grads(model)["lin.weight"], atol=1e-3)


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
    _train_step_against_python(NestedLoops, lambda: (torch.tensor(3), torch.randn(2, 4), torch.randn(5, 2, 4)), max_iterations=6)


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

    _train_step_against_python(Fori, lambda: (torch.tensor(6), torch.randn(3)), max_iterations=8)


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
        _assert_grads_close(_grads(model), _grads(reference))


def test_exceeding_max_iterations_is_an_error_then_the_process_still_works():
    torch.manual_seed(0)
    model = ResidualStepper().to(xla_device())
    compiled = xla_loop_backend.compile(model, fullgraph=True, max_iterations=4)
    x = torch.randn(4, 6, device=xla_device())
    with pytest.raises(LoopLoweringError, match=r"while_loop at test_training.py:\d+: still running after max_iterations=4"):
        compiled(torch.tensor(9, device=xla_device()), x)
    loss = compiled(torch.tensor(4, device=xla_device()), x)  # at the bound: fine
    torch.testing.assert_close(loss.cpu(), model.cpu()(torch.tensor(4), x.cpu(), python=True).detach())


def test_training_through_while_loop_without_a_bound():
    model = ResidualStepper().to(xla_device())
    args = (torch.tensor(3, device=xla_device()), torch.randn(4, 6, device=xla_device()))
    with pytest.raises(LoopLoweringError, match=r"while_loop at test_training.py:\d+: training through a while_loop needs a bound .* max_iterations=N"):
        xla_loop_backend.compile(model, fullgraph=True)(*args)
    with pytest.warns(LoopFallbackWarning, match="needs a bound"):
        loss = torch.compile(model, backend="xla_loop")(*args)
    loss.backward()
    assert model.lin.weight.grad is not None


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
    _train_step_against_python(NestedWhile, lambda: (torch.tensor(3), torch.tensor(4), torch.randn(3)), max_iterations=5)


def test_inner_while_loop_exceeding_max_iterations_is_an_error():
    model = NestedWhile().to(xla_device())
    compiled = xla_loop_backend.compile(model, fullgraph=True, max_iterations=5)
    dev = xla_device()
    with pytest.raises(LoopLoweringError, match="still running after max_iterations=5"):
        compiled(torch.tensor(2, device=dev), torch.tensor(7, device=dev), torch.randn(3, device=dev))
    compiled(torch.tensor(2, device=dev), torch.tensor(5, device=dev), torch.randn(3, device=dev))


@pytest.mark.parametrize("remat", [True, 5])
def test_remat_gives_the_same_gradients(remat):
    # 12 steps in segments of 4 (True: ceil(sqrt(12))) or 5 (padded with masked steps).
    _train_step_against_python(ScanRnn, lambda: (torch.zeros(3, 8), torch.randn(12, 3, 5)), remat=remat)
    _train_step_against_python(ResidualStepper, lambda: (torch.tensor(7), torch.randn(4, 6)), max_iterations=16, remat=remat)


def _forward_saved_shapes(model: torch.nn.Module, args: tuple, remat) -> list[tuple[int, ...]]:
    """Shapes of what the forward graph hands to the backward (its outputs beyond the loss)."""
    saved = []

    def forward_compiler(graph: torch.fx.GraphModule, _):
        (outputs,) = graph.graph.find_nodes(op="output")[0].args
        saved.extend(tuple(o.meta["val"].shape) for o in outputs[1:] if isinstance(o, torch.fx.Node))
        return make_boxed_func(graph.forward)

    def backend(gm, example_inputs):
        prepare_for_autograd(gm, None, remat)
        return aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)

    torch.compile(model, backend=backend, fullgraph=True)(*args)
    return saved


@pytest.mark.parametrize("remat, stored", [(False, 100), (True, 10), (25, 4)])
def test_remat_stores_carries_per_segment_instead_of_per_step(remat, stored):
    torch.manual_seed(0)
    args = (torch.zeros(3, 8, device=xla_device()), torch.randn(100, 3, 5, device=xla_device()))
    saved = _forward_saved_shapes(ScanRnn().to(xla_device()), args, remat)
    hidden_states = [shape for shape in saved if shape[-2:] == (3, 8) and len(shape) == 3]
    assert hidden_states == [(stored, 3, 8)], saved


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
    _assert_grads_close(_grads(model), _grads(reference))
