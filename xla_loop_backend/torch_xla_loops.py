"""torch_xla's loop APIs under xla_loop: `scan`, `scan_layers` and `fori_loop` from
`torch_xla.experimental` lower like xla_loop's own loops.

Why: torch_xla documents them as its way to compile a deep model once, and its examples use
`scan_layers` over a decoder's layers. Each builds its loop eagerly, tracing the body with
AOTAutograd on lazy tensors. Inside a graph Dynamo traces that cannot work (torch 2.9:
"isFunctionalTensor(t) INTERNAL ASSERT FAILED" when the graph runs; torch_xla's `openxla`
backend fails too), so a torch_xla user had to choose between torch.compile and the scan code
they already have. The loop they describe is the one xla_loop lowers.

How: a Dynamo rule (pipeline.DYNAMO_RULES). When Dynamo traces a call of one of them, it
traces xla_loop's equivalent in its place, same arguments, same results:
- `scan(fn, init, xs, partition_fn, is_fn_pure)`: `xla_loop_backend.scan(fn, init, xs)`;
- `scan_layers(layers, input_data, partition_fn, is_layer_pure)`: `xla_loop_backend.scan_layers`
  (api.py: one layer traced once, over the layers' stacked parameters);
- `fori_loop(lower, upper, body_fun, *values)`: a while_loop running `body_fun(*values)`
  `upper - lower` times, returning `[0, *values]` as torch_xla's does (its counter counts
  down to 0).
Their options: `partition_fn` decides what the backward stores; `default_partition` (store
what the backward needs) is xla_loop's own behaviour, and anything else is refused with an
error that names the compile option that does it (`remat`). `is_fn_pure`/`is_layer_pure`
let torch_xla reuse a traced body between calls; Dynamo traces a body once per compile
anyway, so they change nothing here and are accepted.

The same rule serves xla_loop's own `scan_layers`: when its layers are modules Dynamo knows
(a ModuleList, a Sequential, a list of modules), the check that each has the first one's
tensors runs here, on the real modules, and Dynamo traces only the stacking and the scan
(`api.scan_stacked_layers`): traced, the check read each module's tables of parameters and
buffers, and Dynamo guarded on each, about 30 ms a layer.

torch_xla's `while_loop` is torch's while_loop op (torch_xla registers an eager XLA kernel for
it); Dynamo captures it as torch's op, which xla_loop lowers, so it needs no rule. Called
outside torch.compile, all of them run torch_xla's own code.

The functions are found in `sys.modules`, never imported here: importing
`torch_xla.experimental.fori_loop` registers that eager kernel, which gives wrong results.
torch takes one such registration per op, and xla_loop makes one (a warning that a
while_loop runs as a host loop, fallback.py): so that a user's import of that module after
xla_loop's works, xla_loop's steps aside just before it (an import hook, `_GiveWay`).
"""
from __future__ import annotations

import importlib.abc
import sys
from typing import Any, Callable

from .errors import raise_loop_error


def _default_partition() -> Any:
    from functorch.compile import default_partition

    return default_partition


def _name(partition_fn: Any) -> str:
    from functorch.compile import min_cut_rematerialization_partition

    return "min_cut_rematerialization_partition" if partition_fn is min_cut_rematerialization_partition else "a partition function of your own"


def _check_partition(api: str, partition_fn: Any) -> None:
    if partition_fn is not None and partition_fn is not _default_partition():
        raise_loop_error(
            f"torch_xla's {api}: partition_fn={_name(partition_fn)} is not supported "
            "under xla_loop, which decides what a loop's backward stores itself: it stores what the backward "
            "needs (default_partition), or, with xla_loop_backend.compile(remat=True) (or remat=k), recomputes "
            "segments of the loop in the backward. Drop partition_fn, or set remat."
        )


