"""Families of programs that differ in one place, for the wiring fuzzer (test_wiring_fuzz.py).

A family is a base program and variants of it, each differing from the base in exactly one
place, and nowhere in any shape or dtype:
- an operand: one op reads another tensor of the same shape (`a * x1` -> `a * x2`);
- a constant: one constant has another value (`torch.tensor(0.5)` -> `torch.tensor(1.5)`);
- a device placement: one constant or loop counter is made on the CPU (no `device=`, as
  users write it), on the device, or is a Python number.
Such programs are what an executable cache keyed too coarsely confuses: torch_xla's own
graph hash cannot tell an operand change apart (pytorch/xla#8353), and a constant held as
device data is a parameter whose value must not be baked in.

Each program takes inputs `x0, x1, x2` (float32, 3x4), `xs` (5x3x4) and `n` (a trip count),
computes a few statements, and may run one loop (torch's while_loop with a counter, a
fori_loop, or a scan over xs) whose body has statements of its own. Values stay bounded
(tanh). The family's members share one source layout, so they are compiled from different
code objects of the same shape: the test compiles them in one process, in random order, and
runs each against eager on CPU.
"""
from __future__ import annotations

import linecache
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from hypothesis import strategies as st

INPUTS = ("x0", "x1", "x2")
OPS = (
    "{a} + {b}",
    "{a} * {b}",
    "{a} - {b}",
    "torch.sin({a}) * {b}",
    "{a} * torch.sigmoid({a} * {b})",
    "torch.where({a} > {b}, {a}, {b} * 0.5)",
)
# How a constant is made: a Python number, a 0-dim CPU tensor (no device=), a device tensor.
PLACEMENTS = ("number", "cpu", "device")
LOOPS = ("none", "while_loop", "fori_loop", "scan")


@dataclass(frozen=True)
class Operand:
    """A tensor by name, or a constant (value, placement)."""

    name: str | None = None
    value: float = 0.0
    placement: str = "number"

    def source(self) -> str:
        if self.name is not None:
            return self.name
        if self.placement == "number":
            return repr(self.value)
        device = ", device=x0.device" if self.placement == "device" else ""
        return f"torch.tensor({self.value!r}{device})"


@dataclass(frozen=True)
class Statement:
    target: str
    op: int
    a: Operand
    b: Operand

    def source(self) -> str:
        return f"{self.target} = torch.tanh({OPS[self.op].format(a=self.a.source(), b=self.b.source())})"


@dataclass(frozen=True)
class Program:
    """`def program(x0, x1, x2, xs, n)`: statements, then maybe a loop, then the result."""

    before: tuple[Statement, ...]
    loop: str
    body: tuple[Statement, ...]
    counter: str  # the while_loop counter's placement: "cpu" or "device"
    description: str = "base"

    def source(self) -> str:
        lines = ["def program(x0, x1, x2, xs, n):"]
        lines += [f"    {s.source()}" for s in self.before]
        last = self.before[-1].target if self.before else "x0"
        body = [f"        {s.source()}" for s in self.body]
        result = self.body[-1].target if self.body else "h"
        if self.loop == "while_loop":
            device = ", device=x0.device" if self.counter == "device" else ""
            lines += ["    def body(i, h):", *body, f"        return i + 1, {result}"]
            lines += [f"    i, out = while_loop(lambda i, h: i < n, body, (torch.zeros((), dtype=torch.int64{device}), {last}))"]
        elif self.loop == "fori_loop":
            lines += ["    def body(i, h):", *body, f"        return {result}"]
            lines += [f"    out = L.fori_loop(0, 3, body, {last})"]
        elif self.loop == "scan":
            lines += ["    def body(h, x):", *body, f"        return {result}, {result}.sum()"]
            lines += [f"    out, ys = scan(body, {last}, xs)", "    out = out + ys.sum()"]
        else:
            lines += [f"    out = {last}"]
        lines += ["    return out"]
        return "\n".join(lines) + "\n"

    def function(self, loops: Any, index: int) -> Callable[..., Any]:
        """A new function object from the source (each member compiles on its own)."""
        from torch._higher_order_ops.scan import scan
        from torch._higher_order_ops.while_loop import while_loop

        filename = f"<wiring program {index}: {self.description}>"
        text = self.source()
        linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
        namespace: dict[str, Any] = {"torch": torch, "L": loops, "while_loop": while_loop, "scan": scan}
        exec(compile(text, filename, "exec"), namespace)
        return namespace["program"]


