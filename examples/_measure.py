"""What the examples print: each result next to eager PyTorch on CPU, and what torch_xla did
during a call (XLA compiles, host syncs)."""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
import torch_xla
import torch_xla.debug.metrics as met

from xla_loop_backend.metrics import device_counts


def counts() -> tuple[int, int]:
    """(XLA compiles, host syncs) since the last `met.clear_all()`; a host sync is a scalar
    read or a device-to-host transfer."""
    c = device_counts()
    return c["compiles"], c["host_syncs"] + c["transfers_from_device"]


def call_measured(fn: Callable[..., Any], *args: Any) -> tuple[Any, int, int]:
    """Run fn(*args) on the device; return (result on CPU, compiles, host syncs of the call)."""
    torch_xla.sync()  # inputs on the device before we start counting
    met.clear_all()
    result = fn(*args)
    torch_xla.sync()
    compiles, syncs = counts()
    return pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, result), compiles, syncs


def to_xla(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.to(torch_xla.device()) if isinstance(t, torch.Tensor) else t, tree)


def report_match(
    what: str,
    got: torch.Tensor,
    expected: torch.Tensor,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    against: str = "eager CPU",
) -> None:
    """Print how close the xla_loop result is to the reference; exit non-zero if not close."""
    got, expected = got.cpu(), expected.cpu()
    if got.is_floating_point():
        diff = (got - expected).abs().max().item()
        close = torch.allclose(got, expected, rtol=rtol, atol=atol)
        print(f"  {what}: max |xla_loop - {against}| = {diff:.1e} ({'matches' if close else 'DIFFERS'})")
    else:
        close = torch.equal(got, expected)
        print(f"  {what}: {'identical to' if close else 'DIFFERS from'} {against}")
    if not close:
        sys.exit(f"{what}: xla_loop result differs from {against}")


def report_counts(what: str, compiles: int, syncs: int) -> None:
    print(f"  {what}: {compiles} XLA compile(s), {syncs} host sync(s)")
