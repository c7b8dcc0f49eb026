"""Shared by the training tests: models with loops, and one training step compiled with
xla_loop on the device against the same model as plain Python loops on CPU."""
from __future__ import annotations

import copy

import torch
from loop_testing import xla_device
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

import xla_loop_backend


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's gradient; none (a parameter the loss did not use) counts as zeros."""
    return {
        name: torch.zeros(p.shape) if p.grad is None else p.grad.detach().cpu().clone()
        for name, p in module.named_parameters()
    }


def assert_grads_close(actual: dict, expected: dict, tol: float = 1e-4) -> None:
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

    def run(self, n: torch.Tensor, x: torch.Tensor, python: bool) -> torch.Tensor:
        if python:
            for _ in range(int(n)):
                x = self.step(x)
            return x
        start = torch.zeros((), dtype=torch.int64, device=x.device)
        return while_loop(lambda i, x: i < n, lambda i, x: (i + 1, self.step(x)), (start, x))[1]

    def forward(self, n: torch.Tensor, x: torch.Tensor, python: bool = False) -> torch.Tensor:
        return (self.run(n, x, python) ** 2).sum()


class StepperWithHead(ResidualStepper):
    """The stepper, then a linear head: the loss depends on parameters at any trip count."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(6, 2)

    def forward(self, n: torch.Tensor, x: torch.Tensor, python: bool = False) -> torch.Tensor:
        return self.head(self.run(n, x, python)).pow(2).sum()


def train_step_against_python(model, make_args, max_iterations=None, tol=1e-4, remat=False):
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
    assert_grads_close(grads(device_model), grads(reference), tol)
    return reference, device_model, compiled


def train_against_python_loops(model: type[torch.nn.Module], args: tuple, tol: float = 1e-4, **compile_options) -> None:
    """One forward/backward of `model(*args, L=...)`: compiled with xla_loop on the device
    (`L` = the xla_loop loops) against the plain Python loops on CPU (`L` = reference_loops);
    the loss and every parameter's gradient must match."""
    import reference_loops
    from training_programs import xla_loops

    xla_device()  # (the XLA runtime starts before the first backward; see loop_testing)
    torch.manual_seed(0)
    reference = model()
    device_model = copy.deepcopy(reference).to(xla_device())
    loss = reference(*args, L=reference_loops)
    loss.backward()
    compiled = xla_loop_backend.compile(device_model, fullgraph=True, **compile_options)
    device_loss = compiled(*[a.to(xla_device()) for a in args], L=xla_loops)
    device_loss.backward()
    torch.testing.assert_close(device_loss.detach().cpu(), loss.detach(), rtol=tol, atol=tol)
    assert_grads_close(grads(device_model), grads(reference), tol)
