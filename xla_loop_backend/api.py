"""User-facing loop functions: `while_loop`, `scan`, `fori_loop`, `cond` and `scan_layers`, with clear errors.

Each checks its inputs and what its body returns by pytree path, so an error names the
loop, the carry and what was expected vs found (torch's own checks report a flat position,
or an empty AssertionError for a bad carry type). Then it calls torch's higher-order op, which
`torch.compile(backend="xla_loop")` lowers to one XLA While.

Called outside torch.compile on XLA tensors, each of them compiles itself with xla_loop
(fullgraph), so an "eager" loop on the device is still one XLA While and not a Python loop
with a host sync per iteration.
"""
from __future__ import annotations

import types
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.utils._pytree as pytree
from torch._higher_order_ops.cond import cond as _torch_cond
from torch._higher_order_ops.scan import scan as _torch_scan
from torch._higher_order_ops.while_loop import while_loop as _torch_while_loop
from torch._higher_order_ops.while_loop import while_loop_op as _while_loop_op

from . import trees
from .errors import describe_value, raise_loop_error, raising_loop_errors, traced_loop, tracing_loop
from .stacking import stack_layers
from .tracing import call_checked, reject_constant_condition

Carries = Any  # a pytree (tuple/list/dict nesting) of tensors and Python ints


def while_loop(
    cond_fn: Callable[..., Any],
    body_fn: Callable[..., Any],
    carried_inputs: Sequence[Carries],
    *,
    name: str | None = None,
) -> Any:
    """``while cond_fn(*carries): carries = body_fn(*carries)``; returns the final carries.

    Carries are a tuple/list of pytrees of tensors and Python ints; the body must return
    them with the same structure, shapes and dtypes (it may return a carry unchanged).
    `name` labels the loop in errors (default: the body's name).
    """
    loop = _loop_label("while_loop", name, body_fn)
    if not isinstance(carried_inputs, (tuple, list)):
        raise_loop_error(f"{loop}: carried_inputs must be a tuple or list, found {describe_value(carried_inputs)}")
    carried_inputs = trees.tree_map(_dense, tuple(carried_inputs))
    _check_leaves(loop, "carry", "carried_inputs", carried_inputs, allow_ints=True)
    paths = _tensor_paths("carried_inputs", carried_inputs)

    def checked_cond(*carries: Any) -> Any:
        pred = call_checked(loop, "cond_fn", paths, cond_fn, *carries)
        if isinstance(pred, torch.Tensor) and (pred.dim() != 0 or pred.dtype != torch.bool):
            raise_loop_error(f"{loop}: cond_fn must return a scalar bool tensor (bool[]) or a bool, found {describe_value(pred)}")
        reject_constant_condition(loop, pred)
        return pred

    def checked_body(*carries: Any) -> Any:
        new = call_checked(loop, "body_fn", paths, body_fn, *carries)
        if not isinstance(new, tuple):
            new = tuple(new) if isinstance(new, list) else (new,)
        _check_same_carries(loop, "body_fn", "carried_inputs", new, carries)
        return _as_new_carries(new)

    return _on_device(_run_while_loop, loop, checked_cond, checked_body, carried_inputs)


