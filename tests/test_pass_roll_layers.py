"""passes/roll_layers.py: a chain of calls of one nested_compile_region subgraph becomes one
scan over the stacked per-layer operands (shared operands as its additional inputs, values
used outside the chain as its ys); forward and gradients equal eager PyTorch on CPU, and the
layer is lowered once."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_xla
from loop_testing import MetricsDelta, xla_device
from training_testing import assert_grads_close, grads

import xla_loop_backend

from xla_loop_backend.inspect import lowered_hlo
from xla_loop_backend.options import Options, PassContext
from xla_loop_backend.passes.roll_layers import PASS as ROLL_LAYERS
from xla_loop_backend.passes.stacked_inputs import PASS as STACKED_INPUTS

STACK_LAYERS = torch.ops.xla_loop.stack_layers.default

nested_compile_region = torch.compiler.nested_compile_region
_scan = torch.ops.higher_order.scan
_invoke = torch.ops.higher_order.invoke_subgraph


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 8)

    @nested_compile_region
    def forward(self, x: torch.Tensor, shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.fc(self.norm(x))) * shared
        return x + h, h.sum(-1)  # the next layer's input, and a per-layer value


class Stack(torch.nn.Module):
    """`depth` marked blocks; `per_layer` also returns each block's second output."""

    def __init__(self, depth: int = 4, per_layer: bool = False) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(depth))
        self.shared = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.per_layer = per_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extras = []
        for block in self.blocks:
            x, extra = block(x, self.shared)
            extras.append(extra)
        loss = x.pow(2).mean()
        if self.per_layer:
            loss = loss + torch.stack(extras).pow(2).mean()
        return loss


class ReadInside(Stack):
    """A block's output read before the chain ends: it must not move past that read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, _ = self.blocks[0](x, self.shared)
        early = x1 * 2
        x2, _ = self.blocks[1](x1, self.shared)
        x3, _ = self.blocks[2](x2 + early, self.shared)
        return x3.pow(2).mean()


def _dynamo_graph(model, *args):
    graphs = []

    def spy(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=spy, fullgraph=True)(*args)
    return graphs[0]


def _rolled(model, *args, **options):
    gm, example_inputs = _dynamo_graph(model, *args)
    ROLL_LAYERS.run(gm, PassContext.for_graph(Options.parse(options), example_inputs))
    return gm


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_a_chain_of_marked_layers_becomes_one_scan():
    gm = _rolled(Stack(depth=4, per_layer=True), torch.randn(2, 8))
    (scan,) = _calls(gm, _scan)
    assert not _calls(gm, _invoke)
    _, init, xs, shared = scan.args
    assert len(init) == 1 and len(shared) == 1  # the carry; the shared scale
    assert [tuple(n.meta["example_value"].shape) for n in xs] == [(4, 8), (4, 8), (4, 8, 8), (4, 8)]
    assert len(scan.meta["example_value"]) == 2  # the carry, and the per-layer value as ys


def test_roll_layers_off_leaves_the_calls():
    gm = _rolled(Stack(depth=3), torch.randn(2, 8), roll_layers=False)
    assert not _calls(gm, _scan) and len(_calls(gm, _invoke)) == 3


def test_a_value_read_before_the_chain_ends_keeps_the_calls():
    gm = _rolled(ReadInside(depth=3), torch.randn(2, 8))
    assert not _calls(gm, _scan) and len(_calls(gm, _invoke)) == 3


def _train_against_eager(model, calls, **options):
    xla_device()
    reference = model
    device_model = copy.deepcopy(model).to(xla_device())
    compiled = xla_loop_backend.compile(device_model, fullgraph=True, **options)
    for k, x in enumerate(calls):
        reference.zero_grad(set_to_none=True)
        device_model.zero_grad(set_to_none=True)
        expected = reference(x)
        expected.backward()
        x_dev = x.to(xla_device())
        torch_xla.sync()
        with MetricsDelta() as delta:
            loss = compiled(x_dev)
            loss.backward()
        torch.testing.assert_close(loss.detach().cpu(), expected.detach(), rtol=1e-4, atol=1e-4)
        assert_grads_close(grads(device_model), grads(reference))
        if k > 0:  # (on the first call the bridge clears torch_xla's counters while it compiles)
            assert delta.compiles == 0
            assert delta.host_syncs == 0  # (the rolled layers run on the device: nothing read back)


@pytest.mark.parametrize("per_layer", [False, True])
def test_rolled_layers_train_like_eager(per_layer):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    _train_against_eager(Stack(depth=5, per_layer=per_layer), [torch.randn(3, 8, generator=gen) for _ in range(2)])


@pytest.mark.parametrize("remat", [True, 2])
def test_rolled_layers_train_with_remat(remat):
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    _train_against_eager(Stack(depth=6, per_layer=True), [torch.randn(3, 8, generator=gen)], remat=remat)


def test_a_chain_that_cannot_roll_still_trains_like_eager():
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    _train_against_eager(ReadInside(depth=3), [torch.randn(3, 8, generator=gen)])


def test_the_layer_is_lowered_once():
    torch.manual_seed(3)
    model = Stack(depth=6).to(xla_device())
    with torch.no_grad():
        (rolled,) = lowered_hlo(model, torch.randn(2, 8, device=xla_device()), fullgraph=True)
        torch._dynamo.reset()
        (unrolled,) = lowered_hlo(model, torch.randn(2, 8, device=xla_device()), fullgraph=True, options={"roll_layers": False})
    assert rolled.count(" tanh(") == 1 and unrolled.count(" tanh(") == 6
    assert "while(" in rolled


def test_a_layer_that_updates_its_inputs_keeps_the_calls():
    # (a BatchNorm's running statistics in training mode: a scan body may not update them)
    from test_lowering_invoke_subgraph import NormBlocks

    with torch.no_grad():
        gm = _rolled(NormBlocks(), torch.randn(4, 8))
    assert not _calls(gm, _scan) and len(_calls(gm, _invoke)) == 3


class Unmarked(torch.nn.Module):
    """Repeated blocks with no marker: Dynamo's graph deduplication finds them."""

    def __init__(self, depth: int = 5) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(depth))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(8) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, layer in zip(self.norms, self.layers):
            x = x + torch.tanh(layer(norm(x)))
        return x.pow(2).mean()


