"""The while_loop programs with parameters of PyTorch's test/functorch/test_control_flow.py
(`test_while_loop_compile[simple_with_linear]` and `[nested_with_linear]`), run through
backend="xla_loop".

Their modules have parameters that need gradients, so the loop is trained as soon as the
module is: before xla_loop kept checkpoints, such a call read its trip count back to the
host (to size a stack) even when no backward ran. Here each is compiled with torch.compile
on the XLA device and compared with the same module eagerly on CPU (forward), then called
with another trip count, which must compile nothing and read nothing back; its gradients
are compared with the same module as Python loops on CPU (torch 2.9's eager while_loop
autograd is wrong for closed-over parameters). The modules, re-written:

* simple_with_linear: `it, x -> it - 1, linear(x)` while `it - dec > 0` (dec a buffer, 1);
* nested_with_linear: the outer loop runs the simple module's loop from its own counter,
  then an outer Linear, each iteration.
"""
from __future__ import annotations

import copy

import pytest
import torch
from loop_testing import MetricsDelta, assert_same, xla_device
from torch._higher_order_ops.while_loop import while_loop
from training_testing import assert_grads_close, grads


class SimpleWithLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.register_buffer("dec", torch.tensor(1))

    def forward(self, it, x, python=False):
        if python:
            while int(it - self.dec) > 0:
                it, x = it - 1, self.linear(x)
            return it, x
        return while_loop(lambda it, x: it - self.dec > 0, lambda it, x: (it - 1, self.linear(x)), (it, x))


class NestedWithLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mod = SimpleWithLinear()
        self.outer_linear = torch.nn.Linear(2, 2)
        self.register_buffer("dec", torch.tensor(1))

    def forward(self, it, x, python=False):
        if python:
            while int(it - self.dec) > 0:
                it, x = it - 1, self.outer_linear(self.mod(it, x, python=True)[1])
            return it, x
        return while_loop(
            lambda it, x: it - self.dec > 0, lambda it, x: (it - 1, self.outer_linear(self.mod(it, x)[1])), (it, x)
        )


@pytest.mark.parametrize("model", [SimpleWithLinear, NestedWithLinear])
def test_upstream_while_loop_with_linear(model):
    dev = xla_device()
    torch.manual_seed(0)
    reference = model()
    device_model = copy.deepcopy(reference).to(dev)
    compiled = torch.compile(device_model, backend="xla_loop", fullgraph=True)
    x = torch.randn(2, 2)
    for call, n in enumerate((3, 6)):
        with MetricsDelta() as delta:
            it, out = compiled(torch.tensor(n, device=dev), x.to(dev))
        with torch.no_grad():
            assert_same((it, out), reference(torch.tensor(n), x), rtol=1e-5, atol=1e-6)
        assert delta.host_syncs == 0, vars(delta)  # (before: the trip count, read to size a stack)
        if call == 1:
            assert delta.compiles == 0, vars(delta)
        reference.zero_grad()
        device_model.zero_grad()
        reference(torch.tensor(n), x, python=True)[1].pow(2).sum().backward()
        out.pow(2).sum().backward()
        assert_grads_close(grads(device_model), grads(reference))
