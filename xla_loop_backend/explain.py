"""See what xla_loop did: its log lines (`TORCH_LOGS`) and `explain(fn)(*args)`, one report.

Why one mechanism: what a user asks ("did my loop become one While? why did it compile
again? what does training store?") is answered where it happens, in the passes, the
lowering and the call path. Each of those places writes one log record through `record`
(INFO, logger `xla_loop_backend.<module>`), carrying its facts as fields. torch parses
`TORCH_LOGS` when it is imported and accepts an importable module's name there, so
`TORCH_LOGS="xla_loop_backend"` prints those lines, `"+xla_loop_backend"` also the lowered
graphs (DEBUG), and nothing prints when it is unset (the package's logger has a NullHandler
and logs nothing above INFO). Records are written while compiling, never on a call that
compiles nothing.

`explain` compiles `fn` with xla_loop (fullgraph off, so that a fallback shows rather than
raises), runs it once on the arguments (and, with `backward=True`, its loss's backward) while
collecting those records, and turns them into a `Report`: a row per loop or branch, at every
depth and in every graph (forward, backward), what a trained loop's backward stores, and a
row per graph (its execution path, HLO size, compile time); it prints the report and returns
it. A loop's carries are what its XLA While carries: for a trained while_loop, also its
counter, its report and the stacks of carries it keeps for the backward.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

_PACKAGE_LOG = logging.getLogger("xla_loop_backend")
if any(not isinstance(h, logging.NullHandler) for h in _PACKAGE_LOG.handlers):
    # TORCH_LOGS named the package: torch gave it a handler. A second copy of each line through
    # the root logger (torch_xla's first warning gives the root a handler) would repeat it.
    _PACKAGE_LOG.propagate = False
_PACKAGE_LOG.addHandler(logging.NullHandler())

# Which graph AOTAutograd made is being traced for XLA ("forward", "backward"), and how deep
# inside loop bodies the lowering is: set by call.GraphCall and lowering.subgraph.
current_graph: contextvars.ContextVar[str] = contextvars.ContextVar("xla_loop_graph", default="")
depth: contextvars.ContextVar[int] = contextvars.ContextVar("xla_loop_depth", default=0)


def record(logger: logging.Logger, event: str, message: str, stacklevel: int = 1, **fields: Any) -> None:
    """One INFO line (TORCH_LOGS="xla_loop_backend"), its fields kept for `explain`. The line
    names the caller's module, or its caller's with `stacklevel=2`."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "%s", message, stacklevel=stacklevel + 1,
            extra={"xla_loop_event": event, "xla_loop_fields": {"graph": current_graph.get(), **fields}},
        )


def record_graph(logger: logging.Logger, what: str, text: Callable[[], str]) -> None:
    """A lowered graph or program, at DEBUG (TORCH_LOGS="+xla_loop_backend")."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s:\n%s", what, text(), stacklevel=2)


@contextlib.contextmanager
def deeper() -> Iterator[None]:
    """Inside a loop body or branch being lowered."""
    token = depth.set(depth.get() + 1)
    try:
        yield
    finally:
        depth.reset(token)


def describe_tensor(t: Any) -> str:
    """`f32[8, 16]`, and its sharding under SPMD: what a carry is."""
    from .errors import describe_value

    text = describe_value(t)
    if isinstance(t, torch.Tensor) and t.device.type == "xla":
        import torch_xla
        import torch_xla.runtime as xr

        if xr.is_spmd():
            spec = torch_xla._XLAC._get_xla_sharding_spec(t)
            text += f" {spec or '{replicated}'}"
    return text.replace("float32", "f32").replace("int64", "i64").replace("bfloat16", "bf16").replace("float64", "f64")


def carry_bytes(site: Any) -> int:
    """Bytes of a loop site's carries (from the graph's example values)."""
    from .ops import CARRIES, example_value

    values = [example_value(v) for name in site.call.spec.names(CARRIES) for v in site.call.args[name]]
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def kib(n: float) -> str:
    """A size in bytes, for people."""
    return f"{n:.0f} B" if n < 2**10 else f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


@dataclass
class LoopRow:
    """A loop or branch: what it became."""

    graph: str
    kind: str
    where: str
    depth: int
    lowered_to: str
    trip_count: str
    carries: list[str]
    stores: str = ""


@dataclass
class GraphRow:
    """A graph AOTAutograd made, as compiled: its execution path and its cost."""

    graph: str
    path: str
    programs: int
    hlo_ops: int
    compile_s: float
    buffers_bytes: int


@dataclass
class Report:
    """What `explain` found: loops (`loops`), graphs (`graphs`), fallbacks, recompiles, the
    first call's time by stage (seconds), and every log line in order (`lines`)."""

    loops: list[LoopRow] = field(default_factory=list)
    graphs: list[GraphRow] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    recompiles: list[str] = field(default_factory=list)
    rolled: list[str] = field(default_factory=list)
    stages_s: dict[str, float] = field(default_factory=dict)
    memory: str = ""
    lines: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        out = ["xla_loop explain", "", "loops and branches:"]
        if not self.loops:
            out.append("  (none lowered)")
        for row in self.loops:
            indent = "  " * (row.depth + 1)
            carries = ", ".join(row.carries) or "none"
            out.append(
                f"{indent}{row.kind} at {row.where} [{row.graph or 'graph'}]: {row.lowered_to}; "
                + (f"trip count {row.trip_count}; " if row.trip_count else "")
                + f"{'operands' if row.kind == 'cond' else 'carries'} {carries}"
                + (f"; backward stores {row.stores}" if row.stores else "")
            )
        for line in self.rolled:
            out.append(f"  {line}")
        for line in self.fallbacks:
            out.append(f"  FALLBACK: {line}")
        out += ["", "graphs:"]
        for g in self.graphs:
            out.append(
                f"  {g.graph or 'graph'}: {g.path}, {g.programs} program(s), {g.hlo_ops} HLO ops, "
                f"traced and compiled in {g.compile_s * 1e3:.0f} ms, parameters {kib(g.buffers_bytes)}"
            )
        stages = ", ".join(f"{name} {seconds * 1e3:.0f} ms" for name, seconds in self.stages_s.items())
        out += ["", f"first call by stage: {stages}", f"device memory: {self.memory}"]
        if self.recompiles:
            out += ["", "recompiles:", *(f"  {line}" for line in self.recompiles)]
        return "\n".join(out)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _collecting() -> Iterator[_Collector]:
    logger = logging.getLogger("xla_loop_backend")
    collector = _Collector()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(collector)
    if not logger.isEnabledFor(logging.INFO):  # (explain needs the records; nobody asked for the lines)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield collector
    finally:
        logger.removeHandler(collector)
        logger.setLevel(level)
        logger.propagate = propagate