def scan(fn: Callable, init: Any, xs: Any, partition_fn: Any = None, is_fn_pure: bool = False) -> Any:
    """torch_xla.experimental.scan.scan, traced by Dynamo under xla_loop."""
    from .api import scan as xla_loop_scan

    _check_partition("scan", partition_fn)
    return xla_loop_scan(fn, init, xs)


def scan_layers(layers: Any, input_data: Any, partition_fn: Any = None, is_layer_pure: bool = False) -> Any:
    """torch_xla.experimental.scan_layers.scan_layers, traced by Dynamo under xla_loop."""
    from .api import scan_layers as xla_loop_scan_layers

    _check_partition("scan_layers", partition_fn)
    return xla_loop_scan_layers(layers, input_data)


def fori_loop(lower: Any, upper: Any, body_fun: Callable, *values: Any) -> Any:
    """torch_xla.experimental.fori_loop.fori_loop, traced by Dynamo under xla_loop."""
    import torch

    from .api import while_loop

    count = upper - lower
    if not isinstance(count, torch.Tensor):
        count = torch.tensor(count, dtype=torch.int64, device=values[0].device)

    def body(i: Any, *carried: Any) -> tuple:
        out = body_fun(*carried)
        return (i - 1, *(out if isinstance(out, (tuple, list)) else (out,)))

    return list(while_loop(lambda i, *carried: i > 0, body, (count, *values)))


# (module, name) -> what Dynamo traces in its place.
STAND_INS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch_xla.experimental.scan", "scan"): scan,
    ("torch_xla.experimental.scan_layers", "scan_layers"): scan_layers,
    ("torch_xla.experimental.fori_loop", "fori_loop"): fori_loop,
}


def stand_in(fn: Any) -> Callable[..., Any] | None:
    """xla_loop's equivalent of `fn`, if `fn` is one of torch_xla's loop functions."""
    for (module, name), ours in STAND_INS.items():
        loaded = sys.modules.get(module)
        if loaded is not None and getattr(loaded, name, None) is fn:
            return ours
    return None


def _api_scan_layers() -> Any:
    from .api import scan_layers as xla_loop_scan_layers

    return xla_loop_scan_layers


def _checked_layers(tx: Any, args: list, kwargs: dict) -> tuple[Callable[..., Any], list] | None:
    """`xla_loop_backend.scan_layers(layers, input_data, name=...)` under Dynamo, when its
    layers are modules Dynamo knows (a ModuleList, a Sequential, a list of modules): the
    layers' structure is checked here, on the real modules, and Dynamo traces only
    `api.scan_stacked_layers` (one stack a tensor name, and the scan). Traced, the
    check read each module's tables of parameters and buffers, and Dynamo guarded on each:
    about 30 ms a layer. The layers' tensors are handed to it found here too, each with the
    source Dynamo gives it (`_layer_tensors`): traced, each attribute read on the way to a
    tensor cost Dynamo about 3 ms. Returns (function, arguments) to trace, or None to trace
    `scan_layers` as it is."""
    from torch._dynamo.variables import ConstantVariable

    from .api import check_layers, layers_loop_name, scan_stacked_layers, weight_owners

    if len(args) != 2 or set(kwargs) - {"name"}:
        return None
    name = kwargs.get("name")
    if name is not None and not name.is_python_constant():
        return None
    found = _modules_of(args[0])
    if not found:
        return None
    layers, sources = found
    loop = (name.as_python_constant() if name is not None else None) or layers_loop_name(layers)
    owners = weight_owners(layers[0])
    check_layers(loop, layers, owners)
    constant = ConstantVariable.create
    owned = tuple((prefix, tuple(names)) for prefix, names in owners)
    weights = _layer_tensors(tx, layers, sources, owners)
    return scan_stacked_layers, [args[0], args[1], constant(owned), constant(loop), *([weights] if weights else [])]


