"""After AOTAutograd: rewrites of the graph (and of every loop subgraph) around torch_xla 2.9
ops that give wrong results, found by the differential fuzzer (tests/test_fuzz.py).

- `amax`/`amin` over all dimensions (``x.amax()``, traced as ``dim=[]``) reduce nothing
  on XLA: the result keeps x's shape. Spelled with every dimension, they reduce.
- A comparison of a floating tensor with a Python float (``x > 0.2``) compares in float64
  on XLA, where PyTorch first rounds the scalar to the tensor's dtype: a float32 0.2 is
  then greater than 0.2. The scalar is rounded to the tensor's dtype in the graph.
- The bridge returns the outputs of a graph in the wrong order (silently wrong results)
  when two of them are distinct tensors holding the same value: e.g. two clones of one
  input, or of one loop result (torch_xla's clone is a shallow copy; the bridge dedups its
  outputs by value, but the executable does not always return them deduped, and the two
  lists no longer line up). `DISTINCT_OUTPUTS` makes every output after the first whose
  value is another's (through clones and no-op views) a copy computed on the device
  (`zeros + x`). Run on the graph the bridge gets.
- torch_xla keys its executables by a hash of the graph in which every input of one shape
  and dtype hashes the same, and which records only where each input is first used
  (pytorch/xla#8353). Two graphs that differ only in which input a later op reads (e.g.
  `sin(x) * y + x` and `sin(x) * y + y`, or a loop bounded by `n` and one bounded by `m`)
  share an executable: the second one silently runs the first (openxla does it too; the
  gradient fuzzer found it). `KEYED_BY_WIRING` passes the graph's results through
  `keyed_by_wiring`, which, while the bridge traces, puts a digest of the traced graph's
  text (its nodes in order, each naming its operands) into the hash, as the name of an
  identity computation around one computed result (free: XLA inlines it). Run last on the
  graph the bridge gets. Not on a graph with a CPU tensor constant: the bridge splits such a
  graph and traces each part alone, and the key node would form a part it cannot run (such
  graphs go unkeyed).
"""
from __future__ import annotations

import hashlib
import operator
from typing import Any, Sequence

import torch
import torch.fx

from ..traversal import NodeRewrite

aten = torch.ops.aten

_ALL_DIMS_REDUCTIONS = {aten.amax.default, aten.amin.default}
_SCALAR_COMPARISONS = {getattr(aten, name).Scalar for name in ("eq", "ne", "lt", "le", "gt", "ge")}


def _spell_out_all_dims(graph: torch.fx.Graph) -> bool:
    changed = False
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _ALL_DIMS_REDUCTIONS:
            continue
        source = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
        value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        if list(dims) or not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        node.args = (source, list(range(value.dim())), keepdim)
        node.kwargs = {}
        changed = True
    return changed


def _round_comparison_scalars(graph: torch.fx.Graph) -> bool:
    changed = False
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _SCALAR_COMPARISONS or len(node.args) != 2:
            continue
        source, scalar = node.args
        value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        if type(scalar) is not float or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        rounded = torch.tensor(scalar, dtype=value.dtype).item()
        if rounded != scalar:
            node.args = (source, rounded)
            changed = True
    return changed


# Ops that return their input's value as it is: torch_xla makes no new value for them.
_SHALLOW_COPIES = {aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
_SAME_SHAPE_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default, aten._to_copy.default}