def scan(
    combine_fn: Callable[[Any, Any], tuple[Any, Any]],
    init: Carries,
    xs: Any,
    *,
    dim: int = 0,
    reverse: bool = False,
    name: str | None = None,
) -> tuple[Any, Any]:
    """``carry = init; for x in xs (along dim): carry, y = combine_fn(carry, x)``.

    Returns (final carry, ys), each y leaf stacked along dim 0 (torch's convention). init
    and xs are pytrees of tensors; every xs leaf must have the same length along `dim`.
    combine_fn must return (carry, y) with the carry's structure, shapes and dtypes
    unchanged; it may return its inputs, views of them or tensors it captured (outputs
    are copied, as torch's scan rejects outputs that alias inputs). `reverse=True` scans from the end.
    """
    loop = _loop_label("scan", name, combine_fn)
    _check_leaves(loop, "init", "init", init, allow_ints=False)
    _check_leaves(loop, "xs", "xs", xs, allow_ints=False)
    xs_leaves = _leaves_with_paths("xs", xs)
    if not xs_leaves:
        raise_loop_error(f"{loop}: xs must hold at least one tensor to scan over, found {xs!r}")
    first_path, first = xs_leaves[0]
    for path, x in xs_leaves:
        if x.dim() <= dim or x.dim() < -dim:
            raise_loop_error(f"{loop}: {path} has no dimension {dim} to scan over, found {describe_value(x)}")
    length = first.shape[dim]
    for path, x in xs_leaves[1:]:
        if x.shape[dim] != length:
            raise_loop_error(
                f"{loop}: every xs must have the same length along dim {dim}: {first_path} has "
                f"{length} ({describe_value(first)}), {path} has {x.shape[dim]} ({describe_value(x)})"
            )
    if length == 0:
        raise_loop_error(f"{loop}: xs are empty along dim {dim} ({first_path} is {describe_value(first)}); nothing to scan")

    paths = _tensor_paths("init", init) + _tensor_paths("xs", xs)

    def checked_combine(carry: Any, x: Any) -> Any:
        out = call_checked(loop, "combine_fn", paths, combine_fn, carry, x)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise_loop_error(
                f"{loop}: combine_fn must return a pair (next carry, y), found {_structure(out)}"
            )
        _check_same_carries(loop, "combine_fn", "init", out[0], carry)
        return _as_new_carries((out[0], _hide_none(out[1], xs_leaves[0][1].device)))

    carry, ys = _on_device(_run_scan, loop, checked_combine, trees.tree_map(_dense, init), xs, dim, reverse)
    return carry, _show_none(ys)


def scan_layers(layers: Iterable[torch.nn.Module], input_data: Any, *, name: str | None = None) -> Any:
    """``for layer in layers: input_data = layer(input_data)``, as one scan: torch_xla's
    `scan_layers` call, for layers of one structure (the decoder layers of a model).

    The first layer runs as a function of its parameters and buffers
    (`torch.func.functional_call`), scanned over every layer's parameters and buffers stacked
    along a new first dimension. So Dynamo traces one layer, once, whatever the depth, and
    the graph is one XLA While. The stacks are made from the layers' own tensors each call,
    so each layer's gradient lands in its own `.grad`, and optimizers see the model as it is.
    Each layer must have layers[0]'s parameters and buffers, by name, shape and dtype, and as
    many in each module that holds some (an error names the first layer and tensor that
    differ), and compute the same function of them (not checked, as in torch_xla). A layer
    may not update its buffers in place. A tuple `input_data` is the layers' arguments.
    """
    layers = list(layers)
    if not layers:
        return input_data
    loop = name or layers_loop_name(layers)
    owners = weight_owners(layers[0])
    check_layers(loop, layers, owners)
    return scan_stacked_layers(layers, input_data, owners, loop)


def layers_loop_name(layers: list[torch.nn.Module]) -> str:
    return f"scan_layers over {len(layers)} {type(layers[0]).__name__}"


def check_layers(loop: str, layers: list[torch.nn.Module], owners: list[tuple[str, list[str]]]) -> None:
    """That every layer has layers[0]'s parameters and buffers (see `scan_layers`). Under
    torch.compile, Dynamo does not trace this: a rule runs it on the real layers
    (`torch_xla_loops.install`), then traces `scan_stacked_layers`."""
    first = _layer_weights(loop, 0, layers[0], owners, None)
    for i, layer in enumerate(layers[1:], start=1):
        _layer_weights(loop, i, layer, owners, first)


def scan_stacked_layers(
    layers: Any, input_data: Any, owners: Sequence[tuple[str, Sequence[str]]], loop: str, weights: Sequence[Sequence[Any]] | None = None
) -> Any:
    """`scan_layers` once its layers are checked: each tensor of `owners` (by module path and
    name) stacked over the layers, and the scan. `weights`, when given, holds those tensors
    already, one list over the layers per name in `owners`' order (under Dynamo, a rule finds
    them on the real modules, `torch_xla_loops.install`); else they are read off the layers."""
    template = layers[0]
    names = [(prefix, own) for prefix, owned in owners for own in owned]
    if weights is None:
        weights = [[getattr(_at(layer, prefix.split(".") if prefix else []), own) for layer in layers] for prefix, own in names]
    stacked = {f"{prefix}.{own}" if prefix else own: stack_layers(list(per_layer)) for (prefix, own), per_layer in zip(names, weights)}

    def one_layer(h: Any, layer_weights: dict[str, torch.Tensor]) -> tuple[Any, None]:
        return _call_with_weights(template, owners, layer_weights, h), None

    out, _ = scan(one_layer, input_data, stacked, name=loop)
    return out


