"""One description of each control-flow op's operands, shared by every pass and the lowering.

torch's control-flow ops are higher-order operators whose FX nodes take their operands by
position: `while_loop(cond_fn, body_fn, carried_inputs, additional_inputs)`,
`scan(combine_fn, init, xs, additional_inputs)`, `map_impl(f, xs, pos_args)`,
`cond(pred, true_fn, false_fn, operands)`, `invoke_subgraph(subgraph, identifier, *operands)`.
Each is described here once, as named fields with a role, so that no pass unpacks a node by
position or offset:

    subgraph   a `get_attr` of a GraphModule the op calls (cond_fn, body_fn, combine_fn, ...)
    carries    values threaded from one iteration to the next (while_loop, scan)
    xs         tensors sliced along dim 0, one slice per step (scan, map)
    captured   tensors the subgraphs read unchanged (additional inputs, closed-over values)
    predicate  cond's boolean
    constant   anything else (invoke_subgraph's identifier)

xla_loop's passes replace some nodes by calls of their own functions (a bounded while_loop,
a scan in segments, ...). Those functions take the same fields as the op they stand for and
are registered here too (`register`), under the same kind, so every later pass and the one
traversal (`traversal.py`) see them as what they are. Options of such a call (a bound, a
segment length) are keyword arguments of the node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx

SUBGRAPH, CARRIES, XS, CAPTURED, PREDICATE, CONSTANT = "subgraph", "carries", "xs", "captured", "predicate", "constant"
_LIST_ROLES = (CARRIES, XS, CAPTURED)


@dataclass(frozen=True)
class OpSpec:
    """A control-flow op: its kind and its positional fields `(name, role)`, in order.

    `variadic` names the last field when it takes all remaining positional arguments
    (invoke_subgraph's operands) rather than one list."""

    kind: str
    fields: tuple[tuple[str, str], ...]
    variadic: bool = False
    unsupported: str = ""  # why xla_loop does not lower this op, said in its errors

    def names(self, role: str) -> list[str]:
        return [name for name, r in self.fields if r == role]

    def bind(self, args: tuple) -> dict[str, Any]:
        """Positional arguments of a call (or of a node) by field name."""
        count = len(self.fields) - 1 if self.variadic else len(self.fields)
        named = {name: args[i] for i, (name, _) in enumerate(self.fields[:count])}
        if self.variadic:
            named[self.fields[-1][0]] = tuple(args[count:])
        return named

    def unbind(self, named: dict[str, Any]) -> tuple:
        """The positional arguments for fields by name (the inverse of `bind`)."""
        args = [named[name] for name, _ in self.fields]
        if self.variadic:
            return (*args[:-1], *args[-1])
        return tuple(args)


_hop = torch.ops.higher_order
_WHILE_FIELDS = (("cond_fn", SUBGRAPH), ("body_fn", SUBGRAPH), ("carried_inputs", CARRIES), ("additional_inputs", CAPTURED))

# torch's control-flow ops. (associative_scan is known so that it is reported, not skipped.)
_SPECS: dict[Any, OpSpec] = {
    _hop.while_loop: OpSpec("while_loop", _WHILE_FIELDS),
    _hop.while_loop_stack_output: OpSpec(
        "while_loop_stack_output",
        _WHILE_FIELDS,
        unsupported=(
            "it returns every iteration's carries stacked, a tensor whose length is the trip count, "
            "known only at run time, and an XLA program needs static shapes. (torch's while_loop "
            "autograd makes it; xla_loop trains through while_loop with a fixed number of checkpoints "
            "instead: call while_loop.)"
        ),
    ),
    _hop.scan: OpSpec("scan", (("combine_fn", SUBGRAPH), ("init", CARRIES), ("xs", XS), ("additional_inputs", CAPTURED))),
    _hop.map_impl: OpSpec("map", (("f", SUBGRAPH), ("xs", XS), ("pos_args", CAPTURED))),
    _hop.cond: OpSpec("cond", (("pred", PREDICATE), ("true_fn", SUBGRAPH), ("false_fn", SUBGRAPH), ("operands", CAPTURED))),
    _hop.invoke_subgraph: OpSpec(
        "invoke_subgraph", (("subgraph", SUBGRAPH), ("identifier", CONSTANT), ("operands", CAPTURED)), variadic=True
    ),
    _hop.associative_scan: OpSpec(
        "associative_scan",
        (("combine_fn", SUBGRAPH), ("xs", XS), ("additional_inputs", CAPTURED)),
        unsupported="use scan, which lowers to one XLA While.",
    ),
}

KINDS = tuple(sorted({spec.kind for spec in _SPECS.values()}))


def register(function: Callable[..., Any], like: Any) -> Callable[..., Any]:
    """Describe `function` (a pass's stand-in for a torch op, called with that op's fields
    and keyword options) with the op `like`'s fields."""
    _SPECS[function] = _SPECS[like]
    return function


def spec_of(target: Any) -> OpSpec | None:
    try:
        return _SPECS.get(target)
    except TypeError:  # unhashable targets (method names are strings, fine; others are not ours)
        return None


def is_control_flow(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and spec_of(node.target) is not None


@dataclass
class Call:
    """A view of one control-flow node in `owner`'s graph: its operands by field name."""

    owner: torch.fx.GraphModule
    node: torch.fx.Node
    spec: OpSpec

    @classmethod
    def of(cls, owner: torch.fx.GraphModule, node: torch.fx.Node) -> "Call":
        spec = spec_of(node.target)
        assert spec is not None, node.format_node()
        return cls(owner, node, spec)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def args(self) -> dict[str, Any]:
        return self.spec.bind(self.node.args)

    def __getitem__(self, name: str) -> Any:
        return self.args[name]

    def subgraph(self, name: str) -> torch.fx.GraphModule:
        return getattr(self.owner, self[name].target)

    def subgraphs(self) -> dict[str, torch.fx.GraphModule]:
        return {name: self.subgraph(name) for name in self.spec.names(SUBGRAPH)}

    def operands(self, role: str) -> list[Any]:
        """The values of every field with `role`, flattened (carries, xs or captured)."""
        assert role in _LIST_ROLES, role
        return [value for name in self.spec.names(role) for value in self[name]]

    def all_operands(self) -> Iterator[tuple[str, int, Any]]:
        """(field, index, value) for every value passed in a list field, in argument order."""
        for name, role in self.spec.fields:
            if role in _LIST_ROLES:
                for i, value in enumerate(self[name]):
                    yield name, i, value

    def update(self, **fields: Any) -> None:
        """Replace fields of the node's arguments (kwargs, the options, stay)."""
        named = self.args
        for name, value in fields.items():
            assert name in named, f"{self.kind} has no field {name!r}"
            named[name] = type(named[name])(value) if isinstance(named[name], (list, tuple)) else value
        self.node.args = self.spec.unbind(named)

    def describe(self) -> str:
        return f"`{self.node.format_node()}`"


def example_value(value: Any) -> Any:
    """What a graph value is at compile time: a node's (fake) example value, or the value."""
    if isinstance(value, torch.fx.Node):
        return value.meta.get("example_value", value.meta.get("val"))
    return value


def loop_device(values: Any) -> torch.device:
    """The device a loop's state lives on: that of its first tensor not on the CPU, else of
    its first tensor. (Eager PyTorch lets a 0-dim CPU tensor, a counter made without
    `device=`, mix with XLA tensors; what a pass adds to the loop goes on the XLA device.)"""
    tensors = [t for t in values if isinstance(t, torch.Tensor)]
    return next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device if tensors else torch.device("cpu"))
