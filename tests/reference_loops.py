"""The loop functions as plain Python loops: the reference the fuzzed programs are checked
against. Same signatures as xla_loop_backend.while_loop / scan / fori_loop (and torch's
map); no torch higher-order ops, no compilation, just the meaning."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree


def while_loop(cond_fn: Callable, body_fn: Callable, carried_inputs: Any, *, name: str | None = None) -> Any:
    carries = tuple(carried_inputs)
    while bool(cond_fn(*carries)):
        new = body_fn(*carries)
        carries = tuple(new) if isinstance(new, (tuple, list)) else (new,)
    return carries


def scan(
    combine_fn: Callable, init: Any, xs: Any, *, dim: int = 0, reverse: bool = False, name: str | None = None
) -> tuple[Any, Any]:
    leaves, spec = pytree.tree_flatten(xs)
    length = leaves[0].shape[dim]
    carry, ys = init, [None] * length
    for i in reversed(range(length)) if reverse else range(length):
        x = pytree.tree_unflatten([leaf.select(dim, i) for leaf in leaves], spec)
        carry, ys[i] = combine_fn(carry, x)
    y_leaves = [pytree.tree_flatten(y)[0] for y in ys]
    stacked = [torch.stack([y[k] for y in y_leaves]) for k in range(len(y_leaves[0]))]
    return carry, pytree.tree_unflatten(stacked, pytree.tree_flatten(ys[0])[1])


def fori_loop(lower: Any, upper: Any, body_fn: Callable, init: Any, *, name: str | None = None) -> Any:
    carry = init
    for i in range(int(lower), int(upper)):
        carry = body_fn(torch.tensor(i, dtype=torch.int64), carry)
    return carry


def map(f: Callable, xs: Any, *args: Any) -> Any:  # noqa: A001 - torch's name
    leaves, spec = pytree.tree_flatten(xs)
    outs = [f(pytree.tree_unflatten([leaf[i] for leaf in leaves], spec), *args) for i in range(leaves[0].shape[0])]
    out_leaves = [pytree.tree_flatten(o)[0] for o in outs]
    stacked = [torch.stack([o[k] for o in out_leaves]) for k in range(len(out_leaves[0]))]
    return pytree.tree_unflatten(stacked, pytree.tree_flatten(outs[0])[1])


def cond(pred: Any, true_fn: Callable, false_fn: Callable, operands: Any) -> Any:
    return true_fn(*operands) if bool(pred) else false_fn(*operands)
