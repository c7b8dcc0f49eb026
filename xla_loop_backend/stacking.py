"""The stack of repeated layers' weights, and the split of its gradient, as one op each.

`scan_layers` and the `roll_layers` pass scan over each weight of the layers stacked along a
new first dimension. With `torch.stack`, AOTAutograd differentiates the stack into one
`select` per layer, each traced through functionalization, fake tensors and the proxy
graph: at 32 decoder layers (224 weights), about half of AOTAutograd's time that grows with
depth. Here the stack is `xla_loop::stack_layers` and its backward `xla_loop::unstack_layers`,
one op for all the layers' gradients of a weight.

`unstack_layers` slices at offsets held as device tensors, which the program takes as
inputs (a dynamic slice each, one XLA computation for all): the slices of one stack are then one
computation, and XLA's CPU backend compiles one kernel for them, where a slice at a literal
offset is a kernel of its own (`passes/stacked_results.py` does the same for other stacks'
selects). Each layer's gradient is still a tensor of its own: the optimizer and `.grad`
see the same tensors as with `torch.stack`.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

_LIB = "xla_loop"


@torch.library.custom_op(f"{_LIB}::stack_layers", mutates_args=())
def stack_layers(tensors: Sequence[Tensor]) -> Tensor:
    """`torch.stack(tensors)`: the layers' tensors along a new first dimension."""
    return torch.stack(list(tensors))


@torch.library.custom_op(f"{_LIB}::unstack_layers", mutates_args=())
def unstack_layers(stack: Tensor) -> list[Tensor]:
    """`stack.unbind(0)`, each a tensor of its own (not a view)."""
    return [t.clone() for t in stack.unbind(0)]


@stack_layers.register_fake
def _stack_layers_fake(tensors: Sequence[Tensor]) -> Tensor:
    first = tensors[0]
    return first.new_empty((len(tensors), *first.shape))


@unstack_layers.register_fake
def _unstack_layers_fake(stack: Tensor) -> list[Tensor]:
    return [stack.new_empty(stack.shape[1:]) for _ in range(stack.shape[0])]


@unstack_layers.register_kernel("xla")
def _unstack_layers_xla(stack: Tensor) -> list[Tensor]:
    import torch_xla

    computation = _unstack_computation(tuple(stack.shape), stack.dtype)
    offsets = _offsets(str(stack.device), stack.shape[0])
    return list(torch_xla._XLAC._xla_user_computation("xla_loop::unstack_layers", [stack, *offsets], computation))


@functools.cache
def _offsets(device: str, count: int) -> tuple[Tensor, ...]:
    """int64 device tensors [0] .. [count - 1], uploaded once: inputs of the program. (Of
    one element, not 0-dim: torch_xla makes a 0-dim 0 or 1 a literal of the program.)"""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return tuple(torch.tensor([i], dtype=torch.int64).to(device) for i in range(count))


@functools.cache
def _unstack_computation(shape: tuple[int, ...], dtype: torch.dtype) -> object:
    """XLA: (stack, offset_0, ..., offset_n-1) -> (stack[offset_0], ..., stack[offset_n-1]),
    each a dynamic slice along dim 0, at an offset of shape [1]."""
    import torch_xla.core.xla_builder as xb

    builder = xb.create_builder("xla_loop_unstack_layers")
    stack = xb.mkparam(builder, 0, xb.Shape.create(xb.Op.from_torch_type(dtype), shape))
    zero = xb.Op.scalar(builder, 0, dtype=xb.Type.S64)
    parts = []
    for i in range(shape[0]):
        offset = xb.mkparam(builder, 1 + i, xb.Shape.create(xb.Type.S64, [1])).reshape([])
        part = stack.dynamic_slice([offset] + [zero] * (len(shape) - 1), [1, *shape[1:]])
        parts.append(part.reshape(list(shape[1:])))
    return xb.Op.tuple(parts, builder).build("xla_loop_unstack_layers")


def _no_context(ctx: object, inputs: tuple, output: object) -> None:
    return None


def _stack_backward(ctx: object, grad: Tensor) -> tuple[list[Tensor]]:
    return (list(torch.ops.xla_loop.unstack_layers(grad)),)


def _unstack_backward(ctx: object, grads: Sequence[Tensor | None]) -> Tensor:
    like = next(g for g in grads if g is not None)
    return torch.ops.xla_loop.stack_layers([torch.zeros_like(like) if g is None else g for g in grads])


stack_layers.register_autograd(_stack_backward, setup_context=_no_context)
unstack_layers.register_autograd(_unstack_backward, setup_context=_no_context)
