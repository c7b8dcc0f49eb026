"""Look at what xla_loop builds: the HLO of each graph, for tests and for curious users."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from functorch.compile import make_boxed_func

from . import pipeline
from .lowering.driver import lower_loops
from .options import Options


def lowered_hlo(fn: Callable[..., Any], *args: Any, options: dict[str, Any] | None = None, **compile_options: Any) -> list[str]:
    """HLO text of every graph that `torch.compile(fn, backend="xla_loop")` would run for
    `args` (one string per forward graph), e.g. to check that a loop became one `while`.
    The graph goes through the same pipeline as in the backend, then is run once."""
    import torch_xla

    texts: list[str] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        for graph_pass in pipeline.AFTER_AUTOGRAD:
            graph_pass.run(gm)
        lowered = lower_loops(gm)

        def run(*graph_args: Any) -> Any:
            outputs = lowered.module(*graph_args)
            tensors = [o for o in pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor)]
            texts.append(torch_xla._XLAC._get_xla_tensors_hlo(tensors))
            return outputs

        return make_boxed_func(run)

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        return pipeline.compile(gm, example_inputs, Options.parse(options), graph_compiler=capture)

    torch.compile(fn, backend=backend, **compile_options)(*args)
    torch_xla.sync()
    return texts
