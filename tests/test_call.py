"""call.py: the call-time wrappers. GraphCall reads int results back once; ReportingCall
reads the report of loops with a bound once per call and raises past max_iterations; a
trained while_loop reads nothing back and never recompiles for a longer loop."""
from __future__ import annotations

import pytest
import torch
from loop_testing import MetricsDelta, xla_device
from training_testing import StepperWithHead, grads
from torch._higher_order_ops.while_loop import while_loop

import xla_loop_backend
from xla_loop_backend import LoopLoweringError
from xla_loop_backend.call import ReportingCall


def test_reporting_call_raises_past_max_iterations_naming_the_loops():
    call = ReportingCall(lambda: (torch.tensor(1.0), torch.tensor(11)), ["while_loop at a.py:1", "while_loop at b.py:2"], 10)
    with pytest.raises(LoopLoweringError, match=r"while_loop at a.py:1 or while_loop at b.py:2: still running after max_iterations=10"):
        call()


def test_reporting_call_returns_the_outputs_within_the_bound():
    (out,) = ReportingCall(lambda: (torch.tensor(1.0), torch.tensor(10)), ["while_loop at x.py:1"], 10)()
    assert float(out) == 1.0


def test_a_trained_loop_longer_than_any_before_compiles_nothing_and_reads_nothing_back():
    # 4 checkpoints; the trip counts outgrow them at once (3 -> 70): the same program runs
    # each, with the right gradients, and the only host work is the call itself.
    torch.manual_seed(0)
    reference = StepperWithHead()
    model = StepperWithHead().to(xla_device())
    model.load_state_dict(reference.state_dict())
    compiled = xla_loop_backend.compile(model, fullgraph=True, checkpoints=4)
    x = torch.randn(2, 6)
    for n in (3, 6, 70, 70, 40, 300):
        reference.zero_grad()
        model.zero_grad()
        reference(torch.tensor(n), x, python=True).backward()
        n_dev, x_dev = torch.tensor(n, device=xla_device()), x.to(xla_device())
        if n <= 6:
            compiled(n_dev, x_dev).backward()
        else:
            with MetricsDelta() as delta:
                compiled(n_dev, x_dev).backward()
            assert delta.compiles == 0 and delta.host_syncs == 0, (n, vars(delta))
        actual, expected = grads(model), grads(reference)
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"n={n} {name}: {m}")


def test_int_results_are_read_back_once_per_call():
    def f(x):
        i, x = while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, x * 2), (0, x))
        return x, i, i * 2

    compiled = torch.compile(f, backend="xla_loop", fullgraph=True)
    x = torch.ones(2, device=xla_device())
    compiled(x)
    with MetricsDelta() as delta:
        x, i, twice = compiled(x)
    assert (i, twice) == (3, 6) and type(i) is int
    assert delta.host_syncs == 2 and delta.compiles == 0


def test_a_gradient_of_a_cpu_tensor_comes_back_on_the_cpu():
    # (autograd checks a gradient's device against its input's)
    def f(x, scale):
        return while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, x * scale), (torch.zeros((), dtype=torch.int64), x))[1]

    scale = torch.tensor(1.5, requires_grad=True)  # a 0-dim CPU tensor, as eager allows
    x = torch.ones(2, device=xla_device(), requires_grad=True)
    out = xla_loop_backend.compile(f, fullgraph=True)(x, scale)
    out.sum().backward()
    assert scale.grad is not None and scale.grad.device.type == "cpu"
    torch.testing.assert_close(scale.grad, torch.tensor(2 * 3 * 1.5**2))
    torch.testing.assert_close(x.grad.cpu(), torch.full((2,), 1.5**3))
