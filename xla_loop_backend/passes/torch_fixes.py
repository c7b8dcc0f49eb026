"""Fixes for torch 2.9 bugs in its control-flow ops, made where the bug is: in the op.

scan's autograd (pytorch/pytorch#184528, fixed after 2.9): when a floating carry of a scan
does not require grad (``h = torch.zeros(...)``), torch traces the per-step backward with a
zero gradient for that carry, so the gradient flowing back through the carries is dropped:
closed-over parameters and xs get silently wrong gradients. It happens at any depth (a scan
inside a trained loop's body, a scan xla_loop makes itself) and in torch's eager scan too.

The fix wraps scan's autograd kernel: when the scan is differentiated, such carries are
made to require grad through a link with an exactly zero gradient, ``where(False, p, carry)``,
to an operand p that does.

The backward of scan, map and cond runs its body's vector-Jacobian product (`create_bw_fn`)
as the body of another scan, map or cond, and two things go wrong in torch 2.9:
- that op refuses outputs that alias each other ("scan might be aliasing the input or the
  output!", pytorch/pytorch#185332, fixed after 2.9), but autograd returns one tensor for
  two inputs whose gradients are equal, as for ``new = carry + x`` (torch_xla's first
  scan test, trained): the VJP's outputs are made distinct tensors (`distinct_outputs`;
  the copies cost nothing in XLA);
- scan passes the VJP a gradient for every output, but the VJP takes them only for the
  floating ones, which alone are differentiable: a scan with an integer or bool y (a
  count, a token id) failed to train ("AssertionError", eagerly too). The VJP now drops
  the gradients of non-floating outputs.

Dynamo's graph deduplication (which `xla_loop_backend.compile` turns on, so that repeated
layers with no marker roll into a scan) fails on a graph that also has calls of a marked
function (`nested_compile_region`) or of a loop or cond: its region tracker puts the call's
subgraph node, which has no example value, into a region, and the pass dies on it
(KeyError: 'example_value', in `_has_aliasing` and `_is_tuple_node`). The tracker now
leaves out every call of a subgraph and its outputs (`install_dedup_fix`): a marked call is
already a call of one subgraph, and a loop is not a layer to roll.

The same pass silently computes wrong results (found by the gradient fuzzer): it takes
regions of identical nodes as one group even when they are wired differently, as in

    h = x
    for layer in self.layers:  h = torch.tanh(layer(h) + 0.1 * x) + 0.5 * h

whose first region reads one input (`x`) where the others read two (`h`, `x`). The
subgraph is made from the first region and every call passes it the others' operands by
the first one's wiring: the second layer computed `0.1 * h` (with torch's eager backend
too). The fix splits each group by wiring, each operand of each node named by where it
comes from (a node of the region, by position, or one input shared by the same uses),
and keeps the parts of two or more regions (`_by_wiring`).

Dynamo's first trace in a process is slower than it need be: for every FX call node it
makes, it names the function around the source line, for a debug log line (TRACE FX call)
it then drops unless that log is on, and naming the first line of a file tokenizes the
whole file. A first call of a small loop spent 0.2-0.5 s there (of about 1.2 s). The name
is now looked up only while Dynamo's trace_call or trace_source log is on
(`install_funcname_fix`).

torch's own cond, while_loop, scan and map refuse a branch or body that returns one of its
inputs unchanged (`lambda g: g`, a carry passed through) or one tensor twice, which
`xla_loop_backend.cond` and `while_loop` accept: Dynamo's check of the traced subgraph
("Encountered aliasing during higher order op tracing") now first makes such an output a
copy, in the subgraph, where the tensors are on the XLA device (`install_aliasing_fix`).
Two inputs that are one tensor are still refused (the operands, not the body, alias).

Under SPMD, scan's backward lays its gradients out as torch leaves them: the gradients of
the final carries and of the ys come from whatever computed the loss (often a replicated
seed, as `torch.autograd.backward(outputs, ones)` makes), and the accumulators of the
captured inputs' gradients start as `zeros_like` (no sharding). xla_loop pins a While's
carries to their initial values' shardings, so every backward iteration gathered a whole
gradient. `install_scan_gradient_layouts` makes each of them take the sharding of the
forward value it is the gradient of (a carry's: its row of the stacked forward carries; a
y's: the forward ys; a captured input's: the input), through `sharding.sharding_like`,
which reads the sharding when the graph is traced for XLA. Outside SPMD nothing changes.

All are installed once, at import (`OP_FIXES`); tests check that torch still needs them.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any, Callable

import torch
from torch._C import DispatchKey
from torch._higher_order_ops.scan import scan_op
from torch.multiprocessing.reductions import StorageWeakRef

_FIXED_ATTRIBUTE = "_xla_loop_fixes_184528"


def linked_to_grad(carry: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`carry`, requiring grad through `reference` with an exactly zero gradient."""
    never = torch.zeros((), dtype=torch.bool, device=carry.device)
    linked = torch.where(never, reference.flatten()[0].to(carry.dtype), carry)
    from ..sharding import sharding_like, spmd_on

    return sharding_like(linked, carry) if spmd_on() else linked  # (SPMD: the carry's layout, if it has one)


