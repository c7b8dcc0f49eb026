"""Backend entry: the `xla_loop` Dynamo backend, composed like torch's own backends.

    xla_loop(gm) = aot_autograd(fw_compiler=compile_graph, bw_compiler=compile_graph)(
                       bound_while_loops(prepare_for_autograd(gm)))

`prepare_for_autograd` (training only, `training.py`) turns while_loops that need
gradients into bounded scans AOTAutograd can differentiate with static shapes. With
`max_iterations`, `bound_while_loops` (`bounds.py`) stops the other while_loops after that
many iterations; the call then raises instead of running forever.

`compile_graph` lowers the graph's loop nodes (`rewrite.lower_loops`) and hands the result
to torch_xla's dynamo bridge, which traces it once into one cached XLA executable. A loop
that cannot be lowered is an error under `fullgraph=True`; otherwise the graph runs eagerly
on the XLA device with a warning that says why.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, TypeVar

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from ._device import select_default_device
from .aliasing import unalias_loop_operands
from .bounds import bound_while_loops, check_bounds, returning_flags
from .dynamo_memory import release_dead_guard_managers
from .training import prepare_for_autograd
from .errors import LoopLoweringError, raising_loop_errors
from .fallback import install_eager_warning, warn_host_loop
from .rewrite import LoweredGraph, lower_loops
from .workarounds import apply_workarounds

select_default_device()
install_eager_warning()


def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """AOTAutograd graph compiler: lower loops, then compile with torch_xla's bridge."""
    try:
        apply_workarounds(gm)
        lowered = lower_loops(gm)
    except LoopLoweringError as error:
        if _fullgraph_requested():
            raise
        warn_host_loop(f"could not lower a loop, so its graph runs eagerly ({error})")
        return make_boxed_func(gm.forward)
    return make_boxed_func(_BridgeCall(lowered))


class _BridgeCall:
    """Calls the graph through torch_xla's bridge, built on the first call (the bridge needs
    real device inputs), and turns int results back into Python ints."""

    def __init__(self, lowered: LoweredGraph):
        self.lowered = lowered
        self.compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            self.compiled = _extract_compiled_graph(self.lowered.module, args)
        result = self.compiled(*args)
        if not self.lowered.int_outputs:
            return result
        return _ints_at(result, self.lowered.int_outputs)


def _extract_compiled_graph(gm: torch.fx.GraphModule, args: Sequence[Any]) -> Callable[..., Any]:
    import torch_xla
    from torch_xla._dynamo import dynamo_bridge

    try:
        return dynamo_bridge.extract_compiled_graph(gm, _private_scalars(args))
    except Exception:
        # Drop what the failed trace left behind, so the next compile starts clean.
        torch_xla._XLAC._clear_pending_irs(str(torch_xla.device()))
        raise


_PLACEHOLDER = 1  # what scalar inputs hold while the bridge traces (a loop bound of 1 ends)


def _private_scalars(args: Sequence[Any]) -> list[Any]:
    """The args, each 0-dim XLA tensor replaced by a placeholder in a buffer of its own.

    torch_xla keeps one device buffer per scalar constant value, and `torch.tensor(3).to(xla)`
    may hand out that same buffer. Traced with such an input, the bridge cannot tell the
    input from the constant 3 in the graph, and the executable bakes in the first call's
    value: every later call silently reuses it (seen with openxla too; the fuzzer found it).
    Tracing with a private buffer keeps the input an input (a host-to-device copy, which
    torch_xla does not cache); every call, the first too, then takes the real value by position.
    """
    import torch_xla

    copies = list(args)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.device.type == "xla" and a.dim() == 0:
            # Tracing does not read the value; a new buffer costs no sync and no compile.
            placeholder = torch.full((), _PLACEHOLDER, dtype=a.dtype)
            (copies[i],) = torch_xla._XLAC._xla_tensors_from_aten([placeholder], [str(a.device)])
    return copies


def _ints_at(result: Any, positions: list[int]) -> Any:
    """One host read per int result, after the whole graph ran."""
    single = not isinstance(result, (list, tuple))
    values = [result] if single else list(result)
    for i in positions:
        values[i] = int(values[i].item())
    return values[0] if single else type(result)(values) if isinstance(result, tuple) else values


