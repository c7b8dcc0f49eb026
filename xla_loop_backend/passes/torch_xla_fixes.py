"""After AOTAutograd: rewrites of the graph (and of every loop subgraph) around torch_xla 2.9
ops that give wrong results, found by the differential fuzzer (tests/test_fuzz.py).

- `amax`/`amin` over all dimensions (``x.amax()``, traced as ``dim=[]``) reduce nothing
  on XLA: the result keeps x's shape. Spelled with every dimension, they reduce.
- A comparison of a floating tensor with a Python float (``x > 0.2``) compares in float64
  on XLA, where PyTorch first rounds the scalar to the tensor's dtype: a float32 0.2 is
  then greater than 0.2. The scalar is rounded to the tensor's dtype in the graph.
"""
from __future__ import annotations

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


PASS = NodeRewrite(
    "torch_xla_fixes",
    "works around torch_xla ops that give wrong results",
    (_spell_out_all_dims, _round_comparison_scalars),
)