def carries_requiring_grad(init: Any, operands: Any) -> list[Any]:
    """The scan's carries, floating ones made to require grad when some operand does."""
    reference = next(
        (t for t in operands if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()), None
    )
    if reference is None or not torch.is_grad_enabled():
        return list(init)
    return [
        linked_to_grad(c, reference) if isinstance(c, torch.Tensor) and c.is_floating_point() and not c.requires_grad else c
        for c in init
    ]


def install_scan_autograd_fix() -> None:
    """Wrap scan's Autograd kernel (once) so every scan gets `carries_requiring_grad`."""
    kernel = scan_op.py_kernels[DispatchKey.Autograd]
    if getattr(kernel, _FIXED_ATTRIBUTE, False):
        return

    def scan_autograd(combine_fn: Any, init: Any, xs: Any, additional_inputs: Any) -> Any:
        init = carries_requiring_grad(init, (*init, *xs, *additional_inputs))
        return kernel(combine_fn, init, xs, additional_inputs)

    setattr(scan_autograd, _FIXED_ATTRIBUTE, True)
    scan_autograd.torch_kernel = kernel  # type: ignore[attr-defined]
    scan_op.py_kernels[DispatchKey.Autograd] = scan_autograd
    scan_op._dispatch_cache.clear()


def install_scan_gradient_layouts() -> None:
    """Under SPMD, scan's backward gradients take their forward values' shardings (see the
    module docstring)."""
    from torch._higher_order_ops.scan import ScanAutogradOp

    original = ScanAutogradOp.backward
    if getattr(original, _FIXED_ATTRIBUTE, False):
        return

    def backward(ctx: Any, *flat_grads: Any) -> Any:
        from ..sharding import sharding_like, spmd_on

        if not spmd_on():
            return original(ctx, *flat_grads)
        from torch._higher_order_ops.utils import saved_tensors_and_symints, split_into_chunks

        n_init, n_ys, n_add = ctx._num_leaves_init, ctx._num_leaves_ys, ctx._num_additional_inputs
        _, _, captured, fw_carries, fw_ys = split_into_chunks(
            saved_tensors_and_symints(ctx), [n_init, ctx._num_leaves_xs, n_add, n_init, n_ys]
        )
        references = [(c, 1) for c in fw_carries] + [(y, 0) for y in fw_ys]
        grads = [
            sharding_like(g, r, k) if isinstance(g, torch.Tensor) and isinstance(r, torch.Tensor) else g
            for g, (r, k) in zip(flat_grads, references)
        ]
        with _ZerosLikeFollows(captured):
            return original(ctx, *grads)

    setattr(backward, _FIXED_ATTRIBUTE, True)
    backward.__wrapped__ = original  # type: ignore[attr-defined]
    ScanAutogradOp.backward = staticmethod(backward)


