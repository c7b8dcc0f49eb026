"""`with_sharding_constraint`: JAX's name and meaning, for torch_xla's SPMD.

`with_sharding_constraint(x, mesh, partition_spec)` returns x, telling XLA's partitioner
to lay it out as `partition_spec` over `mesh` at this point of the program. torch_xla's
`xs.mark_sharding` cannot do that inside a compiled function (Dynamo breaks the graph
there, pytorch/xla#7645), and so not inside a loop body at all. This is a torch custom op
(`xla_loop::sharding_constraint`) that Dynamo and AOTAutograd keep in the graph; when the
graph (or a loop body) is traced for XLA, it annotates a copy of x with the sharding. The
gradient gets the same constraint. Outside SPMD, or on tensors that are not on the XLA
device, it is the identity.
"""
from __future__ import annotations

import ast
from typing import Any, Sequence

import torch
from torch._dynamo.comptime import comptime

from .lowering.sharding import with_leading_dims


def with_sharding_constraint(tensor: torch.Tensor, mesh: Any, partition_spec: Sequence[Any]) -> torch.Tensor:
    """`tensor`, constrained to `partition_spec` over `mesh` (a torch_xla `xs.Mesh`):
    one entry per dimension, a mesh axis (name or index), a tuple of axes, or None."""
    if len(partition_spec) != tensor.dim():
        raise ValueError(
            f"with_sharding_constraint: partition_spec has {len(partition_spec)} entries, but the tensor has "
            f"{tensor.dim()} dimensions ({tuple(tensor.shape)})"
        )
    _mesh = mesh  # read by comptime
    if torch.compiler.is_compiling():
        comptime(_remember_traced_mesh)
    else:
        _MESHES[id(mesh)] = mesh
    return torch.ops.xla_loop.sharding_constraint(tensor, _mesh_string(id(mesh)), repr(tuple(partition_spec)))


# A custom op takes strings, not a Mesh, and Dynamo cannot make a Mesh a string (its device
# ids are a numpy array); it can take id(mesh) as a constant. So the mesh is remembered by
# id (at trace time, through comptime, which sees the real object) and made a string then.
_MESHES: dict[int, Any] = {}


def _remember_traced_mesh(ctx: Any) -> None:
    mesh = ctx.get_local("_mesh")._i_will_not_complain_if_bc_breaks_VariableTracker().value
    _MESHES[id(mesh)] = mesh


@torch._dynamo.assume_constant_result
def _mesh_string(mesh_id: int) -> str:
    return str(_MESHES[mesh_id])


@torch.library.custom_op("xla_loop::sharding_constraint", mutates_args=())
def _sharding_constraint(tensor: torch.Tensor, mesh: str, partition_spec: str) -> torch.Tensor:
    import torch_xla
    import torch_xla.runtime as xr

    copy = tensor.clone()
    if tensor.device.type != "xla" or not xr.is_spmd():
        return copy
    import torch_xla.distributed.spmd as xs

    sharding = xs.Mesh.from_str(mesh).get_op_sharding(ast.literal_eval(partition_spec))
    torch_xla._XLAC._xla_annotate_custom_sharding(copy, sharding)
    return copy


@_sharding_constraint.register_fake
def _sharding_constraint_fake(tensor: torch.Tensor, mesh: str, partition_spec: str) -> torch.Tensor:
    return torch.empty_like(tensor)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _, ctx.mesh, ctx.partition_spec = inputs


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    return torch.ops.xla_loop.sharding_constraint(grad, ctx.mesh, ctx.partition_spec), None, None


_sharding_constraint.register_autograd(_backward, setup_context=_setup_context)


def spmd_on() -> bool:
    """Whether torch_xla runs in SPMD mode (`torch_xla.runtime.use_spmd()`, for the process)."""
    import torch_xla.runtime as xr

    return xr.is_spmd()


def sharding_like(tensor: torch.Tensor, reference: torch.Tensor, leading: int = 0) -> torch.Tensor:
    """`tensor`, laid out like `reference` under SPMD, less `reference`'s first `leading`
    dims (a stack of a loop's carries, one row a step: `leading=1`). The sharding is read
    when the graph is traced for XLA: what a gradient takes from the forward value it is
    the gradient of. The identity where there is no sharding to follow."""
    return torch.ops.xla_loop.sharding_like(tensor, reference, leading)


@torch.library.custom_op("xla_loop::sharding_like", mutates_args=())
def _sharding_like(tensor: torch.Tensor, reference: torch.Tensor, leading: int) -> torch.Tensor:
    import torch_xla
    import torch_xla.runtime as xr

    copy = tensor.clone()
    if tensor.device.type != "xla" or reference.device.type != "xla" or not xr.is_spmd():
        return copy
    if tuple(tensor.shape) != tuple(reference.shape[leading:]):
        return copy
    spec = torch_xla._XLAC._get_xla_sharding_spec(reference)
    sharding = (torch_xla._XLAC._get_xla_op_sharding(reference) if spec else None) if not leading else with_leading_dims(spec, -leading)
    if sharding is not None:
        torch_xla._XLAC._xla_annotate_custom_sharding(copy, sharding)
    return copy


@_sharding_like.register_fake
def _sharding_like_fake(tensor: torch.Tensor, reference: torch.Tensor, leading: int) -> torch.Tensor:
    return torch.empty_like(tensor)


def _like_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    return grad, None, None


_sharding_like.register_autograd(_like_backward)
