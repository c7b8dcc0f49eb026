"""User-facing loop functions: `while_loop` with clear errors for bad loops.

torch's own while_loop rejects a carry of the wrong type (a float, a string) with an empty
AssertionError. This wrapper checks carries by their pytree path first, so the error names
the loop, the carry, and what was expected vs found. Checks of what the body returns stay
with torch (Dynamo reports them by carry position, with expected vs found): an exception
raised inside a loop body while Dynamo traces it loses its message.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch._higher_order_ops.while_loop import while_loop as _torch_while_loop

from .errors import LoopLoweringError, describe_value

Carries = Any  # a pytree (tuple/list/dict nesting) of tensors and Python ints


def while_loop(
    cond_fn: Callable[..., Any],
    body_fn: Callable[..., Any],
    carried_inputs: Sequence[Carries],
    *,
    name: str | None = None,
) -> Any:
    """`torch._higher_order_ops.while_loop` with checked carries.

    Runs ``while cond_fn(*carries): carries = body_fn(*carries)`` and returns the final
    carries. Under ``torch.compile(backend="xla_loop")`` it becomes one XLA While.
    `name` labels the loop in error messages (default: the body's name).
    """
    loop = f"while_loop {name or getattr(body_fn, '__name__', 'body_fn')!r}"
    if not isinstance(carried_inputs, (tuple, list)):
        raise LoopLoweringError(
            f"{loop}: carried_inputs must be a tuple or list, found {describe_value(carried_inputs)}"
        )
    entries = _leaves_with_paths(carried_inputs)
    for path, leaf in entries:
        if not isinstance(leaf, (torch.Tensor, int, torch.SymInt)) or isinstance(leaf, bool):
            raise LoopLoweringError(
                f"{loop}: carry {path} must be a tensor or a Python int, found {describe_value(leaf)} ({leaf!r})"
            )
    return _torch_while_loop(cond_fn, body_fn, tuple(carried_inputs))


def _leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = pytree.tree_flatten_with_path(tuple(tree))
    return [(f"carried_inputs{pytree.keystr(path)}", leaf) for path, leaf in leaves]
