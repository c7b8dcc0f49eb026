"""Stage an FX subgraph (a loop's cond or body) out as an XLA computation.

The subgraph runs once on placeholder tensors; torch_xla's lazy-tensor machinery records
the ops, and a `LoweringContext` turns them into an HLO computation whose parameters we map
back to the subgraph's inputs or to device data the body captured ("hoisted" tensors).

Python ints (SymInts in the graph: int carries, `.item()` results) live on the device as
0-dim int64 tensors while tracing, so nothing is read back to the host. `TensorScalarCall`
runs a graph node whose scalar arguments are such tensors.
"""
from __future__ import annotations

import contextlib
import functools
import math
import operator
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.utils._pytree as pytree
import torch_xla
import torch_xla.core.xla_builder as xb

from .. import metrics
from ..errors import LoopLoweringError, loop_name
from ..explain import deeper
from ..ops import spec_of
from .sharding import pinned

aten = torch.ops.aten

# A Python int that lives on the device while tracing.
INT_DTYPE = torch.int64


def is_symbolic_scalar(meta_val: Any) -> bool:
    """True for graph values that are Python scalars (ints, bools, floats, or their Sym forms)."""
    return isinstance(meta_val, (int, float, bool, torch.SymInt, torch.SymBool, torch.SymFloat))


