"""Errors raised when a loop cannot be lowered to one XLA While."""
from __future__ import annotations

import functools
import re
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
    """A LoopLoweringError naming `label` for an error Dynamo raised while tracing that loop:
    torch's message whole (its lines kept, less its hint to set `capture_scalar_outputs`,
    which does not make a read of the host possible inside a loop on the device), what to
    write instead where xla_loop knows, and, on its last line, the user's source line."""
    text = str(error)
    if "input mutation" in text:
        return LoopLoweringError(
            f"{label}: its cond or body updates a tensor it captured in place: expected captured "
            "tensors to be read only (compute new tensors, or make the tensor a carry), found an "
            "in-place update (e.g. `w.add_(1)`)"
        )
    message, _, stack = text.partition("\nfrom user code:\n")
    lines = [line.rstrip() for line in message.strip().splitlines() if not _hints_scalar_capture(line)]
    if any(marker in message for marker in _READS_BACK):
        lines.append(f"  xla_loop: {_READ_BACK_HINT}")
    where = user_source_line(stack)
    return LoopLoweringError(
        f"{label}: tracing its cond or body failed: {type(error).__name__}: " + "\n".join(_squeezed(lines))
        + (f"\n  at {where}" if where else "")
    )


# What torch says when a body reads a tensor's value back (`.item()`, `int(t)`, `x[t]` on a
# CPU tensor), and what to write instead inside a loop.
_READS_BACK = ("Tensor.item()", "Data dependent operator", "data-dependent", "_local_scalar_dense")
_READ_BACK_HINT = (
    "a loop body or branch runs on the device and cannot read a value back to the host. Index "
    "with the 0-dim tensor itself (`x[t]`, `out[:, t] = v`, `x.narrow(dim, t, k)`, `x[t:t + k]`: "
    "xla_loop lowers them to dynamic slices), or use tensor ops (`torch.where`) instead of Python "
    "control flow on the value."
)


def _hints_scalar_capture(line: str) -> bool:
    return line.lstrip().startswith("Hint:") and ("capture_scalar_outputs" in line or "CAPTURE_SCALAR_OUTPUTS" in line)


def _squeezed(lines: list[str]) -> list[str]:
    """The lines without runs of blank ones."""
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return out[:-1] if out and not out[-1] else out


_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (\S+)')


def user_source_line(stack: str) -> str | None:
    """`file.py:N: <source>` of the innermost frame of Dynamo's "from user code" stack that is
    the user's (not torch's, not xla_loop's)."""
    lines = stack.splitlines()
    found = None
    for i, line in enumerate(lines):
        match = _FRAME.match(line)
        if match is None or _library_file(match.group(1)):
            continue
        source = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) else ""
        found = f"{match.group(1).rsplit('/', 1)[-1]}:{match.group(2)}: {source}".rstrip(": ")
    return found


def ending_with_user_line(error: LoopLoweringError) -> LoopLoweringError:
    """The error, its message without the stack Dynamo appends ("from user code: ...") and
    with the user's source line last, as the errors of a body's tracing end."""
    message, found, stack = str(error).partition("\nfrom user code:\n")
    if not found:
        return error
    where = user_source_line(stack)
    return LoopLoweringError(message.rstrip() + (f"\n  at {where}" if where else ""))


def _library_file(path: str) -> bool:
    return "torch/" in path and "site-packages" in path or "xla_loop_backend/" in path or "/torch/_" in path


def install_op_labels() -> None:
    """torch's own cond, while_loop, scan and map, called by the user inside a compiled
    function, mark the op they trace (as xla_loop's API does), so that an error in a branch or
    body nested in another loop names the op that failed."""
    from torch._dynamo.variables import higher_order_ops as hop

    base = hop.TorchHigherOrderOperatorVariable
    if getattr(base.call_function, "_xla_loop_labels", False):
        return
    kinds = {
        hop.CondHigherOrderVariable: "cond",
        hop.WhileLoopHigherOrderVariable: "while_loop",
        hop.ScanHigherOrderVariable: "scan",
        hop.MapHigherOrderVariable: "map",
    }
    original = base.call_function

    def call_function(self: Any, tx: Any, args: Any, kwargs: Any) -> Any:
        kind = kinds.get(type(self))
        where = _user_frame(tx) if kind is not None else None
        if where is None:
            return original(self, tx, args, kwargs)
        label = f"{kind} at {where}"
        _loops_being_traced.append(label)
        result = original(self, tx, args, kwargs)
        if _loops_being_traced and _loops_being_traced[-1] == label:
            _loops_being_traced.pop()
        return result

    call_function._xla_loop_labels = True  # type: ignore[attr-defined]
    base.call_function = call_function


def _user_frame(tx: Any) -> str | None:
    """`file.py:N` of the innermost frame Dynamo is tracing that is the user's (None when a
    library, such as xla_loop's own API, called the op: that marks its loop itself)."""
    while tx is not None:
        path = tx.f_code.co_filename
        if not _library_file(path):
            return f"{path.rsplit('/', 1)[-1]}:{tx.lineno}"
        if "xla_loop_backend/" in path:
            return None
        tx = getattr(tx, "parent", None)
    return None


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
                raise ending_with_user_line(cause) from None
            if cause is None and failed_in is not None:
                raise attribute_to_loop(error, failed_in) from error
            raise

    return run
