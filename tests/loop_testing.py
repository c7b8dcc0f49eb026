"""Shared helpers for the tests: run a program eagerly on CPU and compiled with xla_loop on
the XLA device, compare, and count what torch_xla did (compiles, host transfers)."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
import torch_xla

from xla_loop_backend.metrics import device_counts


def xla_device() -> torch.device:
    return torch_xla.device()


def to_device(tree: Any, device: torch.device | str) -> Any:
    """Move every tensor of a pytree to `device`; non-tensors stay as they are."""
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def _prepare(fn: Callable, device: torch.device | str) -> Callable:
    if isinstance(fn, torch.nn.Module):
        return copy.deepcopy(fn).to(device)
    return fn


class Closure(torch.nn.Module):
    """A loop function with captured tensors, registered as buffers so they move with the
    module to each device: `Closure(fn, w=...)(*args)` calls `fn(module, *args)`."""

    def __init__(self, fn: Callable, **tensors: torch.Tensor):
        super().__init__()
        self.fn = fn
        for name, t in tensors.items():
            self.register_buffer(name, t)

    def forward(self, *args: Any) -> Any:
        return self.fn(self, *args)


def assert_same(actual: Any, expected: Any, rtol: float | None = None, atol: float | None = None) -> None:
    """Compare pytrees leaf by leaf: tensors on CPU with torch.testing, Python scalars exactly
    (same type too: an int carry must come back as an int, not a tensor)."""
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    assert a_spec == e_spec, f"structure differs: {a_spec} vs {e_spec}"
    for a, e in zip(a_leaves, e_leaves):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"expected a tensor, got {type(a).__name__}: {a!r}"
            assert a.dtype == e.dtype, f"dtype {a.dtype} vs {e.dtype}"
            torch.testing.assert_close(a.cpu(), e, rtol=rtol, atol=atol, equal_nan=True)
        else:
            assert type(a) is type(e), f"expected {type(e).__name__} {e!r}, got {type(a).__name__} {a!r}"
            assert a == e, f"{a!r} != {e!r}"


def check_against_eager(
    fn: Callable,
    *args: Any,
    dynamic: bool | None = None,
    fullgraph: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
) -> tuple[Any, Any]:
    """Run `fn(*args)` eagerly on CPU and compiled with backend="xla_loop" on the XLA device;
    assert the results match. `fn` may be an nn.Module (copied to each device). Returns
    (compiled result on CPU, eager result)."""
    eager_fn = _prepare(fn, "cpu")
    expected = eager_fn(*to_device(copy.deepcopy(args), "cpu"))
    device = xla_device()
    compiled = torch.compile(_prepare(fn, device), backend="xla_loop", fullgraph=fullgraph, dynamic=dynamic)
    actual = to_device(compiled(*to_device(copy.deepcopy(args), device)), "cpu")
    assert_same(actual, expected, rtol=rtol, atol=atol)
    return actual, expected


def dynamo_graph(fn: Callable, *args: Any) -> torch.fx.GraphModule:
    """The graph Dynamo hands a backend for `fn(*args)` (fullgraph), before AOTAutograd."""
    graphs = []

    def keep(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=keep, fullgraph=True)(*args)
    (gm,) = graphs
    return gm


def fuzz_settings(examples: int, seed_value: str | None) -> Callable:
    """hypothesis settings of a fuzz test: `examples` programs, the same ones every run
    (derandomized) unless a seed draws new ones; no deadline (each program compiles)."""
    from hypothesis import HealthCheck, seed, settings

    def apply(test: Callable) -> Callable:
        test = settings(
            max_examples=examples,
            derandomize=seed_value is None,
            database=None,
            deadline=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )(test)
        return seed(int(seed_value))(test) if seed_value is not None else test

    return apply


@contextlib.contextmanager
def graphs_as_lowered() -> Iterator[list[torch.fx.GraphModule]]:
    """Within: each graph the lowering driver gets (forward, then backward once it runs),
    after the passes, copied before the driver lowers its loops in place."""
    from unittest import mock

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from xla_loop_backend import pipeline

    graphs: list[torch.fx.GraphModule] = []
    lower = pipeline.lower_loops

    def keep(gm: torch.fx.GraphModule) -> Any:
        with unset_fake_temporarily():  # (AOTAutograd compiles under its fake mode)
            graphs.append(copy.deepcopy(gm))
        return lower(gm)

    with mock.patch.object(pipeline, "lower_loops", keep):
        yield graphs


def fullgraph(program_seed: int) -> bool:
    """Whether a fuzzed program compiles with fullgraph=True: every other one, by its seed.
    Users get fullgraph=False by default, a path of its own (the graph kept for an eager
    fallback, unlowerable loops warned about instead of refused): a fuzzer always on
    fullgraph=True never ran it."""
    return program_seed % 2 == 0


class MetricsDelta:
    """What torch_xla did between entering and leaving the block (`metrics.device_counts`):
    .compiles, .executions, .host_syncs (`aten::_local_scalar_dense`), .transfers_from_device."""

    def __enter__(self) -> "MetricsDelta":
        torch_xla._XLAC._xla_wait_device_ops([])  # what ran before lands before the start
        self._start = self._read()
        return self

    def __exit__(self, *exc: Any) -> None:
        torch_xla._XLAC._xla_wait_device_ops([])  # execution metrics land when it finishes
        end = self._read()
        for key, value in end.items():
            setattr(self, key, value - self._start[key])

    @staticmethod
    def _read() -> dict[str, int]:
        return device_counts()
