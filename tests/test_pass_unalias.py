"""passes/unalias.py: loop operands that are the same tensor are made distinct, at any depth."""
from __future__ import annotations

import torch
from loop_testing import check_against_eager, dynamo_graph
from torch._higher_order_ops.scan import scan

import xla_loop_backend
from xla_loop_backend.ops import example_value
from xla_loop_backend.options import Options, PassContext
from xla_loop_backend.passes import unalias
from xla_loop_backend.traversal import sites


def _carry_also_captured(x, xs):
    """A fori_loop whose body reads its own carry through the closure, inside a scan body."""

    def combine(c, s):
        inner = xla_loop_backend.fori_loop(0, 2, lambda j, u: torch.tanh(u + c), c)
        return inner + s, c.sum()

    return scan(combine, x, xs)


def _tensor_operands(site):
    return [v for _, _, v in site.call.all_operands() if isinstance(example_value(v), torch.Tensor)]


def test_repeated_operands_become_copies_at_any_depth():
    gm = dynamo_graph(_carry_also_captured, torch.ones(3), torch.ones(4, 3))
    inner = next(s for s in sites(gm) if s.depth == 1)
    operands = _tensor_operands(inner)
    assert len(set(operands)) < len(operands)  # the carry is also captured
    unalias.PASS.run(gm, PassContext(Options(), training=False))
    inner = next(s for s in sites(gm) if s.depth == 1)
    operands = _tensor_operands(inner)
    assert len(set(operands)) == len(operands)
    assert any(n.op == "call_function" and n.target is torch.clone for n in inner.call.owner.graph.nodes)


def test_the_program_then_compiles_and_matches_eager():
    check_against_eager(_carry_also_captured, torch.randn(3), torch.randn(4, 3))
