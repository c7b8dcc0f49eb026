"""call.py: the call-time wrappers. GraphCall reads int results back once; ReportingCall
reads the loops' report once per call, raises past max_iterations, and grows the stack of
trained while_loops by recompiling and rerunning the call."""
from __future__ import annotations

import math

import pytest
import torch
from loop_testing import MetricsDelta, xla_device
from training_testing import StepperWithHead, grads
from torch._higher_order_ops.while_loop import while_loop

import xla_loop_backend
from xla_loop_backend import LoopLoweringError, metrics
from xla_loop_backend.call import ReportingCall, grown_capacity


@pytest.mark.parametrize(
    "needed, bound, capacity", [(65, None, 128), (300, None, 512), (128, None, 128), (1, None, 1), (300, 200, 200)]
)
def test_grown_capacity_is_the_next_power_of_two_within_the_bound(needed, bound, capacity):
    assert grown_capacity(needed, bound) == capacity


class _Reports:
    """A stand-in compiled function: returns the capacity it was built with and a report."""

    def __init__(self, needed):
        self.needed, self.builds = needed, []

    def build(self, capacity):
        self.builds.append(capacity)
        return lambda *args: (torch.tensor(capacity), torch.tensor(self.needed))


def test_reporting_call_reruns_with_room_for_the_loop():
    fake = _Reports(needed=200)
    call = ReportingCall(fake.build, 64, ["while_loop at x.py:1"], None, trains=True)
    (built_for,) = call()
    assert fake.builds == [64, 256] and int(built_for) == 256 and call.capacity == 256
    call()
    assert fake.builds == [64, 256]  # no more compiles once it fits


def test_reporting_call_raises_past_max_iterations_naming_the_loops():
    fake = _Reports(needed=11)
    call = ReportingCall(fake.build, 8, ["while_loop at a.py:1", "while_loop at b.py:2"], 10, trains=True)
    with pytest.raises(LoopLoweringError, match=r"while_loop at a.py:1 or while_loop at b.py:2: still running after max_iterations=10"):
        call()


def test_loops_that_only_have_a_bound_never_grow_the_stack():
    fake = _Reports(needed=0)
    call = ReportingCall(fake.build, 4, ["while_loop at x.py:1"], 10, trains=False)
    call()
    assert fake.builds == [4]


def test_a_loop_that_outgrows_the_stack_still_gets_the_right_gradients():
    # Capacity 4 at first; trip counts up to 70 need 128: log2(70 / 4) + 1 = 5 compiles at
    # most, and here just the growths 4 -> 8 -> 128.
    torch.manual_seed(0)
    reference = StepperWithHead()
    model = StepperWithHead().to(xla_device())
    model.load_state_dict(reference.state_dict())
    compiled = xla_loop_backend.compile(model, fullgraph=True, capacity=4)
    x = torch.randn(2, 6)
    growths = metrics.counter_value(metrics.CAPACITY_GROWTHS)
    for n in (3, 6, 70, 70, 40):
        reference.zero_grad()
        model.zero_grad()
        reference(torch.tensor(n), x, python=True).backward()
        compiled(torch.tensor(n, device=xla_device()), x.to(xla_device())).backward()
        actual, expected = grads(model), grads(reference)
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"n={n} {name}: {m}")
    grew = metrics.counter_value(metrics.CAPACITY_GROWTHS) - growths
    assert grew == 2 <= math.log2(70 / 4) + 1
    with MetricsDelta() as delta:  # every trip count up to 128 now runs without a compile
        compiled(torch.tensor(100, device=xla_device()), x.to(xla_device())).backward()
    assert delta.compiles == 0 and delta.host_syncs == 1


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