def _rolled_by(compile_model, model, x):
    from xla_loop_backend import metrics

    before = metrics.counter_value(metrics.LAYERS_ROLLED)
    compile_model(model)(x).backward()
    return metrics.counter_value(metrics.LAYERS_ROLLED) - before


def test_repeated_layers_with_no_marker_roll_under_the_decorator():
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    _train_against_eager(Unmarked(depth=5), [torch.randn(3, 8, generator=gen) for _ in range(2)])
    x = torch.randn(3, 8, device=xla_device())
    torch._dynamo.reset()
    assert _rolled_by(lambda m: xla_loop_backend.compile(m, fullgraph=True), Unmarked(5).to(xla_device()), x) == 4
    assert torch._dynamo.config.use_graph_deduplication is False  # (set only during the calls)


def test_no_marker_no_roll_with_roll_layers_off_or_under_plain_torch_compile():
    x = torch.randn(3, 8, device=xla_device())
    torch._dynamo.reset()
    off = _rolled_by(lambda m: xla_loop_backend.compile(m, fullgraph=True, roll_layers=False), Unmarked(5).to(xla_device()), x)
    torch._dynamo.reset()
    plain = _rolled_by(lambda m: torch.compile(m, backend="xla_loop", fullgraph=True), Unmarked(5).to(xla_device()), x)
    assert (off, plain) == (0, 0)


def test_inference_takes_the_stacked_weights_as_inputs():
    with torch.no_grad():
        gm, example_inputs = _dynamo_graph(Stack(depth=4), torch.randn(2, 8))
        context = PassContext.for_graph(Options.parse({}), example_inputs)
        ROLL_LAYERS.run(gm, context)
        # roll_layers stacks the weights; the stacked_inputs pass makes each stack an input
        assert len(_calls(gm, STACK_LAYERS)) == 4 and not context.stacked_inputs
        STACKED_INPUTS.run(gm, context)
    assert not _calls(gm, STACK_LAYERS)
    # the norm's weight and bias, the Linear's weight and bias: one input each, the stack of 4
    assert [len(group) for group in context.stacked_inputs] == [4, 4, 4, 4]
    placeholders = gm.graph.find_nodes(op="placeholder")
    assert [n.meta["example_value"].shape[0] for n in placeholders[-4:]] == [4, 4, 4, 4]


def test_inference_stacks_the_weights_once_while_they_stay_the_same():
    from xla_loop_backend import metrics

    torch.manual_seed(6)
    reference = Stack(depth=5)
    model = copy.deepcopy(reference).to(xla_device())
    compiled = torch.compile(model, backend="xla_loop", fullgraph=True)
    x = torch.randn(3, 8)
    x_dev = x.to(xla_device())

    def check() -> None:
        torch.testing.assert_close(compiled(x_dev).cpu(), reference(x), rtol=1e-4, atol=1e-4)

    with torch.no_grad():
        check()
        stackings = metrics.counter_value(metrics.LAYER_STACKINGS)
        torch_xla.sync()
        with MetricsDelta() as delta:
            compiled(x_dev)
            torch_xla.sync()
        assert (delta.compiles, delta.executions) == (0, 1)  # the layers' call only: no stacking
        assert metrics.counter_value(metrics.LAYER_STACKINGS) == stackings
        for ours, theirs in zip(model.parameters(), reference.parameters()):  # an in-place update
            ours.mul_(0.9)
            theirs.mul_(0.9)
        check()
        model.blocks[2].fc.weight.data = torch.ones(8, 8, device=xla_device())  # a new tensor
        reference.blocks[2].fc.weight.data = torch.ones(8, 8)
        check()
        model.load_state_dict(Stack(depth=5).state_dict())
        reference.load_state_dict(model.state_dict())
        check()
    assert metrics.counter_value(metrics.LAYER_STACKINGS) == stackings + 3