def _data_source(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose data `node` is, through shallow copies and no-op views."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
        source = node.args[0]
        if node.target in _SHALLOW_COPIES:
            node = source
            continue
        value, source_value = node.meta.get("val"), source.meta.get("val")
        same = (
            isinstance(value, torch.Tensor)
            and isinstance(source_value, torch.Tensor)
            and value.shape == source_value.shape
            and value.dtype == source_value.dtype
            and value.device == source_value.device
        )
        if node.target in _SAME_SHAPE_VIEWS and same:
            node = source
            continue
        break
    return node


def _device_copy(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x) + x


def _distinct_outputs(graph: torch.fx.Graph) -> bool:
    """Outputs after the first with the same value become computed copies."""
    output = next(n for n in graph.nodes if n.op == "output")
    outs = output.args[0]
    if not isinstance(outs, (tuple, list)):
        return False
    seen: set[torch.fx.Node] = set()
    new = list(outs)
    for i, out in enumerate(outs):
        if not isinstance(out, torch.fx.Node):
            continue
        source = _data_source(out)
        if source in seen:
            with graph.inserting_before(output):
                new[i] = graph.call_function(_device_copy, (out,))
            new[i].meta = dict(out.meta)
        seen.add(source)
    if new == list(outs):
        return False
    output.args = (type(outs)(new),)
    return True


PASS = NodeRewrite(
    "torch_xla_fixes",
    "works around torch_xla ops that give wrong results",
    (_spell_out_all_dims, _round_comparison_scalars),
)
DISTINCT_OUTPUTS = NodeRewrite(
    "distinct_outputs",
    "keeps the bridge from mixing up outputs that share device data",
    (_distinct_outputs,),
    subgraphs=False,
)


def keyed_by_wiring(outputs: Sequence[Any]) -> list[Any]:
    """The outputs, one computed XLA tensor among them passed through an identity
    computation named by a digest of the traced graph (see the module docstring)."""
    import torch_xla
    import torch_xla.core.xla_builder as xb

    from ..lowering.sharding import pinned, shardings_of

    out = list(outputs)
    positions = [i for i, t in enumerate(out) if isinstance(t, torch.Tensor) and t.device.type == "xla"]
    tensors = [out[i] for i in positions]
    if not tensors:
        return out
    computed = [i for i, pending in zip(positions, torch_xla._XLAC._check_tensor_need_materialization(tensors)) if pending]
    if not computed:  # (only inputs returned as they are: the hash sees each one's position)
        return out
    shardings = dict(zip(computed, shardings_of([out[i] for i in computed])))
    target = next((i for i in computed if shardings[i] is None), computed[0])
    digest = hashlib.sha256(torch_xla._XLAC._get_xla_tensors_text(tensors).encode()).hexdigest()[:32]
    builder = xb.create_builder("xla_loop_key")
    identity = xb.mkparam(builder, 0, xb.tensor_shape(out[target])).build("xla_loop_key")
    (keyed,) = torch_xla._XLAC._xla_user_computation(f"xla_loop::graph_{digest}", [out[target]], identity)
    (out[target],) = pinned([keyed], [shardings[target]])
    return out


def _key_by_wiring(graph: torch.fx.Graph) -> bool:
    output = next(n for n in graph.nodes if n.op == "output")
    outs = output.args[0]
    if not isinstance(outs, (tuple, list)) or not any(isinstance(o, torch.fx.Node) for o in outs):
        return False
    if _bridge_splits(graph):
        return False

    new = list(outs)
    with graph.inserting_before(output):
        keyed = graph.call_function(keyed_by_wiring, (tuple(outs),))
        for i, out in enumerate(outs):
            if isinstance(out, torch.fx.Node):
                new[i] = graph.call_function(operator.getitem, (keyed, i))
                new[i].meta = dict(out.meta)
    output.args = (type(outs)(new),)
    return True


def _bridge_splits(graph: torch.fx.Graph) -> bool:
    """Whether the bridge will split the graph around a CPU tensor constant in it (and trace
    each part alone): the key node would form a part of its own, which the bridge cannot run.
    Such graphs go unkeyed."""
    module = graph.owning_module
    for node in graph.nodes:
        if node.op == "get_attr":
            value = getattr(module, node.target, None) if module is not None else None
            if isinstance(value, torch.Tensor) and value.device.type != "xla":
                return True
    return False


KEYED_BY_WIRING = NodeRewrite(
    "keyed_by_wiring",
    "keeps torch_xla from running another graph's executable (pytorch/xla#8353)",
    (_key_by_wiring,),
    subgraphs=False,
)
