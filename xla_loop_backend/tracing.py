"""Checks that run while a loop's cond or body is traced, so bad loops get errors that name
the loop and the carry instead of Dynamo's generic ones.

- An exception the user's function raises while traced comes out with its message (Dynamo
  keeps only its class).
- An in-place update of a carry (``x.add_(1)``) is named by the carry's path. Dynamo
  rejects it too, but names a placeholder of its own graph. The check reads the version
  counters of the carries' fake tensors at trace time (`comptime`), or of the real tensors
  when nothing is being compiled.
- Errors that Dynamo raises while tracing a loop (a captured tensor updated in place, a
  shape error in the body) are attributed to that loop: `errors.tracing_loop` records it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch._dynamo.comptime import comptime

from . import trees
from .errors import LoopLoweringError

# Version counters of the fake tensors a body received, by id, from when its tracing began.
_versions_at_entry: dict[int, int] = {}


def call_checked(loop: str, fn_name: str, paths: list[str], fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, with the checks above. `paths` names each tensor leaf of args (for errors)."""
    _leaves = [t for t in trees.tree_leaves(args) if isinstance(t, torch.Tensor)]  # read by comptime
    _where = f"{loop}: {fn_name}"  # read by comptime
    _paths = paths  # read by comptime
    compiling = torch.compiler.is_compiling()
    if compiling:
        comptime(_record_fake_versions)
    else:
        versions = [t._version for t in _leaves]
    try:
        out = fn(*args)
    except LoopLoweringError:
        raise
    except Exception as error:
        if compiling:
            _error = error  # read by comptime  # noqa: F841
            comptime(_raise_traced_exception)
        raise LoopLoweringError(_raised_message(_where, type(error).__name__, [str(a) for a in error.args])) from error
    if compiling:
        comptime(_check_fake_versions)
    else:
        for path, t, before in zip(_paths, _leaves, versions):
            if t._version != before:
                raise LoopLoweringError(_in_place_message(_where, path))
    return out


def reject_constant_condition(loop: str, pred: Any) -> None:
    """A cond that returns a Python constant never changes: the loop runs forever or never.
    (Under Dynamo a symbolic bool from int carries also looks like a bool, so the check
    asks Dynamo whether the value is a constant.)"""
    _where, _pred = loop, pred  # read by comptime
    if torch.compiler.is_compiling():
        comptime(_reject_constant)
    elif type(pred) in (bool, int, float):
        raise LoopLoweringError(_constant_message(loop, pred))


def _reject_constant(ctx: Any) -> None:
    pred = ctx.get_local("_pred")._i_will_not_complain_if_bc_breaks_VariableTracker()
    if pred.is_python_constant():
        raise LoopLoweringError(_constant_message(ctx.get_local("_where").as_python_constant(), pred.as_python_constant()))


def _constant_message(loop: str, value: Any) -> str:
    return (
        f"{loop}: cond_fn must return a bool tensor computed from the carries, found the Python "
        f"constant {value!r} (a condition that never changes loops forever or never runs)"
    )


def _raise_traced_exception(ctx: Any) -> None:
    """Re-raise, at trace time, what the user's function raised, with its message."""
    where = ctx.get_local("_where").as_python_constant()
    error = ctx.get_local("_error")._i_will_not_complain_if_bc_breaks_VariableTracker()
    args = []
    for arg in getattr(error, "args", None) or []:
        try:
            args.append(str(arg.as_python_constant() if hasattr(arg, "as_python_constant") else arg))
        except Exception:
            args.append(repr(arg))
    raise LoopLoweringError(_raised_message(where, getattr(getattr(error, "exc_type", None), "__name__", "an exception"), args))


def _raised_message(where: str, name: str, args: list[str]) -> str:
    return f"{where} raised {name} while being traced: {', '.join(args) or '(no message)'}"


def _fakes(ctx: Any) -> list[Any]:
    return [proxy.node.meta["example_value"] for proxy in ctx.get_local("_leaves").as_proxy()]


def _record_fake_versions(ctx: Any) -> None:
    for fake in _fakes(ctx):
        _versions_at_entry[id(fake)] = fake._version


def _check_fake_versions(ctx: Any) -> None:
    where = ctx.get_local("_where").as_python_constant()
    paths = ctx.get_local("_paths").as_python_constant()
    changed = None
    for path, fake in zip(paths, _fakes(ctx)):
        before = _versions_at_entry.pop(id(fake), fake._version)
        if changed is None and fake._version != before:
            changed = path
    if changed is not None:
        raise LoopLoweringError(_in_place_message(where, changed))


def _in_place_message(where: str, path: str) -> str:
    return (
        f"{where} updates {path} in place: expected new tensors computed from the carries "
        "(e.g. `x = x + 1`), found an in-place update of an input (e.g. `x.add_(1)`)"
    )
