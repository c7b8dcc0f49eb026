"""passes/checkpointed_while.py: the trained while_loop's autograd in fixed memory. Eagerly
on CPU (the op itself) against the same loop as a Python loop, at trip counts that fit in
the checkpoints and that outrun them many times; compiled on the XLA device in
test_training.py and test_call.py."""
from __future__ import annotations

import pytest
import torch
from loop_testing import xla_device

from xla_loop_backend.passes.checkpointed_while import CheckpointedWhile, CheckpointSpec, LoopFunctions


def _python_loop(n, x, acc, w, b):
    for _ in range(n):
        x, acc = torch.tanh(x @ w + b), acc + x.sum()
    return x, acc


def _loop():
    """Carries (i, x, acc), captured (n, w, b)."""
    return LoopFunctions(
        cond_fn=lambda i, x, acc, n, w, b: i < n,
        body_fn=lambda i, x, acc, n, w, b: (i + 1, torch.tanh(x @ w + b), acc + x.sum()),
        num_carries=3,
        body_reports=False,
    )


def _checkpointed(n, x, acc, w, b, checkpoints=8, max_iterations=None):
    spec = CheckpointSpec(_loop(), checkpoints, max_iterations)
    i, x, acc, report = CheckpointedWhile.apply(spec, torch.zeros((), dtype=torch.int64), x, acc, torch.tensor(n), w, b)
    return x, acc, i, report


def _leaves():
    torch.manual_seed(0)
    x = torch.randn(2, 3, requires_grad=True)
    acc = torch.zeros(())  # starts without grad: its gradient still flows into w, b, x
    w = (torch.randn(3, 3) * 0.5).requires_grad_()
    b = torch.randn(3, requires_grad=True)
    return x, acc, w, b


def _gradients(run):
    x, acc, w, b = _leaves()
    out_x, out_acc = run(x, acc, w, b)[:2]
    (out_x.pow(2).sum() + out_acc).backward()
    return [t.grad for t in (x, w, b)], (out_x.detach(), out_acc.detach())


def _assert_same_gradients(n, **spec):
    xla_device()  # (the XLA runtime starts before the first backward; see loop_testing)
    expected, expected_out = _gradients(lambda x, acc, w, b: _python_loop(n, x, acc, w, b))
    got, got_out = _gradients(lambda x, acc, w, b: _checkpointed(n, x, acc, w, b, **spec))
    torch.testing.assert_close(got_out, expected_out)
    for g, e in zip(got, expected):
        g = g if g is not None else torch.zeros_like(e)
        torch.testing.assert_close(g, e if e is not None else torch.zeros_like(g), rtol=1e-4, atol=1e-5, msg=lambda m: f"n={n} {spec}: {m}")


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 20, 65, 300])
@pytest.mark.parametrize("checkpoints", [8, 3, 1])
def test_gradients_equal_the_python_loop(n, checkpoints):
    _assert_same_gradients(n, checkpoints=checkpoints)


def test_gradients_of_a_loop_600_times_longer_than_its_checkpoints():
    _assert_same_gradients(5000, checkpoints=8)


def _positions_after_forward(n, checkpoints):
    x, acc, w, b = _leaves()
    out, *_ = _checkpointed(n, x, acc, w, b, checkpoints=checkpoints)
    saved = out.grad_fn.saved_tensors  # (n, positions, *checkpoints, *captured)
    assert int(saved[0]) == n
    positions = saved[1]
    assert positions.shape == (checkpoints + 1,) and int(positions[-1]) == -1  # (the row the others write to)
    return sorted(int(p) for p in positions if p >= 0)


@pytest.mark.parametrize("n", [0, 1, 7, 8])
def test_a_loop_that_fits_stores_every_iteration(n):
    assert _positions_after_forward(n, 8) == list(range(n))


