"""xla_loop_backend.while_loop (xla_loop_backend/api.py): bad loops get errors naming the
loop, the carry, and expected vs found; the process keeps working afterwards."""
from __future__ import annotations

import pytest
import torch
from loop_testing import check_against_eager, xla_device

from xla_loop_backend import LoopLoweringError, while_loop


def _loop_with_carry(bad):
    def f(n, x):
        def body(i, state):
            return i - 1, state

        return while_loop(lambda i, s: i > 0, body, (n, {"x": x, "extra": [bad]}))

    return f


@pytest.mark.parametrize("bad, found", [(1.5, "float"), ("text", "str"), (None, "NoneType"), (True, "bool")])
def test_unsupported_carry_type_named_by_path(bad, found):
    f = _loop_with_carry(bad)
    dev = xla_device()
    with pytest.raises(LoopLoweringError, match=rf"while_loop 'body': carry carried_inputs\[1\]\['extra'\]\[0\] must be a tensor or a Python int, found {found}"):
        f(torch.tensor(2, device=dev), torch.ones(2, device=dev))
    compiled = torch.compile(f, backend="xla_loop", fullgraph=True)
    with pytest.raises(Exception, match=rf"carried_inputs\[1\]\['extra'\]\[0\] must be a tensor or a Python int, found {found}"):
        compiled(torch.tensor(2, device=dev), torch.ones(2, device=dev))


def test_carried_inputs_must_be_a_sequence():
    with pytest.raises(LoopLoweringError, match=r"while_loop 'decay': carried_inputs must be a tuple or list, found float32\[2\]"):
        while_loop(lambda x: x.sum() > 0, lambda x: x - 1, torch.ones(2), name="decay")


@pytest.mark.parametrize(
    "body, message",
    [
        (lambda i, x: (i - 1, torch.cat([x, x])), r"pair\[1\] differ in 'shape: torch.Size\(\[4\]\) vs torch.Size\(\[2\]\)"),
        (lambda i, x: (i - 1, x.double()), r"pair\[1\] differ in 'dtype: torch.float64 vs torch.float32"),
        (lambda i, x: (i - 1,), "same number of outputs"),
    ],
)
def test_body_changing_a_carry_is_rejected_then_process_still_works(body, message):
    dev = xla_device()

    def bad(n, x):
        return while_loop(lambda i, x: i > 0, body, (n, x))

    with pytest.raises(Exception, match=message):
        torch.compile(bad, backend="xla_loop", fullgraph=True)(torch.tensor(3, device=dev), torch.ones(2, device=dev))
    # No poisoned state: another loop compiles and runs correctly in the same process.
    good = lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x * 3), (n, x))  # noqa: E731
    check_against_eager(good, torch.tensor(3), torch.ones(2))


def test_cond_that_is_not_a_scalar_bool_is_rejected():
    dev = xla_device()

    def bad(n, x):
        return while_loop(lambda i, x: x > 0, lambda i, x: (i - 1, x - 1), (n, x))

    with pytest.raises(Exception, match=r"Expected cond_fn to return a scalar tensor or a bool but got torch.Size\(\[2\]\)"):
        torch.compile(bad, backend="xla_loop", fullgraph=True)(torch.tensor(3, device=dev), torch.ones(2, device=dev))
    check_against_eager(
        lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x - 1), (n, x)), torch.tensor(3), torch.ones(2)
    )