def _layer_tensors(tx: Any, layers: list[Any], sources: list[Any], owners: list[tuple[str, list[str]]]) -> Any:
    """Dynamo's variables of each layer's tensors named in `owners`, one list over the layers
    per name, each with the source of its module's table entry
    (`layers[i]._modules[...]._parameters[name]`, as Dynamo names it); None when a layer has
    no source."""
    from torch._dynamo.source import AttrSource, DictGetItemSource
    from torch._dynamo.variables.builder import VariableBuilder
    from torch._dynamo.variables.lists import ListVariable

    if any(source is None for source in sources):
        return None
    per_name = []
    for prefix, names in owners:
        owners_of = []
        for layer, source in zip(layers, sources):
            module = layer
            for part in prefix.split(".") if prefix else []:
                module, source = module._modules[part], DictGetItemSource(AttrSource(source, "_modules"), part)
            owners_of.append((module, source))
        for own in names:
            items = []
            for module, source in owners_of:
                table = "_parameters" if own in module._parameters else "_buffers"
                value = getattr(module, table)[own]
                items.append(VariableBuilder(tx, DictGetItemSource(AttrSource(source, table), own))(value))
            per_name.append(ListVariable(items))
    return ListVariable(per_name)


def _modules_of(variable: Any) -> tuple[list[Any], list[Any]] | None:
    """The modules a Dynamo variable holds, a ModuleList's or Sequential's, or a list's or
    tuple's of modules, and the source of each (None where Dynamo has none); else None."""
    import torch
    from torch._dynamo.variables.lists import BaseListVariable
    from torch._dynamo.variables.nn_module import NNModuleVariable, UnspecializedNNModuleVariable

    def module(v: Any) -> Any:
        v = v.realize() if hasattr(v, "realize") else v
        value = getattr(v, "value", None)
        return value if isinstance(v, (NNModuleVariable, UnspecializedNNModuleVariable)) and isinstance(value, torch.nn.Module) else None

    from torch._dynamo.source import AttrSource, DictGetItemSource

    variable = variable.realize() if hasattr(variable, "realize") else variable
    container = module(variable)
    if isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)):
        source = variable.source
        keys = list(container._modules)
        sources = [DictGetItemSource(AttrSource(source, "_modules"), key) if source is not None else None for key in keys]
        return list(container._modules.values()), sources
    if isinstance(variable, BaseListVariable):
        found = [module(item) for item in variable.items]
        return (found, [item.source for item in variable.items]) if all(m is not None for m in found) else None
    return None


class _GiveWay(importlib.abc.MetaPathFinder):
    """Before torch_xla.experimental.fori_loop is imported, xla_loop's eager kernel for
    torch's while_loop op steps aside (the module docstring says why); finds nothing itself."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "torch_xla.experimental.fori_loop":
            from .fallback import remove_eager_while_loop_kernel

            remove_eager_while_loop_kernel()
        return None


def install() -> None:
    """Teach Dynamo to trace the stand-ins above in place of torch_xla's loop functions."""
    from torch._dynamo.variables.functions import UserFunctionVariable

    if not any(isinstance(finder, _GiveWay) for finder in sys.meta_path):
        sys.meta_path.insert(0, _GiveWay())

    if getattr(UserFunctionVariable.call_function, "_xla_loop_stand_ins", False):
        return
    original = UserFunctionVariable.call_function

    def call_function(self: Any, tx: Any, args: list, kwargs: dict) -> Any:
        ours = stand_in(self.fn)
        if ours is not None:
            return original(UserFunctionVariable(ours), tx, args, kwargs)
        if self.fn is _api_scan_layers():
            checked = _checked_layers(tx, args, kwargs)
            if checked is not None:
                return original(UserFunctionVariable(checked[0]), tx, checked[1], {})
        return original(self, tx, args, kwargs)

    call_function._xla_loop_stand_ins = True  # type: ignore[attr-defined]
    UserFunctionVariable.call_function = call_function  # type: ignore[method-assign]
