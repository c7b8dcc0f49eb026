"""scan (and map) lowered by xla_loop (xla_loop_backend/lowering/scan.py): results against
eager PyTorch on CPU, and the structure that makes a scan one rolled XLA While (one `while`
in the HLO, dynamic slices, a bounded number of traces, no host transfers).

These use torch's own `scan`/`map` (the higher-order ops), so they test the lowering rather
than xla_loop_backend's checking wrappers (tests/test_api.py)."""
from __future__ import annotations

import re

import pytest
import torch
import torch_xla
from loop_testing import Closure, MetricsDelta, check_against_eager, xla_device
from torch._higher_order_ops.map import map as torch_map
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

from xla_loop_backend import LoopLoweringError, metrics
from xla_loop_backend.inspect import lowered_hlo
from xla_loop_backend.lowering.scan import lower_scan


def cumulative(init, xs):
    def step(carry, x):
        new = carry + x
        return new, new.clone()

    return scan(step, init, xs)


# ---- results ------------------------------------------------------------------------------


def test_cumulative_sum():
    check_against_eager(cumulative, torch.zeros(3), torch.randn(6, 3))


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("reverse", [False, True])
def test_dim_and_reverse(dim, reverse):
    def f(init, xs):
        def step(carry, x):
            new = carry * 0.9 + x
            return new, (new.sum(), x * 2)

        return scan(step, init, xs, dim=dim, reverse=reverse)

    xs = torch.randn(4, 5, 6)
    init = torch.zeros(xs.movedim(dim, 0).shape[1:])
    check_against_eager(f, init, xs, rtol=1e-5, atol=1e-5)


def test_pytree_init_xs_and_ys():
    def f(init, xs):
        def step(carry, x):
            h = torch.tanh(carry["h"] + x["a"] * x["b"][0])
            count = carry["count"] + 1
            return {"h": h, "count": count}, [h.mean(), (count.clone(), x["b"].flip(0))]

        return scan(step, init, xs)

    init = {"h": torch.zeros(2, 3), "count": torch.zeros((), dtype=torch.int64)}
    xs = {"a": torch.randn(7, 2, 3), "b": torch.randn(7, 4)}
    check_against_eager(f, init, xs, rtol=1e-5, atol=1e-5)


def test_closures_and_module_parameters():
    def fn(m, init, xs):
        return scan(lambda c, x: (torch.tanh(c @ m.w + x + m.b), c.sum(-1)), init, xs)

    torch.manual_seed(0)
    model = Closure(fn, w=torch.randn(4, 4) * 0.3, b=torch.randn(4))
    check_against_eager(model, torch.zeros(2, 4), torch.randn(9, 2, 4), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_rnn_cell_module_over_a_sequence():
    class Rnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = torch.nn.GRUCell(5, 8)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, h, xs):
            return scan(lambda h, x: (self.cell(x, h), self.head(h)), h, xs)

    torch.manual_seed(0)
    check_against_eager(Rnn(), torch.zeros(3, 8), torch.randn(20, 3, 5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.int64, torch.bool])
def test_dtypes(dtype):
    def f(init, xs):
        def step(carry, x):
            new = carry | x if dtype == torch.bool else carry + x
            return new, new.clone()

        return scan(step, init, xs)

    xs = torch.randint(0, 2, (6, 3)).to(dtype)
    check_against_eager(f, torch.zeros(3, dtype=dtype), xs)


def test_carry_and_ys_with_their_own_shapes():
    def f(init, xs):
        def step(carry, x):
            outer = torch.outer(x, x)
            return carry + outer.sum(0), (outer, x.max())

        return scan(step, init, xs)

    check_against_eager(f, torch.zeros(4), torch.randn(5, 4), rtol=1e-5, atol=1e-5)


def test_map():
    def f(xs, y):
        return torch_map(lambda x, y: {"prod": x["a"] * y, "sum": x["b"].sum() + y}, xs, y)

    check_against_eager(f, {"a": torch.randn(6, 3), "b": torch.randn(6, 2)}, torch.randn(3))


