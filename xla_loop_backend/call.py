"""The call-time wrappers: what runs on every call of a compiled function.

- `BridgeCall`, per AOTAutograd graph (forward, backward): builds torch_xla's cached
  executable on the first call (the bridge needs real device inputs), calls it, and reads
  the graph's Python int and bool results back (once, after the whole graph ran).
- `ReportingCall`, around the whole compiled function when its graph has bounded or
  trained while_loops (`passes/while_loops.py`): reads the loops' report (one scalar, one
  host read per call, none per iteration); raises if a loop was still running after
  `max_iterations`; and when a trained loop needed more iterations than its stack holds,
  compiles again with a larger capacity and reruns the call.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from . import metrics
from .errors import LoopLoweringError
from .lowering.driver import LoweredGraph


class BridgeCall:
    """Calls a lowered graph through torch_xla's bridge (see the module docstring)."""

    def __init__(self, lowered: LoweredGraph):
        self.lowered = lowered
        self.compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            self.compiled = _extract_compiled_graph(self.lowered.module, args)
        result = self.compiled(*args)
        if not self.lowered.scalar_outputs:
            return result
        return _scalars_at(result, self.lowered.scalar_outputs)


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


def _scalars_at(result: Any, types: dict[int, type]) -> Any:
    """One host read per Python scalar result, after the whole graph ran."""
    single = not isinstance(result, (list, tuple))
    values = [result] if single else list(result)
    for i, python_type in types.items():
        values[i] = python_type(values[i].item())
    return values[0] if single else type(result)(values) if isinstance(result, tuple) else values


def grown_capacity(needed: int, max_iterations: int | None) -> int:
    """The smallest power of two that holds `needed` iterations, within `max_iterations`:
    so a function recompiles at most log2(largest trip count / first capacity) + 1 times."""
    capacity = 1 << max(needed - 1, 0).bit_length()
    return capacity if max_iterations is None else min(capacity, max_iterations)


class ReportingCall:
    """The compiled function of a graph that returns its loops' report last (see above).

    `build(capacity)` compiles the graph with trained while_loops storing `capacity`
    iterations."""

    def __init__(
        self,
        build: Callable[[int], Callable[..., Any]],
        capacity: int,
        loops: list[str],
        max_iterations: int | None,
        trains: bool,
    ):
        self.build, self.capacity, self.loops = build, capacity, loops
        self.max_iterations, self.trains = max_iterations, trains
        self.compiled = build(capacity)

    def __call__(self, *args: Any) -> Any:
        while True:
            *outputs, report = self.compiled(*args)
            needed = int(report.item())
            if self.max_iterations is not None and needed > self.max_iterations:
                raise LoopLoweringError(
                    f"{' or '.join(self.loops)}: still running after max_iterations={self.max_iterations} "
                    "iterations; its results (and gradients) would be wrong. Raise max_iterations, or "
                    "check the loop's condition."
                )
            if not self.trains or needed <= self.capacity:
                return outputs
            # A trained loop ran past its stack: its gradients would be wrong. Compile with
            # room for it, and run the call again (the first run's results are dropped).
            self.capacity = grown_capacity(needed, self.max_iterations)
            metrics.increment(metrics.CAPACITY_GROWTHS)
            self.compiled = self.build(self.capacity)