def _at(module: Any, path: Sequence[str]) -> Any:
    for part in path:
        module = getattr(module, part)
    return module


def weight_owners(layer: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """The modules in `layer` that hold parameters or buffers themselves: (path, their names)."""
    owners = []
    for prefix, module in layer.named_modules(remove_duplicate=False):
        own = _own_tensors(module)
        if own:
            owners.append((prefix, own))
    return owners


def _own_tensors(module: torch.nn.Module) -> list[str]:
    """The names of the parameters and buffers a module holds itself (not None: `bias=False`
    registers one as None)."""
    return [name for table in (module._parameters, module._buffers) for name, t in table.items() if t is not None]


def _layer_weights(
    loop: str, index: int, layer: torch.nn.Module, owners: list[tuple[str, list[str]]], like: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """A layer's parameters and buffers by their names in it, found at layers[0]'s paths
    (attribute reads: Dynamo traces a `named_parameters()` of every layer slowly, about
    50 ms a layer), checked against layers[0]'s (`like`)."""
    found = {}
    for prefix, names in owners:
        module = layer.get_submodule(prefix) if prefix else layer
        if like is not None and len(_own_tensors(module)) != len(names):
            raise_loop_error(
                f"{loop}: every layer must have layers[0]'s parameters and buffers; layers[{index}]"
                f"{'.' + prefix if prefix else ''} holds {len(_own_tensors(module))}, "
                f"layers[0]{'.' + prefix if prefix else ''} holds {len(names)} ({', '.join(names)})"
            )
        for own in names:
            key = f"{prefix}.{own}" if prefix else own
            tensor = getattr(module, own, None)
            want = None if like is None else like[key]
            if want is not None and (
                not isinstance(tensor, torch.Tensor) or tensor.shape != want.shape or tensor.dtype != want.dtype
            ):
                raise_loop_error(
                    f"{loop}: every layer must have layers[0]'s parameters and buffers; layers[{index}].{key} "
                    f"is {describe_value(tensor) if tensor is not None else 'missing'}, layers[0].{key} is {describe_value(want)}"
                )
            found[key] = tensor
    return found


def _call_with_weights(layer: torch.nn.Module, owners: list[tuple[str, list[str]]], weights: dict[str, torch.Tensor], h: Any) -> Any:
    """`layer(*h)` (h a tuple) or `layer(h)` with `weights` in place of its parameters and
    buffers: `torch.func.functional_call`, one module at a time. Dynamo traces functional_call
    inside a loop body only for a module holding its tensors itself: it allows the swap of
    that module's tensors, and refuses the swap of a submodule's as a side effect."""
    if not owners:
        return layer(*h) if isinstance(h, tuple) else layer(h)
    (prefix, names), rest = owners[0], owners[1:]
    module = layer.get_submodule(prefix) if prefix else layer
    swapped = {own: weights[f"{prefix}.{own}" if prefix else own] for own in names}
    with torch.nn.utils.stateless._reparametrize_module(module, swapped):
        return _call_with_weights(layer, rest, weights, h)


def cond(
    pred: bool | torch.Tensor,
    true_fn: Callable[..., Any],
    false_fn: Callable[..., Any],
    operands: Sequence[Any] = (),
    *,
    name: str | None = None,
) -> Any:
    """``true_fn(*operands) if pred else false_fn(*operands)``, the branch chosen on the device.

    `pred` is a bool or a one-element tensor; both branches must return the same structure,
    shapes and dtypes. Under xla_loop it is one XLA Conditional: the predicate is never
    read back, and either branch runs from the same executable. A branch may return its
    operands or tensors it captured (outputs are copied: torch's cond rejects aliasing).
    """
    label = _loop_label("cond", name, true_fn)
    if not isinstance(operands, (tuple, list)):
        raise_loop_error(f"{label}: operands must be a tuple or list, found {describe_value(operands)}")
    _check_leaves(label, "operand", "operands", tuple(operands), allow_ints=True)
    paths = _tensor_paths("operands", tuple(operands))

    def branch(fn: Callable[..., Any], fn_name: str) -> Callable[..., Any]:
        def checked(*args: Any) -> Any:
            return _as_new_carries(call_checked(label, fn_name, paths, fn, *args))

        return checked

    if isinstance(pred, torch.Tensor) and pred.device.type != "xla" and _on_xla(operands):
        pred = pred.to(next(t.device for t in pytree.tree_leaves(operands) if isinstance(t, torch.Tensor)))
    return _on_device(_run_cond, label, pred, branch(true_fn, "true_fn"), branch(false_fn, "false_fn"), tuple(operands))


def fori_loop(
    lower: int | torch.Tensor,
    upper: int | torch.Tensor,
    body_fn: Callable[[torch.Tensor, Any], Any],
    init: Carries,
    *,
    name: str | None = None,
) -> Any:
    """``carry = init; for i in range(lower, upper): carry = body_fn(i, carry)`` (JAX's meaning).

    `i` reaches the body as a 0-dim int64 tensor. The carry is a pytree of tensors (Python
    numbers in it become tensors); the body must keep its structure, shapes and dtypes.
    With Python int bounds the trip count is static: the loop is a scan over the indices,
    and XLA knows how often it runs. Tensor (or symbolic) bounds give a while_loop.
    """
    loop = _loop_label("fori_loop", name, body_fn)
    init = _numbers_to_tensors(init)
    _check_leaves(loop, "carry", "init", init, allow_ints=False)
    leaves, spec = pytree.tree_flatten(pytree.tree_map(_dense, init))
    device = leaves[0].device if leaves else None
    paths = ["the loop index"] + _tensor_paths("init", init)

    def step(i: torch.Tensor, carry_leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        carry = pytree.tree_unflatten(list(carry_leaves), spec)
        new = call_checked(loop, "body_fn", paths, body_fn, i, carry)
        _check_same_carries(loop, "body_fn", "init", new, carry)
        return pytree.tree_leaves(_as_new_carries(new))

    static = all(isinstance(b, int) and not isinstance(b, bool) for b in (lower, upper))
    if static:
        if upper <= lower or not leaves:
            return init
        final = _on_device(_run_static_fori, loop, step, lower, upper, leaves)
    else:
        for what, bound in (("lower", lower), ("upper", upper)):
            if isinstance(bound, torch.Tensor) and (bound.numel() != 1 or bound.is_floating_point() or bound.is_complex()):
                raise_loop_error(
                    f"{loop}: {what} bound must be an int or an integer tensor with one element, found {describe_value(bound)}"
                )
        final = _on_device(_run_dynamic_fori, loop, step, lower, upper, leaves, device)
    return pytree.tree_unflatten(list(final), spec)


# The loop bodies below are what runs (eagerly, or traced by Dynamo); the functions above
# only check and route.


# Each marks the loop it traces (`tracing_loop`), so an error Dynamo raises inside names it.


def _run_while_loop(loop: str, cond_fn: Callable, body_fn: Callable, carried_inputs: tuple) -> Any:
    tracing_loop(loop)
    out = _fresh(_while(cond_fn, body_fn, carried_inputs))
    traced_loop(loop)
    return out


def _while(cond_fn: Callable, body_fn: Callable, carried_inputs: tuple) -> Any:
    """torch's while_loop. Under Dynamo, with carries that are a flat tuple of tensors and
    numbers, its op directly: that is what torch's `while_loop` calls there, after flattening
    the carries with pytree and wrapping cond and body to unflatten them again, which for
    flat carries changes nothing and which Dynamo would trace into every loop program
    (`trees.py`)."""
    if torch.compiler.is_dynamo_compiling() and trees.is_flat(carried_inputs):
        return _while_loop_op(cond_fn, body_fn, tuple(carried_inputs), ())
    return _torch_while_loop(cond_fn, body_fn, carried_inputs)


def _run_cond(loop: str, pred: Any, true_fn: Callable, false_fn: Callable, operands: tuple) -> Any:
    tracing_loop(loop)
    out = _torch_cond(pred, true_fn, false_fn, operands)
    traced_loop(loop)
    return out


def _run_scan(loop: str, combine_fn: Callable, init: Any, xs: Any, dim: int, reverse: bool) -> Any:
    tracing_loop(loop)
    out = _torch_scan(combine_fn, init, xs, dim=dim, reverse=reverse)
    traced_loop(loop)
    return out


def _run_static_fori(loop: str, step: Callable, lower: int, upper: int, leaves: list[torch.Tensor]) -> Any:
    tracing_loop(loop)
    indices = torch.arange(lower, upper, dtype=torch.int64, device=leaves[0].device)
    final, _ = _torch_scan(lambda carry, i: (step(i, carry), ()), leaves, indices)
    traced_loop(loop)
    return final


def _run_dynamic_fori(loop: str, step: Callable, lower: Any, upper: Any, leaves: list[torch.Tensor], device: Any) -> Any:
    tracing_loop(loop)
    lower = _index_tensor(lower, device)
    upper = _index_tensor(upper, device)

    def body(i: torch.Tensor, *carry: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (i + 1, *step(i, carry))

    _, *final = _fresh(_while(lambda i, *carry: i < upper, body, (lower, *leaves)))
    traced_loop(loop)
    return final


def _fresh(results: Any) -> Any:
    """A while_loop's results as new tensors. When Dynamo traces a loop that autograd may
    differentiate, torch 2.9 gives its results the strides and offset of a row of a stack
    whose length is data (`while_loop_stack_output`): code after the loop that needs plain
    sizes (`LayerNorm`: "Cannot call numel() on tensor with symbolic sizes/strides") or a
    second loop that captures them ("Source of '3*u0 - 3' is None") then fails to trace. A
    copy has plain strides, and costs nothing in the XLA program."""
    return trees.tree_map(lambda r: r.clone() if isinstance(r, torch.Tensor) else r, results)


def _index_tensor(bound: Any, device: Any) -> torch.Tensor:
    if isinstance(bound, torch.Tensor):  # 0-dim, or one element (torch_xla's fori_loop tests pass those)
        return bound.reshape(()).to(dtype=torch.int64, device=device).clone()
    return torch.full((), bound, dtype=torch.int64, device=device)


def _on_device(run: Callable[..., Any], *args: Any) -> Any:
    """Run `run(*args)`; outside torch.compile on XLA tensors, compile it with xla_loop first.

    The compiled function gets a code object of its own, so Dynamo's cache for it (it
    holds this call's closures) dies with the call instead of piling up. Outside
    torch.compile, a LoopLoweringError comes out as itself, not wrapped by Dynamo.
    """
    if torch.compiler.is_compiling():
        return run(*args)
    if not _on_xla(args):
        return raising_loop_errors(run)(*args)
    from .backend import xla_loop

    code = run.__code__.replace()
    fresh = types.FunctionType(code, run.__globals__, run.__name__, run.__defaults__, run.__closure__)
    return raising_loop_errors(torch.compile(fresh, backend=xla_loop, fullgraph=True))(*args)


def _on_xla(tree: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "xla" for t in trees.tree_leaves(tree))


def _loop_label(kind: str, name: str | None, fn: Callable) -> str:
    """`fori_loop 'euler_step' (sampler.py:12)`: the loop's kind, name and where its body is
    (under torch.compile Dynamo appends the user's stack to errors instead)."""
    # (Dynamo reports a nested function's __name__ as its qualified name: keep the last part.)
    label = f"{kind} {name or getattr(fn, '__name__', type(fn).__name__).rsplit('.', 1)[-1]!r}"
    code = getattr(fn, "__code__", None)
    if code is not None and not torch.compiler.is_compiling():
        label += f" ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})"
    return label


def _numbers_to_tensors(tree: Any) -> Any:
    """JAX-style: Python numbers in a carry become tensors (on the carry's device)."""
    tensors = [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else None

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, (bool, int, float)):
            return torch.tensor(leaf, device=device)
        return leaf

    return pytree.tree_map(convert, tree)


def _tensor_paths(root: str, tree: Any) -> list[str]:
    return [path for path, leaf in _leaves_with_paths(root, tree) if isinstance(leaf, torch.Tensor)]


def _leaves_with_paths(root: str, tree: Any) -> list[tuple[str, Any]]:
    return trees.leaves_with_paths(root, tree)


def _check_leaves(loop: str, what: str, root: str, tree: Any, *, allow_ints: bool) -> None:
    expected = "a tensor or a Python int" if allow_ints else "a tensor"
    for path, leaf in _leaves_with_paths(root, tree):
        ok = isinstance(leaf, torch.Tensor) or (
            allow_ints and isinstance(leaf, (int, torch.SymInt)) and not isinstance(leaf, bool)
        )
        if not ok:
            raise_loop_error(f"{loop}: {what} {path} must be {expected}, found {describe_value(leaf)} ({leaf!r})")


def _check_same_carries(loop: str, fn_name: str, root: str, found: Any, expected: Any) -> None:
    """What a body returns must match the carries it took: structure, shapes, dtypes.

    `expected` is what the body received (not the loop's inputs: a body that closed over
    those would capture them as extra loop inputs)."""
    if not trees.same_structure(found, expected):
        raise_loop_error(
            f"{loop}: {fn_name} must return carries structured like {root}: expected "
            f"{_structure(expected)}, found {_structure(found)}"
        )
    for (path, want), got in zip(_leaves_with_paths(root, expected), trees.tree_leaves(found)):
        if isinstance(want, torch.Tensor):
            if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
                raise_loop_error(
                    f"{loop}: {fn_name} changes carry {path}: expected {describe_value(want)} "
                    f"(as passed in), found {describe_value(got)}"
                )
        elif isinstance(got, torch.Tensor):
            raise_loop_error(
                f"{loop}: {fn_name} changes carry {path}: expected a Python int (as passed in), "
                f"found {describe_value(got)}"
            )


def _as_new_carries(outputs: Any) -> Any:
    """What a body returns, as torch's loop ops take it: new dense tensors. They reject an
    output that aliases an input (a carry returned as it is, a view of one, a tensor the
    body captured from its closure, one tensor returned twice) and other strides than the
    carry's (an `expand`, a transpose). Every output is therefore copied: a dense copy of
    a tensor is no op at all in the XLA program (XLA tensors have no strides or aliases)."""
    return trees.tree_map(
        lambda value: value.clone(memory_format=torch.contiguous_format) if isinstance(value, torch.Tensor) else value,
        outputs,
    )


# A y that is None, or a None inside y (torch_xla's scan and scan_layers return None for ys
# they do not need): torch's scan takes None for a pytree leaf and fails on it, and a loop
# body traced by Dynamo cannot tell the code after the loop where its Nones were. So each
# None travels as an empty marker tensor (float32, shape (0, 0, 0, 0, 0): no data, nothing
# in the XLA program; floating, as torch's scan autograd fails on other ys) and its stacked
# form comes back as None.
_NONE_MARKER_SHAPE = (0, 0, 0, 0, 0)


def _hide_none(y: Any, device: Any) -> Any:
    return pytree.tree_map(lambda leaf: torch.zeros(_NONE_MARKER_SHAPE, dtype=torch.float32, device=device) if leaf is None else leaf, y)


def _show_none(ys: Any) -> Any:
    def marker(leaf: Any) -> bool:
        return isinstance(leaf, torch.Tensor) and leaf.dtype == torch.float32 and tuple(leaf.shape[1:]) == _NONE_MARKER_SHAPE

    return pytree.tree_map(lambda leaf: None if marker(leaf) else leaf, ys)


def _dense(value: Any) -> Any:
    return value.contiguous() if isinstance(value, torch.Tensor) and not value.is_contiguous() else value


def _structure(tree: Any) -> str:
    """A pytree with each leaf shown as its type, e.g. `{h: float32[3], n: int}`."""
    return repr(pytree.tree_map(describe_value, tree)).replace("'", "")
