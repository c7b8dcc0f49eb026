"""stacking.py: the layers' weights stack as one op, and its gradient splits as one op (not a
select a layer); on XLA the split slices at offsets the program takes as inputs, so every
layer's slice is one computation. Values and gradients against torch.stack on the CPU."""
from __future__ import annotations

import copy

import torch
import torch.fx
import torch_xla
from loop_testing import assert_same, graphs_as_lowered, xla_device

import xla_loop_backend as xl
from xla_loop_backend.inspect import lowered_hlo

stack_layers = torch.ops.xla_loop.stack_layers
unstack_layers = torch.ops.xla_loop.unstack_layers


def test_stack_and_unstack_are_torch_stack_and_unbind_on_cpu_and_xla():
    tensors = [torch.randn(3, 2) for _ in range(4)]
    for device in ("cpu", xla_device()):
        on = [t.to(device) for t in tensors]
        stacked = stack_layers(on)
        assert_same(stacked, torch.stack(tensors))
        parts = unstack_layers(stacked)
        assert_same(list(parts), tensors)
        assert not any(p._is_view() for p in parts)  # (each a tensor of its own)


def test_gradients_flow_through_both_like_torch_stack():
    def grads(stack, device):
        torch.manual_seed(0)
        tensors = [torch.randn(3, 2, device=device, requires_grad=True) for _ in range(4)]
        weights = torch.arange(24.0, device=device).reshape(4, 3, 2)
        (stack(tensors) * weights).sum().backward()
        return [t.grad for t in tensors]

    expected = grads(torch.stack, "cpu")
    assert_same(grads(lambda ts: stack_layers(ts), "cpu"), expected)
    assert_same(grads(lambda ts: stack_layers(ts), xla_device()), expected)
    # unstack's own gradient (double backward of a stack) is the stack of its gradients
    g = torch.randn(4, 3, 2, requires_grad=True)
    sum(p.sum() * (k + 1) for k, p in enumerate(unstack_layers(g))).backward()
    assert_same(g.grad, torch.arange(1.0, 5.0).reshape(4, 1, 1).expand(4, 3, 2))


def test_unstack_on_xla_slices_at_offsets_the_program_takes_as_inputs():
    """Each part is a dynamic slice whose offset is a parameter of the program, not a
    literal: the parts are one computation (one XLA kernel)."""
    (hlo,) = lowered_hlo(lambda s: tuple(unstack_layers(s * 2)), torch.zeros(4, 3, 2, device=xla_device()))
    assert hlo.count(" dynamic-slice(") == 4
    entry = hlo[hlo.index("ENTRY"):]
    assert entry.count("s64[1]{0} parameter(") == 4  # (the offsets: inputs, not literals)
    assert " slice(" not in hlo


def test_scan_layers_backward_splits_each_weights_gradient_in_one_op():
    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(4))

        def forward(self, h):
            return xl.scan_layers(self.layers, h)

    model, h = Layers(), torch.randn(2, 8)
    reference = copy.deepcopy(model)
    out = h
    for layer in reference.layers:  # (a plain Python loop: the reference)
        out = layer(out)
    out.square().sum().backward()

    model = model.to(xla_device())
    with graphs_as_lowered() as graphs:
        xl.compile(model, fullgraph=True)(h.to(xla_device())).square().sum().backward()
    forward, backward = graphs
    assert len(forward.graph.find_nodes(op="call_function", target=stack_layers.default)) == 2  # weight, bias
    assert len(backward.graph.find_nodes(op="call_function", target=unstack_layers.default)) == 2
    assert not backward.graph.find_nodes(op="call_function", target=torch.ops.aten.select.int)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_same(p.grad, q.grad, rtol=1e-5, atol=1e-5)


def test_scan_layers_training_steps_after_the_first_compile_and_read_back_nothing():
    """A training step as users write it (default options, a constant made without device=,
    the loss outside, an optimizer), over new data each step: the unstacking of the
    gradients reads nothing back (its offsets are device inputs), and from the second step
    on nothing compiles; the weights follow the Python loop on the CPU."""
    from loop_testing import MetricsDelta

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(4))

        def forward(self, h, python=False):
            if python:
                for layer in self.layers:
                    h = layer(h)
            else:
                h = xl.scan_layers(self.layers, h)
            return h * torch.tensor(0.5)

    torch.manual_seed(0)
    model = Layers()
    reference = copy.deepcopy(model)
    model.to(xla_device())
    compiled = xl.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        h = torch.randn(2, 8, generator=g)
        with MetricsDelta() as delta:
            compiled(h.to(xla_device())).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            torch_xla.sync()
        reference(h, python=True).square().sum().backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        if step > 0:
            assert (delta.compiles, delta.host_syncs, delta.transfers_from_device) == (0, 0, 0)
        for p, q in zip(model.parameters(), reference.parameters()):
            assert_same(p.detach(), q.detach(), rtol=1e-5, atol=1e-5)
