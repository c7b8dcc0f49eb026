"""passes/stacked_results.py: results that are selects of one computed stack (a backward's
gradients of the layers' weights) are split from it by one `unstack_layers` (dynamic slices
at offsets the program takes as inputs: one XLA kernel for them), with the same values; a
lone select and selects of an input stay as they were."""
from __future__ import annotations

import operator


import torch
import torch.fx
from loop_testing import assert_same, graphs_as_lowered, xla_device
from torch._subclasses.fake_tensor import FakeTensorMode

import xla_loop_backend as xl
from xla_loop_backend.passes.stacked_results import PASS as STACKED_RESULTS

aten = torch.ops.aten
UNSTACK = torch.ops.xla_loop.unstack_layers.default


def _graph(shape, picks):
    """`x = a * 2`; results: `select(source, 0, i)` for each (source, i) in picks, source
    "x" (computed) or "a" (the input)."""
    graph = torch.fx.Graph()
    with FakeTensorMode():
        a_val = torch.empty(shape, device=xla_device())
        x_val = a_val * 2
    a = graph.placeholder("a")
    a.meta["val"] = a_val
    x = graph.call_function(aten.mul.Tensor, (a, 2))
    x.meta["val"] = x_val
    nodes = {"a": a, "x": x}
    outs = []
    for source, i in picks:
        out = graph.call_function(aten.select.int, (nodes[source], 0, i))
        out.meta["val"] = nodes[source].meta["val"].select(0, i)
        outs.append(out)
    graph.output(tuple(outs))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _expected(a, picks):
    values = {"a": a, "x": a * 2}
    return [values[source].select(0, i) for source, i in picks]


def _results(gm):
    (outs,) = next(n for n in gm.graph.nodes if n.op == "output").args
    return outs


def test_selects_of_one_computed_stack_are_split_from_it_in_one_op():
    picks = [("x", 0), ("x", 2), ("x", 1), ("x", -1)]
    gm = _graph((3, 4), picks)
    STACKED_RESULTS.run(gm)
    assert not gm.graph.find_nodes(op="call_function", target=aten.select.int)
    (split,) = gm.graph.find_nodes(op="call_function", target=UNSTACK)
    assert split.args[0].target is aten.mul.Tensor
    assert [(out.target, out.args) for out in _results(gm)] == [(operator.getitem, (split, i)) for i in (0, 2, 1, 2)]
    a = torch.randn(3, 4)
    actual = gm(a.to(xla_device()))
    for got, want in zip(actual, _expected(a, picks)):
        assert_same(got, want)


def test_a_lone_select_and_selects_of_an_input_stay():
    picks = [("x", 0), ("a", 0), ("a", 1)]
    gm = _graph((3, 4), picks)
    before = gm.code
    STACKED_RESULTS.run(gm)
    assert gm.code == before


def test_gradients_of_a_stack_in_a_scan_leave_the_backward_as_dynamic_slices_and_are_right():
    """A scan over weights the user stacked (`torch.stack`, whose backward selects each
    layer's gradient): each gradient is split from its stack by one op (no select left among
    the results), and every gradient equals the Python loop's on the CPU."""
    import copy

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

        def forward(self, h):
            weights = torch.stack([layer.weight for layer in self.layers])
            biases = torch.stack([layer.bias for layer in self.layers])

            def step(h, wb):
                w, b = wb
                return torch.tanh(h @ w.T + b), None

            return xl.scan(step, h, (weights, biases))[0]

    model, h = Layers(), torch.randn(2, 8)
    reference = copy.deepcopy(model)
    out = h
    for layer in reference.layers:
        out = torch.tanh(layer(out))
    out.square().sum().backward()

    model = model.to(xla_device())
    with graphs_as_lowered() as graphs:
        xl.compile(model, fullgraph=True)(h.to(xla_device())).square().sum().backward()
    forward, backward = [list(_results(gm)) for gm in graphs]
    gradients = [r for r in backward if isinstance(r, torch.fx.Node)]
    assert not [r for r in gradients if r.target is aten.select.int]
    assert sum(r.target is operator.getitem and r.args[0].target is UNSTACK for r in gradients) == 8
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_same(p.grad, q.grad, rtol=1e-5, atol=1e-5)