def _fullgraph_requested() -> bool:
    """Whether the surrounding torch.compile call asked for fullgraph=True."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        return False
    return bool(getattr(tx, "one_graph", False) or getattr(tx, "error_on_graph_break", False))


def _aot_xla_loop() -> Callable[..., Any]:
    """A new aot_autograd backend per graph: torch 2.9's instance wraps its bw_compiler once
    more on every call, so a shared one nests a wrapper per compiled graph, holding memory
    and, after some hundreds of graphs, overflowing the stack in the backward pass."""
    return aot_autograd(fw_compiler=compile_graph, bw_compiler=compile_graph)

OPTIONS = {
    "max_iterations": "bound on the trip count of while_loops (int): required to train through one; a loop that runs out raises",
    "remat": "training: recompute loop steps in the backward, storing carries every k steps (True: k=sqrt(length), or k)",
}


def xla_loop(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None, mode: str | None = None
) -> Callable[..., Any]:
    """The Dynamo backend; `torch.compile(fn, backend="xla_loop")` finds it by entry point.

    options (``torch.compile(..., options={...})``): `max_iterations`, a bound on every
    while_loop's trip count (needed to train through one; see `bounds`, `training`), and
    `remat`.
    """
    options = dict(options or {})
    max_iterations = options.pop("max_iterations", None)
    remat = options.pop("remat", False)
    if options or mode not in (None, "default"):
        raise ValueError(f"xla_loop: unknown options {sorted(options)} / mode {mode!r}; options are {OPTIONS}")
    if max_iterations is not None and (not isinstance(max_iterations, int) or max_iterations < 1):
        raise ValueError(f"xla_loop: max_iterations must be a positive int, found {max_iterations!r}")
    if not isinstance(remat, (bool, int)) or (remat is not True and remat is not False and remat < 1):
        raise ValueError(f"xla_loop: remat must be True, False or a positive int (steps per segment), found {remat!r}")
    release_dead_guard_managers()
    unalias_loop_operands(gm)
    try:
        flags = prepare_for_autograd(gm, max_iterations, remat)
        if max_iterations is not None:
            flags += bound_while_loops(gm, max_iterations)
        bounded = returning_flags(gm, flags)
    except LoopLoweringError as error:
        if _fullgraph_requested():
            raise
        warn_host_loop(f"could not lower a loop, so its graph runs eagerly ({error})")
        return gm.forward
    compiled = _aot_xla_loop()(bounded.module, example_inputs)
    if not bounded.loops:
        return compiled

    def run_and_check_bounds(*args: Any) -> Any:
        *outputs, exceeded = compiled(*args)
        check_bounds(bounded.loops, max_iterations, exceeded)
        return outputs

    return run_and_check_bounds


F = TypeVar("F", bound=Callable[..., Any])


def compile(  # noqa: A001 - mirrors torch.compile
    fn: F | None = None,
    *,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    max_iterations: int | None = None,
    remat: bool | int = False,
    **options: Any,
) -> F | Callable[[F], F]:
    """Decorator: ``torch.compile(fn, backend="xla_loop", ...)`` for loop-heavy functions.

    Use bare (``@xla_loop_backend.compile``) or with torch.compile's options
    (``@xla_loop_backend.compile(fullgraph=True, dynamic=False)``). `max_iterations` bounds
    the trip count of while_loops (a loop that runs out raises; training through a
    while_loop needs it); `remat` trades compute for the memory of
    stored loop carries (see `training`). A loop error surfaces
    as the `LoopLoweringError` itself rather than wrapped in Dynamo's exceptions.
    """
    if fn is None:
        return functools.partial(
            compile, fullgraph=fullgraph, dynamic=dynamic, max_iterations=max_iterations, remat=remat, **options
        )
    backend_options = {"max_iterations": max_iterations, "remat": remat}
    backend_options = {k: v for k, v in backend_options.items() if v not in (None, False)}
    if backend_options:
        options["options"] = {**options.get("options", {}), **backend_options}
    compiled = torch.compile(fn, backend=xla_loop, fullgraph=fullgraph, dynamic=dynamic, **options)
    if isinstance(fn, torch.nn.Module):
        # torch's compiled module; its forward is the compiled call, so unwrap errors there.
        compiled.forward = raising_loop_errors(compiled.forward)
        return compiled
    return functools.wraps(fn)(raising_loop_errors(compiled))  # type: ignore[return-value]

