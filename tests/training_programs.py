"""Random training programs for the gradient fuzzer (test_grad_fuzz.py), as hypothesis
strategies.

A program is the source of a module, ``class Program(torch.nn.Module)``, whose forward
``(n, m, x, xs)`` runs loops nested up to three deep around pieces with parameters
(Linear, GRUCell, LayerNorm, a scale vector) and returns a scalar loss:

- while_loop on a counter up to a trip-count tensor (n or m), with one carry, or with a
  second carry that starts without grad (``acc = torch.zeros_like(h)``);
- fori_loop with tensor bounds (a while_loop) and with static bounds (a scan);
- scan over the sequence input xs or over a stack of the current state, with ys that
  enter the loss, and scan whose carry starts without grad;
- map over xs;
- cond on a trip count or an input, its branches running pieces and loops;
- repeated layers: a Python for loop over a ModuleList of 2-4 identical Linear layers,
  each reading the previous one's output and the step input (at top level, Dynamo's graph
  deduplication and xla_loop's `roll_layers` make such a chain one scan).

Loop bodies read their carries, the parameters, the inputs x and xs, the trip counts
and the carries of the loops around them. Values stay bounded (tanh, LayerNorm). The
loops are looked up as ``L.while_loop`` / ``L.scan`` / ``L.fori_loop`` / ``L.map``, so the
same source runs as plain Python loops on CPU (``L = reference_loops``) and compiled with
xla_loop (``L = xla_loops``, below). The compile options (remat, max_iterations) are drawn
too. Hypothesis shrinks a failing program; `TrainingProgram.source` is the reproduction.
"""
from __future__ import annotations

import linecache
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from hypothesis import strategies as st
from torch._higher_order_ops.cond import cond as torch_cond
from torch._higher_order_ops.map import map as torch_map

import xla_loop_backend

BATCH, DIM, LENGTH = 2, 4, 3
MAX_DEPTH = 3

# The loops as xla_loop compiles them (xla_loop_backend has no map or cond of its own: torch's).
xla_loops = types.SimpleNamespace(
    while_loop=xla_loop_backend.while_loop,
    scan=xla_loop_backend.scan,
    fori_loop=xla_loop_backend.fori_loop,
    map=torch_map,
    cond=torch_cond,
)


@dataclass(frozen=True)
class TrainingProgram:
    """Source of `Program`, its seed, the trip counts (n, m) of two calls, compile options."""

    source: str
    seed: int
    trip_counts: tuple[tuple[int, int], tuple[int, int]]
    remat: bool | int = False
    max_iterations: int | None = None

    def module(self, loops: Any) -> torch.nn.Module:
        """A fresh `Program` (parameters from `seed`) with `L` bound to `loops`."""
        filename = f"<training program {self.seed}>"
        lines = self.source.splitlines(keepends=True)
        linecache.cache[filename] = (len(self.source), None, lines, filename)  # for tracebacks
        namespace: dict[str, Any] = {"torch": torch, "L": loops}
        exec(compile(self.source, filename, "exec"), namespace)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return namespace["Program"]()

    def arguments(self, call: int) -> tuple[torch.Tensor, ...]:
        """CPU inputs of call `call`: n, m, and x, xs (floating, to differentiate)."""
        n, m = self.trip_counts[call]
        gen = torch.Generator().manual_seed(self.seed + call)
        x = torch.randn(BATCH, DIM, generator=gen)
        xs = torch.randn(LENGTH, BATCH, DIM, generator=gen)
        return torch.tensor(n), torch.tensor(m), x, xs


# Pieces: (constructor of their parameter, or None; expression in p, h and e).
_PIECES = {
    "linear": (f"torch.nn.Linear({DIM}, {DIM})", "torch.tanh(self.{p}({h}))"),
    "gru": (f"torch.nn.GRUCell({DIM}, {DIM})", "self.{p}({e}, {h})"),
    # (plus a ramp, so it never normalizes a state constant along DIM: its gradient is
    # float32 noise scaled by 1/sqrt(eps) per LayerNorm, e.g. 1e18 after nine; a step input
    # alone is not enough, as a scan over a stack of a zero state gives zero steps. Not x:
    # a map body that takes x and also reads it is refused by torch 2.9's Dynamo)
    "layernorm": (f"torch.nn.LayerNorm({DIM})", "self.{p}({h} + 0.3 * {e} + torch.linspace(-0.2, 0.2, %d, device=dev))" % DIM),
    "scale": (f"torch.nn.Parameter(torch.linspace(0.5, 1.2, {DIM}))", "torch.tanh({h} * self.{p} + {e} * 0.1)"),
    "input": (None, "torch.tanh({h} + 0.5 * {e})"),
}


