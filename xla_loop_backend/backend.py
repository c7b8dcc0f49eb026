"""Backend entry: the `xla_loop` Dynamo backend, and the `compile` decorator.

    xla_loop(gm, example_inputs) = pipeline.compile(gm, example_inputs, Options.parse(options))

Everything between the Dynamo graph and the cached XLA executable is the pipeline
(`pipeline.py`: its passes in order, AOTAutograd, the lowering, torch_xla's bridge); this
module only reads the options.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Sequence, TypeVar

import torch

from . import pipeline
from ._device import select_default_device
from .dynamo_memory import release_dead_guard_managers
from .errors import raising_loop_errors
from .fallback import install_eager_warning
from .options import OPTIONS, Options

select_default_device()
install_eager_warning()

compile_graph = pipeline.compile_graph


def xla_loop(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None, mode: str | None = None
) -> Callable[..., Any]:
    """The Dynamo backend; `torch.compile(fn, backend="xla_loop")` finds it by entry point.

    options (``torch.compile(..., options={...})``): see `options.OPTIONS`."""
    parsed = Options.parse(options, mode)
    release_dead_guard_managers()
    return pipeline.compile(gm, example_inputs, parsed)


F = TypeVar("F", bound=Callable[..., Any])


def compile(  # noqa: A001 - mirrors torch.compile
    fn: F | None = None,
    *,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    max_iterations: int | None = None,
    checkpoints: int | None = None,
    capacity: int | None = None,
    remat: bool | int = False,
    roll_layers: bool = True,
    gather_invariants: bool | int | None = None,
    **options: Any,
) -> F | Callable[[F], F]:
    """Decorator: ``torch.compile(fn, backend="xla_loop", ...)`` for loop-heavy functions.

    Use bare (``@xla_loop_backend.compile``) or with torch.compile's options
    (``@xla_loop_backend.compile(fullgraph=True, dynamic=False)``) and xla_loop's
    (`max_iterations`, `checkpoints` (`capacity`, its old name), `remat`, `roll_layers`, `gather_invariants`: see `options.OPTIONS`).
    A loop error surfaces
    as the `LoopLoweringError` itself rather than wrapped in Dynamo's exceptions.
    """
    if fn is None:
        return functools.partial(
            compile,
            fullgraph=fullgraph,
            dynamic=dynamic,
            max_iterations=max_iterations,
            checkpoints=checkpoints,
            capacity=capacity,
            remat=remat,
            roll_layers=roll_layers,
            gather_invariants=gather_invariants,
            **options,
        )
    backend_options = {"max_iterations": max_iterations, "checkpoints": checkpoints, "capacity": capacity, "remat": remat}
    backend_options = {k: v for k, v in backend_options.items() if v not in (None, False)}
    if gather_invariants is not None:
        backend_options["gather_invariants"] = gather_invariants
    if not roll_layers:
        backend_options["roll_layers"] = False
    if backend_options:
        options["options"] = {**options.get("options", {}), **backend_options}
    options["options"] = {"guard_filter_fn": without_library_guards, **options.get("options", {})}
    compiled = torch.compile(fn, backend=xla_loop, fullgraph=fullgraph, dynamic=dynamic, **options)
    if isinstance(fn, torch.nn.Module):
        # torch's compiled module; its forward is the compiled call, so unwrap errors there.
        compiled.forward = _finding_repeated_layers(raising_loop_errors(compiled.forward), roll_layers)
        return compiled
    return functools.wraps(fn)(_finding_repeated_layers(raising_loop_errors(compiled), roll_layers))  # type: ignore[return-value]


# Where Dynamo keeps the modules that code it inlines from other modules reads: xla_loop's
# own (the loop API's checks and wrappers), and torch's pytree, polyfills and loop-op frontends
# that the API calls.
LIBRARY_GLOBALS = (
    "G['__import_xla_loop_backend_dot_",
    "G['__import_torch_dot_utils_dot__pytree']",
    "G['__import_torch_dot__dynamo_dot_polyfills",
    "G['__import_torch_dot__higher_order_ops_dot_",
)


def without_library_guards(entries: Sequence[Any]) -> list[bool]:
    """The decorator's `guard_filter_fn` (torch.compile's option): keeps every guard but those
    on the functions and module attributes of the libraries a loop's API call runs through
    (`LIBRARY_GLOBALS`). Dynamo inlines `while_loop`/`scan`'s checks, pytree code and torch's
    loop frontends into every loop program and guards on each global they read: about 80% of
    a small loop program's guards, about 3 us of every call. They change only if those
    libraries are patched between calls. Guards on the user's code, tensors and globals stay.
    A compile's own `options={"guard_filter_fn": ...}` replaces this one."""
    return [not any(prefix in entry.name for prefix in LIBRARY_GLOBALS) for entry in entries]


def _finding_repeated_layers(call: Callable[..., Any], roll_layers: bool) -> Callable[..., Any]:
    """With `roll_layers` (the default), Dynamo compiles `call`'s frames with its graph
    deduplication on, so repeated layers with no marker reach the pipeline as calls of one
    subgraph, which `passes/roll_layers.py` rolls into one scan. Only these calls:
    `torch.compile(backend="xla_loop")` leaves Dynamo's default, and rolls the chains marked
    with nested_compile_region.

    Dynamo reads the flag while it traces, which happens inside a call, and only on a call that
    compiles. So the call only marks itself as running (a counter, well under 1 us); Dynamo's
    compile callbacks (`_deduplication_on`, `_deduplication_restored`, registered again after a
    `torch._dynamo.reset()`, which drops them) turn the flag on when a compile starts inside a
    marked call and restore it when the compile ends. (Setting and restoring the flag around every
    call cost about 2.6 us a call: ConfigModule's attribute access.)"""
    if not roll_layers:
        return call

    @functools.wraps(call)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # (traced into by an outer compile: its config rules)
            return call(*args, **kwargs)
        if _deduplication_on not in _COMPILE_CALLBACKS.start_callbacks:  # (torch._dynamo.reset() clears them)
            _COMPILE_CALLBACKS.register_start_callback(_deduplication_on)
            _COMPILE_CALLBACKS.register_end_callback(_deduplication_restored)
        _DEDUPLICATING.calls += 1
        try:
            return call(*args, **kwargs)
        finally:
            _DEDUPLICATING.calls -= 1

    return run


class _Deduplicating(threading.local):
    """How many decorated calls with `roll_layers` are running on this thread, and the flag's
    value to restore when the compile running in one of them ends."""

    calls = 0
    saved: bool | None = None


_DEDUPLICATING = _Deduplicating()


def _deduplication_on(_args: Any) -> None:
    if _DEDUPLICATING.calls and _DEDUPLICATING.saved is None:
        _DEDUPLICATING.saved = torch._dynamo.config.use_graph_deduplication
        torch._dynamo.config.use_graph_deduplication = True


def _deduplication_restored(_args: Any) -> None:
    if _DEDUPLICATING.saved is not None:
        torch._dynamo.config.use_graph_deduplication = _DEDUPLICATING.saved
        _DEDUPLICATING.saved = None


_COMPILE_CALLBACKS = torch._dynamo.callback.callback_handler


__all__ = ["OPTIONS", "compile", "compile_graph", "xla_loop"]
