"""passes/remat.py: with `remat`, trained loops store fewer carries and give the same
gradients: scans run in segments, trained while_loops store every k-th iteration."""
from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from loop_testing import dynamo_graph, xla_device
from torch._higher_order_ops.scan import scan
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




@pytest.mark.parametrize("remat, rows", [(False, 65), (8, 9), (True, 9)])
def test_a_trained_while_loop_stores_every_kth_iteration(remat, rows):
    # Capacity 64: all 64 iterations and a spare row, or one in 8 (True: k = sqrt(64)).
    torch.manual_seed(0)
    args = (torch.tensor(5, device=xla_device()), torch.randn(4, 6, device=xla_device()))
    saved = _forward_saved_shapes(ResidualStepper().to(xla_device()), args, remat)
    assert [shape for shape in saved if shape[1:] == (4, 6)] == [(rows, 4, 6)], saved


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
