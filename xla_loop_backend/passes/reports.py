"""Before AOTAutograd: the reports of bounded and trained while_loops (`while_loops.py`),
carried out of every enclosing op to one more output of the graph.

A report is a 0-dim int64 (iterations a loop needed). Each kind of op passes the reports
of the loops in its subgraphs out its own way. (An integer output of a scan, map or cond
body trains since `torch_fixes` fixed their VJP.)

    while_loop (bounded_while)   its body returns the largest inner report as one more
                                 output, which the loop keeps the maximum of
    scan, map                    the body returns it as one more y; its maximum over the steps
    cond                         both branches return it (0 from a branch with no loop)
    invoke_subgraph              the subgraph returns it, as one more output

The graph then returns the largest report of its top-level loops last; the call-time
wrapper reads it (`call.ReportingCall`). Runs after `while_loops`, which makes the reports.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from ..errors import LoopLoweringError
from ..ops import example_value
from ..options import PassContext
from ..traversal import GraphPass, Site, graph_modules
from .while_loops import bounded_while

# GraphModule.meta keys: the report nodes found in a (sub)graph so far, and the index of the
# output a subgraph returns its report at, once it does (a subgraph may be called from
# several places: invoke_subgraph).
_PENDING, _RETURNED_AT = "xla_loop_reports", "xla_loop_report_output"


def _pending(module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return module.meta.setdefault(_PENDING, [])


def _report_output(module: torch.fx.GraphModule, always: bool = False) -> int | None:
    """The index of the output at which `module` returns its largest report, making it
    return one if it has reports (or, with `always`, 0 if it has none)."""
    if _RETURNED_AT in module.meta:
        return module.meta[_RETURNED_AT]
    reports = module.meta.pop(_PENDING, [])
    if not reports and not always:
        return None
    output = next(n for n in module.graph.nodes if n.op == "output")
    outs = output.args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    with module.graph.inserting_before(output):
        if reports:
            report = reports[0]
            for other in reports[1:]:
                report = module.graph.call_function(torch.maximum, (report, other))
        else:
            report = module.graph.call_function(_no_report, (_tensor_input(module),))
    output.args = ((*outs, report),)
    module.meta[_RETURNED_AT] = len(outs)
    return len(outs)


def _no_report(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=like.device)


def _tensor_input(module: torch.fx.GraphModule) -> torch.fx.Node:
    for node in module.graph.nodes:
        if node.op == "placeholder" and isinstance(example_value(node), torch.Tensor):
            return node
    raise LoopLoweringError("xla_loop: a branch without tensor operands cannot pass a loop's report on")


def _after(node: torch.fx.Node, target: Any, args: tuple) -> torch.fx.Node:
    with node.graph.inserting_after(node):
        return node.graph.call_function(target, args)


def while_loop(site: Site, context: PassContext) -> None:
    call = site.call
    if _report_output(call.subgraph("cond_fn")) is not None:
        raise LoopLoweringError(
            f"{site.name}: its cond_fn runs a while_loop that has a bound or trains; that is not "
            "supported: compute the condition in the body and carry it"
        )
    if call.node.target is not bounded_while:
        assert not call.subgraph("body_fn").meta.get(_PENDING), f"{site.name}: a loop inside an unbounded while_loop reports"
        return
    if _report_output(call.subgraph("body_fn")) is not None:
        call.node.kwargs = {**call.node.kwargs, "body_reports": True}
    report = _after(call.node, operator.getitem, (call.node, len(call["carried_inputs"])))
    _pending(call.owner).append(report)


def stacked_steps(site: Site, context: PassContext) -> None:
    """scan and map: the body's report is one more y; the loop reports its maximum."""
    call = site.call
    (body,) = call.subgraphs().values()
    index = _report_output(body)
    if index is None:
        return
    per_step = _after(call.node, operator.getitem, (call.node, index))
    _pending(call.owner).append(_after(per_step, torch.amax, (per_step,)))


def branches(site: Site, context: PassContext) -> None:
    """cond and invoke_subgraph: each subgraph returns the report as one more output."""
    call = site.call
    subgraphs = list(call.subgraphs().values())
    if all(_report_output(sub) is None for sub in subgraphs):
        return
    (index,) = {_report_output(sub, always=True) for sub in subgraphs}
    _pending(call.owner).append(_after(call.node, operator.getitem, (call.node, index)))


def finish(gm: torch.fx.GraphModule, context: PassContext) -> None:
    """The graph returns the largest report of its top-level loops last."""
    context.reports = _report_output(gm) is not None
    for module in graph_modules(gm):
        module.meta.pop(_PENDING, None)
        module.meta.pop(_RETURNED_AT, None)


PASS = GraphPass(
    "reports",
    "carries loop reports out to the graph's output",
    {
        "while_loop": while_loop,
        "scan": stacked_steps,
        "map": stacked_steps,
        "cond": branches,
        "invoke_subgraph": branches,
    },
    finish=finish,
)
