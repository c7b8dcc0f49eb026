"""torch_xla's test/test_while_loop.py cases, run through backend="xla_loop" (upstream runs
them with torch_xla.experimental.fori_loop imported, which this project must not use)."""
from __future__ import annotations

import torch
from loop_testing import check_against_eager

from xla_loop_backend import while_loop


def _python_while(cond_fn, body_fn, operands):
    while cond_fn(*operands):
        operands = body_fn(*operands)
    return operands


def test_while_loop_addition():
    def cond_fn(iteri, x):
        return iteri > 0

    def body_fn(iteri, x):
        return iteri - 1, torch.add(x, 1)

    def f(iteri, init_val):
        return while_loop(cond_fn, body_fn, (iteri, init_val))

    args = (torch.tensor(10), torch.tensor(3, dtype=torch.int32))
    actual, _ = check_against_eager(f, *args)
    assert torch.equal(actual[1], _python_while(cond_fn, body_fn, args)[1])


def test_while_loop_addition_nested():
    def cond_fn(iteri, x):
        return iteri > 0

    def body_fn(iteri, x):
        return iteri - 1, torch.add(torch.add(x, 1), 1)

    def f(iteri, init_val):
        return while_loop(cond_fn, body_fn, (iteri, init_val))

    args = (torch.tensor(10), torch.tensor(2, dtype=torch.int32))
    actual, _ = check_against_eager(f, *args)
    assert torch.equal(actual[1], _python_while(cond_fn, body_fn, args)[1])


@torch.no_grad()
def test_while_loop_simple_linear_inside_loop():
    class SimpleLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, iteri, x):
            return while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, self.linear(x)), (iteri, x))

        def forward_without_while_loop_op(self, iteri, x):
            while iteri > 0:
                x = self.linear(x)
                iteri -= 1
            return iteri, x

    torch.manual_seed(0)
    model = SimpleLinear()
    x, iteri = torch.randn(2, 2), torch.tensor(10, dtype=torch.int32)
    actual, _ = check_against_eager(model, iteri, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual[1], model.forward_without_while_loop_op(iteri, x)[1], rtol=1e-5, atol=1e-5)


def test_fori_loop_addition_upstream_skips():
    # Upstream skips its fori_loop test ("unstable result"); the same loop as a while_loop.
    def f(lower, upper, init_val):
        return while_loop(lambda i, x: i < upper, lambda i, x: (i + 1, torch.add(x, 1)), (lower, init_val))

    actual, _ = check_against_eager(f, torch.tensor(0), torch.tensor(50), torch.tensor(1, dtype=torch.int32))
    assert actual[1].item() == 51
