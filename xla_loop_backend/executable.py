"""The cached executable of a lowered graph, traced once and called directly.

torch_xla's dynamo bridge (`extract_compiled_graph`) is built for any graph: it runs the
graph three times while compiling (once op by op to find ops torch_xla runs on the CPU,
once to collect each partition's inputs, once to trace), and on every call it walks its
own wrappers (a partitioned GraphModule, sym-constant and sharding lookups, the input
matcher) before it reaches the executable. A graph xla_loop lowers is usually the simple
case: every input an XLA tensor, every op on the device, no input mutated. For it,
`trace_once` makes the same torch_xla calls the bridge makes, once: run the graph on the
device inputs (lazy tensors), find which device buffers the result reads
(`_get_tensors_xla_device_data_node`), hash and compile it (`_get_graph_hash`,
`_xla_warm_up_cache`), and drop the traced IR. `Executable.__call__` then does what the
bridge's call does for that case and nothing more: materialize inputs that are still
pending, order them as the executable's parameters, `_run_cached_graph`, and put back the
outputs XLA does not return (an input returned as it is, a tensor returned twice, None).

`trace_once` returns None, and the caller uses the bridge, where the bridge does work this
path does not: SPMD (shardings, the per-call sharding check), an input that is not an XLA
tensor or is a Python number, a graph that mutates an input, a graph whose trace ran an
op on the CPU (torch_xla's fallback counters moved) or produced a CPU tensor (the bridge
runs those nodes outside the executable), and a graph that reads torch_xla's RNG seed
(the bridge feeds a new seed each call). The bridge then traces the graph again itself.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx

# What each output of the graph is, in `Executable.outputs`:
_COMPUTED, _INPUT, _NONE = 0, 1, 2


class Executable:
    """Calls one cached executable (see the module docstring)."""

    def __init__(
        self, graph_hash: bytes, parameters: list[tuple[int | None, Any]], outputs: list[tuple[int, int]], structure: type | None
    ):
        import torch_xla

        self.graph_hash = graph_hash
        # parameter j of the executable: args[i], or (i None) a constant traced buffer
        self.arg_positions = [i for i, _ in parameters]
        self.constants = [(j, value) for j, (i, value) in enumerate(parameters) if i is None]
        self.outputs = outputs
        self.structure = structure  # the graph returns a tuple, a list, or (None) one value
        # When the executable returns exactly the graph's outputs, in order, they pass as they are.
        self.direct = all(kind == _COMPUTED and k == n for n, (kind, k) in enumerate(outputs))
        self._needs_data = torch_xla._XLAC._check_tensor_need_materialization
        self._sync = torch_xla._XLAC._xla_sync_multi
        self._run = torch_xla._XLAC._run_cached_graph

    def __call__(self, *args: Any) -> Any:
        pending = self._needs_data(args)
        if any(pending):  # an input still computing lazily: it must be a device buffer
            self._sync([a for a, p in zip(args, pending) if p], devices=[], wait=True, sync_xla_data=True)
        inputs = [args[i] if i is not None else None for i in self.arg_positions]
        for j, value in self.constants:
            inputs[j] = value
        results = self._run(self.graph_hash, inputs)
        if not self.direct:
            results = [results[k] if kind == _COMPUTED else args[k] if kind == _INPUT else None for kind, k in self.outputs]
        return results[0] if self.structure is None else self.structure(results)


class _OnDeviceOnly(Exception):
    """A node of the graph read or made a tensor that is not an XLA tensor."""


class _DeviceChecker(torch.fx.Interpreter):
    """Runs the graph, checking that every node's tensors are XLA tensors (what the bridge's
    collector checks; it runs the other nodes outside the executable)."""

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if n.op in ("call_function", "call_method", "call_module"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if not _all_on_xla((args, kwargs, result)):
                raise _OnDeviceOnly(n.format_node())
        return result


def _all_on_xla(value: Any) -> bool:
    leaves = torch.utils._pytree.tree_leaves(value)
    return all(t.device.type == "xla" for t in leaves if isinstance(t, torch.Tensor))


def _fallback_counts() -> dict[str, int]:
    """torch_xla's count of each op it ran on the CPU (its 'aten::' counters)."""
    import torch_xla.debug.metrics as met

    return {name: met.counter_value(name) for name in met.executed_fallback_ops()}