@dataclass(frozen=True)
class Family:
    members: tuple[Program, ...]
    order: tuple[int, ...]  # the order members compile in
    seed: int
    again: tuple[int, ...] = field(default=())  # the order they run a second time

    def arguments(self) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(self.seed)
        xs = [torch.randn(3, 4, generator=gen) for _ in INPUTS]
        return (*xs, torch.randn(5, 3, 4, generator=gen), torch.tensor(3))

    def describe(self) -> str:
        return "\n".join(f"# member {i} ({p.description}):\n{p.source()}" for i, p in enumerate(self.members))


@st.composite
def _operand(draw: Any, names: list[str], constant: bool) -> Operand:
    if constant and draw(st.booleans()):
        return Operand(value=draw(st.sampled_from((0.5, 1.5, -0.75, 2.0))), placement=draw(st.sampled_from(PLACEMENTS)))
    return Operand(name=draw(st.sampled_from(names)))


@st.composite
def _statements(draw: Any, names: list[str], prefix: str, count: int) -> tuple[Statement, ...]:
    names = list(names)
    out = []
    for k in range(count):
        a = draw(_operand(names, constant=False))
        b = draw(_operand(names, constant=True))
        target = f"{prefix}{k}"
        out.append(Statement(target, draw(st.integers(0, len(OPS) - 1)), a, b))
        names.append(target)
    return tuple(out)


def _sites(program: Program) -> list[tuple[str, int, str]]:
    """Every place a variant may differ: (where, statement index, 'a' or 'b')."""
    return [(where, k, side) for where in ("before", "body") for k in range(len(getattr(program, where))) for side in ("a", "b")]


def _names_at(program: Program, where: str, k: int) -> list[str]:
    if where == "before":
        return [*INPUTS, *(s.target for s in program.before[:k])]
    loop_names = ["h", "x"] if program.loop == "scan" else ["h", "i"] if program.loop == "fori_loop" else ["h"]
    outer = [*INPUTS, *(s.target for s in program.before)]
    names = [*loop_names, *outer, *(s.target for s in program.body[:k])]
    return [n for n in names if n != "i"]  # (the index is an int64 tensor: not float)


def _with(program: Program, where: str, k: int, side: str, operand: Operand, description: str) -> Program:
    statements = list(getattr(program, where))
    statements[k] = replace(statements[k], **{side: operand})
    return replace(program, **{where: tuple(statements)}, description=description)


@st.composite
def _variant(draw: Any, base: Program) -> Program | None:
    kind = draw(st.sampled_from(("operand", "constant", "device", "counter")))
    if kind == "counter":
        if base.loop != "while_loop":
            return None
        other = "device" if base.counter == "cpu" else "cpu"
        return replace(base, counter=other, description=f"counter on {other}")
    where, k, side = draw(st.sampled_from(_sites(base)))
    old: Operand = getattr(getattr(base, where)[k], side)
    if kind == "operand":
        choices = [n for n in _names_at(base, where, k) if n != old.name]
        if old.name is None or not choices:
            return None
        new = draw(st.sampled_from(choices))
        return _with(base, where, k, side, Operand(name=new), f"{where}[{k}].{side}: {old.name} -> {new}")
    if old.name is not None:
        return None
    if kind == "constant":
        value = draw(st.sampled_from([v for v in (0.5, 1.5, -0.75, 2.0, 3.25) if v != old.value]))
        return _with(base, where, k, side, replace(old, value=value), f"{where}[{k}].{side}: {old.value} -> {value}")
    placement = draw(st.sampled_from([p for p in PLACEMENTS if p != old.placement]))
    return _with(base, where, k, side, replace(old, placement=placement), f"{where}[{k}].{side}: {old.placement} -> {placement}")


@st.composite
def families(draw: Any, size: int = 4) -> Family:
    """A base program and up to `size - 1` variants, each one change away from it."""
    loop = draw(st.sampled_from(LOOPS))
    before = draw(_statements(list(INPUTS), "v", draw(st.integers(1, 3))))
    outer = [*INPUTS, *(s.target for s in before)]
    loop_names = {"scan": ["h", "x"], "while_loop": ["h"], "fori_loop": ["h"]}.get(loop, [])
    body = draw(_statements([*loop_names, *outer], "b", draw(st.integers(1, 2)))) if loop != "none" else ()
    base = Program(before, loop, body, draw(st.sampled_from(("cpu", "device"))))
    members = [base]
    for _ in range(size * 3):
        if len(members) == size:
            break
        variant = draw(_variant(base))
        if variant is not None and variant.source() not in {m.source() for m in members}:
            members.append(variant)
    order = tuple(draw(st.permutations(range(len(members)))))
    again = tuple(draw(st.permutations(range(len(members)))))
    return Family(tuple(members), order, draw(st.integers(0, 2**31 - 1)), again)
