"""The backend's options, and what one compile knows while the passes run.

`max_iterations` bounds every while_loop (a loop still running after that many iterations
makes the call raise); `capacity` is how many iterations a trained while_loop stores before
its stack grows; `remat` trades compute for the memory of stored carries; `roll_layers`
runs repeated layers as one scan. See `passes/while_loops.py`, `passes/remat.py` and
`passes/roll_layers.py`.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

DEFAULT_CAPACITY = 64

OPTIONS = {
    "max_iterations": "bound on the trip count of every while_loop (int); a loop still running after it makes the call raise",
    "capacity": f"iterations a trained while_loop stores before its stack grows (int, default {DEFAULT_CAPACITY}; grown on demand)",
    "remat": "training: recompute loop steps in the backward, storing carries every k steps (True: k=sqrt(length), or k)",
    "roll_layers": "chains of calls of one subgraph (nested_compile_region; under xla_loop_backend.compile also repeated layers with no marker) run as one scan over the stacked layers (default True)",
}


@dataclass(frozen=True)
class Options:
    max_iterations: int | None = None
    capacity: int = DEFAULT_CAPACITY
    remat: bool | int = False
    roll_layers: bool = True

    @classmethod
    def parse(cls, options: dict[str, Any] | None, mode: str | None = None) -> "Options":
        given = dict(options or {})
        known = {name: given.pop(name) for name in OPTIONS if name in given}
        if given or mode not in (None, "default"):
            raise ValueError(f"xla_loop: unknown options {sorted(given)} / mode {mode!r}; options are {OPTIONS}")
        parsed = cls(**{k: v for k, v in known.items() if v is not None})
        for name in ("max_iterations", "capacity"):
            value = getattr(parsed, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"xla_loop: {name} must be a positive int, found {value!r}")
        if not isinstance(parsed.roll_layers, bool):
            raise ValueError(f"xla_loop: roll_layers must be True or False, found {parsed.roll_layers!r}")
        remat = parsed.remat
        if not isinstance(remat, (bool, int)) or (not isinstance(remat, bool) and remat < 1):
            raise ValueError(f"xla_loop: remat must be True, False or a positive int (steps per segment), found {remat!r}")
        return parsed

    def first_capacity(self) -> int:
        """The stack capacity of the first compile: `capacity`, within `max_iterations`."""
        return self.capacity if self.max_iterations is None else min(self.capacity, self.max_iterations)


@dataclass
class PassContext:
    """One compile: its options, whether it can train, and what the passes record for the
    call-time wrapper (the while_loops whose report it reads)."""

    options: Options
    training: bool
    reporting_loops: list[str] = field(default_factory=list)
    trains_loops: bool = False  # some reporting loop may be trained: its trip count sizes the stack
    reports: bool = False  # the graph returns one more output, the report
    # (inference) graph inputs the passes added, each the stack of these Dynamo inputs
    # (positions), made at call time and kept while they do not change (call.StackedOnce)
    stacked_inputs: list[tuple[int, ...]] = field(default_factory=list)

    @classmethod
    def for_graph(cls, options: Options, example_inputs: Any) -> "PassContext":
        inputs_need_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
        return cls(options, training=torch.is_grad_enabled() and inputs_need_grad)


# How many iterations a trained while_loop stores; read when AOTAutograd traces the loop, so
# a compile at a larger capacity needs no change to the graph (see call.ReportingCall).
_capacity: contextvars.ContextVar[int] = contextvars.ContextVar("xla_loop_capacity", default=DEFAULT_CAPACITY)


@contextlib.contextmanager
def stack_capacity(capacity: int) -> Iterator[None]:
    token = _capacity.set(capacity)
    try:
        yield
    finally:
        _capacity.reset(token)


def current_capacity() -> int:
    return _capacity.get()
