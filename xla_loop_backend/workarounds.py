"""Rewrites of the AOT graph (and its loop subgraphs) around torch_xla 2.9 ops that give
wrong results, found by the differential fuzzer (tests/test_fuzz.py).

- `amax`/`amin` over all dimensions (``x.amax()``, traced as ``dim=[]``) reduce nothing
  on XLA: the result keeps x's shape. Spelled with every dimension, they reduce.
"""
from __future__ import annotations

import torch
import torch.fx

aten = torch.ops.aten

_ALL_DIMS_REDUCTIONS = {aten.amax.default, aten.amin.default}


def apply_workarounds(gm: torch.fx.GraphModule) -> None:
    """Rewrite `gm` and its subgraphs in place (see above)."""
    for module in list(gm.modules()):
        if isinstance(module, torch.fx.GraphModule) and _spell_out_all_dims(module.graph):
            module.recompile()


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
