"""Errors raised when a loop cannot be lowered to one XLA While."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch


class LoopLoweringError(RuntimeError):
    """A loop (while_loop, scan, ...) could not be lowered to an XLA While.

    The message names the loop (kind and source location), the carry involved, and what
    was expected versus what was found.
    """


def describe_value(value: object) -> str:
    """A short description such as `f32[3, 4]`, `int`, or `tuple`."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{dtype}[{', '.join(str(d) for d in value.shape)}]"
    return type(value).__name__


def loop_name(kind: str, node: torch.fx.Node | None) -> str:
    """`while_loop at model.py:12` from the node's stack trace, or just the kind."""
    trace = (node.meta.get("stack_trace") or "") if node is not None else ""
    # The innermost "File ..., line N" entry outside torch and this package is the user's call.
    for line in reversed(trace.strip().splitlines()):
        line = line.strip()
        if line.startswith("File "):
            parts = line.split(",")
            path = parts[0][len('File "'):].strip('"')
            if "torch/_higher_order_ops" in path or "xla_loop_backend/" in path:
                continue
            lineno = parts[1].strip().removeprefix("line ") if len(parts) > 1 else "?"
            return f"{kind} at {path.rsplit('/', 1)[-1]}:{lineno}"
    return kind


@torch._dynamo.assume_constant_result
def raise_loop_error(message: str) -> None:
    """Raise LoopLoweringError(message), keeping the message when Dynamo is tracing.

    Dynamo replaces an exception raised in traced code (a loop body, or a fullgraph
    function) by its class alone, losing the message. A function it treats as a constant
    runs for real at trace time, so the error and its message reach the user.
    """
    raise LoopLoweringError(message)


# Labels of the loops whose cond/body Dynamo is tracing, outermost first. An entry is pushed
# at trace time before a loop op is traced and popped after it; when tracing fails inside,
# it is left behind and tells `raising_loop_errors` which loop failed.
_loops_being_traced: list[str] = []


@torch._dynamo.assume_constant_result
def tracing_loop(label: str) -> bool:
    """Mark the start of tracing loop `label` (runs at trace time under Dynamo)."""
    _loops_being_traced.append(label)
    return True


@torch._dynamo.assume_constant_result
def traced_loop(label: str) -> bool:
    """Mark the end of tracing loop `label`."""
    if _loops_being_traced and _loops_being_traced[-1] == label:
        _loops_being_traced.pop()
    return True


def unwrap_loop_error(error: BaseException) -> LoopLoweringError | None:
    """The LoopLoweringError behind a Dynamo/backend wrapper exception, if there is one."""
    seen = error
    while seen is not None:
        if isinstance(seen, LoopLoweringError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def attribute_to_loop(error: BaseException, label: str) -> LoopLoweringError:
    """A LoopLoweringError naming `label` for an error Dynamo raised while tracing that loop."""
    text = str(error)
    if "input mutation" in text:
        return LoopLoweringError(
            f"{label}: its cond or body updates a tensor it captured in place: expected captured "
            "tensors to be read only (compute new tensors, or make the tensor a carry), found an "
            "in-place update (e.g. `w.add_(1)`)"
        )
    summary = text.split("from user code:")[0].strip().replace("\n", " ")
    return LoopLoweringError(
        f"{label}: tracing its cond or body failed: {type(error).__name__}: {summary[:500]}"
    )


def raising_loop_errors(call: Callable[..., Any]) -> Callable[..., Any]:
    """`call`, raising a LoopLoweringError itself rather than wrapped by Dynamo, and turning
    errors Dynamo raises while tracing a loop into LoopLoweringErrors naming that loop."""

    @functools.wraps(call)
    def run(*args: Any, **kwargs: Any) -> Any:
        outermost = not torch.compiler.is_compiling()
        if outermost:
            _loops_being_traced.clear()
        try:
            return call(*args, **kwargs)
        except Exception as error:
            failed_in = _loops_being_traced[-1] if outermost and _loops_being_traced else None
            if outermost:
                _loops_being_traced.clear()
            cause = unwrap_loop_error(error)
            if cause is not None and cause is not error:
                raise cause from None
            if cause is None and failed_in is not None:
                raise attribute_to_loop(error, failed_in) from error
            raise

    return run
