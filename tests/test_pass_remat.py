"""passes/remat.py: with `remat`, trained loops store fewer carries and give the same
gradients: scans run in segments, trained while_loops keep fewer checkpoints."""
from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from loop_testing import dynamo_graph, xla_device
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop
from training_testing import ResidualStepper, ScanRnn, train_step_against_python

from xla_loop_backend import pipeline
from xla_loop_backend.options import Options, PassContext
from xla_loop_backend.passes import remat as remat_pass
from xla_loop_backend.passes import while_loops
from xla_loop_backend.traversal import sites


@pytest.mark.parametrize("remat", [True, 5])
def test_remat_gives_the_same_gradients(remat):
    # 12 steps in segments of 4 (True: ceil(sqrt(12))) or 5 (padded with masked steps).
    train_step_against_python(ScanRnn, lambda: (torch.zeros(3, 8), torch.randn(12, 3, 5)), remat=remat)
    train_step_against_python(ResidualStepper, lambda: (torch.tensor(7), torch.randn(4, 6)), max_iterations=16, remat=remat)


def _forward_saved_shapes(model: torch.nn.Module, args: tuple, remat) -> list[tuple[int, ...]]:
    """Shapes of what the forward graph hands to the backward (its outputs beyond the loss)."""
    saved = []

    def forward_compiler(graph: torch.fx.GraphModule, _):
        (outputs,) = graph.graph.find_nodes(op="output")[0].args
        saved.extend(tuple(o.meta["val"].shape) for o in outputs[1:] if isinstance(o, torch.fx.Node))
        return make_boxed_func(graph.forward)

    def backend(gm, example_inputs):
        return pipeline.compile(gm, example_inputs, Options(remat=remat), graph_compiler=forward_compiler)

    torch.compile(model, backend=backend, fullgraph=True)(*args)
    return saved


@pytest.mark.parametrize("remat, stored", [(False, 100), (True, 10), (25, 4)])
def test_remat_stores_carries_per_segment_instead_of_per_step(remat, stored):
    torch.manual_seed(0)
    args = (torch.zeros(3, 8, device=xla_device()), torch.randn(100, 3, 5, device=xla_device()))
    saved = _forward_saved_shapes(ScanRnn().to(xla_device()), args, remat)
    hidden_states = [shape for shape in saved if shape[-2:] == (3, 8) and len(shape) == 3]
    assert hidden_states == [(stored, 3, 8)], saved




@pytest.mark.parametrize("remat, checkpoints", [(False, 32), (8, 4), (3, 11), (True, 5)])
def test_a_trained_while_loop_keeps_fewer_checkpoints(remat, checkpoints):
    # The default 32 checkpoints divided by k (True: sqrt(32)): what the forward hands the
    # backward is that many copies of the carry and the row the others write to.
    torch.manual_seed(0)
    args = (torch.tensor(5, device=xla_device()), torch.randn(4, 6, device=xla_device()))
    saved = _forward_saved_shapes(ResidualStepper().to(xla_device()), args, remat)
    assert [shape for shape in saved if shape[1:] == (4, 6)] == [(checkpoints + 1, 4, 6)], saved
    assert remat_pass.while_checkpoints(32, remat) == checkpoints


def test_a_nested_trained_while_loop_keeps_its_checkpoints():
    w = torch.randn(3, 3, requires_grad=True)

    def f(h, xs):
        def combine(c, x):
            _, inner = while_loop(lambda i, d: i < 3, lambda i, d: (i + 1, torch.tanh(d @ w)), (torch.zeros((), dtype=torch.int64), c))
            return inner + x, c.sum()

        _, h = while_loop(lambda i, h: i < 2, lambda i, h: (i + 1, scan(combine, h, xs)[0]), (torch.zeros((), dtype=torch.int64), h))
        return h

    gm = dynamo_graph(f, torch.zeros(3), torch.ones(4, 3))
    context = PassContext(Options(remat=4), training=True)
    while_loops.PASS.run(gm, context)
    remat_pass.PASS.run(gm, context)
    counts = {s.depth: s.call.node.kwargs["checkpoints"] for s in sites(gm) if s.call.kind == "while_loop"}
    assert counts == {0: 8, 2: 32}


def test_only_top_level_loops_are_segmented():
    w = torch.randn(3, 3, requires_grad=True)

    def f(h, xs):
        def combine(c, x):
            inner, _ = scan(lambda d, y: (torch.tanh(d @ w + y), d.sum()), c, xs)
            return inner + x, c.sum()

        return scan(combine, h, xs)

    gm = dynamo_graph(f, torch.zeros(3), torch.ones(4, 3))
    context = PassContext(Options(remat=2), training=True)
    while_loops.PASS.run(gm, context)
    remat_pass.PASS.run(gm, context)
    targets = {s.depth: s.call.node.target for s in sites(gm)}
    assert targets == {0: remat_pass.segmented_scan, 1: torch.ops.higher_order.scan}
