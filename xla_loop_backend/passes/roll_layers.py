"""Before AOTAutograd: repeated layers become one scan (option `roll_layers`, on by default).

`for layer in self.layers: x = layer(x)` unrolls under Dynamo: XLA compiles every layer,
forward and backward, so compile time grows with depth. A layer marked with
`torch.compiler.nested_compile_region`, or repeated code that Dynamo's graph deduplication
finds (on during calls of `xla_loop_backend.compile`, see `backend.py`), reaches the
backend as calls of one subgraph, `invoke_subgraph(subgraph, id, *ops)`. (Deduplication
leaves the first occurrence in line and calls the subgraph for the others: a chain of
depth - 1 calls.)
A chain of such calls, each feeding one output to the next call's same operand,

    x1 = layer(x0, w0, b0);  x2 = layer(x1, w1, b1);  ...

is the scan `scan(layer, x0, xs=[stack(w0, w1, ...), stack(b0, b1, ...)])`: the carry is
the chained value, the operands that differ between calls (each layer's parameters) are
stacked into xs, and those that are the same node in every call (a shared mask, a shared
weight) are the scan's additional inputs. Values of a layer used outside the chain (its
other outputs, a cache) become the scan's ys, read back per layer. The scan then goes
through every later pass like one the user wrote (unalias, remat) and trains through the
scan path: XLA compiles the layer once, as a While body.

Subgraphs are compared by structure (torch 2.9 traces the first call of a marked function
apart from the rest, so a chain holds two identical GraphModules). Only top-level chains
roll; calls that do not chain stay `invoke_subgraph` and are computed in line
(`lowering/invoke_subgraph.py`). A chain rolls only where that changes nothing else: every
use of its values outside it comes after its last call, the non-chained operands are
tensors of one shape per position, the chained value keeps its shape and dtype, and the
layer updates none of its inputs in place (a BatchNorm's running statistics: a scan body
may not).
Stacking the per-layer operands costs one copy of them per call, in the graph, when it
trains (the gradients flow back through the stack). In inference the stacks of operands that
are the graph's inputs (the layers' parameters) become inputs of their own instead
(`passes/stacked_inputs.py`), which the call-time wrapper stacks once and keeps while the
parameters stay the same (`call.StackedOnce`).

First in the pipeline: the scans it makes then meet every pass as the user's own do.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch._higher_order_ops.scan import scan_op

from .. import metrics, stacking  # noqa: F401  (stacking: registers torch.ops.xla_loop.stack_layers)
from ..errors import loop_name
from ..explain import record
from ..ops import example_value
from ..options import PassContext
from ..traversal import GraphPass, free_name, unchanged

_LOG = logging.getLogger(__name__)

_invoke_subgraph = torch.ops.higher_order.invoke_subgraph
_FIRST_OPERAND = 2  # invoke_subgraph(subgraph, identifier, *operands)


@dataclass
class _Layer:
    node: torch.fx.Node  # the invoke_subgraph call
    subgraph: torch.fx.GraphModule
    outputs: dict[int, list[torch.fx.Node]] = field(default_factory=dict)  # output index -> its getitem nodes

    @property
    def operands(self) -> tuple[Any, ...]:
        return self.node.args[_FIRST_OPERAND:]


def _layers(gm: torch.fx.GraphModule) -> list[_Layer]:
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not _invoke_subgraph:
            continue
        layer = _Layer(node, getattr(gm, node.args[0].target))
        _describe_placeholders(layer)
        for user in node.users:
            if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
                layer.outputs.setdefault(user.args[1], []).append(user)
            else:
                layer.outputs = {}  # used whole (not by index): leave this call alone
                layer.node = None  # type: ignore[assignment]
                break
        if layer.node is not None:
            layers.append(layer)
    return layers


def _describe_placeholders(layer: _Layer) -> None:
    """Give the subgraph's inputs the call's operand values where they have none: Dynamo's
    graph deduplication makes subgraphs whose placeholders carry no example value (a marked
    function's have them). Every call of one subgraph passes operands of the same shapes."""
    for placeholder, operand in zip(layer.subgraph.graph.find_nodes(op="placeholder"), layer.operands):
        if example_value(placeholder) is None and isinstance(operand, torch.fx.Node):
            placeholder.meta["example_value"] = example_value(operand)


def structure(gm: torch.fx.GraphModule) -> tuple:
    """What a subgraph computes, by node position (names aside), with its inputs' types."""
    position: dict[torch.fx.Node, int] = {}
    signature = []
    for i, node in enumerate(gm.graph.nodes):
        position[node] = i
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: ("%", position[n]))
        if node.op == "placeholder":
            value = example_value(node)
            what: Any = (value.shape, value.dtype, value.device) if isinstance(value, torch.Tensor) else type(value)
            signature.append(("placeholder", what))
        elif node.op == "get_attr":
            attribute = getattr(gm, node.target)
            if not isinstance(attribute, torch.fx.GraphModule):
                return ("unrollable", id(gm))  # a constant tensor: compared by identity, never equal
            signature.append(("get_attr", structure(attribute)))
        elif node.op == "call_module":
            return ("unrollable", id(gm))
        else:
            signature.append((node.op, node.target, repr(args)))
    return tuple(signature)