def _mutates_an_input(graph: torch.fx.Graph) -> bool:
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is not None and schema.is_mutable:
            return True
        if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_"):
            return True
    return False


def _traceable_here(gm: torch.fx.GraphModule, args: Sequence[Any]) -> bool:
    import torch_xla.runtime as xr

    if xr.is_spmd():
        return False
    for a in args:
        if not isinstance(a, torch.Tensor) or a.device.type != "xla":
            return False
    return not _mutates_an_input(gm.graph)


def trace_once(gm: torch.fx.GraphModule, trace_args: Sequence[Any], args: Sequence[Any]) -> Executable | None:
    """The graph compiled by one trace on `trace_args` (stand-ins of `args`: see
    `call._private_scalars`), or None where the bridge must compile it (see the module
    docstring). Moves `gm`'s tensor constructors onto the device, in place (as the bridge
    does): give it a copy. Leaves no pending IR behind, also when it raises."""
    import torch_xla
    from torch_xla._dynamo.dynamo_bridge import XLAConstructorMoverPass
    from torch_xla.utils.buffer_donor_context import alias_with_buffer_donor_config

    if not _traceable_here(gm, args):
        return None
    XLAConstructorMoverPass()(gm.graph)  # tensor constructors on the CPU -> on the device
    gm.recompile()
    xla = torch_xla._XLAC
    try:
        for a in args:  # (torch_xla's tensors wrap functional views: bring them up to date)
            torch._functionalize_sync(a)
        # Every live tensor a device buffer first (the bridge does this too), so the traced
        # graph's parameters are the inputs' buffers, and dropping the traced IR at the end
        # drops nothing else.
        torch_xla.sync(reset_scope=False)
        # (as the bridge does: restores an input the graph updated in place, which the static
        # check should have caught)
        saved = [torch.clone(a) for a in trace_args]
        before = _fallback_counts()
        try:
            out = _DeviceChecker(gm).run(*trace_args)
        except _OnDeviceOnly:
            return None
        updated = xla._check_tensor_need_materialization(list(trace_args))
        if any(updated):
            for a, original, u in zip(trace_args, saved, updated):
                if u:
                    a.copy_(original)
            return None
        if _fallback_counts() != before:
            return None
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        plan, computed = _output_plan(outs, trace_args)
        if plan is None:
            return None
        xla._xla_wait_device_ops(devices=[])  # (the buffers' lookup needs them ready)
        ids, buffers = xla._get_tensors_xla_device_data_node(computed)
        if xla._get_seed_info_id() in ids:
            return None
        position = {xla._xla_get_tensor_id(a): i for i, a in enumerate(trace_args)}
        parameters = [(position[i], None) if i in position else (None, b) for i, b in zip(ids, buffers)]
        with alias_with_buffer_donor_config():
            graph_hash = xla._get_graph_hash(computed)
            xla._xla_warm_up_cache(computed, [])
        return Executable(graph_hash, parameters, plan, type(out) if isinstance(out, (tuple, list)) else None)
    finally:
        xla._clear_pending_irs(str(torch_xla.device()))


def _output_plan(outs: list[Any], inputs: Sequence[Any]) -> tuple[list[tuple[int, int]] | None, list[torch.Tensor]]:
    """Where each output comes from: the k-th computed tensor, the k-th input (XLA returns
    no output that is an input as it is), or None; and the computed tensors, each once (XLA
    returns a tensor listed twice once). (None, []) for an output that is not a tensor."""
    input_position = {id(a): i for i, a in enumerate(inputs)}
    computed: list[torch.Tensor] = []
    computed_position: dict[int, int] = {}
    plan: list[tuple[int, int]] = []
    for out in outs:
        if out is None:
            plan.append((_NONE, 0))
        elif not isinstance(out, torch.Tensor) or out.device.type != "xla":
            return None, []
        elif id(out) in input_position:
            plan.append((_INPUT, input_position[id(out)]))
        else:
            if id(out) not in computed_position:
                computed_position[id(out)] = len(computed)
                computed.append(out)
            plan.append((_COMPUTED, computed_position[id(out)]))
    return plan, computed
