"""Indexing with a loop counter: `x[t]`, `x[:, t]`, `out[t] = v`, `out[:, t] = v`,
`x.narrow(d, t, k)`, `x.select(d, t)`, `x[t:t + k]`, with `t` a 0-dim integer tensor, inside
loop bodies and branches, as XLA dynamic slices and dynamic update slices: no host read.

Why: PyTorch reads a 0-dim integer index back as a Python int (`__index__`), and Dynamo
refuses that read inside a loop body or branch (a data-dependent operator); with
`capture_scalar_outputs` it still fails, as `select` needs the int's bounds. JAX compiles
exactly this (`x[i]`, `x.at[i].set(v)` with a traced `i`: dynamic_slice and
dynamic_update_slice). So does xla_loop:

- Two ops of its own (`torch.library`), with XLA kernels that build XLA's DynamicSlice and
  DynamicUpdateSlice, a kernel for any other device that computes the same (so eager CPU
  runs and tests agree), shapes for fake tensors, and gradients: a read's gradient is added
  into zeros at the slice (summed over reads by autograd: a scatter-add), a write passes the
  gradient through outside the slice and hands the slice's gradient to the written value.
      dynamic_slice(x, dims, starts, sizes)          x sliced at starts[i] along dims[i]
      dynamic_update_slice(x, update, dims, starts)  x with that slice replaced by update
- Index semantics: a negative index counts from the end, as in PyTorch (t = -1 is the last);
  then, as XLA's dynamic slice does, the start is clamped so the slice lies inside the
  tensor: an index past the end reads (and writes) the last row, where eager PyTorch raises
  an IndexError, and `x[t:t + k]` always has k rows, where eager PyTorch returns fewer near
  the end. A loop cannot raise on the device; keep indices in range.
- Dynamo, while it traces a body or branch (a nested tracer), where it would otherwise refuse
  the read, turns such indexing into calls of `getitem` / `setitem` below (`install`): the
  static part of an index is taken as a view, the counter's part with the ops above. A slice `t:u` needs a length
  known when tracing: `u` must be `t` plus or minus a constant (`t:t + 2`, `t - 1:t + 1`).
  A slice whose length is data (`x[:t]`, `x[t:]`) is an error that says what to write.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Sequence

import torch
from torch import Tensor

_LIB = "xla_loop"


def _starts(x: Tensor, dims: Sequence[int], starts: Sequence[Tensor], sizes: Sequence[int]) -> list[Tensor]:
    """Each start as an int64 scalar: negative counts from the end, then clamped so that the
    slice of `sizes[i]` lies inside `x` (XLA's dynamic-slice rule)."""
    out = []
    for dim, start, size in zip(dims, starts, sizes):
        n = x.shape[dim]
        s = start.reshape(()).to(torch.int64)
        s = torch.where(s < 0, s + n, s)
        out.append(s.clamp(0, n - size))
    return out


@torch.library.custom_op(f"{_LIB}::dynamic_slice", mutates_args=())
def dynamic_slice(x: Tensor, dims: Sequence[int], starts: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    """`x` sliced to `sizes[i]` elements from `starts[i]` along `dims[i]` (any device)."""
    out = x
    for dim, start, size in zip(dims, _starts(x, dims, starts, sizes), sizes):
        out = torch.index_select(out, dim, start + torch.arange(size, device=x.device))
    return out.clone()


@torch.library.custom_op(f"{_LIB}::dynamic_update_slice", mutates_args=())
def dynamic_update_slice(x: Tensor, update: Tensor, dims: Sequence[int], starts: Sequence[Tensor]) -> Tensor:
    """`x` with its slice at `starts` along `dims` (of `update`'s size) replaced by `update`."""
    sizes = [update.shape[d] for d in dims]
    index = [torch.arange(n, device=x.device) for n in x.shape]
    for dim, start, size in zip(dims, _starts(x, dims, starts, sizes), sizes):
        index[dim] = start + torch.arange(size, device=x.device)
    out = x.clone()
    out[torch.meshgrid(*index, indexing="ij")] = update.to(x.dtype)
    return out


@dynamic_slice.register_fake
def _(x: Tensor, dims: Sequence[int], starts: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    shape = list(x.shape)
    for dim, size in zip(dims, sizes):
        shape[dim] = size
    return x.new_empty(shape)


@dynamic_update_slice.register_fake
def _(x: Tensor, update: Tensor, dims: Sequence[int], starts: Sequence[Tensor]) -> Tensor:
    return torch.empty_like(x)


@dynamic_slice.register_kernel("xla")
def _(x: Tensor, dims: Sequence[int], starts: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    import torch_xla

    begin = _starts(x, dims, starts, sizes)
    computation = _slice_computation(tuple(x.shape), x.dtype, tuple(dims), tuple(sizes))
    return torch_xla._XLAC._xla_user_computation("xla_loop::dynamic_slice", [x, *begin], computation)[0]


@dynamic_update_slice.register_kernel("xla")
def _(x: Tensor, update: Tensor, dims: Sequence[int], starts: Sequence[Tensor]) -> Tensor:
    import torch_xla

    update = update.to(x.dtype)
    begin = _starts(x, dims, starts, [update.shape[d] for d in dims])
    computation = _update_computation(tuple(x.shape), tuple(update.shape), x.dtype, tuple(dims))
    return torch_xla._XLAC._xla_user_computation("xla_loop::dynamic_update_slice", [x, update, *begin], computation)[0]


def _builder_params(name: str, shapes: Sequence[tuple[tuple[int, ...], torch.dtype]], starts: int) -> tuple[Any, list[Any]]:
    import torch_xla.core.xla_builder as xb

    builder = xb.create_builder(name)
    params = [xb.mkparam(builder, i, xb.Shape.create(xb.Op.from_torch_type(dtype), shape)) for i, (shape, dtype) in enumerate(shapes)]
    params += [xb.mkparam(builder, len(shapes) + i, xb.Shape.create(xb.Type.S64, [])) for i in range(starts)]
    return builder, params


@functools.cache
def _slice_computation(shape: tuple[int, ...], dtype: torch.dtype, dims: tuple[int, ...], sizes: tuple[int, ...]) -> Any:
    import torch_xla.core.xla_builder as xb

    builder, (x, *begin) = _builder_params("xla_loop_dynamic_slice", [(shape, dtype)], len(dims))
    zero = xb.Op.scalar(builder, 0, dtype=xb.Type.S64)
    at = {d: b for d, b in zip(dims, begin)}
    size = dict(zip(dims, sizes))
    indices = [at.get(d, zero) for d in range(len(shape))]
    return x.dynamic_slice(indices, [size.get(d, n) for d, n in enumerate(shape)]).build("xla_loop_dynamic_slice")


@functools.cache
def _update_computation(shape: tuple[int, ...], update: tuple[int, ...], dtype: torch.dtype, dims: tuple[int, ...]) -> Any:
    import torch_xla.core.xla_builder as xb

    builder, (x, value, *begin) = _builder_params("xla_loop_dynamic_update_slice", [(shape, dtype), (update, dtype)], len(dims))
    zero = xb.Op.scalar(builder, 0, dtype=xb.Type.S64)
    at = {d: b for d, b in zip(dims, begin)}
    indices = [at.get(d, zero) for d in range(len(shape))]
    return x.dynamic_update_slice(value, indices).build("xla_loop_dynamic_update_slice")


def _slice_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, dims, starts, sizes = inputs
    ctx.shape, ctx.dtype, ctx.device, ctx.dims = x.shape, x.dtype, x.device, dims
    ctx.save_for_backward(*starts)


def _slice_backward(ctx: Any, grad: Tensor) -> tuple:
    starts = list(ctx.saved_tensors)
    zeros = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device)
    return dynamic_update_slice(zeros, grad, ctx.dims, starts), None, [None] * len(starts), None


def _update_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, update, dims, starts = inputs
    ctx.dims, ctx.sizes, ctx.update_dtype = dims, [update.shape[d] for d in dims], update.dtype
    ctx.update_shape = update.shape
    ctx.save_for_backward(*starts)


def _update_backward(ctx: Any, grad: Tensor) -> tuple:
    starts = list(ctx.saved_tensors)
    zeros = torch.zeros(ctx.update_shape, dtype=grad.dtype, device=grad.device)
    grad_x = dynamic_update_slice(grad, zeros, ctx.dims, starts)
    grad_update = dynamic_slice(grad, ctx.dims, starts, ctx.sizes)
    grad_update = grad_update.to(ctx.update_dtype) if ctx.update_dtype.is_floating_point else None
    return grad_x, grad_update, None, [None] * len(starts)


dynamic_slice.register_autograd(_slice_backward, setup_context=_slice_setup)
dynamic_update_slice.register_autograd(_update_backward, setup_context=_update_setup)


# ---- what Dynamo runs in place of the indexing (it inlines these functions) -------------------


def getitem(x: Tensor, key: Any, lengths: tuple) -> Tensor:
    """`x[key]`, where key holds counters (0-dim integer tensors) and slices from a counter of
    `lengths[i]` elements."""
    view, dims, starts, sizes, squeezed = _split(x, key, lengths)
    out = torch.ops.xla_loop.dynamic_slice(x[view] if view is not None else x, dims, starts, sizes)
    for dim in reversed(squeezed):
        out = out.squeeze(dim)
    return out


def setitem(x: Tensor, key: Any, value: Any, lengths: tuple) -> None:
    """`x[key] = value`, in place (see `getitem`)."""
    view, dims, starts, sizes, squeezed = _split(x, key, lengths)
    base = x[view] if view is not None else x
    region = list(base.shape)
    for dim, size in zip(dims, sizes):
        region[dim] = size
    value = value.to(x.dtype) if isinstance(value, Tensor) else torch.full((), value, dtype=x.dtype, device=x.device)
    value = value.expand([n for d, n in enumerate(region) if d not in squeezed])
    for dim in squeezed:
        value = value.unsqueeze(dim)
    base.copy_(torch.ops.xla_loop.dynamic_update_slice(base, value, dims, starts))


def narrow(x: Tensor, dim: int, start: Tensor, length: int) -> Tensor:
    """`x.narrow(dim, start, length)` with a counter start (a copy, not a view)."""
    return torch.ops.xla_loop.dynamic_slice(x, [dim % x.dim()], [start], [length])


def select(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """`x.select(dim, index)` with a counter index."""
    dim = dim % x.dim()
    return torch.ops.xla_loop.dynamic_slice(x, [dim], [index], [1]).squeeze(dim)


def _split(x: Tensor, key: Any, lengths: tuple) -> tuple:
    """The static part of an index as a view of `x` (None if there is none) and, in that
    view's dims, where the counters slice it: dims, starts, sizes, and the dims a counter
    index removes."""
    key = key if isinstance(key, tuple) else (key,)
    taking = sum(1 for k in key if k is not None and k is not Ellipsis)
    view: list[Any] = []
    dims: list[int] = []
    starts: list[Tensor] = []
    sizes: list[int] = []
    squeezed: list[int] = []
    static = False  # (whether the view takes anything but whole dims)
    dim = 0
    for k, length in zip(key, lengths):
        if k is Ellipsis:
            for _ in range(x.dim() - taking):
                view.append(slice(None))
                dim += 1
        elif isinstance(k, Tensor):
            view.append(slice(None))
            dims.append(dim)
            starts.append(k)
            sizes.append(1)
            squeezed.append(dim)
            dim += 1
        elif length is not None:
            view.append(slice(None))
            dims.append(dim)
            starts.append(k.start)
            sizes.append(length)
            dim += 1
        else:
            view.append(k)
            dim += 0 if isinstance(k, int) else 1
            static = static or not (isinstance(k, slice) and k.start is None and k.stop is None and k.step is None)
    return (tuple(view) if static else None), dims, starts, sizes, squeezed


# ---- Dynamo: where the indexing above replaces PyTorch's -----------------------------------


def install() -> None:
    """Teach Dynamo the counter indexing above (see the module docstring). Only while it
    traces a body or branch (a nested tracer), where Dynamo would refuse the read of the
    counter; everything else is left to Dynamo as it is. On any device: torch's eager scan
    and while_loop on CPU tensors trace their bodies with Dynamo too (xla_loop's API runs
    them for CPU tensors), and they then compute what the device does."""
    from torch._dynamo.variables import builtin, lists, tensor, torch as torch_variables

    if getattr(tensor.TensorVariable.call_method, "_xla_loop_indexing", False):
        return
    method, function, slice_init, in_graph = (
        tensor.TensorVariable.call_method,
        torch_variables.TorchInGraphFunctionVariable.call_function,
        lists.SliceVariable.__init__,
        builtin.BuiltinVariable._handle_insert_op_in_graph,
    )

    def call_method(self: Any, tx: Any, name: str, args: list, kwargs: dict) -> Any:
        rewritten = _method(tx, self, name, args, kwargs)
        return rewritten if rewritten is not None else method(self, tx, name, args, kwargs)

    def call_function(self: Any, tx: Any, args: list, kwargs: dict) -> Any:
        if self.value in (torch.narrow, torch.select) and args and not kwargs:
            rewritten = _method(tx, args[0], self.value.__name__, list(args[1:]), {})
            if rewritten is not None:
                return rewritten
        return function(self, tx, args, kwargs)

    def insert_op_in_graph(self: Any, tx: Any, args: list, kwargs: dict) -> Any:  # (`x[t]` comes here)
        if self.fn is operator.getitem and len(args) == 2 and not kwargs:
            rewritten = _method(tx, args[0], "__getitem__", [args[1]], {})
            if rewritten is not None:
                return rewritten
        return in_graph(self, tx, args, kwargs)

    def init(self: Any, items: Any, **kwargs: Any) -> None:
        if any(_counter(item) for item in items) and _in_body():  # (a slice from a counter: `getitem`)
            none = variables().ConstantVariable.create(None)
            self.items = {1: (none, items[0], none), 2: (items[0], items[1], none)}.get(len(items), tuple(items))
            variables().VariableTracker.__init__(self, **kwargs)
            return
        slice_init(self, items, **kwargs)

    call_method._xla_loop_indexing = True  # type: ignore[attr-defined]
    call_method.__wrapped__ = method  # type: ignore[attr-defined]
    insert_op_in_graph.__wrapped__ = in_graph  # type: ignore[attr-defined]
    tensor.TensorVariable.call_method = call_method
    torch_variables.TorchInGraphFunctionVariable.call_function = call_function
    lists.SliceVariable.__init__ = init
    builtin.BuiltinVariable._handle_insert_op_in_graph = insert_op_in_graph


def variables() -> Any:
    import torch._dynamo.variables as v

    return v


def _in_body() -> bool:
    """Whether Dynamo is tracing a body or branch (a nested tracer: what it would refuse)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    return tx is not None and tx.output.current_tracer.parent is not None


def _example(vt: Any) -> Any:
    proxy = getattr(vt, "proxy", None)
    return proxy.node.meta.get("example_value") if proxy is not None else None


def _counter(vt: Any) -> bool:
    """A 0-dim integer tensor (a loop counter, an index read from a table)."""
    value = _example(vt)
    return (
        isinstance(vt, variables().TensorVariable)
        and isinstance(value, Tensor)
        and value.dim() == 0
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
    )


def _is_tensor(vt: Any) -> bool:
    return isinstance(_example(vt), Tensor)


def _method(tx: Any, tensor_vt: Any, name: str, args: list, kwargs: dict) -> Any:
    """The counter indexing of `tensor_vt.name(*args)`, inlined, or None to leave it to Dynamo."""
    if name not in ("__getitem__", "__setitem__", "narrow", "select") or kwargs or not _is_tensor(tensor_vt) or not _in_body():
        return None
    v = variables()
    if name in ("narrow", "select"):
        if len(args) < 2 or not _counter(args[1]):
            return None
        if name == "narrow" and not (len(args) == 3 and isinstance(args[2], v.ConstantVariable)):
            _refuse("narrow(dim, t, length) with a length that is not a Python int", "Give narrow a Python int length.")
        polyfill = narrow if name == "narrow" else select
        return v.UserFunctionVariable(polyfill).call_function(tx, [tensor_vt, *args], {})
    key = args[0]
    entries = list(key.items) if isinstance(key, v.TupleVariable) else [key]
    lengths = [_slice_length(tx, e) if isinstance(e, v.SliceVariable) else None for e in entries]
    if not any(_counter(e) for e in entries) and all(n is None for n in lengths):
        return None
    if any(isinstance(e, v.TensorVariable) and not _counter(e) for e in entries):
        return None  # (other tensor indices: PyTorch's advanced indexing, left to Dynamo)
    lengths_vt = v.ConstantVariable.create(tuple(lengths))
    key_vt = v.TupleVariable(entries)
    if name == "__getitem__":
        return v.UserFunctionVariable(getitem).call_function(tx, [tensor_vt, key_vt, lengths_vt], {})
    return v.UserFunctionVariable(setitem).call_function(tx, [tensor_vt, key_vt, args[1], lengths_vt], {})


def _slice_length(tx: Any, entry: Any) -> int | None:
    """The length of a slice with a counter bound, `t + a:t + b` -> b - a; None for a slice
    of Python ints. A slice whose length is data is refused."""
    start, stop, step = entry.items
    if not (_counter(start) or _counter(stop)):
        return None
    v = variables()
    if not (isinstance(step, v.ConstantVariable) and step.value in (None, 1)):
        _refuse("a slice from a tensor index with a step", "Slice with step 1, then take every k-th element with a static slice.")
    if _counter(start) and _counter(stop):
        outer = _outer_nodes(tx)
        base, a = _affine(start.proxy.node, outer)
        other, b = _affine(stop.proxy.node, outer)
        if base is other and b - a >= 1:
            return b - a
    _refuse(
        "a slice whose length depends on data (`x[:t]`, `x[t:]`, `x[t:u]`)",
        "XLA needs every shape fixed when it compiles. Write a slice of fixed length, `x[t:t + k]` or "
        "`x.narrow(dim, t, k)` with k a Python int, or keep the whole tensor and mask it, e.g. "
        "`torch.where(torch.arange(x.shape[0], device=x.device) < t, x, 0)` for `x[:t]`.",
    )
    return None


def _outer_nodes(tx: Any) -> dict[Any, Any]:
    """For each placeholder a body's tracer lifted from an enclosing graph, that graph's node
    (`t` captured by the body and `t + 2` computed in it then have one base)."""
    outer = {}
    tracer = tx.output.current_tracer
    while tracer is not None:
        for theirs, ours in tracer.lifted_freevars.items():
            outer[ours.node] = theirs.node
        tracer = tracer.parent
    return outer


def _affine(node: Any, outer: dict[Any, Any]) -> tuple[Any, int]:
    """(base, offset) with node = base + offset, through additions and subtractions of ints
    and lifted placeholders."""
    offset = 0
    while True:
        while node in outer:
            node = outer[node]
        if getattr(node, "op", None) != "call_function" or len(node.args) != 2:
            break
        a, b = node.args
        if node.target in (operator.add, torch.add, operator.iadd) and isinstance(b, int) and not isinstance(b, bool):
            node, offset = a, offset + b
        elif node.target in (operator.add, torch.add) and isinstance(a, int) and not isinstance(a, bool):
            node, offset = b, offset + a
        elif node.target in (operator.sub, torch.sub, operator.isub) and isinstance(b, int) and not isinstance(b, bool):
            node, offset = a, offset - b
        else:
            break
    return node, offset


def _refuse(what: str, instead: str) -> None:
    """Dynamo's graph break for an indexing form xla_loop cannot lower (in a body, an error)."""
    from torch._dynamo.exc import unimplemented_v2

    unimplemented_v2(
        gb_type=f"xla_loop cannot lower {what}",
        context=what,
        explanation="Inside a loop body or branch, xla_loop indexes with a 0-dim integer tensor through "
        f"XLA's dynamic slices, whose size is fixed. {instead}",
        hints=[],
    )
