"""The call-time wrappers: what runs on every call of a compiled function.

- `BridgeCall`, per AOTAutograd graph (forward, backward): builds the graph's cached
  executable on the first call (tracing needs real device inputs), traced once and called
  directly (`executable.py`), or through torch_xla's bridge where that does not apply (SPMD,
  CPU fallback ops, RNG, a mutated input). It calls it, and reads the graph's Python int and
  bool results back (once, after the whole graph ran). Under SPMD, the backward's gradients
  are laid out like their inputs (`GradientLayout`).
- `ReportingCall`, around the whole compiled function when its graph has bounded or
  trained while_loops (`passes/while_loops.py`): reads the loops' report (one scalar, one
  host read per call, none per iteration); raises if a loop was still running after
  `max_iterations`; and when a trained loop needed more iterations than its stack holds,
  compiles again with a larger capacity and reruns the call.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Callable, Iterator, Sequence

import torch

from . import metrics
from .errors import LoopLoweringError
from .executable import Executable, trace_once
from .lowering.driver import LoweredGraph
from .lowering.sharding import pinned, shardings_of


class GradientLayout:
    """SPMD: a gradient keeps the sharding of what it is the gradient of (an FSDP-sharded
    parameter gets a sharded gradient, not whatever XLA's propagation picks). The forward
    graph's first call records its inputs' shardings; the backward graph, whose outputs are
    the gradients of those inputs in the same order, pins each output to its input's
    sharding before the bridge compiles it. Outside SPMD nothing is recorded."""

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
    """Inference with rolled layers: the stacked weights are inputs of the graph
    (`passes/roll_layers.py`), stacked here on the first call and kept while the layers'
    parameters stay the same, so a call copies no weights. A parameter counts as the same
    while its XLA tensor is (an in-place update, `copy_`, `load_state_dict` or assigning
    `.data` gives it a new one) and its version counter has not moved. The stacks are
    computed on the device as a graph of their own (compiled once per set of shapes)."""

    def __init__(self, compiled: Callable[..., Any], groups: list[tuple[int, ...]]):
        self.compiled, self.groups = compiled, groups
        self.key: tuple[Any, ...] | None = None
        self.stacks: list[torch.Tensor] = []

    def __call__(self, *args: Any) -> Any:
        key = _identity(args, self.groups)
        if key != self.key:
            self.stacks = stacked_inputs(args, self.groups)
            self.key = key
            metrics.increment(metrics.LAYER_STACKINGS)
        return self.compiled(*args, *self.stacks)


def stacks_of(args: Sequence[Any], groups: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """The stack of each group (positions) of `args`: the rolled layers' stacked weights."""
    return [torch.stack([args[i] for i in group]) for group in groups]


def stacked_inputs(args: Sequence[Any], groups: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """`stacks_of(args, groups)`, computed on the device now."""
    import torch_xla

    stacks = stacks_of(args, groups)
    xla = [t for t in stacks if t.device.type == "xla"]
    if xla:
        torch_xla._XLAC._xla_sync_multi(xla, devices=[], wait=False)
    return stacks


def _identity(args: Sequence[Any], groups: list[tuple[int, ...]]) -> tuple[Any, ...]:
    import torch_xla

    tensor_id = torch_xla._XLAC._xla_get_tensor_id
    return tuple(
        (tensor_id(t) if t.device.type == "xla" else id(t), t._version) for group in groups for t in (args[i] for i in group)
    )


class BridgeCall:
    """Calls a lowered graph's executable (see the module docstring): its own, traced once
    (`executable.py`), or, where that does not apply, through torch_xla's bridge."""

    def __init__(self, lowered: LoweredGraph, layout: GradientLayout | None = None, backward: bool = False):
        self.lowered = lowered
        self.compiled: Callable[..., Any] | None = None
        self.layout, self.backward = layout, backward
        self.input_shardings: tuple[str, ...] | None = None

    def __call__(self, *args: Any) -> Any:
        if isinstance(self.compiled, Executable):  # (made outside SPMD only: no sharding to check)
            result = self.compiled(*args)
        else:
            result = self._call_compiling_if_needed(args)
        if not self.lowered.scalar_outputs:
            return result
        return _scalars_at(result, self.lowered.scalar_outputs)

    def _call_compiling_if_needed(self, args: Sequence[Any]) -> Any:
        """The first call (it compiles), and every call through the bridge (under SPMD it
        compiles again when an input's sharding changed)."""
        shardings = _input_shardings(args)
        if self.compiled is None or shardings != self.input_shardings:
            if self.compiled is not None:  # (SPMD) an input's sharding changed: trace again
                metrics.increment(metrics.SHARDING_RETRACES)
            if self.layout is not None:
                if not self.backward:
                    self.layout.record(args)
                elif self.compiled is None:
                    self.layout.pin_gradients(self.lowered.module)
            self.compiled = _compiled(self.lowered.module, args)
            self.input_shardings = _input_shardings(args)
        return self.compiled(*args)


def _compiled(gm: torch.fx.GraphModule, args: Sequence[Any]) -> Callable[..., Any]:
    """The graph's executable: traced once and called directly (`executable.py`), or,
    where that path does not apply, through torch_xla's bridge. Both trace a copy of the
    graph (each rewrites the module it is given; the lowered graph stays as it is, for a
    retrace) on the same stand-ins for the args."""
    from torch._dynamo.utils import dynamo_timed

    with dynamo_timed("xla_loop_executable"):  # (a stage of the first call in Dynamo's compile times)
        fresh = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        trace_args = _private_scalars(args)
        own = trace_once(fresh, trace_args, args)
        return own if own is not None else _extract_compiled_graph(fresh, trace_args)


def _extract_compiled_graph(gm: torch.fx.GraphModule, trace_args: Sequence[Any]) -> Callable[..., Any]:
    """torch_xla's bridge on `gm`, which it partitions in place."""
    import torch_xla
    from torch_xla._dynamo import dynamo_bridge

    try:
        with _bridge_sharding_check_off():
            return dynamo_bridge.extract_compiled_graph(gm, _spmd_trace_args(trace_args))
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


def _input_shardings(args: Sequence[Any]) -> tuple[str, ...] | None:
    """Under SPMD, the sharding of each XLA arg ('' read as replicated: an arg not yet on
    the device and one uploaded replicated run the same executable); None outside SPMD."""
    import torch_xla
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.device.type == "xla"]
    return tuple(spec or "{replicated}" for spec in torch_xla._XLAC._get_xla_sharding_specs(tensors))


@contextlib.contextmanager
def _bridge_sharding_check_off() -> Iterator[None]:
    """The bridge's own per-call check of input shardings, off for what it compiles now.

    It compares sharding strings, so an input not yet uploaded ('') differs from the
    replicated one it was traced with: under SPMD a training step's fresh batch made it
    retrace the forward on every call, and its retrace traces with the real args (see
    `_spmd_trace_args`). `BridgeCall` checks instead (`_input_shardings`), on every call.
    """
    name = "XLA_DYNAMO_INPUT_SHARDING_CHECK_THRESHOLD"  # read once per graph, at compile
    saved = os.environ.get(name)
    os.environ[name] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def _spmd_trace_args(args: Sequence[Any]) -> list[Any]:
    """Under SPMD: the args the bridge traces with, each XLA tensor replaced by a new
    tensor on the same device buffer (no copy; same sharding). Each call then takes the
    real args by position.

    The bridge tells a graph's arguments from its constants by the tensor id each device
    buffer is tagged with, and under SPMD its own lookup of a traced graph's buffers
    (`_get_tensors_xla_device_data_node`) re-tags every buffer it visits with the id of a
    new tensor it wraps the buffer in. So the next graph traced on the same tensor (a
    training step's backward after its forward, or a second compiled function on the same
    parameters) no longer recognises it as an argument and bakes in its current value:
    after an optimizer step updates the parameters, that graph silently computes with the
    old ones (wrong gradients from the second step on; torch_xla's own `openxla` backend
    does it too, and `tests/test_spmd.py` notices when it stops). A tensor wrapped on the
    buffer by that same lookup is tagged with its own id, so tracing with it keeps every
    argument an argument. The args are first made device buffers of their own (uploaded,
    or computed if pending: as the bridge's first call would), so that the bridge's own
    sync before tracing re-tags nothing. Outside SPMD the lookup re-tags nothing, and the
    args are returned as they are.
    """
    import torch_xla
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        return list(args)
    xla = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.device.type == "xla"]
    if xla:
        torch_xla._XLAC._xla_sync_multi([args[i] for i in xla], devices=[], wait=True, sync_xla_data=True)
    # An arg computed by an earlier asynchronous sync may still be a placeholder, and
    # torch_xla's lookup crashes the process on one: wait (the bridge waits here too).
    torch_xla._XLAC._xla_wait_device_ops(devices=[])
    stand_ins = list(args)
    for i in xla:
        _, buffers = torch_xla._XLAC._get_tensors_xla_device_data_node([args[i]])
        if len(buffers) == 1 and buffers[0].shape == args[i].shape and buffers[0].dtype == args[i].dtype:
            stand_ins[i] = buffers[0]
    return stand_ins


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
