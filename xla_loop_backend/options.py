"""The backend's options, and what one compile knows while the passes run.

`max_iterations` bounds every while_loop (a loop still running after that many iterations
makes the call raise); `checkpoints` is how many copies of its carries a trained while_loop
keeps for its backward, whatever its trip count (`capacity`, its old name, is a synonym);
`remat` trades compute for the memory of stored carries; `roll_layers`
runs repeated layers as one scan; `gather_invariants` (SPMD) gathers a While's sharded loop
invariants once before it. See `passes/while_loops.py`, `passes/remat.py`,
`passes/roll_layers.py` and `lowering/sharding.py`.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

DEFAULT_CHECKPOINTS = 32
DEFAULT_INVARIANT_BUDGET = 256 * 2**20  # bytes a While's gathered loop invariants may take per device

OPTIONS = {
    "max_iterations": "bound on the trip count of every while_loop (int); a loop still running after it makes the call raise",
    "checkpoints": (
        f"copies of its carries a trained while_loop keeps for its backward (int, default {DEFAULT_CHECKPOINTS}): "
        "memory is fixed at any trip count; a loop of at most that many iterations recomputes nothing, a longer one "
        "recomputes iterations between them"
    ),
    "capacity": "the old name of checkpoints (a synonym)",
    "remat": (
        "training: recompute loop steps in the backward: a top-level scan stores carries every k steps (True: k=sqrt(length), or k), "
        "a top-level trained while_loop keeps checkpoints/k checkpoints (True: sqrt(checkpoints))"
    ),
    "roll_layers": "chains of calls of one subgraph (nested_compile_region; under xla_loop_backend.compile also repeated layers with no marker) run as one scan over the stacked layers (default True)",
    "gather_invariants": (
        "SPMD: a sharded tensor a While reads unchanged every iteration (a captured weight) is gathered once "
        "before the While, not in every iteration. Default (None): where it is split like the loop's "
        f"activations (FSDP), while a While's gathered copies fit in {DEFAULT_INVARIANT_BUDGET >> 20} MiB a "
        "device; an int: that budget in bytes; True: any sharded one (tensor parallel too) within the "
        "default budget; False: never"
    ),
}


@dataclass(frozen=True)
class Options:
    max_iterations: int | None = None
    checkpoints: int = DEFAULT_CHECKPOINTS
    remat: bool | int = False
    roll_layers: bool = True
    gather_invariants: bool | int | None = None

    @classmethod
    def parse(cls, options: dict[str, Any] | None, mode: str | None = None) -> "Options":
        given = dict(options or {})
        known = {name: given.pop(name) for name in OPTIONS if name in given}
        if given or mode not in (None, "default"):
            raise ValueError(f"xla_loop: unknown options {sorted(given)} / mode {mode!r}; options are {OPTIONS}")
        for name in ("max_iterations", "checkpoints", "capacity"):
            value = known.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"xla_loop: {name} must be a positive int, found {value!r}")
        capacity = known.pop("capacity", None)
        if capacity is not None:
            if known.get("checkpoints") not in (None, capacity):
                raise ValueError(f"xla_loop: capacity is the old name of checkpoints; give one, found {capacity!r} and {known['checkpoints']!r}")
            known["checkpoints"] = capacity
        parsed = cls(**{k: v for k, v in known.items() if v is not None})
        if not isinstance(parsed.roll_layers, bool):
            raise ValueError(f"xla_loop: roll_layers must be True or False, found {parsed.roll_layers!r}")
        gather = parsed.gather_invariants
        if gather is not None and (not isinstance(gather, (bool, int)) or (not isinstance(gather, bool) and gather < 0)):
            raise ValueError(f"xla_loop: gather_invariants must be True, False or a budget in bytes, found {gather!r}")
        remat = parsed.remat
        if not isinstance(remat, (bool, int)) or (not isinstance(remat, bool) and remat < 1):
            raise ValueError(f"xla_loop: remat must be True, False or a positive int (steps per segment), found {remat!r}")
        return parsed

    def invariant_gathering(self) -> "InvariantGathering":
        """What the `gather_invariants` option asks of each While (see `lowering/state.py`)."""
        value = self.gather_invariants
        if value is False or value == 0:
            return InvariantGathering(0, fsdp_only=True)
        if value is True:
            return InvariantGathering(DEFAULT_INVARIANT_BUDGET, fsdp_only=False)
        return InvariantGathering(DEFAULT_INVARIANT_BUDGET if value is None else value, fsdp_only=True)


@dataclass
class PassContext:
    """One compile: its options, whether it can train, and what the passes record for the
    call-time wrapper (the while_loops whose report it reads)."""

    options: Options
    training: bool
    reporting_loops: list[str] = field(default_factory=list)
    reports: bool = False  # the graph returns one more output, the report
    # (inference) graph inputs the passes added, each the stack of these Dynamo inputs
    # (positions), made at call time and kept while they do not change (call.StackedOnce)
    stacked_inputs: list[tuple[int, ...]] = field(default_factory=list)

    @classmethod
    def for_graph(cls, options: Options, example_inputs: Any) -> "PassContext":
        inputs_need_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
        return cls(options, training=torch.is_grad_enabled() and inputs_need_grad)


@dataclass(frozen=True)
class InvariantGathering:
    """SPMD: which sharded loop invariants a While gathers before it: up to `budget` bytes a
    device, and (`fsdp_only`) only those split like one of the loop's activations."""

    budget: int
    fsdp_only: bool


_gathering: contextvars.ContextVar[InvariantGathering] = contextvars.ContextVar(
    "xla_loop_gathering", default=InvariantGathering(DEFAULT_INVARIANT_BUDGET, fsdp_only=True)
)


@contextlib.contextmanager
def invariant_gathering(gathering: InvariantGathering) -> Iterator[None]:
    """While a graph is traced for XLA (its loops lowered), gather loop invariants so."""
    token = _gathering.set(gathering)
    try:
        yield
    finally:
        _gathering.reset(token)


def current_invariant_gathering() -> InvariantGathering:
    return _gathering.get()
