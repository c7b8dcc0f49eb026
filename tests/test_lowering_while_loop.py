"""while_loop lowered by xla_loop, compared against eager PyTorch on CPU, with the metrics
and HLO structure that make it one XLA While (xla_loop_backend/lowering/while_loop.py)."""
from __future__ import annotations

import re

import pytest
import torch
import torch_xla
from loop_testing import Closure, MetricsDelta, check_against_eager, xla_device

import xla_loop_backend
from xla_loop_backend import while_loop
from xla_loop_backend.inspect import lowered_hlo
from xla_loop_backend import metrics


def countdown(n, x):
    return while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, torch.add(x, 1)), (n, x))


# ---- the seed example and counters --------------------------------------------------------


def test_seed_example():
    actual, _ = check_against_eager(countdown, torch.tensor(10), torch.tensor(3))
    assert actual[1].item() == 13


def test_counter_last_and_first():
    def first(x, n):
        return while_loop(lambda x, i: i < n, lambda x, i: (x * 2, i + 1), (x, torch.tensor(0)))

    check_against_eager(first, torch.ones(3), torch.tensor(5))


def test_no_counter_convergence_loop():
    # Newton's method for sqrt(a): the trip count depends on the data.
    def newton(a):
        def cond(x, prev):
            return (x - prev).abs().max() > 1e-6

        def body(x, prev):
            return 0.5 * (x + a / x), x.clone()  # a carry returned as is must be cloned

        return while_loop(cond, body, (a.clone(), torch.zeros_like(a)))

    actual, _ = check_against_eager(newton, torch.tensor([2.0, 9.0, 1e4]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual[0], torch.tensor([2.0, 9.0, 1e4]).sqrt())


def test_cond_reads_data_carry():
    def f(x):
        s = torch.zeros((), device=x.device)
        return while_loop(lambda x, s: s < 50.0, lambda x, s: (x * 1.5, s + x.sum()), (x, s))

    check_against_eager(f, torch.tensor([1.0, 2.0]))


def test_python_scalars_in_body():
    def f(n, x):
        return while_loop(lambda i, x: i > 0, lambda i, x: (i - 2, x * 2.5 - 1), (n, x))

    check_against_eager(f, torch.tensor(9), torch.randn(4))


# ---- closures, modules, pytrees, ints ------------------------------------------------------


def test_captured_tensors():
    def fn(m, n, x):
        return while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x @ m.w + m.b), (n, x))

    torch.manual_seed(0)
    model = Closure(fn, w=torch.randn(4, 4) * 0.3, b=torch.randn(4))
    check_against_eager(model, torch.tensor(6), torch.randn(2, 4), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_module_parameters_and_buffers():
    class Stepper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.register_buffer("shift", torch.linspace(-1, 1, 8))

        def forward(self, n, x):
            return while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, torch.tanh(self.lin(x)) + self.shift), (n, x))

    torch.manual_seed(0)
    check_against_eager(Stepper(), torch.tensor(7), torch.randn(3, 8), rtol=1e-5, atol=1e-5)


def test_pytree_carries():
    def f(state):
        def cond(s):
            return s["i"] < 4

        def body(s):
            a, (b,) = s["xs"]
            return {"i": s["i"] + 1, "xs": [a * 2, (b + a.sum(),)]}

        return while_loop(cond, body, (state,))

    state = {"i": torch.tensor(0), "xs": [torch.ones(2), (torch.zeros(3, dtype=torch.float64),)]}
    check_against_eager(f, state)


def test_python_int_carry_comes_back_as_int():
    def f(x):
        i, x = while_loop(lambda i, x: i < 5, lambda i, x: (i + 1, x * 0.5), (0, x))
        return i, x * i, i * 3 + 1

    actual, _ = check_against_eager(f, torch.randn(3, 3))
    assert actual[0] == 5 and actual[2] == 16


def test_python_int_carry_is_read_back_once():
    f = torch.compile(lambda x: while_loop(lambda i, x: i < 5, lambda i, x: (i + 1, x + 1), (0, x)), backend="xla_loop")
    x = torch.zeros(2, device=xla_device())
    f(x)
    with MetricsDelta() as delta:
        i, _ = f(x)
    assert i == 5
    assert delta.compiles == 0
    assert delta.host_syncs == 1  # the int result, once, after the loop


# ---- structure ------------------------------------------------------------------------------


def test_nested_while_loops_three_deep():
    def f(n, x):
        def mid(j, y):
            _, y = while_loop(lambda k, z: k > 0, lambda k, z: (k - 1, z + 1), (j.clone(), y))
            return j - 1, y * 2

        def outer(i, x):
            _, x = while_loop(lambda j, y: j > 0, mid, (i.clone(), x))
            return i - 1, x

        return while_loop(lambda i, x: i > 0, outer, (n, x))

    check_against_eager(f, torch.tensor(3), torch.ones(2))
    hlo = lowered_hlo(f, torch.tensor(3, device=xla_device()), torch.ones(2, device=xla_device()), fullgraph=True)
    assert [len(re.findall(r"\bwhile\(", text)) for text in hlo] == [3]


