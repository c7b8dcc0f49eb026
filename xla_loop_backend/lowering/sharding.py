"""SPMD: loop carries keep their sharding through the loop.

XLA's sharding propagation chooses the layout of a While's state by itself. When shardings
conflict (a carry split by batch, a weight split by columns), it may re-shard the carry
inside the While, and the loop's result loses the user's sharding. As torch_xla's scan
does (with a `* 1` copy), each sharded carry is pinned: in the staged body, a copy of the
carry's parameter and the body's new carry are annotated with the carry's sharding, so the
While's state keeps it and the partitioner adds no collective to move it.

A tensor a While reads unchanged every iteration (a captured weight) keeps its sharding into
the loop, and where a step needs it whole (FSDP: the weight split like the batch), XLA's
partitioner gathers it inside the body, on every iteration, forward and backward. So the
state passes a gathered (replicated) copy instead, made once before the While
(`gathered_invariants`), for the invariants split over the same devices, the same way, as
one of the loop's activations: the FSDP pattern. An activation is a carry or xs of the loop,
or a tensor the graph was called with (`argument_layouts`: a loop's activations are mostly
computed in the graph, and their shardings are XLA's to choose when it compiles), that is
not shaped like an invariant (that would be a weight, or a weight's gradient). An invariant split otherwise (tensor parallel: the
weight split over a model axis the activations are not) stays split: gathering it would
make every device compute the whole layer. The copies of one While take at most a budget
of bytes per device, smallest first (option `gather_invariants`). Rolled layers' weights
are xs, a different slice each iteration: FSDP gathers those in the loop, as it should.

Nothing happens outside SPMD (`torch_xla.runtime.use_spmd()`) or for unsharded tensors.
"""
from __future__ import annotations

from typing import Any, Sequence

import contextlib
import contextvars
import re
from typing import Iterator

import numpy as np
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


def stacks_like_carries(stacks: Sequence[torch.Tensor], carries: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A scan's ys buffers (one row a step), each laid out like a sharded carry of its row's
    shape, if there is one (in training the ys hold the carries), whole along the steps:
    otherwise XLA may split a buffer along the steps, and writing a row then takes a
    collective every iteration."""
    if not _spmd():
        return list(stacks)
    layouts = {tuple(c.shape): _spec(c) for c in carries if _spec(c)}
    out = []
    for stack in stacks:
        sharding = with_leading_dims(layouts[tuple(stack.shape[1:])], 1) if tuple(stack.shape[1:]) in layouts else None
        out.append(pinned([stack], [sharding])[0] if sharding is not None else stack)
    return out


def gathered_invariants(state: Sequence[torch.Tensor], invariants: Sequence[int]) -> list[torch.Tensor]:
    """The While's state, the invariants it should gather (see the module docstring) as
    replicated copies."""
    import torch_xla.distributed.spmd as xs

    from ..options import current_invariant_gathering

    state = list(state)
    gathering = current_invariant_gathering()
    if gathering.budget <= 0 or not invariants or not _spmd():
        return state
    specs = [_spec(t) for t in state]
    shapes = {tuple(state[i].shape) for i in invariants}
    layouts = [(tuple(t.shape), spec) for k, (t, spec) in enumerate(zip(state, specs)) if k not in set(invariants)]
    activations = {_shard_groups(spec) for shape, spec in layouts + _arguments.get() if shape not in shapes}
    candidates = [
        i for i in invariants if _shard_groups(specs[i]) is not None and (not gathering.fsdp_only or _shard_groups(specs[i]) in activations)
    ]
    replicated = torch_xla._XLAC.OpSharding([], [], [], int(xs.ShardingType.REPLICATED))
    used = 0
    for i in sorted(candidates, key=lambda k: state[k].numel() * state[k].element_size()):
        size = state[i].numel() * state[i].element_size()
        if used + size > gathering.budget:
            break
        (state[i],) = pinned([state[i]], [replicated])
        used += size
    return state


def _spmd() -> bool:
    import torch_xla.runtime as xr

    return xr.is_spmd()


def _spec(t: Any) -> str:
    return torch_xla._XLAC._get_xla_sharding_spec(t) if isinstance(t, torch.Tensor) and t.device.type == "xla" else ""


_arguments: contextvars.ContextVar[list[tuple[tuple[int, ...], str]]] = contextvars.ContextVar("xla_loop_arguments", default=[])


@contextlib.contextmanager
def argument_layouts(args: Sequence[Any]) -> Iterator[None]:
    """While a graph is traced: the shapes and shardings of the tensors it was called with."""
    token = _arguments.set([(tuple(a.shape), _spec(a)) for a in args if isinstance(a, torch.Tensor)] if _spmd() else [])
    try:
        yield
    finally:
        _arguments.reset(token)


_TILED = re.compile(r"\{devices=\[([\d,]+)\]([\d,]+)( last_tile_dim_replicate)?\}")


def _shard_groups(spec: str) -> frozenset | None:
    """The devices that hold the same piece of a tensor of sharding `spec` (HLO's text), as a
    set of groups; None for a tensor that is not split (or a form not read here)."""
    match = _TILED.fullmatch(spec or "")
    if match is None:
        return None
    dims = [int(d) for d in match.group(1).split(",")]
    tiles = np.array([int(d) for d in match.group(2).split(",")]).reshape(dims)
    tensor_dims = len(dims) - 1 if match.group(3) else len(dims)
    groups: dict[tuple[int, ...], set[int]] = {}
    for index in np.ndindex(tiles.shape):
        groups.setdefault(index[:tensor_dims], set()).add(int(tiles[index]))
    return frozenset(frozenset(g) for g in groups.values()) if len(groups) > 1 else None


def with_leading_dims(spec: str, added: int) -> Any:
    """The sharding `spec` (HLO's text) of a tensor with `added` more leading dims, whole on
    every device (added < 0: that many fewer, which must be whole): a stack of a loop's
    carries, one row a step, and a row of it. None where `spec` is none or another form."""
    import torch_xla.distributed.spmd as xs

    replicated = torch_xla._XLAC.OpSharding([], [], [], int(xs.ShardingType.REPLICATED))
    if spec == "{replicated}":
        return replicated
    match = _TILED.fullmatch(spec or "")
    if match is None:
        return None
    dims = [int(d) for d in match.group(1).split(",")]
    devices = [int(d) for d in match.group(2).split(",")]
    partial = match.group(3) is not None
    tensor_dims = dims[:-1] if partial else dims
    if added < 0 and any(d != 1 for d in tensor_dims[:-added]):
        return None
    kept = [1] * added + tensor_dims if added >= 0 else tensor_dims[-added:]
    if all(d == 1 for d in kept):
        return replicated
    mesh = xs.Mesh(np.array(devices), tuple(kept + dims[-1:] if partial else kept))
    return mesh.get_op_sharding(tuple(range(len(kept))))
