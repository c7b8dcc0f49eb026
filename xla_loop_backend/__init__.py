"""xla_loop: torch.compile loops that compile once and run entirely on the XLA device.

    torch.compile(model, backend="xla_loop")     # no import needed (entry point)
    @xla_loop_backend.compile                     # the same, as a decorator

while_loop, scan (and torch's map) lower to one XLA While each, cond to one XLA
Conditional; each graph is one executable xla_loop compiles and calls itself. `while_loop`,
`scan`, `fori_loop` and `cond` here are torch's ops with errors that name the loop and the
carry, and they run on the device (one While, one Conditional) even when called outside
torch.compile on XLA tensors.
"""
from __future__ import annotations

import xla_loop_cpu_defaults

from ._device import select_default_device

select_default_device()
xla_loop_cpu_defaults.apply()  # (before torch_xla starts its client; see that module)

from .api import cond, fori_loop, scan, scan_layers, while_loop  # noqa: E402
from .backend import compile, compile_graph, xla_loop  # noqa: E402
from .explain import Report, explain  # noqa: E402
from .fallback import LoopFallbackWarning  # noqa: E402
from .sharding import with_sharding_constraint  # noqa: E402
from .errors import LoopLoweringError  # noqa: E402

__all__ = [
    "compile",
    "cond",
    "compile_graph",
    "explain",
    "fori_loop",
    "scan",
    "scan_layers",
    "while_loop",
    "with_sharding_constraint",
    "xla_loop",
    "LoopFallbackWarning",
    "LoopLoweringError",
    "Report",
]