@pytest.mark.parametrize("n", [0, -3])
def test_zero_trip(n):
    check_against_eager(countdown, torch.tensor(n), torch.ones(2))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int32, torch.int64, torch.bool]
)
def test_carry_dtypes(dtype):
    def f(x, n):
        def body(i, x):
            y = x.logical_not() if x.dtype == torch.bool else x * 2 + 1
            return i - 1, y

        return while_loop(lambda i, x: i > 0, body, (n, x))

    x = torch.tensor([1, 0, 3]).to(dtype)
    check_against_eager(f, x, torch.tensor(3, dtype=torch.int32))


def test_mixed_dtypes_in_one_loop():
    def f(a, b, c, d, e):
        def body(i, a, b, c, d, e):
            return i + 1, a * 2, b + i, c.logical_not(), d + 0.5, (e * 3).to(torch.int32)

        return while_loop(lambda i, *rest: i < 3, body, (torch.tensor(0, dtype=torch.int32), a, b, c, d, e))

    check_against_eager(
        f,
        torch.ones(2, dtype=torch.float64),
        torch.zeros(2, dtype=torch.int64),
        torch.tensor([True, False]),
        torch.ones(2, dtype=torch.bfloat16),
        torch.ones(2, dtype=torch.int32),
    )


def test_in_place_ops_in_body():
    def f(n, x):
        def body(i, x):
            y = x.clone()
            y.add_(1)
            y.mul_(2)
            y[0] = -y[0]
            return i - 1, y

        return while_loop(lambda i, x: i > 0, body, (n, x))

    check_against_eager(f, torch.tensor(3), torch.ones(3))


def test_many_loops_in_one_graph():
    def f(n, x):
        _, x = while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x * 2), (n, x))
        y = x.sum()
        _, y = while_loop(lambda i, y: i < 4, lambda i, y: (i + 1, y - 1), (torch.tensor(0), y))
        _, z = while_loop(lambda i, z: i < n, lambda i, z: (i + 1, z + y), (torch.tensor(0), x))
        return x, y, z

    check_against_eager(f, torch.tensor(3), torch.ones(2))
    hlo = lowered_hlo(f, torch.tensor(3, device=xla_device()), torch.ones(2, device=xla_device()), fullgraph=True)
    assert [len(re.findall(r"\bwhile\(", text)) for text in hlo] == [3]


def test_loop_with_code_before_and_after_is_one_executable():
    def f(n, x):
        x = torch.sin(x) + 1
        _, x = while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x * 1.1), (n, x))
        return x.sum() * 2

    check_against_eager(f, torch.tensor(4), torch.randn(5))
    compiled = torch.compile(f, backend="xla_loop", fullgraph=True)
    dev = xla_device()
    compiled(torch.tensor(2, device=dev), torch.randn(5, device=dev))
    args = (torch.tensor(9, device=dev), torch.randn(5, device=dev))
    torch_xla.sync()  # materialize the inputs first: only the call is measured
    with MetricsDelta() as delta:
        compiled(*args)
    assert delta.compiles == 0
    assert delta.executions == 1  # loop and surrounding code: one executable


def test_graph_breaks_around_loop():
    def f(n, x):
        x = x + 1
        print("graph break")  # noqa: T201
        _, x = while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x * 2), (n, x))
        print("another")  # noqa: T201
        return x - 1

    check_against_eager(f, torch.tensor(3), torch.ones(2), fullgraph=False)


# ---- dynamic shapes, randomness ---------------------------------------------------------------


def test_dynamic_shapes():
    def f(n, x):
        return while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x * 2 + x.shape[0]), (n, x))

    compiled = torch.compile(f, backend="xla_loop", dynamic=True)
    dev = xla_device()
    for size in (3, 5, 8):
        x = torch.randn(size)
        got = compiled(torch.tensor(4, device=dev), x.to(dev))
        expected = f(torch.tensor(4), x)
        torch.testing.assert_close(got[1].cpu(), expected[1])


