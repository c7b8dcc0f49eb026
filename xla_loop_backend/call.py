"""The call-time wrappers: what runs on every call of a compiled function.

- `GraphCall`, per AOTAutograd graph (forward, backward): makes the graph's program on the
  first call (tracing needs real device inputs; `segments.program`: one executable,
  `executable.py`, or device parts and host steps), and one more for each new value of a
  Python number input or, under SPMD, each new sharding of the inputs. It calls it, reads
  the graph's Python int and bool results back (once, after the whole graph ran), and gives
  gradients of CPU tensors back on the CPU. Under SPMD, the backward's gradients are laid
  out like their inputs (`GradientLayout`).
- `ReportingCall`, around the whole compiled function when its graph has while_loops
  bounded by `max_iterations` (`passes/while_loops.py`): reads the loops' report (one
  scalar, one host read per call, none per iteration) and raises if a loop was still
  running after `max_iterations`. (Trained loops read nothing back: their checkpoints are
  fixed, `passes/checkpointed_while.py`.)
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Sequence

import torch

from . import metrics
from .errors import LoopLoweringError
from .fallback import warn_host_loop
from .explain import current_graph, record, record_graph
from .lowering.driver import LoweredGraph
from .lowering.sharding import pinned, shardings_of
from .lowering.subgraph import is_symbolic_scalar
from .options import InvariantGathering, Options, invariant_gathering
from .segments import program

_LOG = logging.getLogger(__name__)
_FX_NOTE = "\n\nWhile executing"  # (what torch.fx's Interpreter appends to an error's message)


class GradientLayout:
    """SPMD: a gradient keeps the sharding of what it is the gradient of (an FSDP-sharded
    parameter gets a sharded gradient, not whatever XLA's propagation picks). The forward
    graph's first call records its inputs' shardings; the backward graph, whose outputs are
    the gradients of those inputs in the same order, pins each output to its input's
    sharding before it is compiled. Outside SPMD nothing is recorded."""

    def __init__(self) -> None:
        self.input_shardings: list[Any] | None = None

    def record(self, args: Sequence[Any]) -> None:
        self.input_shardings = shardings_of(list(args))

    def pin_gradients(self, gm: torch.fx.GraphModule) -> None:
        shardings = self.input_shardings or []
        output = next(n for n in gm.graph.nodes if n.op == "output")
        outs = output.args[0]
        if not any(s is not None for s in shardings) or not isinstance(outs, (tuple, list)) or len(outs) != len(shardings):
            return
        new = list(outs)
        for i, (out, sharding) in enumerate(zip(outs, shardings)):
            if sharding is None or not isinstance(out, torch.fx.Node):
                continue
            with gm.graph.inserting_before(output):
                new[i] = gm.graph.call_function(_pin_to(sharding, i), (out,))
            new[i].meta = dict(out.meta)
        output.args = (type(outs)(new),)
        gm.recompile()


def _pin_to(sharding: Any, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def pin_gradient(tensor: torch.Tensor) -> torch.Tensor:
        return pinned([tensor], [sharding])[0]

    pin_gradient.__name__ = pin_gradient.__qualname__ = f"xla_loop_pin_gradient_{index}"  # (FX names targets)
    return pin_gradient


class StackedOnce:
    """Inference with repeated layers: the stacked weights are inputs of the graph
    (`passes/stacked_inputs.py`), stacked here on the first call and kept while the layers'
    parameters stay the same, so a call copies no weights. A parameter counts as the same
    while it holds the same device buffer, computed (a pending in-place update, `copy_`,
    `load_state_dict` or assigning `.data` gives it another), and its version counter has
    not moved. (Not torch_xla's tensor id: tracing a graph gives its arguments new XLA
    tensors on the same buffers, `executable._forget_ir`.) The stacks are computed on the
    device as a graph of their own (compiled once per set of shapes)."""

    def __init__(self, compiled: Callable[..., Any], groups: list[tuple[int, ...]]):
        self.compiled, self.groups = compiled, groups
        self.key: tuple[Any, ...] | None = None
        self.stacks: list[torch.Tensor] = []

    def __call__(self, *args: Any) -> Any:
        key = _identity(args, self.groups)
        if key is None or key != self.key:
            self.stacks = stacked_inputs(args, self.groups)
            self.key = key
            metrics.increment(metrics.LAYER_STACKINGS)
        return self.compiled(*args, *self.stacks)


def stacks_of(args: Sequence[Any], groups: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """The stack of each group (positions) of `args`: the layers' stacked weights."""
    return [torch.stack([args[i] for i in group]) for group in groups]


def stacked_inputs(args: Sequence[Any], groups: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """`stacks_of(args, groups)`, computed on the device now."""
    import torch_xla

    stacks = stacks_of(args, groups)
    xla = [t for t in stacks if t.device.type == "xla"]
    if xla:
        torch_xla._XLAC._xla_sync_multi(xla, devices=[], wait=False)
    return stacks


def _identity(args: Sequence[Any], groups: list[tuple[int, ...]]) -> tuple[Any, ...] | None:
    """What the stacked tensors are now: (device buffer or object, version) each; None while
    one of them is still computing (then they are stacked again)."""
    import torch_xla

    xla = torch_xla._XLAC
    tensors = [args[i] for group in groups for i in group]
    on_device = [t for t in tensors if t.device.type == "xla"]
    if on_device and any(xla._check_tensor_need_materialization(on_device)):
        return None
    handles = iter(xla._get_tensors_handle(on_device) if on_device else ())
    return tuple((next(handles) if t.device.type == "xla" else id(t), t._version) for t in tensors)


class GraphCall:
    """Runs one AOTAutograd graph (see the module docstring): its program, made on the first
    call from the real arguments (`segments.program`), one per value of the graph's Python
    number inputs and, under SPMD, per sharding of its inputs (checked every call there)."""

    def __init__(
        self,
        lowered: LoweredGraph,
        layout: GradientLayout | None = None,
        backward: bool = False,
        gathering: InvariantGathering | None = None,
        eager: torch.fx.GraphModule | None = None,
    ):
        self.lowered = lowered
        self.eager = eager  # (without fullgraph: the graph as AOTAutograd made it, to run if a loop fails to lower)
        self.gathering = gathering or Options().invariant_gathering()  # (SPMD: loop invariants gathered before their While)
        self.layout, self.backward = layout, backward
        placeholders = lowered.module.graph.find_nodes(op="placeholder")
        self.numbers = [i for i, p in enumerate(placeholders) if is_symbolic_scalar(p.meta.get("val"))]
        self.number_names = [str(placeholders[i].meta["val"]) for i in self.numbers]  # (Dynamo's symbols: s0, ...)
        self.programs: dict[Any, Callable[..., Any]] = {}
        self.only: Callable[..., Any] | None = None  # the one program, when nothing keys it
        self.to_cpu = _gradients_on_cpu(lowered.module) if backward else []

    def __call__(self, *args: Any) -> Any:
        compiled = self.only if self.only is not None else self._program(args)
        result = compiled(*args)
        if self.lowered.scalar_outputs:
            result = _scalars_at(result, self.lowered.scalar_outputs)
        if self.to_cpu:
            result = _moved_to_cpu(result, self.to_cpu)
        return result

    def _program(self, args: Sequence[Any]) -> Callable[..., Any]:
        shardings = _input_shardings(args)
        key = (tuple(args[i] for i in self.numbers), shardings)
        compiled = self.programs.get(key)
        if compiled is None:
            if self.programs:
                _log_recompile(self, key)
            try:
                compiled = self._compile(args, shardings)
            except LoopLoweringError as error:
                if self.eager is None:
                    raise
                warn_host_loop(f"could not lower a loop, so its graph runs eagerly ({str(error).split(_FX_NOTE)[0]})")
                compiled = self.eager.forward
            self.programs[key] = compiled
            if not self.numbers and shardings is None:
                self.only = compiled
        return compiled

    def _compile(self, args: Sequence[Any], shardings: tuple[str, ...] | None) -> Callable[..., Any]:
        from torch._dynamo.utils import dynamo_timed

        if self.layout is not None:
            if not self.backward:
                self.layout.record(args)
            elif not self.programs:
                self.layout.pin_gradients(self.lowered.module)
        if shardings is not None and any(key[1] != shardings for key in self.programs):
            metrics.increment(metrics.SHARDING_RETRACES)  # (SPMD) an input's sharding changed
        label = current_graph.set("backward" if self.backward else "forward")
        start = time.perf_counter()
        try:
            with dynamo_timed("xla_loop_executable"), invariant_gathering(self.gathering):  # (dynamo_timed: a stage of the first call)
                compiled = program(self.lowered.module, args)
            _log_program(compiled, time.perf_counter() - start)
            return compiled
        finally:
            current_graph.reset(label)


def _log_recompile(call: GraphCall, key: tuple) -> None:
    numbers, shardings = key
    if any(shardings != k[1] for k in call.programs):
        why = "an input's sharding changed"
    else:
        values = ", ".join(f"{name}={value}" for name, value in zip(call.number_names, numbers))
        why = f"a new value of the Python numbers and sizes it takes ({values}): a program per value"
    record(_LOG, "recompile", f"{'backward' if call.backward else 'forward'} graph compiles again: {why}", why=why)


def _log_program(compiled: Any, seconds: float) -> None:
    """One line per graph made a program (TORCH_LOGS="xla_loop_backend"; `explain`); its HLO at DEBUG."""
    from .executable import Executable

    if isinstance(compiled, Executable):
        text = compiled.hlo_text() if _LOG.isEnabledFor(logging.INFO) else ""
        ops = sum(1 for line in text.splitlines() if " = " in line)
        path, programs, buffers = "one program", 1, sum(_bytes(shape, dtype) for shape, dtype, _ in compiled.shapes)
    else:
        parts = compiled.interpreter.device_parts
        path, programs, ops, buffers, text = f"segmented: {len(parts)} device part(s) and host steps", len(parts), 0, 0, ""
    record(
        _LOG, "program", f"graph made {path} ({ops} HLO ops) in {seconds * 1e3:.0f} ms",
        path=path, programs=programs, hlo_ops=ops, seconds=seconds, buffers=buffers,
    )
    record_graph(_LOG, "its HLO", lambda: text)


def _bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _gradients_on_cpu(gm: torch.fx.GraphModule) -> list[int]:
    """The outputs of a backward graph that are gradients of CPU tensors: they leave the
    device (autograd checks a gradient's device against its input's)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    return [
        i
        for i, o in enumerate(outs)
        if isinstance(o, torch.fx.Node) and isinstance(o.meta.get("val"), torch.Tensor) and o.meta["val"].device.type == "cpu"
    ]


def _moved_to_cpu(result: Any, positions: list[int]) -> Any:
    single = not isinstance(result, (list, tuple))
    values = [result] if single else list(result)
    for i in positions:
        if isinstance(values[i], torch.Tensor):
            values[i] = values[i].cpu()
    return values[0] if single else type(result)(values)


def _input_shardings(args: Sequence[Any]) -> tuple[str, ...] | None:
    """Under SPMD, the sharding of each XLA arg ('' read as replicated: an arg not yet on
    the device and one uploaded replicated run the same executable); None outside SPMD."""
    import torch_xla
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.device.type == "xla"]
    return tuple(spec or "{replicated}" for spec in torch_xla._XLAC._get_xla_sharding_specs(tensors))


def _scalars_at(result: Any, types: dict[int, type]) -> Any:
    """One host read per Python scalar result, after the whole graph ran."""
    single = not isinstance(result, (list, tuple))
    values = [result] if single else list(result)
    for i, python_type in types.items():
        values[i] = python_type(values[i].item())
    return values[0] if single else type(result)(values) if isinstance(result, tuple) else values


class ReportingCall:
    """The compiled function of a graph that returns its loops' report last (see above)."""

    def __init__(self, compiled: Callable[..., Any], loops: list[str], max_iterations: int):
        self.compiled, self.loops, self.max_iterations = compiled, loops, max_iterations

    def __call__(self, *args: Any) -> Any:
        *outputs, report = self.compiled(*args)
        if int(report.item()) > self.max_iterations:
            raise LoopLoweringError(
                f"{' or '.join(self.loops)}: still running after max_iterations={self.max_iterations} "
                "iterations; its results (and gradients) would be wrong. Raise max_iterations, or "
                "check the loop's condition."
            )
        return outputs
