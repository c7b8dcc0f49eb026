"""Look at what xla_loop builds: the HLO of each graph, for tests and for curious users."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from .rewrite import lower_loops


def lowered_hlo(fn: Callable[..., Any], *args: Any, **compile_options: Any) -> list[str]:
    """HLO text of every graph that `torch.compile(fn, backend="xla_loop")` would run for
    `args` (one string per graph), e.g. to check that a loop became one `while`."""
    import torch_xla

    texts: list[str] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        lowered = lower_loops(gm)

        def run(*graph_args: Any) -> Any:
            outputs = lowered.module(*graph_args)
            tensors = [o for o in pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor)]
            texts.append(torch_xla._XLAC._get_xla_tensors_hlo(tensors))
            return outputs

        return make_boxed_func(run)

    torch.compile(fn, backend=aot_autograd(fw_compiler=capture), **compile_options)(*args)
    torch_xla.sync()
    return texts
