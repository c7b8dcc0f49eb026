"""passes/stacked_inputs.py: in inference, a stack of graph inputs (the layers' weights that
scan_layers or roll_layers stack) becomes an input of its own, stacked once by the call and
kept while the weights stay the same; stacks Dynamo's deduplication put in subgraphs too; a
stack of an input the graph updates, and every stack in training, stay in the graph (the
ones in subgraphs copied back in line)."""
from __future__ import annotations

import copy
from unittest import mock

import torch
import torch_xla
from loop_testing import MetricsDelta, xla_device

import xla_loop_backend as xl
from xla_loop_backend import metrics
from xla_loop_backend.options import Options, PassContext
from xla_loop_backend.passes.stacked_inputs import PASS as STACKED_INPUTS

STACK_LAYERS = torch.ops.xla_loop.stack_layers.default


class Mlp(torch.nn.Module):
    """Two Linears of one shape (gate, up): Dynamo's deduplication makes their stacks calls
    of one subgraph."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        return h + torch.nn.functional.silu(self.gate(x)) * self.up(x)


class Layers(torch.nn.Module):
    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        torch.manual_seed(depth)
        self.layers = torch.nn.ModuleList(Mlp() for _ in range(depth))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return xl.scan_layers(self.layers, h)


def _graph_and_inputs(fn, *args):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    with mock.patch.object(torch._dynamo.config, "use_graph_deduplication", True):  # (as under xl.compile)
        torch.compile(fn, backend=keep, fullgraph=True)(*args)
    return graphs[0]


def _calls(gm, target):
    return gm.graph.find_nodes(op="call_function", target=target)


def test_inference_scan_layers_takes_each_stack_as_an_input():
    with torch.no_grad():
        gm, example_inputs = _graph_and_inputs(Layers(4), torch.randn(2, 8))
        assert _calls(gm, torch.ops.higher_order.invoke_subgraph)  # (the stacks deduplication found)
        context = PassContext.for_graph(Options.parse({}), example_inputs)
        STACKED_INPUTS.run(gm, context)
    assert not _calls(gm, STACK_LAYERS) and not _calls(gm, torch.ops.higher_order.invoke_subgraph)
    # gate.weight, up.weight, norm.weight, norm.bias: one input each, the stack of 4 layers'
    assert sorted(len(group) for group in context.stacked_inputs) == [4, 4, 4, 4]
    placeholders = gm.graph.find_nodes(op="placeholder")
    assert [n.meta["example_value"].shape[0] for n in placeholders[-4:]] == [4, 4, 4, 4]


def test_training_keeps_the_stacks_in_the_graph_with_the_deduplicated_ones_in_line():
    """In training the gradients flow back through each stack, in the graph; the stacks
    deduplication put in subgraphs come back in line all the same (AOTAutograd traced each
    subgraph call with its own joint graph: about 0.8 s of the first step at 32 decoder
    layers)."""
    x = torch.randn(2, 8, requires_grad=True)
    gm, example_inputs = _graph_and_inputs(Layers(3), x)
    assert _calls(gm, torch.ops.higher_order.invoke_subgraph)
    context = PassContext.for_graph(Options.parse({}), example_inputs)
    assert context.training
    STACKED_INPUTS.run(gm, context)
    assert not context.stacked_inputs and not _calls(gm, torch.ops.higher_order.invoke_subgraph)
    assert len(_calls(gm, STACK_LAYERS)) == 4  # one a tensor of the layer


def test_a_stack_of_an_input_the_graph_updates_stays_in_the_graph():
    def f(a, b):
        a.add_(1)
        return torch.stack([a, b]).sum(0)

    with torch.no_grad():
        gm, example_inputs = _graph_and_inputs(f, torch.zeros(3), torch.ones(3))
        context = PassContext.for_graph(Options.parse({}), example_inputs)
        STACKED_INPUTS.run(gm, context)
    assert len(_calls(gm, torch.stack)) == 1 and not context.stacked_inputs
    dev = xla_device()
    a = torch.zeros(3, device=dev)
    out = xl.compile(f, fullgraph=True)(a, torch.ones(3, device=dev))
    assert torch.equal(out.cpu(), torch.full((3,), 2.0)) and torch.equal(a.cpu(), torch.ones(3))


def test_inference_with_scan_layers_stacks_the_weights_once():
    """(What makes a new stack, an update of a weight, is tested with rolled layers:
    test_pass_roll_layers.py.)"""
    reference = Layers(5)
    compiled = xl.compile(copy.deepcopy(reference).to(xla_device()), fullgraph=True)
    xs = [torch.randn(3, 8) for _ in range(3)]  # (each call with other data)
    before = metrics.counter_value(metrics.LAYER_STACKINGS)
    with torch.no_grad():
        results = [compiled(x.to(xla_device())).cpu() for x in xs]
        torch_xla.sync()
        with MetricsDelta() as delta:
            compiled(xs[0].to(xla_device()))
            torch_xla.sync()
    for x, result in zip(xs, results):
        expected = x
        for layer in reference.layers:  # (a Python loop on the CPU: the reference)
            expected = layer(expected)
        torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)
    assert metrics.counter_value(metrics.LAYER_STACKINGS) == before + 1
    assert delta.compiles == 0
