"""xla_loop: torch.compile loops that compile once and run entirely on the XLA device.

    torch.compile(model, backend="xla_loop")     # no import needed (entry point)
    @xla_loop_backend.compile                     # the same, as a decorator

while_loop (and, as they land, scan and what autograd makes of them) lower to one XLA
While; the rest of the graph goes through torch_xla's openxla bridge.
"""
from __future__ import annotations

from ._device import select_default_device

select_default_device()

from .api import while_loop  # noqa: E402
from .backend import compile_graph, xla_loop  # noqa: E402
from .fallback import LoopFallbackWarning  # noqa: E402
from .errors import LoopLoweringError  # noqa: E402

__all__ = ["xla_loop", "compile_graph", "while_loop", "LoopLoweringError", "LoopFallbackWarning"]
