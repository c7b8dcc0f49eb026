"""pytree operations on a loop's carries, with a fast path for the usual case.

The loop API (`api.py`) checks and copies carries with torch's pytree, and Dynamo traces
that code line by line into every loop program it compiles, guarding on each function and
module attribute it reads. For a small loop (benchmark B: h = tanh(h @ w)), pytree and the
polyfills its TreeSpec uses were most of Dynamo's time on the first call, and most of the
guards checked on every later call. Most carries are a tuple or list of tensors and Python
numbers, or one tensor: for those, these functions do the same with plain Python over the
container, which Dynamo traces in a few steps. Anything else (nested containers, dicts,
None, namedtuples, registered pytree types, symbolic ints) goes to torch.utils._pytree, so
the results are pytree's in every case.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

_NUMBERS = (int, float, bool)


def _is_leaf(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or type(value) in _NUMBERS


def is_flat(tree: Any) -> bool:
    """A tuple or list (exactly: not a namedtuple or torch.Size) of tensors and numbers."""
    return type(tree) in (tuple, list) and all(_is_leaf(v) for v in tree)


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    if _is_leaf(tree):
        return fn(tree)
    if is_flat(tree):
        return type(tree)([fn(v) for v in tree])
    return pytree.tree_map(fn, tree)


def tree_leaves(tree: Any) -> list[Any]:
    if _is_leaf(tree):
        return [tree]
    if is_flat(tree):
        return list(tree)
    return pytree.tree_leaves(tree)


def leaves_with_paths(root: str, tree: Any) -> list[tuple[str, Any]]:
    """Each leaf with its path from `root`, as pytree's `keystr` writes it (`root[0]['h']`)."""
    if _is_leaf(tree):
        return [(root, tree)]
    if is_flat(tree):
        return [(f"{root}[{i}]", v) for i, v in enumerate(tree)]
    leaves, _ = pytree.tree_flatten_with_path(tree)
    return [(f"{root}{pytree.keystr(path)}", leaf) for path, leaf in leaves]


def same_structure(a: Any, b: Any) -> bool:
    """Whether pytree gives `a` and `b` the same tree spec."""
    if is_flat(a) and is_flat(b):
        return type(a) is type(b) and len(a) == len(b)
    return pytree.tree_structure(a) == pytree.tree_structure(b)
