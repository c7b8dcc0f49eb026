"""passes/stacked_while.py: the trained while_loop's autograd, its real trip count stored on
the device. Eagerly on CPU (the op itself) and compiled on the XLA device, against the
same loop as a Python loop."""
from __future__ import annotations

import pytest
import torch
from loop_testing import xla_device
from training_testing import StepperWithHead, train_step_against_python

from xla_loop_backend.passes.stacked_while import LoopFunctions, StackedWhile, StackSpec, segment_length


def _python_loop(n, x, acc, w, b):
    for _ in range(n):
        x, acc = torch.tanh(x @ w + b), acc + x.sum()
    return x, acc


def _stacked(n, x, acc, w, b, capacity=8, every=1, max_iterations=None):
    """The same loop through StackedWhile: carries (i, x, acc), captured (n, w, b)."""
    loop = LoopFunctions(
        cond_fn=lambda i, x, acc, n, w, b: i < n,
        body_fn=lambda i, x, acc, n, w, b: (i + 1, torch.tanh(x @ w + b), acc + x.sum()),
        num_carries=3,
        body_reports=False,
    )
    i0 = torch.zeros((), dtype=torch.int64)
    i, x, acc, report = StackedWhile.apply(StackSpec(loop, capacity, max_iterations, every), i0, x, acc, torch.tensor(n), w, b)
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


@pytest.mark.parametrize("n", [0, 1, 5, 8])
@pytest.mark.parametrize("every", [1, 3])
def test_gradients_equal_the_python_loop(n, every):
    xla_device()  # (the XLA runtime starts before the first backward; see loop_testing)
    expected, expected_out = _gradients(lambda x, acc, w, b: _python_loop(n, x, acc, w, b))
    got, got_out = _gradients(lambda x, acc, w, b: _stacked(n, x, acc, w, b, capacity=8, every=every))
    torch.testing.assert_close(got_out, expected_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(e), e if e is not None else torch.zeros_like(g))


def test_trip_count_and_report():
    x, acc, w, b = _leaves()
    *_, i, report = _stacked(5, x, acc, w, b, capacity=8)
    assert int(i) == 5 and int(report) == 5
    *_, i, report = _stacked(12, x, acc, w, b, capacity=8)  # past the capacity: reports what it needed
    assert int(i) == 12 and int(report) == 12
    *_, i, report = _stacked(12, x, acc, w, b, capacity=8, max_iterations=8)  # stopped by the bound
    assert int(i) == 8 and int(report) == 9


def test_captured_tensors_that_do_not_require_grad_get_none():
    x, acc, w, b = _leaves()
    w = w.detach()
    out, _, _, _ = _stacked(3, x, acc, w, b)
    out.sum().backward()
    assert w.grad is None and b.grad is not None and x.grad is not None


@pytest.mark.parametrize("capacity, every, rows", [(64, 1, 65), (64, 8, 9), (10, 3, 5), (1, 1, 2)])
def test_stored_rows(capacity, every, rows):
    # One row per stored iteration, and one more the others write to.
    assert StackSpec(None, capacity, None, every).rows == rows


def test_segment_length():
    assert [segment_length(t, True) for t in (1, 4, 10, 64, 65)] == [1, 2, 4, 8, 9]
    assert segment_length(100, 7) == 7


def test_compiled_on_the_device_with_remat_matches_the_python_loop():
    for n in (7, 13):
        train_step_against_python(StepperWithHead, lambda: (torch.tensor(n), torch.randn(2, 6)), remat=4)