def test_dynamic_shapes_different_lengths():
    compiled = torch.compile(cumulative, backend="xla_loop", dynamic=True, fullgraph=True)
    dev = xla_device()
    for length in (5, 9):
        xs = torch.randn(length, 3)
        carry, ys = compiled(torch.zeros(3, device=dev), xs.to(dev))
        torch.testing.assert_close(ys.cpu(), torch.cumsum(xs, 0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(carry.cpu(), xs.sum(0), rtol=1e-5, atol=1e-5)


# ---- nesting and code around the loop ------------------------------------------------------


def test_scan_inside_while_loop_and_while_loop_inside_scan():
    def f(n, init, xs):
        def outer_body(i, h):
            carry, _ = scan(lambda c, x: (c * 0.5 + x, c.clone()), h, xs)
            return i - 1, carry

        _, h = while_loop(lambda i, h: i > 0, outer_body, (n, init))

        def repeat(c, x):
            _, c2 = while_loop(lambda k, c: k > 0, lambda k, c: (k - 1, c + x), (n.clone(), c))
            return c2, c2.sum()

        return scan(repeat, h, xs)

    dev = xla_device()
    args = (torch.tensor(3), torch.zeros(4), torch.randn(5, 4))
    check_against_eager(f, *args, rtol=1e-5, atol=1e-5)
    (hlo,) = lowered_hlo(f, *[a.to(dev) for a in args], fullgraph=True)
    # while(scan) and scan(while): four loops, each one XLA While.
    assert len(re.findall(r"\bwhile\(", hlo)) == 4


def test_scan_of_scan():
    def f(init, xs):
        def row(c, x_row):
            inner, _ = scan(lambda a, x: (a + x, a.clone()), c, x_row)
            return inner, inner.sum()

        return scan(row, init, xs)

    check_against_eager(f, torch.zeros(()), torch.randn(4, 6), rtol=1e-5, atol=1e-5)


def test_code_before_and_after_is_one_executable():
    def f(init, xs):
        xs = torch.sin(xs) * 2
        carry, ys = cumulative(init + 1, xs)
        return carry.sum() + ys.mean()

    dev = xla_device()
    args = (torch.zeros(3), torch.randn(8, 3))
    check_against_eager(f, *args, rtol=1e-5, atol=1e-5)
    assert len(lowered_hlo(f, *[a.to(dev) for a in args], fullgraph=True)) == 1


def test_random_ops_draw_fresh_numbers_every_step():
    def f(init, xs):
        return scan(lambda c, x: (c + x, torch.rand_like(c)), init, xs)

    compiled = torch.compile(f, backend="xla_loop", fullgraph=True)
    dev = xla_device()
    _, first = compiled(torch.zeros(4, device=dev), torch.ones(6, 4, device=dev))
    _, second = compiled(torch.zeros(4, device=dev), torch.ones(6, 4, device=dev))
    first, second = first.cpu(), second.cpu()
    assert ((first >= 0) & (first < 1)).all()
    assert len({tuple(row.tolist()) for row in first}) == 6, "steps repeat their random numbers"
    assert not torch.equal(first, second), "calls repeat their random numbers"


# ---- rolled, not unrolled: HLO, traces, compiles, host syncs ---------------------------------


def test_one_while_with_dynamic_slices_and_hlo_independent_of_length():
    dev = xla_device()
    texts = {}
    for length in (10, 3000):
        (texts[length],) = lowered_hlo(cumulative, torch.zeros(3, device=dev), torch.ones(length, 3, device=dev), fullgraph=True)
    hlo = texts[3000]
    assert len(re.findall(r"\bwhile\(", hlo)) == 1
    assert "dynamic-slice(" in hlo and "dynamic-update-slice(" in hlo
    # Only the trip count and buffer sizes change with the length: the same program.
    normalize = lambda text: re.sub(r"\b(10|3000)\b", "N", text)  # noqa: E731
    assert normalize(texts[10]) == normalize(texts[3000])


def test_long_scan_traces_its_body_a_bounded_number_of_times_and_never_syncs():
    dev = xla_device()
    compiled = torch.compile(cumulative, backend="xla_loop", fullgraph=True)
    xs = torch.randn(3000, 5, device=dev)
    init = torch.zeros(5, device=dev)
    torch_xla.sync()
    traces = metrics.counter_value(metrics.SUBGRAPHS_TRACED)
    carry, ys = compiled(init, xs)
    # The graph is traced once while compiling (executable.py): the body is staged once,
    # whatever the length.
    assert metrics.counter_value(metrics.SUBGRAPHS_TRACED) - traces == 1
    torch.testing.assert_close(ys.cpu(), torch.cumsum(xs.cpu(), 0), rtol=1e-4, atol=1e-3)

    xs2 = torch.randn(3000, 5, device=dev)
    torch_xla.sync()
    traces = metrics.counter_value(metrics.SUBGRAPHS_TRACED)
    with MetricsDelta() as delta:
        carry, ys = compiled(init, xs2)
        torch_xla.sync()
    assert delta.compiles == 0
    assert delta.host_syncs == 0 and delta.transfers_from_device == 0
    assert metrics.counter_value(metrics.SUBGRAPHS_TRACED) == traces


# ---- the rule's own checks (a backstop behind Dynamo's and the wrapper's) ----------------------


def _identity_combine() -> torch.fx.GraphModule:
    def combine(c, x):
        return [c + x, c * 1]

    return torch.fx.symbolic_trace(combine)


def test_rule_rejects_xs_of_different_lengths():
    dev = xla_device()
    with pytest.raises(LoopLoweringError, match=r"scan: every xs must have the same length .* xs\[0\] has 4 \(float32\[4, 3\]\), xs\[1\] has 5"):
        lower_scan(None, _identity_combine(), [torch.zeros(3, device=dev)], [torch.ones(4, 3, device=dev), torch.ones(5, 3, device=dev)], ())


def test_rule_rejects_a_combine_that_changes_the_carry():
    dev = xla_device()
    with pytest.raises(LoopLoweringError, match=r"scan: combine_fn changes carry 0: expected float32\[3\] \(as passed in\), found float32\[2, 3\]"):
        lower_scan(None, _identity_combine(), [torch.zeros(3, device=dev)], [torch.ones(4, 2, 3, device=dev)], ())
    check_against_eager(cumulative, torch.zeros(3), torch.randn(4, 3))