def scalar_to_tensor(value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A Python scalar (or 0-dim tensor) as a 0-dim tensor on the XLA device."""
    if isinstance(value, torch.Tensor):
        value = value.reshape(())
        return value if dtype is None or value.dtype == dtype else value.to(dtype)
    if dtype is None:
        dtype = torch.bool if isinstance(value, bool) else INT_DTYPE if isinstance(value, int) else torch.float32
    return torch.tensor(value, dtype=dtype, device=torch_xla.device())


# Ops that only check or constrain unbacked SymInts: nothing to run on the device.
_NO_OPS = {
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten.sym_constrain_range.default,
    aten._assert_async.msg,
    aten._assert_async.default,
}

# Python-level symbolic functions, mapped to tensor ops.
_SYMBOLIC_FUNCTIONS: dict[Callable, Callable] = {
    torch.sym_max: lambda a, b: torch.maximum(scalar_to_tensor(a), scalar_to_tensor(b)),
    torch.sym_min: lambda a, b: torch.minimum(scalar_to_tensor(a), scalar_to_tensor(b)),
    torch.sym_not: lambda a: torch.logical_not(scalar_to_tensor(a)),
    torch.sym_ite: lambda c, a, b: torch.where(scalar_to_tensor(c), a, b),
    torch.sym_float: lambda a: scalar_to_tensor(a).to(torch.get_default_dtype()),
    torch.sym_int: lambda a: scalar_to_tensor(a).to(INT_DTYPE),
    math.floor: lambda a: torch.floor(scalar_to_tensor(a)).to(INT_DTYPE),
    math.ceil: lambda a: torch.ceil(scalar_to_tensor(a)).to(INT_DTYPE),
    operator.truediv: lambda a, b: scalar_to_tensor(a).to(torch.get_default_dtype()) / b,
}


def _select_dynamic(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x.select(dim, index) with index on the device: a dynamic slice, no host read."""
    size = x.shape[dim]
    index = scalar_to_tensor(index, INT_DTYPE)
    index = torch.where(index < 0, index + size, index)
    return torch.index_select(x, dim, index.reshape(1)).squeeze(dim)


def _select_scatter_dynamic(x: torch.Tensor, src: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x with x.select(dim, index) = src, index on the device: a dynamic update slice."""
    size = x.shape[dim]
    index = scalar_to_tensor(index, INT_DTYPE)
    index = torch.where(index < 0, index + size, index)
    return x.index_copy(dim, index.reshape(1), src.unsqueeze(dim))


def _full_dynamic(size: Sequence[int], fill: Any, **kwargs: Any) -> torch.Tensor:
    dtype = kwargs.get("dtype") or (fill.dtype if isinstance(fill, torch.Tensor) else None)
    return scalar_to_tensor(fill, dtype).expand(list(size)).clone()


# aten ops whose scalar argument may be a device tensor, with a device-side replacement.
_TENSOR_SCALAR_REPLACEMENTS: dict[Any, Callable] = {
    aten._local_scalar_dense.default: lambda t: t.reshape(()),
    aten.item.default: lambda t: t.reshape(()),
    aten.scalar_tensor.default: lambda s, **kw: scalar_to_tensor(s, kw.get("dtype") or torch.get_default_dtype()),
    aten.full.default: _full_dynamic,
    aten.select.int: _select_dynamic,
    aten.select_scatter.default: _select_scatter_dynamic,
}


def _schema_takes_tensor(arg_type: torch.Type) -> bool:
    return isinstance(arg_type, torch.TensorType) or (
        isinstance(arg_type, torch.OptionalType) and isinstance(arg_type.getElementType(), torch.TensorType)
    )


def _tensor_overload(op: torch._ops.OpOverload, args: Sequence[Any]) -> torch._ops.OpOverload | None:
    """The overload of `op`'s packet that takes a Tensor wherever `args` holds one
    (e.g. aten.gt.Scalar -> aten.gt.Tensor), if there is one."""
    packet = op.overloadpacket
    for name in packet.overloads():
        candidate = getattr(packet, name)
        schema_args = [a for a in candidate._schema.arguments if not a.kwarg_only]
        if len(schema_args) < len(args) or candidate._schema.is_mutable:
            continue
        if all(
            _schema_takes_tensor(schema_arg.type) == isinstance(value, torch.Tensor)
            for schema_arg, value in zip(schema_args, args)
        ):
            return candidate
    return None


@dataclass
class TensorScalarCall:
    """Runs one graph node whose scalar (SymInt/SymBool) arguments arrive as device tensors."""

    node: torch.fx.Node
    loop: str

    def __call__(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target in _NO_OPS:
            return None
        if target is aten.sym_size.int:
            return args[0].shape[args[1]]
        if target is aten.sym_numel.default:
            return args[0].numel()
        if not _has_device_scalar(args, kwargs):
            return target(*args, **kwargs)
        if target in _SYMBOLIC_FUNCTIONS:
            return _SYMBOLIC_FUNCTIONS[target](*args, **kwargs)
        if target in _TENSOR_SCALAR_REPLACEMENTS:
            return _TENSOR_SCALAR_REPLACEMENTS[target](*args, **kwargs)
        if not isinstance(target, torch._ops.OpOverload):
            # Python operators (operator.add, operator.lt, ...) work on tensors as they are.
            return target(*args, **kwargs)
        if all(
            _schema_takes_tensor(a.type) or not isinstance(v, torch.Tensor)
            for a, v in zip(target._schema.arguments, args)
        ) and not any(isinstance(v, torch.Tensor) and k not in _tensor_kwargs(target) for k, v in kwargs.items()):
            return target(*args, **kwargs)
        overload = _tensor_overload(target, args)
        if overload is not None and not kwargs:
            return overload(*args)
        raise LoopLoweringError(
            f"{self.loop}: `{self.node.format_node()}` uses a Python int/bool computed inside the loop "
            f"(a carry or an `.item()` result) where {target} needs a value known at compile time "
            "(for example a shape or a size). XLA needs static shapes: make it a tensor operation, "
            "or compute the value outside the loop."
        )


def _tensor_kwargs(op: torch._ops.OpOverload) -> set[str]:
    return {a.name for a in op._schema.arguments if _schema_takes_tensor(a.type)}


def _has_device_scalar(args: tuple, kwargs: dict) -> bool:
    """True if a 0-dim int/bool device tensor stands in an argument position. Cheap test: any
    tensor argument at all means the generic path must check the schema."""
    return any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves((args, kwargs)))


class SubgraphInterpreter(torch.fx.Interpreter):
    """Runs a loop subgraph on lazy XLA tensors, lowering nested loops through the rule table
    and keeping Python scalars on the device."""

    def __init__(self, module: torch.fx.GraphModule, loop: str):
        super().__init__(module, garbage_collect_values=True)
        self.loop = loop
        self.current_node: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current_node = n
        return super().run_node(n)

    def get_attr(self, target: str, args: tuple, kwargs: dict) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and value.device.type != "xla":
            value = value.to(torch_xla.device())
        return value

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        from . import lower_control_flow  # the table imports this module

        node = self.current_node
        if spec_of(target) is not None:
            return lower_control_flow(node, target, args, kwargs)
        if _on_placeholders[0]:
            check_runs_on_device(node, target, args, kwargs, self.loop)
        if not _node_touches_scalars(node):
            return target(*args, **kwargs)
        return TensorScalarCall(node, self.loop)(target, args, kwargs)


# torch_xla 2.9's XLA kernels that hand some inputs (a dtype, a shape, an option) to its CPU
# fallback (`call_fallback_fn` in torch_xla/csrc/aten_xla_type.cpp at v2.9.0).
_FALLS_BACK_SOMETIMES = frozenset(
    "aten::" + name
    for name in (
        "_adaptive_avg_pool2d _adaptive_avg_pool2d_backward _adaptive_avg_pool3d _adaptive_avg_pool3d_backward "
        "_embedding_bag_backward adaptive_max_pool2d adaptive_max_pool2d_backward addmm as_strided "
        "as_strided_scatter avg_pool2d_backward avg_pool3d_backward bernoulli bernoulli_ cumprod dot "
        "exponential_ full linspace masked_select max_pool2d_with_indices max_pool2d_with_indices_backward "
        "max_pool3d_with_indices max_pool3d_with_indices_backward multinomial nonzero norm normal normal_ "
        "random_ randperm rrelu_with_noise scatter_reduce uniform_ upsample_bilinear2d_backward "
        "upsample_nearest2d_backward _linalg_svd _linalg_eigh linalg_inv_ex _embedding_bag"
    ).split()
)


@functools.cache
def _xla_kernel(name: str) -> str:
    """What torch_xla registered for the op: 'kernel' (its own lowering), 'fallback' (the CPU,
    unless a key before XLA's takes the op) or 'other' (a decomposition, whose ops may fall
    back)."""
    for line in torch._C._dispatch_dump_table(name).splitlines():
        if line.startswith("XLA:"):
            return "fallback" if "[backend fallback]" in line else "kernel" if "[kernel]" in line else "other"
    return "other"


def _probe(fx: Any, value: Any) -> Any:
    """Stand-ins to try an op on: zeros for its tensors, and for a Python scalar that is a
    device tensor here (a loop's int carry), a plain number: 0, False or 1.0."""
    if isinstance(fx, torch.fx.Node) and is_symbolic_scalar(fx.meta.get("val")):
        meta = fx.meta["val"]
        return False if isinstance(meta, (bool, torch.SymBool)) else 1.0 if isinstance(meta, (float, torch.SymFloat)) else 0
    if isinstance(value, torch.Tensor):
        return torch.zeros(value.shape, dtype=value.dtype, device=value.device)
    if isinstance(value, (tuple, list)) and isinstance(fx, (tuple, list)) and len(fx) == len(value):
        return type(value)(_probe(f, v) for f, v in zip(fx, value))
    if isinstance(value, dict) and isinstance(fx, dict):
        return {k: _probe(fx.get(k), v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_probe(None, v) for v in value)
    return value


def _fallback_count() -> int:
    """How many times torch_xla ran an op on the CPU so far in this process."""
    xla = torch_xla._XLAC
    return sum(xla._xla_counter_value(name) for name in xla._get_executed_fallback_ops())


def check_runs_on_device(node: torch.fx.Node | None, target: Any, args: tuple, kwargs: dict, loop: str) -> None:
    """Before an op runs on placeholder tensors (a loop body, a branch): raise if torch_xla
    would run it on the CPU, which reads its inputs back and, on a placeholder (no buffer),
    aborts the process. An op with an XLA kernel that never falls back runs as it is; any
    other (a fallback registration, which functionalization may still take before it, a
    kernel that falls back for some inputs, a decomposition) first runs on zeros of the same
    shapes (lazy: nothing executes unless it falls back)."""
    if not isinstance(target, torch._ops.OpOverload):
        return
    name = target._schema.name
    kind = _xla_kernel(name)
    if kind == "kernel" and name not in _FALLS_BACK_SOMETIMES:
        return
    zeros = _probe((node.args, node.kwargs) if node is not None else (args, kwargs), (args, kwargs))
    before = _fallback_count()
    try:
        target(*zeros[0], **zeros[1])
    except Exception:  # (zeros may be values the op refuses: it then meets the real trace)
        return
    if _fallback_count() == before:
        return
    where = f" ({loop_name('the op', node).removeprefix('the op ')})" if node is not None else ""
    raise LoopLoweringError(
        f"{loop}: `{node.format_node() if node is not None else name}`{where}: torch_xla runs {name} on "
        "the CPU for these inputs (it has no XLA lowering for them), which inside a loop body or branch "
        "would read the loop's values back to the host every iteration. Compute it outside the loop, "
        "or write it with ops torch_xla lowers."
    )


def _node_touches_scalars(node: torch.fx.Node) -> bool:
    """True if the node takes or makes a symbolic Python scalar (so it may see device scalars)."""
    if is_symbolic_scalar(node.meta.get("val")):
        return True
    return any(
        isinstance(a, torch.fx.Node) and is_symbolic_scalar(a.meta.get("val"))
        for a in pytree.tree_leaves((node.args, node.kwargs))
    )


@dataclass
class StagedComputation:
    """An XLA computation staged out of a function, and how to feed it.

    `param_sources[k]` says where parameter k of the computation comes from: ("input", i)
    for the function's i-th input, or ("hoisted", tensor) for device data it captured.
    `seed_params` are the parameters holding torch_xla's RNG seed, if the function draws
    random numbers (one per time the seed's IR chain restarted while tracing: each nested
    loop restarts it); a loop advances the seed every iteration, a graph takes a new one
    every call.
    `hlo` is the serialized HLO module; `shared_inputs` lists inputs (i, j) that reached the
    computation as one parameter because they are one device buffer (see `lower_traced`).
    """

    computation: Any
    outputs: list[torch.Tensor]
    param_sources: list[tuple[str, Any]] = field(default_factory=list)
    seed_params: list[int] = field(default_factory=list)
    hlo: bytes = b""
    shared_inputs: list[tuple[int, int]] = field(default_factory=list)


@contextlib.contextmanager
def own_rng_root() -> Iterator[None]:
    """Random ops traced inside get an RNG seed node of their own, as do those traced after.

    Finding a computation's parameters (`_get_tensors_xla_device_data_node`) re-stamps the
    identity of the device data it visits, and torch_xla's RNG seed is recognised by that
    identity (`lower_traced`: a graph feeds it a new seed every call). Restarting the seed's
    IR chain (at the same running seed, so the random stream is unchanged) keeps the
    enclosing graph's seed node out of the staged function.
    """
    device = str(torch_xla.device())
    torch_xla._XLAC._xla_set_rng_seed(torch_xla._XLAC._xla_get_rng_seed(device), device)
    try:
        yield
    finally:
        torch_xla._XLAC._xla_set_rng_seed(torch_xla._XLAC._xla_get_rng_seed(device), device)


# While > 0, ops run on placeholder tensors (no device buffer): see `check_runs_on_device`.
_on_placeholders = [0]


def stage_computation(
    name: str,
    fn: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    carry_shardings: Sequence[Any] = (),
) -> StagedComputation:
    """Trace `fn` on placeholders shaped like `inputs` and lower what it computes.

    `carry_shardings` (SPMD) pins the first inputs and outputs, a loop's carries, to their
    shardings (see `sharding.py`)."""
    metrics.increment(metrics.SUBGRAPHS_TRACED)
    placeholders = [xb.create_placeholder_tensor(t.shape, t.dtype) for t in inputs]
    _on_placeholders[0] += 1
    try:
        with own_rng_root(), deeper():
            outputs = fn(pinned(placeholders, carry_shardings))
            outputs = pinned([scalar_to_tensor(o) if not isinstance(o, torch.Tensor) else o for o in outputs], carry_shardings)
    except BaseException as error:
        placeholders = []  # (see `_forget_placeholders`)
        _forget_placeholders(error)
        raise
    finally:
        _on_placeholders[0] -= 1
    return lower_traced(name, outputs, placeholders)


def _forget_placeholders(error: BaseException) -> None:
    """Drop the local variables of the frames an error passed through while tracing on
    placeholders. They hold placeholder tensors (no device buffer), and a traceback printed
    with its frames' values (pytest's, `traceback`'s capture_locals, a debugger) would read
    one back, which aborts the process. The error's message names the loop and the line."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def lower_traced(name: str, outputs: Sequence[torch.Tensor], inputs: Sequence[Any]) -> StagedComputation:
    """The XLA computation of `outputs`, traced lazily from `inputs` (tensors, or anything
    else, which is not a parameter), and where each of its parameters comes from."""
    ctx = torch_xla._XLAC.lowering.LoweringContext(name)
    ctx.set_name_string(name)
    ctx.build(list(outputs))
    hlo = ctx.hlo()
    computation = xb.computation_from_module_proto(name, hlo)

    input_of_param: dict[int, int] = {}
    shared: list[tuple[int, int]] = []
    for i, value in enumerate(inputs):
        param_id = ctx.tensor_parameter_id(value) if isinstance(value, torch.Tensor) else -1
        if param_id == -1:
            continue
        if param_id in input_of_param:  # (two inputs on one device buffer: one parameter)
            shared.append((input_of_param[param_id], i))
            continue
        input_of_param[param_id] = i
    # Device data the computation captured. (Not ctx.device_parameter_id_tensor_mapping():
    # it re-wraps the data and so erases the identity of torch_xla's RNG seed.)
    hoisted: dict[int, torch.Tensor] = {}
    seed_params = []
    seed_id = torch_xla._XLAC._get_seed_info_id()
    for data_id, value in zip(*torch_xla._XLAC._get_tensors_xla_device_data_node(list(outputs))):
        param_id = ctx.tensor_parameter_id(value)
        if param_id == -1 or param_id in input_of_param:
            continue
        hoisted[param_id] = value
        if data_id == seed_id:
            seed_params.append(param_id)

    num_params = len(input_of_param) + len(hoisted)
    sources: list[tuple[str, Any]] = []
    for param_id in range(num_params):
        if param_id in input_of_param:
            sources.append(("input", input_of_param[param_id]))
        elif param_id in hoisted:
            sources.append(("hoisted", hoisted[param_id]))
        else:
            raise AssertionError(f"{name}: parameter {param_id} of the staged computation has no source")
    return StagedComputation(computation, list(outputs), sources, seed_params, hlo, shared)
