"""Training through a loop: a residual stepper run a data-dependent number of times with
`while_loop`, trained with Adam, compiled with xla_loop (`max_iterations` bounds the loop).

    x <- x + h * tanh(W2 tanh(W1 x + b1) + b2)      repeated n times, n a tensor per batch

The loop runs on the device in the forward and in the backward pass. Batches with
different n reuse the same executables. The first step's gradients are checked against
the plain Python loop on CPU.
"""
import copy

import torch
import torch_xla
import torch_xla.debug.metrics as met
from _measure import counts, report_match, to_xla

import xla_loop_backend

DIM, HIDDEN, BATCH, MAX_STEPS, TRAIN_STEPS = 4, 32, 64, 16, 60


class ResidualStepper(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, DIM), torch.nn.Tanh())

    def forward(self, n: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = 1.0 / MAX_STEPS
        start = torch.zeros((), dtype=torch.int64, device=x.device)
        _, x = xla_loop_backend.while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x + h * self.f(x)), (start, x))
        return x

    def python_loop(self, n: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(n)):
            x = x + (1.0 / MAX_STEPS) * self.f(x)
        return x


def target(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """What to learn: rotate x's first two coordinates by an angle growing with n."""
    angle = 0.1 * n.float()
    c, s = torch.cos(angle), torch.sin(angle)
    out = x.clone()
    out[:, 0], out[:, 1] = c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1]
    return out


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    n = torch.randint(4, MAX_STEPS + 1, (), generator=g)
    x = torch.randn(BATCH, DIM, generator=g)
    return n, x, target(x, n)


def main() -> None:
    torch.manual_seed(0)
    reference = ResidualStepper()
    model = copy.deepcopy(reference).to(torch_xla.device())
    compiled = xla_loop_backend.compile(model, fullgraph=True, max_iterations=MAX_STEPS)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    print(f"training a residual stepper through while_loop (n = 4..{MAX_STEPS} steps per batch), Adam, {TRAIN_STEPS} steps")

    losses, compiles_per_step = [], []
    for step in range(TRAIN_STEPS):
        n, x, y = batch(step)
        n, x, y = to_xla((n, x, y))
        torch_xla.sync()
        met.clear_all()
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(compiled(n, x), y)
        loss.backward()
        if step == 0:
            cpu_n, cpu_x, cpu_y = batch(0)
            torch.nn.functional.mse_loss(reference.python_loop(cpu_n, cpu_x), cpu_y).backward()
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                report_match(f"step 0 gradient of {name}", p.grad, q.grad, rtol=1e-4, atol=1e-5, against="Python loop on CPU")
        optimizer.step()
        torch_xla.sync()
        compiles, _ = counts()
        compiles_per_step.append(compiles)
        losses.append(loss.item())
    print(f"  loss: {' -> '.join(f'{losses[i]:.4f}' for i in (0, 15, 30, 45, TRAIN_STEPS - 1))}")
    print(f"  XLA compiles: step 0: {compiles_per_step[0]} (forward, backward, optimizer); step 1: {compiles_per_step[1]} "
          f"(the optimizer with its state); steps 2-{TRAIN_STEPS - 1}, n varying: {sum(compiles_per_step[2:])}")
    if not losses[-1] < 0.5 * losses[0]:
        raise SystemExit("the loss did not decrease")
    print("  the loss decreased")


if __name__ == "__main__":
    main()
