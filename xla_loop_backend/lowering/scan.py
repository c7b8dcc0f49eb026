"""Lowering rules: `torch.ops.higher_order.scan` (and `map_impl`, a scan without carries)
-> one XLA `While`, never unrolled.

Dynamo has already moved the scanned dimension to 0 and flipped reversed inputs and outputs
around the node, so the rule scans forward over dim 0; `scan_from_the_end`, which the
`reversed_scans` pass puts in place of a scan over flipped xs, reads and writes step i at
`length - 1 - i` instead (no flip, no copy). The While's state is (step counter,
carries, stacked outputs, xs, additional inputs, then what combine_fn captured). Each
iteration reads slice i of every xs with a dynamic slice and writes the step's outputs
into slice i of preallocated buffers with a dynamic update slice, so memory is one copy of
xs and ys and the body is traced once whatever the length. The trip count is a constant, so
XLA knows it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch_xla
import torch_xla.core.xla_builder as xb

from .. import metrics
from ..errors import LoopLoweringError, describe_value, loop_name
from ..ops import register
from .sharding import shardings_of, stacks_like_carries
from .subgraph import SubgraphInterpreter, stage_computation
from .state import ControlFlowState, as_state_tensor, check_new_carries


def scan_from_the_end(combine_fn: Any, init: Any, xs: Any, additional_inputs: Any) -> list[torch.Tensor]:
    """`scan_op` over the xs read from their last slice to their first, each step's ys
    written at the same place: the scan over flipped xs, its ys flipped back. (What it
    computes, run as it is; the lowering reads the xs from the end instead.)"""
    from torch._higher_order_ops.scan import scan_op

    out = list(scan_op(combine_fn, list(init), [x.flip(0) for x in xs], tuple(additional_inputs)))
    return out[: len(init)] + [y.flip(0) for y in out[len(init) :]]


register(scan_from_the_end, torch.ops.higher_order.scan)


def lower_scan(
    node: torch.fx.Node | None,
    combine_fn: torch.fx.GraphModule,
    init: Sequence[Any],
    xs: Sequence[Any],
    additional_inputs: Sequence[Any],
) -> tuple[torch.Tensor, ...]:
    """Run a scan as one XLA While on lazy XLA tensors: returns (*final carries, *stacked ys)."""
    reverse = node is not None and node.target is scan_from_the_end
    return _lower_scan_like(loop_name("scan", node), node, "combine_fn", combine_fn, init, xs, additional_inputs, reverse)


def lower_map(
    node: torch.fx.Node | None, f: torch.fx.GraphModule, xs: Sequence[Any], pos_args: Sequence[Any]
) -> tuple[torch.Tensor, ...]:
    """`torch._higher_order_ops.map`: f applied to every slice of xs, stacked; a scan with no carry."""
    return _lower_scan_like(loop_name("map", node), node, "f", f, (), xs, pos_args)


def _lower_scan_like(
    name: str,
    node: torch.fx.Node | None,
    fn_name: str,
    combine_gm: torch.fx.GraphModule,
    init: Sequence[Any],
    xs: Sequence[Any],
    additional_inputs: Sequence[Any],
    reverse: bool = False,
) -> tuple[torch.Tensor, ...]:
    metrics.increment(metrics.LOOPS_LOWERED)
    carries = [as_state_tensor(name, i, c, what="init") for i, c in enumerate(init)]
    xs = [as_state_tensor(name, i, x, what="xs") for i, x in enumerate(xs)]
    extras = [as_state_tensor(name, i, a, what="additional input") for i, a in enumerate(additional_inputs)]
    length = _scan_length(name, xs)
    num_carries = len(carries)

    def run_combine(args: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = SubgraphInterpreter(combine_gm, name).run(*args)
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        new_carries = check_new_carries(name, fn_name, outputs[:num_carries], carries)
        ys = outputs[num_carries:]
        for j, y in enumerate(ys):
            if not isinstance(y, torch.Tensor):
                raise LoopLoweringError(
                    f"{name}: {fn_name} output y[{j}] must be a tensor, found {describe_value(y)} ({y!r})"
                )
        return new_carries + ys

    slice_specs = [torch.empty(x.shape[1:], dtype=x.dtype, device="meta") for x in xs]
    combine = stage_computation("scan_combine", run_combine, carries + slice_specs + extras, carry_shardings=shardings_of(carries))
    _check_num_outputs(name, node, fn_name, num_carries, len(combine.outputs))
    ys_init = stacks_like_carries(
        [torch.zeros((length, *y.shape), dtype=y.dtype, device=torch_xla.device()) for y in combine.outputs[num_carries:]],
        carries,
    )

    state = ControlFlowState()
    (step,) = state.add([torch.zeros((), dtype=torch.int64, device=torch_xla.device())])
    carry_at = state.add(carries)
    ys_at = state.add(ys_init)
    xs_at = state.add(xs)
    extras_at = state.add(extras, invariant=True)
    combine_call = state.attach(combine)

    def cond_fn(values: list[xb.Op]) -> xb.Op:
        return values[step] < xb.Op.scalar(values[step].builder(), length, dtype=xb.Type.S64)

    def body_fn(values: list[xb.Op]) -> list[xb.Op]:
        i = values[step]
        at = xb.Op.scalar(i.builder(), length - 1, dtype=xb.Type.S64) - i if reverse else i
        inputs = (
            [values[k] for k in carry_at]
            + [_dynamic_slice(values[k], at) for k in xs_at]
            + [values[k] for k in extras_at]
        )
        result = combine_call.call(values, inputs)
        new = list(values)
        new[step] = i + xb.Op.scalar(i.builder(), 1, dtype=xb.Type.S64)
        for j, k in enumerate(carry_at):
            new[k] = result.get_tuple_element(j)
        for j, k in enumerate(ys_at):
            new[k] = _dynamic_update_slice(values[k], result.get_tuple_element(num_carries + j), at)
        return new

    final = state.build("scan", cond_fn, body_fn)
    from . import report_lowered

    kind = "map" if fn_name == "f" else "scan"
    how = "from the last slice to the first" if reverse else "by dynamic slices"
    report_lowered(name, kind, f"one XLA While (xs read and ys written {how})", f"static, {length}", carries)
    return tuple(final[k] for k in carry_at + ys_at)


def _scan_length(loop: str, xs: list[torch.Tensor]) -> int:
    if not xs:
        raise LoopLoweringError(f"{loop}: needs at least one xs tensor to scan over, found none")
    for i, x in enumerate(xs):
        if x.dim() == 0:
            raise LoopLoweringError(f"{loop}: xs[{i}] must have a dimension to scan over, found {describe_value(x)}")
    length = xs[0].shape[0]
    for i, x in enumerate(xs[1:], start=1):
        if x.shape[0] != length:
            raise LoopLoweringError(
                f"{loop}: every xs must have the same length along the scanned dimension: xs[0] "
                f"has {length} ({describe_value(xs[0])}), xs[{i}] has {x.shape[0]} ({describe_value(x)})"
            )
    return length


def _check_num_outputs(loop: str, node: torch.fx.Node | None, fn_name: str, num_carries: int, found: int) -> None:
    expected = node.meta.get("val") if node is not None else None
    if isinstance(expected, (tuple, list)) and len(expected) != found:
        raise LoopLoweringError(
            f"{loop}: {fn_name} returns {found} values ({num_carries} carries and {found - num_carries} "
            f"outputs), but the graph expects {len(expected)}"
        )


def _start_indices(i: xb.Op, rank: int) -> list[xb.Op]:
    return [i] + [i.zeros_like() for _ in range(rank - 1)]


def _dynamic_slice(xs: xb.Op, i: xb.Op) -> xb.Op:
    """xs[i] for a device index i."""
    sizes = list(xs.shape().sizes)
    sliced = xs.dynamic_slice(_start_indices(i, len(sizes)), [1] + sizes[1:])
    return sliced.reshape(sizes[1:])


def _dynamic_update_slice(ys: xb.Op, y: xb.Op, i: xb.Op) -> xb.Op:
    """ys with ys[i] = y, for a device index i."""
    return ys.dynamic_update_slice(y.broadcast([1]), _start_indices(i, ys.shape().rank))
