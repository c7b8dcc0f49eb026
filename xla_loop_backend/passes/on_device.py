"""After AOTAutograd: every tensor the graph makes on the CPU is made on the XLA device.

Users make counters and constants without `device=` (`torch.zeros((), dtype=torch.int64)`,
`torch.tensor(2.0)`): 0-dim CPU tensors, which eager PyTorch lets ops mix with XLA tensors.
Dynamo bakes them into the graph (a factory op with `device=cpu`, a tensor constant), at top
level and inside loop bodies and branches. Left on the CPU they would split the graph around
them, or stand in a loop's state on the wrong device. This pass moves them, in every graph
and subgraph:

- a factory op (`zeros`, `full`, `arange`, `scalar_tensor`, `empty`, random ones, ...) and a
  copy (`_to_copy`) that name the CPU make their tensor on the device instead;
- a tensor constant (a `get_attr` of a CPU tensor) becomes the same values on the device
  (uploaded once, now).

Everything then lowers, trains and reports like device tensors. The graph's meta data keeps
eager's devices, so what leaves xla_loop still lands where eager PyTorch puts it: a result
the user gets on the CPU (`pipeline.OnEagerDevices`), a gradient of a CPU tensor
(`call.GraphCall`). Eager's device rules need no check here: Dynamo traced the program with
them (fake tensors refuse a CPU tensor of more than 0 dims mixed with XLA ones, as eager
does), before any of this.
"""
from __future__ import annotations

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..traversal import NodeRewrite


def _xla_device() -> torch.device:
    import torch_xla

    return torch_xla.device()


def _is_cpu(device: object) -> bool:
    return device is not None and torch.device(device).type == "cpu"  # type: ignore[arg-type]


def _factories_on_device(graph: torch.fx.Graph) -> bool:
    changed = False
    for node in graph.nodes:
        if node.op == "call_function" and _is_cpu(node.kwargs.get("device")):
            node.kwargs = {**node.kwargs, "device": _xla_device()}
            changed = True
    return changed


def _constants_on_device(graph: torch.fx.Graph) -> bool:
    module = graph.owning_module
    changed = False
    for node in graph.nodes:
        if node.op != "get_attr" or module is None:
            continue
        value = getattr(module, node.target, None)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.device.type == "cpu":
            with unset_fake_temporarily():  # (AOTAutograd compiles under its fake mode: this is a real upload)
                _set_attr(module, node.target, value.to(_xla_device()))
            changed = True
    return changed


def _set_attr(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    *path, name = target.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    if name in getattr(owner, "_buffers", {}):
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


PASS = NodeRewrite(
    "on_device",
    "makes on the XLA device the tensors the graph makes on the CPU",
    (_factories_on_device, _constants_on_device),
)