def _link(first: _Layer, second: _Layer) -> tuple[int, int] | None:
    """(output of `first`, operand of `second`) where the first feeds the second, if any."""
    for out, getitems in sorted(first.outputs.items()):
        for position, operand in enumerate(second.operands):
            if operand in getitems:
                return out, position
    return None


def _chains(layers: list[_Layer]) -> list[tuple[list[_Layer], int, int]]:
    """Maximal chains (length >= 2) of calls of one structure, each linked by the same
    (output, operand) pair."""
    shapes = {id(layer): structure(layer.subgraph) for layer in layers}
    by_node = {layer.node: layer for layer in layers}
    used: set[int] = set()
    chains = []
    for start in layers:
        if id(start) in used:
            continue
        chain, link = [start], None
        while True:
            last = chain[-1]
            following = [
                by_node[user]
                for getitems in last.outputs.values()
                for g in getitems
                for user in g.users
                if user in by_node and id(by_node[user]) not in used and shapes[id(by_node[user])] == shapes[id(start)]
            ]
            step = next(((nxt, _link(last, nxt)) for nxt in following if _link(last, nxt) is not None), None)
            if step is None or (link is not None and step[1] != link) or step[0] in chain:
                break
            link = step[1]
            chain.append(step[0])
        if len(chain) >= 2 and link is not None:
            used.update(id(layer) for layer in chain)
            chains.append((chain, *link))
    return chains


def roll_chains(gm: torch.fx.GraphModule, context: PassContext) -> None:
    """The pass's step on the whole graph (see the module docstring)."""
    if not context.options.roll_layers:
        return
    for chain, out, operand in _chains(_layers(gm)):
        plan = _Plan.of(gm, chain, out, operand)
        if plan is not None:
            plan.apply()
            metrics.increment(metrics.LAYERS_ROLLED, len(chain))
            first = loop_name("layer", chain[0].node).removeprefix("layer at ")
            record(_LOG, "rolled", f"rolled {len(chain)} layers (the first at {first}) into one scan", layers=len(chain), where=first)