class _ZerosLikeFollows(torch.overrides.TorchFunctionMode):
    """`torch.zeros_like(t)` of one of `tensors` (a captured input whose gradient a scan's
    backward accumulates) is laid out like t."""

    def __init__(self, tensors: Any) -> None:
        super().__init__()
        self.tensors = {t._cdata for t in tensors if isinstance(t, torch.Tensor)}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.zeros_like and args and isinstance(args[0], torch.Tensor) and args[0]._cdata in self.tensors:
            from ..sharding import sharding_like

            return sharding_like(out, args[0])
        return out


def torch_scan_autograd_kernel() -> Any:
    """torch's own scan Autograd kernel, without the fix (for the test that watches the bug)."""
    kernel = scan_op.py_kernels[DispatchKey.Autograd]
    return getattr(kernel, "torch_kernel", kernel)


def distinct_outputs(values: list[Any]) -> list[Any]:
    """`values`, each tensor that shares storage with an earlier one replaced by a copy."""
    seen: set[StorageWeakRef] = set()
    distinct = []
    for value in values:
        if isinstance(value, torch.Tensor):
            storage = StorageWeakRef(value.untyped_storage())
            if storage in seen:
                value = value.clone()
            seen.add(StorageWeakRef(value.untyped_storage()))
        distinct.append(value)
    return distinct


def create_bw_fn_fixed(fn: Callable[..., Any], args: Any) -> Callable[..., Any]:
    """torch's `create_bw_fn`, taking gradients of floating outputs only and returning
    distinct tensors (see above)."""
    bw_fn = _TORCH_CREATE_BW_FN(fn, args)
    num_primals = len(args)

    @functools.wraps(bw_fn)
    def fixed_bw_fn(*args_and_grads: Any) -> list[Any]:
        primals, grads = args_and_grads[:num_primals], args_and_grads[num_primals:]
        grads = [g for g in grads if not isinstance(g, torch.Tensor) or g.is_floating_point() or g.is_complex()]
        return distinct_outputs(list(bw_fn(*primals, *grads)))

    return fixed_bw_fn


# (importlib: `torch._higher_order_ops.scan` the attribute is the function, not the module.)
_MODULES_WITH_VJP_BODIES = tuple(importlib.import_module(f"torch._higher_order_ops.{m}") for m in ("scan", "map", "cond"))
_TORCH_CREATE_BW_FN = _MODULES_WITH_VJP_BODIES[0].create_bw_fn


def install_vjp_fixes() -> None:
    """Make scan's, map's and cond's backward use `create_bw_fn_fixed`."""
    for module in _MODULES_WITH_VJP_BODIES:
        module.create_bw_fn = create_bw_fn_fixed


# Op-level fixes, in the order they are installed (pipeline.py lists them with the passes).
def _subgraph_call_part(node: torch.fx.Node) -> bool:
    """A node of a call of a subgraph (a marked function, a loop, a cond): the subgraph,
    the call, or an output of it."""
    import operator

    def calls_subgraph(n: Any) -> bool:
        return isinstance(n, torch.fx.Node) and isinstance(n.target, torch._ops.HigherOrderOperator)

    if node.op == "get_attr" or calls_subgraph(node):
        return True
    return node.target is operator.getitem and calls_subgraph(node.args[0])


def wiring(region: list[torch.fx.Node]) -> frozenset:
    """How a region's nodes read their operands: (node, operand) positions grouped by the
    value they read, each value a node of the region (by position) or an input."""
    from torch._dynamo.graph_deduplication import _get_flat_args

    position = {node: i for i, node in enumerate(region)}
    inputs: dict[torch.fx.Node, list[tuple[int, int]]] = {}
    inside = set()
    for i, node in enumerate(region):
        for j, operand in enumerate(_get_flat_args(node, {})):
            if not isinstance(operand, torch.fx.Node):
                continue
            if operand in position:
                inside.add((i, j, position[operand]))
            else:
                inputs.setdefault(operand, []).append((i, j))
    return frozenset(inside) | frozenset(frozenset(uses) for uses in inputs.values())


def _by_wiring(group: list[list[torch.fx.Node]]) -> list[list[list[torch.fx.Node]]]:
    parts: dict[frozenset, list[list[torch.fx.Node]]] = {}
    for region in group:
        parts.setdefault(wiring(region), []).append(region)
    return [part for part in parts.values() if len(part) > 1]


