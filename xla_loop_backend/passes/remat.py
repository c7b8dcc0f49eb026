"""Before AOTAutograd, with option `remat`: loops that may be trained store fewer carries.

Autograd through a loop of T steps stores the carries of every step. With `remat=k` (or
True for k = sqrt(T)):

- scan: runs as a scan over T/k segments whose body is a scan over k steps
  (`segmented_scan`). The outer scan's autograd stores only the carries at segment starts
  and recomputes a segment's steps in its backward: stored carries fall from T to T/k + k,
  for about one more forward pass. (A length k does not divide is padded with steps that
  leave the carries as they are.)
- while_loop: a trained loop keeps C checkpoints (option `checkpoints`,
  `checkpointed_while.py`) whatever its trip count: with remat it keeps C/k (True: about
  sqrt(C)). A loop of at most C/k iterations still stores each; a longer one recomputes
  more between checkpoints. (Not "store every k-th iteration in C rows": the rows are
  allocated whether filled or not, so that would cost compute and save no memory.)

This pass also records, for `explain`, what each trained loop's backward stores.

Only top-level loops: a loop nested in a trained loop's body runs within one step of its
enclosing loop's backward, which recomputes that step anyway; what it stores lives only
for that step. (torch's alias check of a scan or map body, `gen_schema`, also runs the body
in a fake mode of its own, in which a scan made of Python functions cannot be traced.)

Runs after `while_loops`, whose calls it configures.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from torch._higher_order_ops.scan import scan_op

from ..explain import carry_bytes, kib, record
from ..ops import example_value, register
from ..options import PassContext
from ..traversal import GraphPass, Site, replace_call, unchanged
from .while_loops import bounded_while, trained_while

_LOG = logging.getLogger(__name__)


def segment_length(length: int, remat: bool | int) -> int:
    """Steps per segment: `remat` itself, or about sqrt(length) for remat=True."""
    if remat is True:
        return max(1, math.isqrt(max(length, 1) - 1) + 1)
    return max(1, int(remat))


def segmented_scan(combine_fn: Any, init: Any, xs: Any, additional_inputs: Any, *, remat: bool | int) -> list[torch.Tensor]:
    """scan_op(combine_fn, init, xs, additional_inputs), in segments (see above)."""
    return scan_in_segments(combine_fn, list(init), list(xs), tuple(additional_inputs), remat)


register(segmented_scan, torch.ops.higher_order.scan)


def scan_in_segments(
    combine: Callable, init: list[torch.Tensor], xs: list[torch.Tensor], extras: tuple, remat: bool | int
) -> list[torch.Tensor]:
    length = xs[0].shape[0]
    k = segment_length(length, remat)
    if k >= length:
        return list(scan_op(combine, init, xs, extras))
    segments = -(-length // k)
    pad = segments * k - length
    num_carries, num_xs = len(init), len(xs)
    if pad:
        xs = [torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) for x in xs]
    grouped = [x.reshape(segments, k, *x.shape[1:]) for x in xs]
    index = torch.arange(segments * k, device=xs[0].device).reshape(segments, k)

    def step(*args: torch.Tensor) -> list[torch.Tensor]:
        carries, x = args[:num_carries], args[num_carries : num_carries + num_xs]
        i, extras = args[num_carries + num_xs], args[num_carries + num_xs + 1 :]
        out = list(combine(*carries, *x, *extras))
        if pad:  # the padding steps leave the carries as they are
            out[:num_carries] = [torch.where(i < length, n, c) for n, c in zip(out[:num_carries], carries)]
        return out

    def segment(*args: torch.Tensor) -> list[torch.Tensor]:
        carries, x = args[:num_carries], args[num_carries : num_carries + num_xs]
        i, extras = args[num_carries + num_xs], args[num_carries + num_xs + 1 :]
        return list(scan_op(step, list(carries), [*x, i], tuple(extras)))

    out = scan_op(segment, init, [*grouped, index], extras)
    ys = [y.reshape(segments * k, *y.shape[2:])[:length] for y in out[num_carries:]]
    return [*out[:num_carries], *ys]


def segment_scan(site: Site, context: PassContext) -> None:
    remat = context.options.remat
    if site.depth == 0 and site.may_need_grad(context.training):
        _record_stores(site, remat)
    if remat and site.depth == 0 and site.may_need_grad(context.training) and site.call.node.target is not segmented_scan:
        replace_call(site.call, segmented_scan, remat=remat)


def _record_stores(site: Site, remat: bool | int) -> None:
    xs = [example_value(v) for v in site.call.args["xs"]]
    length = xs[0].shape[0] if xs and isinstance(xs[0], torch.Tensor) else 0
    each = carry_bytes(site)
    if remat:
        k = segment_length(length, remat)
        stores = f"the carries at {-(-length // k)} segment starts and one segment's {k} steps (remat={remat}), {kib(each)} each"
    else:
        stores = f"every step's carries: {length} steps of {kib(each)}, {kib(length * each)}"
    _record(site, f"its backward stores {stores}", stores)


def _record(site: Site, sentence: str, stores: str) -> None:
    """The "stores" record (explain, TORCH_LOGS) of one trained loop."""
    record(_LOG, "stores", f"{site.name}: {sentence}", where=site.name.split(" at ", 1)[-1], stores=stores)


def while_checkpoints(checkpoints: int, remat: bool | int) -> int:
    """A top-level trained while_loop's checkpoint count under remat: C/k (True: sqrt(C))."""
    if not remat:
        return checkpoints
    return max(1, math.isqrt(checkpoints)) if remat is True else max(1, -(-checkpoints // int(remat)))


def segment_while(site: Site, context: PassContext) -> None:
    node = site.call.node
    if not (node.target is trained_while or (node.target is bounded_while and node.kwargs.get("may_train"))):
        return
    checkpoints = node.kwargs["checkpoints"]
    if site.depth == 0 and context.options.remat:
        checkpoints = while_checkpoints(checkpoints, context.options.remat)
        node.kwargs = {**node.kwargs, "checkpoints": checkpoints}
    each = carry_bytes(site)
    stores = (
        f"{checkpoints} checkpoints of its carries, {kib(each)} each ({kib(each * (checkpoints + 1))} with the "
        "row the others write to), whatever the trip count; it recomputes the iterations between them"
    )
    _record(site, f"its backward keeps {stores}", stores)


PASS = GraphPass(
    "remat",
    "makes trained loops store fewer carries",
    {
        "while_loop": segment_while,
        "scan": segment_scan,
        "map": unchanged,  # map's autograd stores its inputs, no carries
        "cond": unchanged,
        "invoke_subgraph": unchanged,
    },
)
