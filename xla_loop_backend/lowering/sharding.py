"""SPMD: loop carries keep their sharding through the loop.

XLA's sharding propagation chooses the layout of a While's state by itself. When shardings
conflict (a carry split by batch, a weight split by columns), it may re-shard the carry
inside the While, and the loop's result loses the user's sharding. As torch_xla's scan
does (with a `* 1` copy), each sharded carry is pinned: in the staged body, a copy of the
carry's parameter and the body's new carry are annotated with the carry's sharding, so the
While's state keeps it and the partitioner adds no collective to move it.

Nothing happens outside SPMD (`torch_xla.runtime.use_spmd()`) or for unsharded carries.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch_xla


def shardings_of(tensors: Sequence[torch.Tensor]) -> list[Any]:
    """Each tensor's sharding (an OpSharding), or None; all None outside SPMD."""
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        return [None] * len(tensors)
    return [_sharding(t) for t in tensors]


def _sharding(tensor: torch.Tensor) -> Any:
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "xla":
        return None
    if not torch_xla._XLAC._get_xla_sharding_spec(tensor):
        return None
    return torch_xla._XLAC._get_xla_op_sharding(tensor)


def pinned(tensors: Sequence[Any], shardings: Sequence[Any]) -> list[Any]:
    """The tensors, each with a sharding annotated on a copy of it (as many as shardings)."""
    out = list(tensors)
    for i, sharding in enumerate(shardings):
        if sharding is not None and isinstance(out[i], torch.Tensor):
            copy = out[i].clone()
            torch_xla._XLAC._xla_annotate_custom_sharding(copy, sharding)
            out[i] = copy
    return out