def test_random_ops_draw_fresh_numbers_every_iteration():
    def f(n, x):
        def body(i, last, acc, seen_equal):
            r = torch.rand_like(last)
            return i + 1, r, acc + r, seen_equal | (r == last).all()

        x = x + torch.rand_like(x)  # random ops around the loop keep their own stream
        init = (torch.zeros((), dtype=torch.int64, device=x.device), x, torch.zeros_like(x),
                torch.zeros((), dtype=torch.bool, device=x.device))
        return while_loop(lambda i, *rest: i < n, body, init) + (x,)

    compiled = torch.compile(f, backend="xla_loop", fullgraph=True)
    dev = xla_device()
    _, last, acc, repeated, before = compiled(torch.tensor(64, device=dev), torch.full((4096,), -1.0, device=dev))
    assert not repeated.item()
    mean = (acc / 64).cpu()
    # 64 iterations of independent U(0,1): the per-element mean has std 1/sqrt(12*64) ~ 0.036.
    # The same numbers every iteration would leave it at U(0,1) spread (std ~ 0.29).
    assert 0.45 < mean.mean().item() < 0.55
    assert mean.std().item() < 0.06
    _, last_again, _, _, before_again = compiled(torch.tensor(64, device=dev), torch.full((4096,), -1.0, device=dev))
    assert not torch.equal(last.cpu(), last_again.cpu()), "each call must draw new numbers in the loop"
    assert not torch.equal(before.cpu(), before_again.cpu()), "and around it"


# ---- quality of the lowering: compiles, host syncs, traces -------------------------------------


@pytest.mark.parametrize("form", ["tensor counter", "data-dependent"])
def test_other_trip_counts_need_no_compile_and_no_host_sync(form):
    w = torch.randn(16, 16) * 0.1

    def counted(n, x, w):
        return while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, torch.tanh(x @ w)), (n, x))

    def data(n, x, w):
        return while_loop(lambda s, x: s < n, lambda s, x: (s + x.abs().mean() + 0.01, torch.tanh(x @ w)), (n * 0, x))

    fn = counted if form == "tensor counter" else data
    dev = xla_device()
    compiled = torch.compile(fn, backend="xla_loop", fullgraph=True)
    n_dtype = torch.int64 if form == "tensor counter" else torch.float32
    x, wd = torch.randn(4, 16, device=dev), w.to(dev)
    torch_xla.sync()
    compiled(torch.tensor(2, dtype=n_dtype, device=dev), x, wd)
    torch_xla.sync()
    traces_before = metrics.counter_value(metrics.SUBGRAPHS_TRACED)
    # (Not 0 or 1: torch_xla keeps those as IR constants, which the bridge syncs as inputs.)
    for n in (3, 10, 1000):
        n_dev = torch.tensor(n, dtype=n_dtype, device=dev)
        torch_xla.sync()  # materialize the input first: only the call is measured
        with MetricsDelta() as delta:
            out = compiled(n_dev, x, wd)
            torch_xla.sync()
        assert delta.compiles == 0, f"n={n}: recompiled"
        assert delta.host_syncs == 0, f"n={n}: host read inside the loop"
        assert delta.transfers_from_device == 0, f"n={n}: transfer from device"
        expected = fn(torch.tensor(n, dtype=n_dtype), x.cpu(), w)
        torch.testing.assert_close(out[1].cpu(), expected[1], rtol=1e-4, atol=1e-4)
    assert metrics.counter_value(metrics.SUBGRAPHS_TRACED) == traces_before, "cond/body traced again"


def test_body_traced_a_bounded_number_of_times():
    dev = xla_device()
    before_traces = metrics.counter_value(metrics.SUBGRAPHS_TRACED)
    before_loops = metrics.counter_value(metrics.LOOPS_LOWERED)
    compiled = torch.compile(countdown, backend="xla_loop", fullgraph=True)
    for n in (2, 100, 5000):
        compiled(torch.tensor(n, device=dev), torch.zeros(3, device=dev))
    loops = metrics.counter_value(metrics.LOOPS_LOWERED) - before_loops
    traces = metrics.counter_value(metrics.SUBGRAPHS_TRACED) - before_traces
    # One compile, reused for every trip count, and one trace of the graph while compiling
    # (executable.py; torch_xla's bridge would run it three times): one lowering, tracing
    # cond and body once; none at later calls.
    assert loops == 1
    assert traces == 2


def test_first_call_is_one_compile_and_no_host_sync():
    dev = xla_device()
    compiled = torch.compile(countdown, backend="xla_loop", fullgraph=True)
    # A shape no other test uses, so torch_xla's in-process program cache cannot answer.
    args = (torch.tensor(10, device=dev), torch.full((7, 3, 1), 3.0, device=dev))
    torch_xla.sync()
    with MetricsDelta() as delta:
        _, res = compiled(*args)
        torch_xla.sync()
    assert delta.compiles == 1
    assert delta.host_syncs == 0
    assert delta.transfers_from_device == 0
    assert (res.cpu() == 13).all()


def test_public_api_reexports_torch_semantics():
    # xla_loop_backend.while_loop behaves like torch's eagerly (on CPU too).
    i, x = xla_loop_backend.while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x + 1), (torch.tensor(2), torch.zeros(1)))
    assert i.item() == 0 and x.item() == 2
