"""traversal.py: one traversal of control-flow ops at every depth; passes with a rule per
op kind, and no rule is an error."""
from __future__ import annotations

import pytest
import torch
from loop_testing import dynamo_graph
from torch._higher_order_ops.cond import cond
from torch._higher_order_ops.map import map as torch_map
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

from xla_loop_backend import LoopLoweringError
from xla_loop_backend.traversal import GraphPass, sites, unchanged


def _count(x):
    return torch.zeros((), dtype=torch.int64, device=x.device)


def _nested(n, h, xs):
    """A while_loop whose body runs a scan whose body runs a map; a cond whose branch runs a while_loop."""

    def scan_body(c, x):
        ys = torch_map(lambda row, c: row * c, torch.stack([x, x]), c)
        return c + ys.sum(0), c.sum()

    def body(i, h):
        h, _ = scan(scan_body, h, xs)
        return i + 1, torch.tanh(h)

    _, h = while_loop(lambda i, h: i < n, body, (_count(h), h))

    def branch(h):
        return while_loop(lambda i, h: i < 2, lambda i, h: (i + 1, h * 2), (_count(h), h))[1]

    return cond(h.sum() > 0, branch, lambda h: h - 1, (h,))


def test_every_loop_at_every_depth_innermost_first():
    gm = dynamo_graph(_nested, torch.tensor(2), torch.ones(3), torch.ones(4, 3))
    found = sites(gm)
    assert [(s.call.kind, s.depth) for s in found] == [
        ("map", 2),
        ("scan", 1),
        ("while_loop", 0),
        ("while_loop", 1),
        ("cond", 0),
    ]
    by_kind = {(s.call.kind, s.depth): s for s in found}
    assert by_kind[("map", 2)].parent is by_kind[("scan", 1)]
    assert by_kind[("scan", 1)].parent is by_kind[("while_loop", 0)]
    assert by_kind[("while_loop", 1)].parent is by_kind[("cond", 0)]
    # a node comes after every node of its own subgraphs
    order = {id(s): k for k, s in enumerate(found)}
    for site in found:
        if site.parent is not None:
            assert order[id(site)] < order[id(site.parent)]


def test_a_pass_applies_its_rule_to_each_kind():
    gm = dynamo_graph(_nested, torch.tensor(2), torch.ones(3), torch.ones(4, 3))
    seen = []
    rules = {kind: (lambda site, context, kind=kind: seen.append((kind, site.depth))) for kind in ("while_loop", "scan", "map", "cond")}
    GraphPass("spy", "records what it visits", rules).run(gm, None)
    assert sorted(seen) == sorted([("map", 2), ("scan", 1), ("while_loop", 0), ("while_loop", 1), ("cond", 0)])


def test_a_kind_without_a_rule_is_an_error_naming_the_loop_and_the_pass():
    gm = dynamo_graph(_nested, torch.tensor(2), torch.ones(3), torch.ones(4, 3))
    incomplete = GraphPass("partial", "handles loops but not maps", {"while_loop": unchanged, "scan": unchanged, "cond": unchanged})
    with pytest.raises(LoopLoweringError, match=r"map at test_traversal.py:\d+: .*`torch.ops.higher_order.map_impl`.*`partial` pass.*no rule for map"):
        incomplete.run(gm, None)


def test_may_need_grad_follows_the_operands_at_top_level_and_the_parent_inside():
    w = torch.randn(3, 3, requires_grad=True)

    def f(n, h, xs):
        def body(i, h):
            h, _ = scan(lambda c, x: (c @ w + x, c.sum()), h, xs)
            return i + 1, h

        return while_loop(lambda i, h: i < n, body, (_count(h), h)), scan(lambda c, x: (c + x, c.sum()), h, xs)

    gm = dynamo_graph(f, torch.tensor(2), torch.ones(3), torch.ones(4, 3))
    inner_scan, outer_while, plain_scan = sites(gm)
    assert outer_while.may_need_grad(training=True)  # w is captured
    assert inner_scan.may_need_grad(training=True)  # inside a loop that may be differentiated
    assert not plain_scan.may_need_grad(training=True)  # no operand requires grad
    assert not outer_while.may_need_grad(training=False)


def test_an_unknown_higher_order_op_holding_a_loop_is_an_error():
    def f(n, x):
        def run(x):
            return while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x * 2), (_count(x), x))[1]

        return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)

    gm = dynamo_graph(f, torch.tensor(2), torch.ones(3, requires_grad=True))
    with pytest.raises(LoopLoweringError, match="holds a loop in a subgraph.*does not know this operator"):
        sites(gm)