@dataclass
class _Plan:
    gm: torch.fx.GraphModule
    chain: list[_Layer]
    carry_out: int  # the output of a layer that feeds the next
    carry_in: int  # the operand it feeds
    stacked: list[int]  # operand positions that differ between layers: scanned over
    shared: list[int]  # operand positions that are one node in every layer
    ys: list[int]  # outputs read outside the chain, per layer (the carry too if an inner one escapes)

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, chain: list[_Layer], out: int, operand: int) -> "_Plan | None":
        first, last = chain[0], chain[-1]
        if _mutates_inputs(first.subgraph):
            return None  # a scan body may not (a BatchNorm's running statistics, say)
        init, result = example_value(first.operands[operand]), _output_value(first.subgraph, out)
        if not isinstance(init, torch.Tensor) or not isinstance(result, torch.Tensor):
            return None
        if (init.shape, init.dtype) != (result.shape, result.dtype):
            return None  # the chained value changes shape: not a carry
        produced = {g for layer in chain for getitems in layer.outputs.values() for g in getitems}
        stacked, shared = [], []
        for position in range(len(first.operands)):
            if position == operand:
                continue
            values = [layer.operands[position] for layer in chain]
            if any(v in produced for v in values):
                return None  # a layer reads another's output twice: not a chain of one carry
            if all(v is values[0] for v in values):
                shared.append(position)
            elif _stackable(values):
                stacked.append(position)
            else:
                return None
        following = {layer.node: chain[i + 1].node for i, layer in enumerate(chain[:-1])}
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        escaping: set[int] = set()
        for layer in chain:
            for index, getitems in layer.outputs.items():
                users = {u for g in getitems for u in g.users} - {following.get(layer.node)}
                if not users or (index == out and layer is last):
                    continue  # (the chain's result: used after it by definition)
                if any(order[u] <= order[last.node] for u in users):
                    return None  # read before the chain ends: the scan cannot move past it
                escaping.add(index)
        ys = sorted(escaping)
        if any(not isinstance(_output_value(first.subgraph, i), torch.Tensor) for i in ys):
            return None
        return cls(gm, chain, out, operand, stacked, shared, ys)

    def apply(self) -> None:
        """Rewrite the graph (stacks of graph inputs become inputs later: `stacked_inputs`)."""
        graph, first, last = self.gm.graph, self.chain[0], self.chain[-1]
        combine = self._combine()
        name = free_name(self.gm, "rolled_layers")
        self.gm.add_submodule(name, combine)
        with graph.inserting_before(last.node):
            combine_node = graph.get_attr(name)
            xs = [self._stack([layer.operands[p] for layer in self.chain]) for p in self.stacked]
            init = first.operands[self.carry_in]
            shared = [first.operands[p] for p in self.shared]
            scan = graph.call_function(scan_op, (combine_node, [init], xs, shared))
            scan.meta["example_value"] = self._scan_value()
            if first.node.meta.get("stack_trace"):
                scan.meta["stack_trace"] = first.node.meta["stack_trace"]
            carry = graph.call_function(operator.getitem, (scan, 0))
            carry.meta["example_value"] = scan.meta["example_value"][0]
            ys = {}
            for k, index in enumerate(self.ys):
                ys[index] = graph.call_function(operator.getitem, (scan, 1 + k))
                ys[index].meta["example_value"] = scan.meta["example_value"][1 + k]
        for i, layer in enumerate(self.chain):
            for index, getitems in layer.outputs.items():
                for g in getitems:
                    if index == self.carry_out and layer is last:
                        g.replace_all_uses_with(carry)
                    elif index in ys:
                        with graph.inserting_after(ys[index]):
                            pick = graph.call_function(torch.select, (ys[index], 0, i))
                        pick.meta = {k: v for k, v in g.meta.items() if k in ("example_value", "val")}
                        g.replace_all_uses_with(pick, delete_user_cb=lambda user: user not in {lay.node for lay in self.chain})
        for layer in reversed(self.chain):  # (what is left of each: the link to the next)
            for getitems in layer.outputs.values():
                for g in getitems:
                    graph.erase_node(g)
            subgraph_node = layer.node.args[0]
            graph.erase_node(layer.node)
            if not subgraph_node.users:
                graph.erase_node(subgraph_node)
                if not any(n.op == "get_attr" and n.target == subgraph_node.target for n in graph.nodes):
                    delattr(self.gm, subgraph_node.target)

    def _combine(self) -> torch.fx.GraphModule:
        """The scan body: (carry, one layer's stacked operands, shared operands) -> (next
        carry, the layer's escaping outputs), the layer's subgraph copied in."""
        sub = self.chain[0].subgraph
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        graph = torch.fx.Graph()
        mapping: dict[torch.fx.Node, torch.fx.Node] = {}
        first = self.chain[0]
        for position in [self.carry_in, *self.stacked, *self.shared]:
            new = graph.placeholder(placeholders[position].name)
            # (one layer's operand, as this graph's fake value: torch's scan reads it)
            new.meta = {"example_value": example_value(first.operands[position])}
            mapping[placeholders[position]] = new
        outputs = graph.graph_copy(sub.graph, mapping)
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        results = [outputs[self.carry_out], *[outputs[i] for i in self.ys]]
        seen: set[torch.fx.Node] = set()
        for k, node in enumerate(results):  # a scan body may not return an input or one value twice
            if node.op == "placeholder" or node in seen:
                results[k] = graph.call_function(torch.clone, (node,))
                results[k].meta = dict(node.meta)
            seen.add(results[k])
        graph.output(tuple(results))
        return torch.fx.GraphModule(sub, graph)

    def _stack(self, values: list[torch.fx.Node]) -> torch.fx.Node:
        fakes = [example_value(v) for v in values]
        with _fake_mode(fakes):
            value = torch.stack(fakes)
        stacked = self.gm.graph.call_function(torch.ops.xla_loop.stack_layers.default, (list(values),))  # (stacking.py)
        stacked.meta["example_value"] = value
        return stacked

    def _scan_value(self) -> list[torch.Tensor]:
        """The scan's outputs as fake values of this graph (the subgraph's are of its own)."""
        values = [example_value(self.chain[0].operands[self.carry_in])]
        for index in self.ys:
            one = next(example_value(g) for layer in self.chain for g in layer.outputs.get(index, []))
            with _fake_mode([one]):
                values.append(one.new_empty((len(self.chain), *one.shape)))
        return values


def _output_value(sub: torch.fx.GraphModule, index: int) -> Any:
    output = next(n for n in sub.graph.nodes if n.op == "output")
    outs = output.args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    return example_value(outs[index]) if index < len(outs) else None


def _mutates_inputs(sub: torch.fx.GraphModule) -> bool:
    """Whether the subgraph updates one of its inputs in place (torch's own check)."""
    from torch._higher_order_ops.utils import check_input_alias_and_mutation_return_outputs

    inputs = [example_value(n) for n in sub.graph.find_nodes(op="placeholder")]
    try:
        mutated = check_input_alias_and_mutation_return_outputs(sub, inputs)[3]
    except Exception:
        return True  # cannot tell: leave the calls as they are
    return bool(mutated)


def _stackable(values: list[Any]) -> bool:
    fakes = [example_value(v) for v in values]
    if not all(isinstance(v, torch.fx.Node) and isinstance(f, torch.Tensor) for v, f in zip(values, fakes)):
        return False
    return all((f.shape, f.dtype, f.device) == (fakes[0].shape, fakes[0].dtype, fakes[0].device) for f in fakes)


def _fake_mode(fakes: list[Any]) -> Any:
    """The fake mode the values were made in (to make more values like them)."""
    return fakes[0].fake_mode


PASS = GraphPass(
    "roll_layers",
    "rolls chains of calls of one subgraph into one scan",
    {kind: unchanged for kind in ("while_loop", "scan", "map", "cond", "invoke_subgraph")},
    finish=roll_chains,
)
