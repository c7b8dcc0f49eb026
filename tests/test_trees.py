"""trees.py: the fast path for flat carries gives exactly what torch's pytree gives, for
every kind of tree a loop's carries can be."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.utils._pytree as pytree

from xla_loop_backend import trees

Pair = namedtuple("Pair", "a b")
t1, t2 = torch.ones(2), torch.zeros(3)

TREES = {
    "one tensor": t1,
    "a number": 3,
    "flat tuple": (t1, 2, t2),
    "flat list": [t1, 1.5, True],
    "empty tuple": (),
    "nested": (t1, (t2, 4)),
    "dict": {"h": t1, "n": 2},
    "None inside": (t1, None),
    "namedtuple": Pair(t1, t2),
    "torch.Size": torch.Size([2, 3]),
    "list of dicts": [{"x": t1}, {"x": t2}],
}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", list(TREES))
def test_each_operation_agrees_with_pytree(name):
    tree = TREES[name]

    def fn(leaf):
        return ("seen", leaf)

    assert _same(trees.tree_map(fn, tree), pytree.tree_map(fn, tree))
    assert _same(trees.tree_leaves(tree), pytree.tree_leaves(tree))
    expected = [(f"root{pytree.keystr(path)}", leaf) for path, leaf in pytree.tree_flatten_with_path(tree)[0]]
    assert _same(trees.leaves_with_paths("root", tree), expected)
    for other_name, other in TREES.items():
        assert trees.same_structure(tree, other) == (pytree.tree_structure(tree) == pytree.tree_structure(other)), other_name