@dataclass
class _Writer:
    """Writes the statements of one function, drawing loops and pieces."""

    draw: Callable
    pieces: list[str] = field(default_factory=list)  # constructor lines of the parameters
    counter: int = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def pick(self, options: list[Any]) -> Any:
        return self.draw(st.sampled_from(options))

    def piece(self, h: str, e: str | None, scope: list[str]) -> str:
        """An expression of shape (BATCH, DIM) from state h (and a step input e, if any;
        `scope`: other states it may read: inputs, carries of enclosing loops)."""
        kind = self.pick(list(_PIECES) + (["outer"] if scope else []))
        if kind == "outer":
            return f"torch.tanh({h} - 0.5 * {self.pick(scope)})"
        constructor, expression = _PIECES[kind]
        name = self.param(constructor) if constructor else None
        return expression.format(p=name, h=h, e=e or "x")

    def param(self, constructor: str) -> str:
        name = f"p{len(self.pieces)}"
        self.pieces.append(f"self.{name} = {constructor}")
        return name

    def block(
        self, h: str, e: str | None, depth: int, lines: list[str], indent: str, scope: list[str], xs: bool = True
    ) -> str:
        """Lines (appended to `lines`) computing a new state from `h`; returns its name.
        Without `xs` (inside a map body), loops run over a stack of the state instead: torch's
        map refuses a body that reads the tensor it maps over (its slices alias it)."""
        loops = ["while", "while_acc", "fori_tensor", "fori_static", "scan", "scan_stack", "scan_acc", "map", "cond"]
        # Loops are likelier near the top, so programs nest 1-3 deep but stay small.
        kinds = ["piece"] * (2 + 2 * depth) + ["layers"] + (loops if depth < MAX_DEPTH else [])
        if depth == 0:
            kinds = [*loops, "layers"]
        kind = self.pick(kinds)
        out = self.fresh("h")
        if kind == "piece":
            lines.append(f"{indent}{out} = {self.piece(h, e, scope)}")
            return out
        if kind == "layers":
            count = self.draw(st.integers(2, 4))
            layers = self.param(f"torch.nn.ModuleList(torch.nn.Linear({DIM}, {DIM}) for _ in range({count}))")
            lines.append(f"{indent}{out} = {h}")
            lines.append(f"{indent}for layer in self.{layers}:")
            lines.append(f"{indent}    {out} = torch.tanh(layer({out}) + 0.1 * {e or 'x'}) + 0.5 * {out}")
            return out
        body = self.fresh("body")
        trips = self.pick(["n", "m"])
        c = f"c{depth}"  # the loop's state carry, named per depth so inner bodies see it
        scope = [*scope, h]
        if kind in ("while", "fori_tensor", "fori_static"):
            lines.append(f"{indent}def {body}(i, {c}):")
            inner = self.body(c, e, depth, lines, indent + "    ", scope, xs)
            step = f"i.to({c}.dtype) * 0.05" if kind != "while" else None
            new = f"{inner} + {step}" if step else inner
            if kind == "while":
                lines.append(f"{indent}    return i + 1, {new}")
                lines.append(
                    f"{indent}{out} = L.while_loop(lambda i, {c}: i < {trips}, {body}, "
                    f"(torch.zeros((), dtype=torch.int64, device=dev), {h}))[1]"
                )
            else:
                lines.append(f"{indent}    return {new}")
                upper = trips if kind == "fori_tensor" else str(self.draw(st.integers(1, 3)))
                lines.append(f"{indent}{out} = L.fori_loop(0, {upper}, {body}, {h})")
            return out
        if kind == "while_acc":
            lines.append(f"{indent}def {body}(i, {c}, acc):")
            inner = self.body(c, e, depth, lines, indent + "    ", scope, xs)
            lines.append(f"{indent}    return i + 1, {inner}, torch.tanh(acc + {c} * 0.5)")
            acc = self.fresh("acc")
            lines.append(
                f"{indent}_, {out}, {acc} = L.while_loop(lambda i, {c}, acc: i < {trips}, {body}, "
                f"(torch.zeros((), dtype=torch.int64, device=dev), {h}, torch.zeros_like({h})))"
            )
            lines.append(f"{indent}{out} = {out} + {acc}")
            return out
        if kind == "cond":
            # Predicates that are the same on both sides: trip counts, an input (not inside a
            # map body: the map may have been handed x).
            pred = self.pick(["(n % 2 == 0)", "(m > 2)"] + (["(x.sum() > 0)"] if xs else []))
            names = []
            for branch in ("yes", "no"):
                names.append(self.fresh(branch))
                lines.append(f"{indent}def {names[-1]}({c}):")
                inner = self.body(c, e, depth, lines, indent + "    ", scope, xs)
                lines.append(f"{indent}    return {inner}")
            lines.append(f"{indent}{out} = L.cond({pred}, {names[0]}, {names[1]}, ({h},))")
            return out
        stack = f"torch.stack([{h}, {h} * 0.5, -{h}])"
        if kind in ("scan", "scan_stack", "scan_acc"):
            source = "xs" if kind != "scan_stack" and xs else stack
            s_ = f"s{depth}"
            lines.append(f"{indent}def {body}({c}, {s_}):")
            inner = self.body(c, s_, depth, lines, indent + "    ", scope, xs)
            lines.append(f"{indent}    return {inner}, ({inner} * {s_}).sum(-1)")
            ys = self.fresh("ys")
            init = h if kind != "scan_acc" else f"torch.zeros_like({h})"
            reverse = self.draw(st.booleans())
            lines.append(f"{indent}{out}, {ys} = L.scan({body}, {init}, {source}, reverse={reverse})")
            lines.append(f"{indent}{out} = {out} + {ys}.mean(0).unsqueeze(-1) * 0.1" + (f" + {h}" if kind == "scan_acc" else ""))
            return out
        # map: each slice of xs (or of a stack of the state) with the state
        s_ = f"s{depth}"
        lines.append(f"{indent}def {body}({s_}, {c}):")
        # (torch's map refuses a body that reads a tensor also passed to it: no outer states)
        inner = self.body(c, s_, depth, lines, indent + "    ", [], xs=False)
        lines.append(f"{indent}    return {inner}")
        ys = self.fresh("ys")
        lines.append(f"{indent}{ys} = L.map({body}, {'xs' if xs else stack}, {h})")
        lines.append(f"{indent}{out} = torch.tanh({h} + {ys}.mean(0))")
        return out

    def body(
        self, h: str, e: str | None, depth: int, lines: list[str], indent: str, scope: list[str], xs: bool
    ) -> str:
        """1-2 blocks on the loop's state `h`; returns the new state."""
        for _ in range(self.draw(st.sampled_from([1, 1, 2]))):
            h = self.block(h, e, depth + 1, lines, indent, scope, xs)
        return h


@st.composite
def training_programs(draw: Callable) -> TrainingProgram:
    """A random TrainingProgram (see the module docstring)."""
    writer = _Writer(draw)
    lines: list[str] = []
    h = "x"
    for _ in range(draw(st.integers(1, 2))):
        h = writer.block(h, None, 0, lines, "        ", ["x"])
    head = writer.param(f"torch.nn.Linear({DIM}, 1)")
    init = writer.pieces or ["pass"]
    source = "\n".join(
        [
            "class Program(torch.nn.Module):",
            "    def __init__(self):",
            "        super().__init__()",
            *(f"        {line}" for line in init),
            "",
            "    def forward(self, n, m, x, xs):",
            "        dev = x.device",
            *lines,
            f"        return self.{head}({h}).pow(2).mean() + {h}.pow(2).mean()",
        ]
    ) + "\n"
    seed = draw(st.integers(0, 2**31 - 1))
    trips = tuple((draw(st.integers(0, 5)), draw(st.integers(1, 4))) for _ in range(2))
    remat = draw(st.sampled_from([False, False, True, 2, 3]))
    max_iterations = draw(st.sampled_from([None, None, 16]))
    return TrainingProgram(source, seed, trips, remat, max_iterations)  # type: ignore[arg-type]