def explain(fn: Callable[..., Any], backward: bool = False, **compile_options: Any) -> Callable[..., Report]:
    """`explain(fn)(*args, **kwargs)`: compile `fn` with xla_loop (`compile_options` as
    `xla_loop_backend.compile` takes them, fullgraph off), run it once, print and return
    what became of each loop and graph (see the module docstring). With `backward=True`,
    `fn` returns a loss, and its backward runs too (gradients accumulate as usual), so the
    backward graph's loops are reported."""

    def run(*args: Any, **kwargs: Any) -> Report:
        import torch_xla

        from . import metrics
        from .backend import compile as xla_loop_compile

        before = metrics.first_call_stages()
        with _collecting() as collector:
            compiled = xla_loop_compile(fn, **compile_options)
            result = compiled(*args, **kwargs)
            if backward:
                result.backward()
            tensors = [t for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
            xla = [t for t in tensors if t.device.type == "xla"]
            if xla:
                torch_xla._XLAC._xla_sync_multi(xla, devices=[], wait=True)
        after = metrics.first_call_stages()
        report = _report(collector.records, {name: after[name] - before[name] for name in after})
        print(report)
        return report

    return run


_STAGES = {"dynamo_s": "Dynamo", "aot_s": "AOTAutograd and passes", "executable_s": "executables", "xla_compile_s": "XLA compile"}


def _report(records: list[logging.LogRecord], stages: dict[str, float]) -> Report:
    report = Report(stages_s={label: stages[name] for name, label in _STAGES.items()}, memory=_device_memory())
    stores: dict[str, str] = {}
    for r in records:
        report.lines.append(r.getMessage())
        event, fields = getattr(r, "xla_loop_event", None), getattr(r, "xla_loop_fields", {})
        if event == "lowered":
            report.loops.append(
                LoopRow(fields["graph"], fields["kind"], fields["where"], fields["depth"], fields["lowered_to"], fields["trip"], fields["carries"])
            )
        elif event == "stores":
            stores[fields["where"]] = fields["stores"]
        elif event == "program":
            report.graphs.append(
                GraphRow(fields["graph"], fields["path"], fields["programs"], fields["hlo_ops"], fields["seconds"], fields["buffers"])
            )
        elif event == "fallback":
            report.fallbacks.append(fields["why"])
        elif event == "recompile":
            report.recompiles.append(r.getMessage())
        elif event == "rolled":
            report.rolled.append(r.getMessage())
    for row in report.loops:  # (what training stores is decided before AOTAutograd, by loop)
        if row.graph != "backward" and row.where in stores:
            row.stores = stores[row.where]
    report.loops = _parents_first(report.loops)
    return report


def _parents_first(rows: list[LoopRow]) -> list[LoopRow]:
    """The rows, each loop before the loops in its body: a body is lowered (and recorded)
    before the loop around it, so a row's children are the deeper rows just before it."""
    children: dict[int, list[list[LoopRow]]] = {}
    for row in rows:
        below = children.pop(row.depth + 1, [])
        children.setdefault(row.depth, []).append([row, *[r for group in below for r in group]])
    top = min(children) if children else 0
    return [r for group in children.get(top, []) for r in group]


def _device_memory() -> str:
    """Device memory in use, where torch_xla can say (not on its CPU client)."""
    import torch_xla

    try:
        info = torch_xla._XLAC._xla_memory_info(str(torch_xla.device()))
    except RuntimeError:
        return "not reported by torch_xla on this device"
    used = info.get("bytes_used") if isinstance(info, dict) else None
    return f"{used / 2**20:.1f} MiB in use" if used is not None else str(info)
