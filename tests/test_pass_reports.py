"""passes/reports.py: the reports of bounded and trained while_loops are carried out of
every enclosing op (while_loop, scan, map, cond, invoke_subgraph) to the graph's output."""
from __future__ import annotations

import operator

import pytest
import torch
from loop_testing import assert_same, dynamo_graph, xla_device
from torch._higher_order_ops.cond import cond
from torch._higher_order_ops.map import map as torch_map
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

import xla_loop_backend
from xla_loop_backend import LoopLoweringError
from xla_loop_backend.options import Options, PassContext
from xla_loop_backend.passes import reports, while_loops
from xla_loop_backend.traversal import sites


def _count(x):
    return torch.zeros((), dtype=torch.int64, device=x.device)


def _halve(n, x):
    return while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x * 0.5), (_count(x), x))[1]


def _bounded(fn, *args):
    gm = dynamo_graph(fn, *args)
    outputs = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    context = PassContext(Options(max_iterations=10), training=False)
    while_loops.PASS.run(gm, context)
    reports.PASS.run(gm, context)
    return gm, context, outputs


def _outputs(gm):
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def test_the_graph_returns_one_more_output_the_largest_report():
    gm, context, before = _bounded(lambda n, x: _halve(n, _halve(n, x)), torch.tensor(2), torch.ones(2))
    outs = _outputs(gm)
    assert context.reports and len(outs) == before + 1
    assert outs[-1].target is torch.maximum  # of the two top-level loops' reports


@pytest.mark.parametrize("kind", ["scan", "map"])
def test_scan_and_map_return_the_report_as_one_more_y(kind):
    def f(n, x, xs):
        if kind == "scan":
            return scan(lambda c, s: (_halve(n, c + s), c.sum()), x, xs)
        return torch_map(lambda s, c: _halve(n, s * c), xs, x)

    gm, context, _ = _bounded(f, torch.tensor(2), torch.ones(2), torch.ones(3, 2))
    (outer,) = [s for s in sites(gm) if s.depth == 0]
    body = next(iter(outer.call.subgraphs().values()))
    body_outputs = next(n for n in body.graph.nodes if n.op == "output").args[0]
    assert body_outputs[-1].meta == {} and body_outputs[-1].target is operator.getitem  # the inner loop's report
    steps = [u for u in outer.call.node.users if u.target is operator.getitem and u.args[1] == len(body_outputs) - 1]
    assert len(steps) == 1 and [u.target for u in steps[0].users] == [torch.amax]
    assert context.reports


def test_a_while_loop_body_returns_the_report_of_its_inner_loops():
    def f(n, x):
        return while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, _halve(n, x)), (_count(x), x))[1]

    gm, _, _ = _bounded(f, torch.tensor(2), torch.ones(2))
    outer = next(s for s in sites(gm) if s.depth == 0)
    assert outer.call.node.kwargs["body_reports"] is True


def test_cond_branches_both_return_a_report():
    def f(n, x):
        return cond(x.sum() > 0, lambda x: _halve(n, x), lambda x: x - 1, (x,))

    gm, context, _ = _bounded(f, torch.tensor(2), torch.ones(2))
    branches = next(s for s in sites(gm) if s.call.kind == "cond").call.subgraphs().values()
    lasts = [next(n for n in b.graph.nodes if n.op == "output").args[0][-1] for b in branches]
    assert [n.target for n in lasts] == [operator.getitem, reports._no_report]  # the branch without a loop reports 0


def test_a_subgraph_called_twice_reports_at_both_calls():
    @torch.compiler.nested_compile_region
    def layer(n, x):
        return _halve(n, x) + 1

    gm, context, _ = _bounded(lambda n, x: layer(n, layer(n, x)), torch.tensor(2), torch.ones(2))
    calls = [s for s in sites(gm) if s.call.kind == "invoke_subgraph"]
    assert len(calls) == 2
    subgraph = calls[0].call.subgraph("subgraph")
    index = len(next(n for n in subgraph.graph.nodes if n.op == "output").args[0]) - 1
    for site in calls:
        assert any(u.target is operator.getitem and u.args[1] == index for u in site.call.node.users)
    assert context.reports


def test_a_bounded_loop_in_a_cond_fn_is_an_error():
    def f(n, x):
        return while_loop(lambda i, x: _halve(n, x).sum() > i, lambda i, x: (i + 1, x * 2), (_count(x), x))

    with pytest.raises(LoopLoweringError, match="cond_fn runs a while_loop that has a bound or trains"):
        _bounded(f, torch.tensor(2), torch.ones(2))


def test_reports_reach_the_output_from_two_levels_down():
    def f(n, x, xs):
        def body(i, x):
            x, _ = scan(lambda c, s: (_halve(n, c + s), c.sum()), x, xs)
            return i + 1, x

        return while_loop(lambda i, x: i < 2, body, (_count(x), x))[1]

    dev = xla_device()
    compiled = xla_loop_backend.compile(f, fullgraph=True, max_iterations=10)
    args = (torch.tensor(3), torch.ones(2), torch.ones(3, 2))
    assert_same(compiled(*[a.to(dev) for a in args]), f(*args))
    with pytest.raises(LoopLoweringError, match="still running after max_iterations=10"):
        compiled(torch.tensor(12, device=dev), torch.ones(2, device=dev), torch.ones(3, 2, device=dev))
