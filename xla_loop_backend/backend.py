"""Backend entry: the `xla_loop` Dynamo backend, and the `compile` decorator.

    xla_loop(gm, example_inputs) = pipeline.compile(gm, example_inputs, Options.parse(options))

Everything between the Dynamo graph and the cached XLA executable is the pipeline
(`pipeline.py`: its passes in order, AOTAutograd, the lowering, torch_xla's bridge); this
module only reads the options.
"""
from __future__ import annotations

import functools
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
    capacity: int | None = None,
    remat: bool | int = False,
    roll_layers: bool = True,
    **options: Any,
) -> F | Callable[[F], F]:
    """Decorator: ``torch.compile(fn, backend="xla_loop", ...)`` for loop-heavy functions.

    Use bare (``@xla_loop_backend.compile``) or with torch.compile's options
    (``@xla_loop_backend.compile(fullgraph=True, dynamic=False)``) and xla_loop's
    (`max_iterations`, `capacity`, `remat`, `roll_layers`: see `options.OPTIONS`). A loop error surfaces
    as the `LoopLoweringError` itself rather than wrapped in Dynamo's exceptions.
    """
    if fn is None:
        return functools.partial(
            compile,
            fullgraph=fullgraph,
            dynamic=dynamic,
            max_iterations=max_iterations,
            capacity=capacity,
            remat=remat,
            roll_layers=roll_layers,
            **options,
        )
    backend_options = {"max_iterations": max_iterations, "capacity": capacity, "remat": remat}
    backend_options = {k: v for k, v in backend_options.items() if v not in (None, False)}
    if not roll_layers:
        backend_options["roll_layers"] = False
    if backend_options:
        options["options"] = {**options.get("options", {}), **backend_options}
    compiled = torch.compile(fn, backend=xla_loop, fullgraph=fullgraph, dynamic=dynamic, **options)
    if isinstance(fn, torch.nn.Module):
        # torch's compiled module; its forward is the compiled call, so unwrap errors there.
        compiled.forward = _finding_repeated_layers(raising_loop_errors(compiled.forward), roll_layers)
        return compiled
    return functools.wraps(fn)(_finding_repeated_layers(raising_loop_errors(compiled), roll_layers))  # type: ignore[return-value]


def _finding_repeated_layers(call: Callable[..., Any], roll_layers: bool) -> Callable[..., Any]:
    """With `roll_layers` (the default), `call` runs with Dynamo's graph deduplication on, so
    repeated layers with no marker reach the pipeline as calls of one subgraph, which
    `passes/roll_layers.py` rolls into one scan. Dynamo reads its config while it traces,
    which happens inside a call; set and restored around each (about 2 us) rather than
    with `config.patch` (10 us), and only for these calls: `torch.compile(backend="xla_loop")`
    leaves Dynamo's default, and rolls the chains marked with nested_compile_region."""
    if not roll_layers:
        return call
    config = torch._dynamo.config

    @functools.wraps(call)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # (traced into by an outer compile: its config rules)
            return call(*args, **kwargs)
        saved = config.use_graph_deduplication
        config.use_graph_deduplication = True
        try:
            return call(*args, **kwargs)
        finally:
            config.use_graph_deduplication = saved

    return run


__all__ = ["OPTIONS", "compile", "compile_graph", "xla_loop"]
