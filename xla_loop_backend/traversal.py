"""One traversal of a graph's control-flow ops at every depth, and the one way passes run.

`sites(gm)` lists every control-flow node (`ops.py`) of `gm` and of every subgraph reachable
through one: the bodies of while_loop, scan, map, cond and invoke_subgraph, nested any way.
Each site knows the call whose subgraph holds it (`parent`), and a node comes after every
node of its own subgraphs (innermost first), so a pass that rewrites a loop finds its body
already rewritten. A higher-order op that is not described in `ops.py` but holds a loop in
a subgraph is an error: its loops would otherwise be skipped.

A `GraphPass` has one rule per op kind. `run` applies the rule of each site's kind; a kind
with no rule is a `LoopLoweringError`, never a silent skip. A rule that leaves an op as it
is says so (`unchanged`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.fx

from .errors import LoopLoweringError, loop_name
from .ops import SUBGRAPH, Call, example_value, is_control_flow


@dataclass(eq=False)
class Site:
    """One control-flow call, and the call whose subgraph holds it (None at top level)."""

    call: Call
    parent: "Site | None"
    _differentiable: bool | None = field(default=None, repr=False)

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1

    @property
    def name(self) -> str:
        """The loop's name for messages: its kind and the user's source line."""
        return loop_name(self.call.kind, self.call.node)

    def may_need_grad(self, training: bool) -> bool:
        """Whether AOTAutograd may differentiate this call: at top level, when an operand
        requires grad; inside a subgraph, when the enclosing call may (a subgraph's own
        values say nothing reliable about gradients)."""
        if not training:
            return False
        if self._differentiable is None:
            if self.parent is not None:
                self._differentiable = self.parent.may_need_grad(training)
            else:
                values = [example_value(v) for _, _, v in self.call.all_operands()]
                self._differentiable = any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)
        return self._differentiable


def sites(gm: torch.fx.GraphModule) -> list[Site]:
    """Every control-flow call in `gm` at every depth, innermost first (see above)."""
    found: list[Site] = []
    seen: set[int] = set()

    def visit(owner: torch.fx.GraphModule, parent: Site | None) -> None:
        for node in list(owner.graph.nodes):
            if is_control_flow(node):
                site = Site(Call.of(owner, node), parent)
                for sub in site.call.subgraphs().values():
                    if id(sub) not in seen:
                        seen.add(id(sub))
                        visit(sub, site)
                found.append(site)
            elif _is_unknown_op_holding_loops(owner, node):
                raise LoopLoweringError(
                    f"{loop_name(str(node.target), node)}: `{node.format_node()}` holds a loop in a subgraph, "
                    "and xla_loop does not know this operator's operands, so it cannot lower that loop. "
                    "Call the loop outside it."
                )

    visit(gm, None)
    return found


def graph_modules(gm: torch.fx.GraphModule) -> Iterator[torch.fx.GraphModule]:
    """`gm` and every GraphModule under it (loop bodies and other subgraphs), once each."""
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield module


def unknown_op_subgraphs(owner: torch.fx.GraphModule, node: torch.fx.Node) -> list[torch.fx.GraphModule]:
    """The subgraphs a higher-order op not described in `ops.py` takes (positional or by
    keyword); empty for any other node."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator) or is_control_flow(node):
        return []
    values = [v for v in list(node.args) + list(node.kwargs.values()) if isinstance(v, torch.fx.Node) and v.op == "get_attr"]
    return [sub for sub in (getattr(owner, v.target, None) for v in values) if isinstance(sub, torch.fx.GraphModule)]


def _is_unknown_op_holding_loops(owner: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return any(is_control_flow(n) for sub in unknown_op_subgraphs(owner, node) for m in graph_modules(sub) for n in m.graph.nodes)


Rule = Callable[[Site, Any], None]


def unchanged(site: Site, context: Any) -> None:
    """The rule of a pass that has nothing to do for this kind of op."""


@dataclass(frozen=True)
class GraphPass:
    """A named rewrite of a graph: a rule per control-flow op kind, then an optional step on
    the whole graph (`finish`)."""

    name: str
    purpose: str
    rules: Mapping[str, Rule]
    finish: Callable[[torch.fx.GraphModule, Any], None] | None = None

    def run(self, gm: torch.fx.GraphModule, context: Any) -> None:
        for site in sites(gm):
            rule = self.rules.get(site.call.kind)
            if rule is None:
                why = site.call.spec.unsupported
                raise LoopLoweringError(
                    f"{site.name}: xla_loop has no lowering for `{op_name(site.call.node.target)}` "
                    f"(its `{self.name}` pass, which {self.purpose}, has no rule for {site.call.kind})"
                    + (f": {why}" if why else "")
                )
            rule(site, context)
        if self.finish is not None:
            self.finish(gm, context)
        for module in graph_modules(gm):
            module.graph.lint()
            module.recompile()


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"torch.ops.higher_order.{target.__name__}"
    return getattr(target, "__name__", str(target))


def subgraph_nodes(call: Call) -> list[torch.fx.Node]:
    """The `get_attr` nodes of a call's subgraphs."""
    return [call[name] for name in call.spec.names(SUBGRAPH)]


def free_name(gm: torch.fx.GraphModule, base: str) -> str:
    """`base_k` for the smallest k that names neither an attribute of `gm` nor a node of its
    graph (for a subgraph or an input a pass adds)."""
    taken = {n.name for n in gm.graph.nodes}
    k = 0
    while hasattr(gm, f"{base}_{k}") or f"{base}_{k}" in taken:
        k += 1
    return f"{base}_{k}"


def replace_call(call: Call, target: Callable[..., Any], **options: Any) -> torch.fx.Node:
    """Replace the call's node by `target(*same arguments, **options)`; users follow."""
    graph = call.owner.graph
    with graph.inserting_before(call.node):
        new = graph.call_function(target, call.node.args, {**call.node.kwargs, **options})
    new.meta = dict(call.node.meta)
    call.node.replace_all_uses_with(new)
    graph.erase_node(call.node)
    call.node = new
    return new


@dataclass(frozen=True)
class NodeRewrite:
    """A named rewrite of the nodes of a graph and of every subgraph in it (or of the
    top-level graph alone): each function takes a graph and returns whether it changed it."""

    name: str
    purpose: str
    rewrites: tuple[Callable[[torch.fx.Graph], bool], ...]
    subgraphs: bool = True

    def run(self, gm: torch.fx.GraphModule, context: Any = None) -> None:
        for module in list(graph_modules(gm)) if self.subgraphs else [gm]:
            changed = [rewrite(module.graph) for rewrite in self.rewrites]
            if any(changed):
                module.recompile()
