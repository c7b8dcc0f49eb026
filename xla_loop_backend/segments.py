"""A graph that cannot be one XLA program: device parts, and host steps between them.

Two things keep a graph from being one program (`executable.py`):
- an op torch_xla runs on the CPU (it has no XLA lowering for it, or not for these inputs):
  its inputs must come back to the host, so it runs between two device programs, eagerly;
- a tensor whose size is a value the graph computes (a while_loop's Python int result, an
  `.item()`): XLA needs every size when it compiles, so that value is read back (once, as
  eager PyTorch reads it) and the rest of the graph is compiled for it (one program per
  value, kept).

`program(gm, args)` is what a graph runs as: its `Executable`, or, when tracing finds ops
on the CPU or the graph sizes a tensor by a computed value, a `Segmented` program. That
cuts the graph (`torch.fx.passes.split_module`) into parts numbered in dependency order:
device parts even, host parts odd; a node goes after every host part it reads and after the
part that computes a size it has. Each device part is a graph of its own, run as its own
`program` (one per value of its Python number inputs and shapes of its tensors, made on
first use); each host part runs eagerly on the lazy tensors (torch_xla runs its ops on the
CPU, as its own dynamo bridge does). Between parts, a device scalar that a later part takes
as a Python number is read back.

Loops never split: a loop body or branch is one XLA computation, and an op torch_xla runs on
the CPU inside one is an error (`lowering.subgraph.check_runs_on_device`).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.fx.passes.split_module import split_module

from . import metrics
from .executable import RunsOnHost, trace
from .lowering.subgraph import is_symbolic_scalar


def program(gm: torch.fx.GraphModule, args: Sequence[Any]) -> Callable[..., Any]:
    """What the graph runs as (see the module docstring); `args` are the first call's."""
    if sizes_from_values(gm):
        metrics.increment(metrics.GRAPHS_SEGMENTED)
        return Segmented(gm, set())
    try:
        compiled = trace(gm, args)
    except RunsOnHost as found:
        metrics.increment(metrics.GRAPHS_SEGMENTED)
        return Segmented(gm, set(found.nodes))
    metrics.increment(metrics.GRAPHS_ONE_PROGRAM)
    return compiled


def sizes_from_values(gm: torch.fx.GraphModule) -> bool:
    """Whether a tensor of the graph is sized by a value the graph computes."""
    return bool(_sized_by_values(gm))


def _sized_by_values(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, set[Any]]:
    """Each node whose tensor has a size that is a value computed in the graph (not known
    from its inputs: a part's Python number input is known when it is called), and those
    values."""
    known: set[Any] = set()
    computed: set[Any] = set()
    found = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            known |= _defined_symbols(node)
            continue
        symbols = _size_symbols(node) & computed
        if symbols:
            found[node] = symbols
        computed |= _defined_symbols(node) - known
    return found


def _size_symbols(node: torch.fx.Node) -> set[Any]:
    symbols: set[Any] = set()
    for leaf in torch.utils._pytree.tree_leaves(node.meta.get("val")):
        if isinstance(leaf, torch.Tensor):
            symbols |= free_unbacked_symbols(leaf.shape)
    return symbols


def _defined_symbols(node: torch.fx.Node) -> set[Any]:
    """The values (unbacked symbols) a node computes: a Python scalar's, or its tensors' sizes'."""
    symbols = _size_symbols(node)
    for leaf in torch.utils._pytree.tree_leaves(node.meta.get("val")):
        if isinstance(leaf, (torch.SymInt, torch.SymBool, torch.SymFloat)):
            symbols |= free_unbacked_symbols(leaf)
    return symbols


def parts(gm: torch.fx.GraphModule, on_host: set[torch.fx.Node]) -> dict[torch.fx.Node, int]:
    """The part of every node (see the module docstring): even on the device, odd on the host."""
    sized = _sized_by_values(gm)
    part: dict[torch.fx.Node, int] = {}
    defined_in: dict[Any, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        p = 0
        for source in node.all_input_nodes:
            q = part.get(source, 0)
            if source in on_host and node not in on_host:
                q += 1  # the device part after that host part
            p = max(p, q)
        if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node) and node.args[0] in part:
            p = part[node.args[0]]  # (a part's inputs and outputs are tensors and numbers, never tuples)
        elif node in on_host:
            p += p % 2 == 0
        else:
            for symbol in sized.get(node, ()):
                if symbol in defined_in and defined_in[symbol] >= p:
                    p = defined_in[symbol] + 2 - defined_in[symbol] % 2  # the next device part after it
        part[node] = p
        for symbol in _defined_symbols(node):
            defined_in.setdefault(symbol, p)
    return part


class Segmented:
    """Runs a graph part by part (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule, on_host: set[torch.fx.Node]):
        part = parts(gm, on_host)
        symbolic = {node.name for node in gm.graph.nodes if is_symbolic_scalar(node.meta.get("val"))}
        split = split_module(gm, gm, lambda node: part[node], keep_original_order=True, keep_original_node_name=True)
        self.interpreter = _PartsInterpreter(split, symbolic)

    def __call__(self, *args: Any) -> Any:
        return self.interpreter.run(*args)


class _DevicePart:
    """One device part: its programs, one per value of its numbers and shapes of its tensors."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.programs: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        key = tuple(a if not isinstance(a, torch.Tensor) else (tuple(a.shape), a.dtype, a.device.type) for a in args)
        compiled = self.programs.get(key)
        if compiled is None:
            compiled = self.programs[key] = program(self.gm, args)
        return compiled(*args)


class _PartsInterpreter(torch.fx.Interpreter):
    """Runs the split graph: device parts through their programs, host parts eagerly; a device
    scalar a part takes as a Python number (its graph's node is a SymInt) is read back."""

    def __init__(self, split: torch.fx.GraphModule, symbolic: set[str]):
        super().__init__(split, garbage_collect_values=True)
        self.device_parts: dict[str, _DevicePart] = {}
        self.numbers: dict[str, list[bool]] = {}  # per part, which inputs are Python numbers
        for name, module in split.named_children():
            if int(name.rsplit("_", 1)[1]) % 2 == 0:
                self.device_parts[name] = _DevicePart(module)
            self.numbers[name] = [n.name in symbolic for n in module.graph.find_nodes(op="placeholder")]

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        args = tuple(_as_number(a) if number else a for a, number in zip(args, self.numbers[target]))
        part = self.device_parts.get(target)
        if part is not None:
            return part(*args, **kwargs)
        return module(*args, **kwargs)


def _as_number(value: Any) -> Any:
    """A device scalar standing for a Python int or bool, read back."""
    if isinstance(value, torch.Tensor):
        number = value.item()
        return bool(number) if value.dtype == torch.bool else number
    return value
