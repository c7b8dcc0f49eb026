"""Lowering driver: replace every control-flow node of an AOTAutograd graph by a call of
its lowering rule (`lowering/__init__.py`).

torch_xla's dynamo bridge cannot take a loop node (its subgraphs are `get_attr` modules,
and its dense implementation is a host loop), so each top-level loop node becomes a plain
named function that closes over the subgraph modules and calls the lowering rule. Loops
nested in a subgraph are lowered when the enclosing subgraph is traced.

Before that, `CHECK` (a pass: one rule per op kind) rejects at compile time what cannot be
lowered: an op with no lowering rule, or a loop body whose shapes depend on data; and any
other higher-order op that calls a subgraph (e.g. AOTAutograd's `auto_functionalized_v2`
around an invoke_subgraph that mutates its inputs) is an error, not a bridge crash.

Python int (and bool) results of a loop, and `.item()` values (`capture_scalar_outputs`),
stay 0-dim device tensors inside the graph;
`LoweredGraph` records which graph outputs the caller expects as Python scalars, and of
which type, so they are read back once, at the end of the call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from ..errors import LoopLoweringError, loop_name
from ..ops import KINDS, Call, is_control_flow
from ..traversal import GraphPass, Site, graph_modules, op_name, unknown_op_subgraphs
from . import lower_control_flow, rule_for
from .subgraph import TensorScalarCall, is_symbolic_scalar


@dataclass
class LoweredGraph:
    """The rewritten graph, and the output positions to return as Python ints or bools."""

    module: torch.fx.GraphModule
    num_loops: int
    scalar_outputs: dict[int, type] = field(default_factory=dict)


def find_loop_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The top-level control-flow nodes of `gm`."""
    return [n for n in gm.graph.nodes if is_control_flow(n)]


def _lowerable(site: Site, context: Any) -> None:
    """An op needs a lowering rule; a loop whose body makes a tensor of data-dependent shape
    cannot be one XLA While."""
    rule_for(site.call.node, site.call.node.target)
    for sub in site.call.subgraphs().values():
        _check_static_shapes(site.name, sub)


CHECK = GraphPass("check_lowerable", "rejects loops XLA cannot run", {kind: _lowerable for kind in KINDS})


def _check_static_shapes(loop: str, subgraph: torch.fx.GraphModule) -> None:
    # Sizes fixed before the loop (even data-dependent ones) are the same every iteration.
    known = set()
    for node in subgraph.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
            known |= free_unbacked_symbols(node.meta["val"].shape)
    for node in subgraph.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and free_unbacked_symbols(val.shape) - known:
            raise LoopLoweringError(
                f"{loop}: `{node.format_node()}` inside the loop makes a tensor whose shape "
                f"depends on data (found {tuple(val.shape)}); an XLA While needs every shape in "
                "its body fixed at compile time. Keep shapes static inside the loop (e.g. use "
                "torch.where with a mask instead of masked_select/nonzero)."
            )


def _check_no_unknown_subgraph_calls(gm: torch.fx.GraphModule) -> None:
    """A higher-order op that is not described in `ops.py` but takes a subgraph cannot reach
    torch_xla's bridge (which takes tensors and numbers only, and fails with an assertion)."""
    for module in graph_modules(gm):
        for node in module.graph.nodes:
            if not unknown_op_subgraphs(module, node):
                continue
            wraps_invoke_subgraph = node.args[:1] == (torch.ops.higher_order.invoke_subgraph,)
            hint = (
                " Here it wraps invoke_subgraph: a function marked with "
                "torch.compiler.nested_compile_region updates one of its inputs in place (e.g. a "
                "BatchNorm's running statistics in training mode). Keep that update out of the "
                "marked function, or drop the marker."
                if wraps_invoke_subgraph
                else ""
            )
            raise LoopLoweringError(
                f"{loop_name(node.target.__name__, node)}: `{op_name(node.target)}` calls a subgraph, and "
                "xla_loop has no lowering for it (torch_xla's bridge cannot take a subgraph argument)." + hint
            )


def lower_loops(gm: torch.fx.GraphModule) -> LoweredGraph:
    """Replace the top-level loop nodes of `gm` in place; see the module docstring."""
    CHECK.run(gm, None)
    _check_no_unknown_subgraph_calls(gm)
    loops = find_loop_nodes(gm)
    reads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _READS]
    if not loops and not reads:
        return LoweredGraph(gm, 0)
    device_scalars: set[torch.fx.Node] = set()
    for index, node in enumerate(loops):
        _replace_loop_node(Call.of(gm, node), index, device_scalars)
    for node in reads:  # (`.item()`: its value stays on the device, like a loop's int result)
        node.target = _device_item
        device_scalars.add(node)
    _adapt_scalar_users(gm, device_scalars)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = pytree.tree_leaves(output.args[0])
    scalar_outputs = {
        i: _python_type(o) for i, o in enumerate(outs) if isinstance(o, torch.fx.Node) and o in device_scalars
    }
    return LoweredGraph(gm, len(loops), scalar_outputs)


_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


def _device_item(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor.item()` kept on the device: a 0-dim tensor (read back only if returned)."""
    return tensor.reshape(())


def _python_type(node: torch.fx.Node) -> type:
    value = node.meta.get("val")
    return bool if isinstance(value, (bool, torch.SymBool)) else float if isinstance(value, (float, torch.SymFloat)) else int


def _replace_loop_node(call: Call, index: int, device_scalars: set[torch.fx.Node]) -> None:
    gm, node = call.owner, call.node
    # Subgraphs are captured by the call; every other field stays a graph argument.
    subgraphs = call.subgraphs()
    fields = call.args
    dynamic = {name: value for name, value in fields.items() if name not in subgraphs}
    names = list(dynamic)
    target = node.target

    def call_lowered_loop(*values: Any) -> Any:
        args = call.spec.unbind({**subgraphs, **dict(zip(names, values))})
        return lower_control_flow(node, target, args, {})

    # FX code generation names the target by __name__; keep it unique per loop.
    call_lowered_loop.__name__ = f"xla_loop_{call.kind}_{index}"
    call_lowered_loop.__qualname__ = call_lowered_loop.__name__
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(call_lowered_loop, tuple(dynamic.values()))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for user in new.users:
        if is_symbolic_scalar(user.meta.get("val")):
            device_scalars.add(user)


def _adapt_scalar_users(gm: torch.fx.GraphModule, device_scalars: set[torch.fx.Node]) -> None:
    """Nodes downstream of a loop's int result see a device tensor where the graph has a
    SymInt; route them through `TensorScalarCall` (which may make more device scalars)."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in device_scalars:
            continue
        inputs = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]
        if not any(a in device_scalars for a in inputs):
            continue
        node.target = _scalar_call(node)
        if is_symbolic_scalar(node.meta.get("val")):
            device_scalars.add(node)


def _scalar_call(node: torch.fx.Node) -> Callable[..., Any]:
    target = node.target
    call = TensorScalarCall(node, "code after the loop")

    def call_with_device_scalars(*args: Any, **kwargs: Any) -> Any:
        return call(target, args, kwargs)

    call_with_device_scalars.__name__ = f"xla_loop_scalar_{node.name}"
    call_with_device_scalars.__qualname__ = call_with_device_scalars.__name__
    return call_with_device_scalars