@pytest.mark.parametrize("n", [9, 100, 5000])
def test_a_longer_loop_keeps_half_the_checkpoints_evenly_spread(n):
    positions = _positions_after_forward(n, 8)
    stride = positions[1] - positions[0]
    assert positions == list(range(0, positions[-1] + 1, stride)) and 2 <= len(positions) <= 4
    assert n - positions[-1] <= 2 * stride  # (the last one near the end)


def test_trip_count_and_report():
    x, acc, w, b = _leaves()
    *_, i, report = _checkpointed(12, x, acc, w, b)  # past the checkpoints: no report needed
    assert int(i) == 12 and int(report) == 0
    *_, i, report = _checkpointed(12, x, acc, w, b, max_iterations=8)  # stopped by the bound
    assert int(i) == 8 and int(report) == 9
    *_, i, report = _checkpointed(8, x, acc, w, b, max_iterations=8)  # done at the bound
    assert int(i) == 8 and int(report) == 0


def test_captured_tensors_that_do_not_require_grad_get_none():
    x, acc, w, b = _leaves()
    w = w.detach()
    out, _, _, _ = _checkpointed(3, x, acc, w, b)
    out.sum().backward()
    assert w.grad is None and b.grad is not None and x.grad is not None


# Compiled on the XLA device: a module with a parameter, a buffer and a captured tensor, its
# trained while_loop at top level, inside a scan and inside a while_loop, 8 checkpoints;
# against the same module as Python loops on CPU.
class _Stepper(torch.nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("scale", torch.tensor(0.5))

    def inner(self, L, n, x, c):
        def body(i, x):
            return i + 1, 0.9 * x + 0.1 * torch.tanh(self.lin(x) * self.scale + c)  # (contracting: float32 error stays small at 5000)

        return L.while_loop(lambda i, x: i < n, body, (torch.zeros((), dtype=torch.int64), x))[1]

    def forward(self, n, x, c, xs, L):
        if self.where == "top":
            return self.inner(L, n, x, c)
        if self.where == "scan":
            h, ys = L.scan(lambda h, xt: (self.inner(L, n, h + xt, c), h.sum()), x, xs)
            return h * ys.sum()
        j0 = torch.zeros((), dtype=torch.int64)
        return L.while_loop(lambda j, x: j < 2, lambda j, x: (j + 1, 0.9 * self.inner(L, n, x, c)), (j0, x))[1]


@pytest.mark.parametrize("where", ["top", "scan", "while_loop"])
def test_compiled_gradients_at_any_trip_count_with_nothing_read_back(where):
    import copy

    import reference_loops
    from loop_testing import MetricsDelta
    from training_programs import xla_loops
    from training_testing import assert_grads_close, grads

    import xla_loop_backend

    dev = xla_device()
    torch.manual_seed(0)
    reference = _Stepper(where)
    model = copy.deepcopy(reference).to(dev)
    compiled = xla_loop_backend.compile(model, fullgraph=True, checkpoints=8)
    x, c, xs = torch.randn(2, 4), torch.randn(4), torch.randn(3, 2, 4)
    for n in (7, 0, 1, 300, 5000):
        reference.zero_grad()
        model.zero_grad()
        x_ref, c_ref = x.clone().requires_grad_(), c.clone().requires_grad_()
        loss = (reference(torch.tensor(n), x_ref, c_ref, xs, L=reference_loops) ** 2).sum()
        loss.backward()
        x_dev, c_dev = x.to(dev).requires_grad_(), c.to(dev).requires_grad_()
        with MetricsDelta() as delta:
            out = compiled(torch.tensor(n, device=dev), x_dev, c_dev, xs.to(dev), L=xla_loops)
            (out**2).sum().backward()
        assert delta.host_syncs == 0, (n, vars(delta))
        if n > 7:  # (longer than any call before: the same programs run it, no compile)
            assert delta.compiles == 0, (n, vars(delta))
        assert_grads_close(grads(model), grads(reference))
        for got, expected in ((x_dev.grad, x_ref.grad), (c_dev.grad, c_ref.grad)):
            expected = torch.zeros_like(got.cpu()) if expected is None else expected
            torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"n={n}: {m}")
