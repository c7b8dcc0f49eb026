"""The pipeline: every pass xla_loop runs on a graph, in order, and why in this order.

    Dynamo graph
      │  BEFORE_AUTOGRAD (each a rule per control-flow op kind, at every depth)
      │    roll_layers  chains of calls of one subgraph -> one scan (option `roll_layers`)
      │    unalias      loops get distinct operands
      │    while_loops  bounded / trainable while_loops, each returning a report
      │    reports      reports of inner loops carried out to the graph's output
      │    remat        trained loops store fewer carries (option `remat`)
      │    stacked_inputs  (inference) stacks of the graph's inputs become inputs
      ▼
    AOTAutograd: forward and backward graphs (OP_FIXES patch torch's ops it traces;
      │  DYNAMO_RULES teach Dynamo, before all this, counter indexing, op labels and
      │  torch_xla's loop functions)
      │  AFTER_AUTOGRAD, on each graph
      │    on_device         tensors the graph makes on the CPU are made on the device
      │    torch_xla_fixes   rewrites around torch_xla ops that give wrong results
      │    reversed_scans    a scan over flipped xs reads them from the end (no copies)
      │    stacked_results   results selected from one stack are split in one op
      │  lowering driver     control-flow nodes -> lowering rules (one XLA While each)
      ▼
    each graph's program (call.GraphCall): one executable xla_loop traces, keys and compiles
    itself and calls directly (executable.py), or device parts with host steps between them
    (segments.py); around the whole function, call.ReportingCall reads the loops' report
    once per call, (inference) call.StackedOnce passes the layers' weights stacked once,
    and OnEagerDevices gives results back on the device eager PyTorch puts them on.

Ordering constraints:
- `roll_layers` first: the scans it makes then meet every later pass as the user's own.
- `unalias` next: torch's loop ops refuse aliased operands as soon as they are traced, and
  the passes after it trace nothing but must see a graph AOTAutograd will accept.
- `while_loops` before `reports`: it makes the loops that report.
- `reports` before AOTAutograd: the graph's outputs are fixed when it is traced.
- `remat` after `while_loops`: it sets the checkpoint count of the calls that pass makes
  (before or after `reports`: the segmented scan passes extra ys through).
- `stacked_inputs` last: it finds the stacks roll_layers made and those scan_layers traced,
  and gives the graph more inputs, which no pass after it may renumber.
- OP_FIXES before anything traces a loop op (installed at import): they fix the op itself,
  so they reach loops at every depth, also those the passes make, and eager calls.
- DYNAMO_RULES before Dynamo traces a body (installed at import): `x[t]`, `out[:, t] = v`,
  `x.narrow(d, t, k)` with a loop counter t become dynamic slices (`indexing.py`); calls of
  torch_xla's scan, scan_layers and fori_loop become xla_loop's (`torch_xla_loops.py`).
- `on_device` first after AOTAutograd: the passes before it and AOTAutograd itself trace
  with eager's devices (a CPU counter stays a CPU fake tensor), and every graph AOTAutograd
  makes, forward and backward, has its CPU tensors moved before anything runs it.
- `torch_xla_fixes` before the lowering driver: it rewrites ops inside loop bodies, which
  the driver stages as XLA computations.
- `reversed_scans` after `on_device` (a flip of a CPU constant is made on the device
  first) and before `stacked_results`, whose stacks are then the scan's own ys, unflipped.
- `stacked_results` last after AOTAutograd: it reads the graph's results as AOTAutograd
  made them (a backward's gradients), and only the top-level graph's.

`compile` runs the pipeline; the backend (`backend.xla_loop`), `inspect.lowered_hlo` and the
tests all go through it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
from typing import Any, Callable, Sequence

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import dynamo_timed

from .call import GradientLayout, GraphCall, ReportingCall, StackedOnce
from .errors import LoopLoweringError, install_op_labels
from .explain import record_graph
from .fallback import warn_host_loop
from .lowering.driver import lower_loops
from .options import Options, PassContext
from . import indexing, torch_xla_loops
from .passes import (
    on_device, reports, remat, reversed_scans, roll_layers, stacked_inputs, stacked_results, torch_fixes, torch_xla_fixes, unalias, while_loops,
)

BEFORE_AUTOGRAD = (roll_layers.PASS, unalias.PASS, while_loops.PASS, reports.PASS, remat.PASS, stacked_inputs.PASS)
OP_FIXES = torch_fixes.OP_FIXES
AFTER_AUTOGRAD = (on_device.PASS, torch_xla_fixes.PASS, reversed_scans.PASS, stacked_results.PASS)

# Dynamo's tracing taught what xla_loop lowers (indexing with a loop counter in bodies,
# torch_xla's loop functions), and to say which of torch's control-flow ops it was tracing
# when an error comes.
DYNAMO_RULES = (indexing.install, install_op_labels, torch_xla_loops.install)

for _install in (*OP_FIXES, *DYNAMO_RULES):
    _install()

_LOG = logging.getLogger(__name__)

GraphCompiler = Callable[[torch.fx.GraphModule, Sequence[Any]], Callable[..., Any]]


def compile(  # noqa: A001 - the pipeline's one entry
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Options,
    graph_compiler: GraphCompiler | None = None,
) -> Callable[..., Any]:
    """Run the pipeline on a Dynamo graph; returns the compiled function.

    `graph_compiler` compiles each graph AOTAutograd makes (default: `compile_graph`, the
    passes after AOTAutograd, the lowering, then the graph's program; see `graph_compilers`). A loop that cannot be lowered is an
    error under `fullgraph=True`; otherwise the graph runs eagerly with a warning."""
    fullgraph = fullgraph_requested()
    original = None if fullgraph else _eager_copy(gm)
    context = PassContext.for_graph(options, example_inputs)
    if not context.training:
        gm = _own_copy(gm)  # (stacked_inputs may add inputs; Dynamo reads its own graph's afterwards)
    try:
        for graph_pass in BEFORE_AUTOGRAD:
            graph_pass.run(gm, context)
        if context.stacked_inputs:  # (stacks of inputs made inputs of their own)
            example_inputs = [*example_inputs, *_stacked_examples(example_inputs, context.stacked_inputs)]

        # A new aot_autograd backend each time: torch 2.9's instance wraps its bw_compiler
        # once more per call, so a shared one nests a wrapper per compiled graph (memory, and
        # after some hundreds of graphs a stack overflow in the backward pass).
        fw_compiler, bw_compiler = graph_compilers(graph_compiler, options)
        compiled = aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler)(gm, example_inputs)
        if context.reports:
            compiled = ReportingCall(compiled, context.reporting_loops, options.max_iterations)
        if context.stacked_inputs:
            compiled = StackedOnce(compiled, context.stacked_inputs)
        on_cpu = _results_on_cpu(gm)
        return OnEagerDevices(compiled, on_cpu) if on_cpu else compiled
    except LoopLoweringError as error:
        if fullgraph:
            raise
        warn_host_loop(f"could not lower a loop, so its graph runs eagerly ({error})")
        return original.forward


class OnEagerDevices:
    """The compiled function, its results that eager PyTorch makes on the CPU (a counter
    made without `device=`) copied there: inside, they live on the device (`on_device`)."""

    def __init__(self, compiled: Callable[..., Any], positions: list[int]):
        self.compiled, self.positions = compiled, positions

    def __call__(self, *args: Any) -> Any:
        results = list(self.compiled(*args))
        for i in self.positions:
            if isinstance(results[i], torch.Tensor) and results[i].device.type != "cpu":
                results[i] = results[i].cpu()
        return results


def _results_on_cpu(gm: torch.fx.GraphModule) -> list[int]:
    """The positions of the Dynamo graph's results that are CPU tensors in eager PyTorch."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    positions = []
    for i, out in enumerate(outs):
        value = out.meta.get("example_value", out.meta.get("val")) if isinstance(out, torch.fx.Node) else None
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            positions.append(i)
    return positions


def _own_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of Dynamo's graph module that the passes may give more inputs: Dynamo
    generates the call of the compiled function from its own graph's placeholders after the
    backend returns. What AOTAutograd reads of a Dynamo graph comes along (its meta, the
    sources of its parameters and of each input)."""
    if not any(gm.graph.find_nodes(op="call_function", target=t) for t in (torch.ops.higher_order.invoke_subgraph, *stacked_inputs.STACKS)):
        return gm  # (nothing to roll or stack)
    graph = copy.deepcopy(gm.graph)
    own = torch.fx.GraphModule(gm, graph)
    own.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        own._param_name_to_source = gm._param_name_to_source
    for theirs, ours in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder")):
        if hasattr(theirs, "_dynamo_source"):
            ours._dynamo_source = theirs._dynamo_source
    return own


def _stacked_examples(example_inputs: Sequence[Any], groups: list[tuple[int, ...]]) -> list[Any]:
    """Example values of the stacked inputs: fake (Dynamo's fake mode, where there is one) and
    of static shape (AOTAutograd makes an input with no Dynamo source of its own dynamic)."""
    mode = torch._guards.detect_fake_mode(example_inputs)
    with mode or contextlib.nullcontext():
        return [
            torch.empty((len(group), *example_inputs[group[0]].shape), dtype=example_inputs[group[0]].dtype, device=example_inputs[group[0]].device)
            for group in groups
        ]


def graph_compilers(graph_compiler: GraphCompiler | None, options: Options | None = None) -> tuple[GraphCompiler, GraphCompiler]:
    """AOTAutograd's forward and backward compilers: `graph_compiler` for both, or by
    default `compile_graph`, the backward's gradients laid out like the forward's inputs."""
    if graph_compiler is not None:
        return graph_compiler, graph_compiler
    layout = GradientLayout()
    compile_with = functools.partial(compile_graph, layout=layout, options=options)
    return compile_with, functools.partial(compile_with, backward=True)


def compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    layout: GradientLayout | None = None,
    backward: bool = False,
    options: Options | None = None,
) -> Callable[..., Any]:
    """The graph compiler AOTAutograd calls for each graph: the passes after AOTAutograd,
    the lowering driver, then the graph's program (`call.GraphCall`). Without fullgraph, a
    loop found unlowerable only when the graph is traced (on its first call: an op torch_xla
    runs on the CPU in a body) makes the graph run eagerly, with a warning, as here."""
    eager = None if fullgraph_requested() else _eager_copy(gm)
    try:
        for graph_pass in AFTER_AUTOGRAD:
            graph_pass.run(gm)
        with dynamo_timed("xla_loop_lowering"):  # (a stage of the first call in Dynamo's compile times)
            lowered = lower_loops(gm)
        record_graph(_LOG, f"{'backward' if backward else 'forward'} graph, its loops lowered", lambda: lowered.module.code)
    except LoopLoweringError as error:
        if fullgraph_requested():
            raise
        warn_host_loop(f"could not lower a loop, so its graph runs eagerly ({error})")
        return make_boxed_func(gm.forward)
    return make_boxed_func(GraphCall(lowered, layout, backward, (options or Options()).invariant_gathering(), eager))


def _eager_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph as it came, for an eager fallback (`compile`'s, `GraphCall`'s). Copied
    outside AOTAutograd's fake mode, which is active while it compiles: under it, copying a tensor
    constant the graph holds (a `torch.tensor(0.5)` made without device=, on the CPU) fails
    ("Attempted to set the storage of a tensor on device meta to a storage on ... cpu")."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return copy.deepcopy(gm)


def fullgraph_requested() -> bool:
    """Whether the surrounding torch.compile call asked for fullgraph=True."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        return False
    return bool(getattr(tx, "one_graph", False) or getattr(tx, "error_on_graph_break", False))


__all__ = ["AFTER_AUTOGRAD", "BEFORE_AUTOGRAD", "DYNAMO_RULES", "OP_FIXES", "compile", "compile_graph", "fullgraph_requested"]