def install_dedup_fix() -> None:
    from torch._dynamo.graph_region_tracker import GraphRegionTracker

    track_node = GraphRegionTracker.track_node
    if getattr(track_node, _FIXED_ATTRIBUTE, False):
        return

    @functools.wraps(track_node)
    def track_unmarked_node(self: Any, tx: Any, node: torch.fx.Node) -> None:
        if not _subgraph_call_part(node):
            track_node(self, tx, node)

    setattr(track_unmarked_node, _FIXED_ATTRIBUTE, True)
    GraphRegionTracker.track_node = track_unmarked_node
    get_identical_regions = GraphRegionTracker.get_identical_regions

    @functools.wraps(get_identical_regions)
    def identical_regions_wired_alike(self: Any, graph: torch.fx.Graph) -> list[list[Any]]:
        return [part for group in get_identical_regions(self, graph) for part in _by_wiring(group)]

    setattr(identical_regions_wired_alike, _FIXED_ATTRIBUTE, True)
    GraphRegionTracker.get_identical_regions = identical_regions_wired_alike
    # (the tracker reads the TF32 flag through an API torch 2.9 deprecates: not the user's doing)
    warnings.filterwarnings("ignore", message="Please use the new API settings to control TF32", category=UserWarning)


def install_funcname_fix() -> None:
    import logging

    from torch._dynamo import symbolic_convert

    get_funcname = symbolic_convert.get_funcname
    if getattr(get_funcname, _FIXED_ATTRIBUTE, False):
        return
    logs = (symbolic_convert.trace_call_log, symbolic_convert.trace_source_log)

    @functools.wraps(get_funcname)
    def funcname_when_logged(filename: str, lineno: int) -> str | None:
        if any(log.isEnabledFor(logging.DEBUG) for log in logs):
            return get_funcname(filename, lineno)
        return None

    setattr(funcname_when_logged, _FIXED_ATTRIBUTE, True)
    symbolic_convert.get_funcname = funcname_when_logged


def install_aliasing_fix() -> None:
    """Before Dynamo checks a body's outputs for aliasing, an XLA output that is an input or
    another output is copied in the subgraph (see the module docstring)."""
    from torch._dynamo.output_graph import SubgraphTracer

    if getattr(SubgraphTracer.has_aliasing, _FIXED_ATTRIBUTE, False):
        return
    original = SubgraphTracer.has_aliasing

    def has_aliasing(self: Any) -> Any:
        _copy_aliased_outputs(self.graph)
        return original(self)

    setattr(has_aliasing, _FIXED_ATTRIBUTE, True)
    has_aliasing.__wrapped__ = original  # type: ignore[attr-defined]
    SubgraphTracer.has_aliasing = has_aliasing


def _copy_aliased_outputs(graph: torch.fx.Graph) -> None:
    from torch._higher_order_ops.utils import _collect_fake_inputs

    def storage(node: Any) -> Any:
        value = _collect_fake_inputs([node])[0] if isinstance(node, torch.fx.Node) else None
        if isinstance(value, torch.Tensor) and value.device.type == "xla":
            return StorageWeakRef(value._typed_storage()), value
        return None, None

    seen = {storage(n)[0] for n in graph.find_nodes(op="placeholder")} - {None}
    output = graph.find_nodes(op="output")[0]

    def copied(node: Any) -> Any:
        key, value = storage(node)
        if key is None:
            return node
        if key not in seen:
            seen.add(key)
            return node
        with graph.inserting_before(output):
            copy = graph.call_function(torch.clone, (node,))
        copy.meta["example_value"] = value.clone()
        return copy

    output.args = (torch.utils._pytree.tree_map_only(torch.fx.Node, copied, output.args[0]),)


OP_FIXES = (
    install_scan_autograd_fix,
    install_vjp_fixes,
    install_dedup_fix,
    install_funcname_fix,
    install_aliasing_fix,
    install_scan_gradient_layouts,
)
