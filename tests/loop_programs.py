"""Random loop programs for differential testing (test_fuzz.py), as hypothesis strategies.

A program is Python source: ``def program(n, <inputs>, w3, w4)`` that runs one loop
(while_loop on a counter and maybe on data, fori_loop with static or tensor bounds, or
scan, forward or reverse) over a pytree of carries with random dtypes (float32, bfloat16,
int32, int64, bool) and shapes. Bodies draw from a vocabulary of ops: elementwise,
reductions, matmul with captured weights, static and data-dependent indexing, where,
casts, in-place updates of temporaries, and loops (or a cond) nested in the body. The loop functions
are looked up as ``L.while_loop`` / ``L.scan`` / ``L.fori_loop``, so the same source runs
with ``L = reference_loops`` (plain Python loops, eager on CPU) and ``L = xla_loop_backend``.

Values stay bounded (float carries pass through tanh or clamp, ints through % 1000), and
loop conditions on data only read int and bool carries, so a rounding difference between
XLA and eager cannot change a trip count. Hypothesis shrinks a failing program to a small
one; `LoopProgram.source` is then the reproduction.
"""
from __future__ import annotations

import linecache
from dataclasses import dataclass
from typing import Any, Callable

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = ("float32", "bfloat16")
INT_DTYPES = ("int32", "int64")
DTYPES = ("float32", "float32", "bfloat16", "int32", "int64", "bool")
SHAPES = ((), (3,), (4,), (2, 3), (3, 4))
CLOSURES = {"w3": (3, 3), "w4": (4, 4)}  # float32 weights every program receives


@dataclass(frozen=True)
class Var:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        return "float" if self.dtype in FLOAT_DTYPES else "int" if self.dtype in INT_DTYPES else "bool"


@dataclass(frozen=True)
class LoopProgram:
    """Source of `program(n, *inputs, w3, w4)`, its inputs, and the trip counts to call it with."""

    source: str
    inputs: tuple[Var, ...]
    seed: int
    trip_counts: tuple[int, int]

    @property
    def uses_bfloat16(self) -> bool:
        """bfloat16 anywhere, in a cast or an input: XLA may then keep float32 precision
        between ops where eager rounds to bfloat16, so floats compare loosely."""
        return "bfloat16" in self.source or any(var.dtype == "bfloat16" for var in self.inputs)

    def arguments(self, n: int) -> list[torch.Tensor]:
        """Deterministic CPU arguments for `program` (n is the trip-count input)."""
        gen = torch.Generator().manual_seed(self.seed)
        args = [torch.tensor(n, dtype=torch.int64)]
        for var in (*self.inputs, *(Var(k, "float32", s) for k, s in CLOSURES.items())):
            dtype = getattr(torch, var.dtype)
            if var.kind == "float":
                args.append((torch.randn(var.shape, generator=gen) * 0.7).to(dtype))
            elif var.kind == "int":
                args.append(torch.randint(-5, 6, var.shape, generator=gen).to(dtype))
            else:
                args.append(torch.rand(var.shape, generator=gen) > 0.5)
        return args

    def function(self, loops: Any) -> Callable[..., Any]:
        """`program`, with `L` bound to `loops` (reference_loops or xla_loop_backend)."""
        filename = f"<loop program {self.seed}>"
        lines = self.source.splitlines(keepends=True)
        linecache.cache[filename] = (len(self.source), None, lines, filename)  # for tracebacks
        namespace: dict[str, Any] = {"torch": torch, "L": loops}
        exec(compile(self.source, filename, "exec"), namespace)
        return namespace["program"]


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + "".join(f"{d}, " for d in shape).rstrip(" ") + ")"


class _Writer:
    """Draws expressions of an exact dtype and shape from the variables in scope."""

    def __init__(self, draw: Callable, env: list[Var], depth: int = 2):
        self.draw, self.env, self.depth = draw, list(env), depth
        self.lines: list[str] = []
        self.counter = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def pick(self, options: list[Any]) -> Any:
        return self.draw(st.sampled_from(options))

    # -- leaves
    def leaf(self, dtype: str, shape: tuple[int, ...]) -> str:
        same = [v.name for v in self.env if v.dtype == dtype and v.shape == shape]
        same_shape = [v for v in self.env if v.shape == shape and v.dtype != dtype]
        options: list[str] = list(same)
        for v in same_shape:
            options.append(self.cast(v, dtype))
        if not options:
            scalars = [v for v in self.env if v.shape == ()]
            v = self.pick(scalars)
            options.append(f"({self.cast(v, dtype)} | torch.zeros({_shape_text(shape)}, dtype=torch.bool, device=dev))"
                           if dtype == "bool" else
                           f"({self.cast(v, dtype)} + torch.zeros({_shape_text(shape)}, dtype=torch.{dtype}, device=dev))")
        return self.pick(options)

    def cast(self, v: Var, dtype: str) -> str:
        if v.dtype == dtype:
            return v.name
        if dtype == "bool":
            return f"({v.name} > 0)" if v.dtype != "bfloat16" else f"({v.name}.float() > 0)"
        if v.kind == "float" and dtype in INT_DTYPES:
            return f"({v.name} > 0.3).to(torch.{dtype})" if v.dtype == "float32" else f"torch.zeros_like({v.name}, dtype=torch.{dtype})"
        scale = " * 0.25" if dtype in FLOAT_DTYPES and v.kind == "int" else ""
        return f"({v.name}.to(torch.{dtype}){scale})"

    def scalar(self, kind: str, dtype: str) -> str:
        """A 0-dim expression of `dtype` computed from any variable of `kind`."""
        sources = [v for v in self.env if v.kind == kind and (kind != "float" or v.dtype == dtype)]
        if not sources:
            return f"torch.ones((), dtype=torch.{dtype}, device=dev)"
        v = self.pick(sources)
        if kind == "float":
            op = self.pick([f"{v.name}.mean()", f"({v.name}.sum() * 0.1)", f"{v.name}.amax()"])
        else:
            op = self.pick([f"{v.name}.sum()", f"{v.name}.amax()", f"({v.name}.sum() % 5)"])
        return f"{op}.to(torch.{dtype})"

    # -- expressions
    def expr(self, dtype: str, shape: tuple[int, ...], depth: int | None = None) -> str:
        depth = self.depth if depth is None else depth
        if depth <= 0 or self.draw(st.integers(0, 3)) == 0:
            return self.leaf(dtype, shape)
        sub = lambda dt=dtype, sh=shape: self.expr(dt, sh, depth - 1)  # noqa: E731
        kind = "float" if dtype in FLOAT_DTYPES else "int" if dtype in INT_DTYPES else "bool"
        choice = self.pick(_OPS[kind])
        if kind == "float":
            if choice == "unary":
                return self.pick(["torch.tanh({})", "torch.sin({})", "torch.sigmoid({})", "{}.abs().sqrt()", "({} * -0.75)", "{}.clamp(-1.5, 1.5)"]).format(sub())
            if choice == "binary":
                return self.pick(["({} + {})", "({} * {})", "({} - {})", "torch.maximum({}, {})"]).format(sub(), sub())
            if choice == "scalar":
                return f"({sub()} + {self.scalar(self.pick(['float', 'int']), dtype)})"
            if choice == "reduce" and shape:
                return f"({sub()}.sum(-1, keepdim=True) * 0.2 + {sub()})"
            if choice == "matmul" and dtype == "float32" and shape and shape[-1] in (3, 4):
                return f"({sub()} @ w{shape[-1]})"
            if choice == "where":
                return f"torch.where({sub('bool')}, {sub()}, {sub()})"
            if choice == "in_place":
                return f"{sub()}.clone().mul_(0.5).add_({sub()})"
        elif kind == "int":
            if choice == "binary":
                return self.pick(["({} + {})", "({} * 3 - {})", "({} ^ {})", "({} & {})", "torch.maximum({}, {})"]).format(sub(), sub())
            if choice == "scalar":
                return f"({sub()} + {self.scalar(self.pick(['int', 'float']) if dtype else 'int', dtype)})"
            if choice == "where":
                return f"torch.where({sub('bool')}, {sub()}, {sub()})"
            if choice == "in_place":
                return f"{sub()}.clone().add_({sub()})"
            if choice == "constant":
                return f"({sub()} + {self.draw(st.integers(-3, 3))})"
        else:
            if choice == "logic":
                return self.pick(["(~{0})", "({0} ^ {1})", "({0} | {1})", "({0} & {1})"]).format(sub(), sub())
            if choice == "compare_int":
                return f"({sub('int64')} % 3 == 0)"
            if choice == "compare_float":
                return f"({sub('float32')} > 0.2)"
            if choice == "scalar":
                return f"({sub()} & ({self.scalar('int', 'int64')} % 2 == 0))"
        if choice == "index" and shape:
            return self.index(sub(), shape)
        return sub()

    def index(self, value: str, shape: tuple[int, ...]) -> str:
        """Indexing that keeps the shape: flip, roll, a permutation, or a row chosen at run time."""
        how = self.pick(["flip", "roll", "perm", "dynamic"])
        if how == "flip":
            return f"{value}.flip(0)"
        if how == "roll":
            return f"{value}.roll(1, -1)"
        if how == "perm":
            perm = list(range(shape[-1]))[::-1] if shape[-1] < 3 else [shape[-1] - 1, *range(shape[-1] - 1)]
            return f"{value}[..., {perm}]"
        ints = [v for v in self.env if v.kind == "int" and v.shape == ()]
        j = self.pick(ints).name if ints else "n"
        return f"{value}.index_select(0, ({j}.long() % {shape[0]}).abs().view(1)).expand{_shape_text(shape)}"

    # -- statements
    def carry_update(self, v: Var) -> str:
        e = self.expr(v.dtype, v.shape)
        if v.kind == "float":
            return self.pick([f"torch.tanh({e})", f"({e}).clamp(-4, 4)"])
        if v.kind == "int":
            return f"(({e}) % 1000)"
        return e

    def statements(self, loops_left: int) -> None:
        """0-2 temporaries (some updated in place), maybe a nested loop, added to the scope."""
        for _ in range(self.draw(st.integers(0, 2))):
            dtype, shape = self.pick(DTYPES), self.pick(SHAPES)
            name = self.fresh("t")
            self.lines.append(f"{name} = {self.expr(dtype, shape)}")
            if self.draw(st.booleans()):
                if shape and dtype != "bool":
                    self.lines.append(f"{name} = {name}.clone()")
                    self.lines.append(f"{name}[0] = {self.expr(dtype, shape[1:], 1)}")
                elif dtype in FLOAT_DTYPES:
                    self.lines.append(f"{name} = {name} * 1")
                    self.lines.append(f"{name}.mul_({self.expr(dtype, shape, 1)})")
            self.env.append(Var(name, dtype, shape))
        floats = [v for v in self.env if v.kind == "float" and v.name not in CLOSURES]
        if loops_left > 0 and floats and self.draw(st.integers(0, 2)) == 0:
            self.nested_loop(self.pick(floats))

    def nested_loop(self, v: Var) -> None:
        name = self.fresh("inner")
        kind = self.pick(["fori", "while", "scan", "cond"])
        if kind == "cond":
            # a branch on the device: a bool from the scope, and a step each way
            pred = f"({self.expr('bool', (), 1)}).reshape(())"
            branches = [_Writer(self.draw, self.env + [Var("u", v.dtype, v.shape)], depth=1) for _ in range(2)]
            steps = [f"lambda u: torch.tanh({b.expr(v.dtype, v.shape)})" for b in branches]
            self.lines.append(f"{name} = L.cond({pred}, {steps[0]}, {steps[1]}, ({v.name},))")
            self.env.append(Var(name, v.dtype, v.shape))
            return
        inner = _Writer(self.draw, self.env + [Var("u", v.dtype, v.shape), Var("j", "int64", ())], depth=1)
        step = f"torch.tanh({inner.expr(v.dtype, v.shape)})"
        if kind == "fori":
            line = f"{name} = L.fori_loop(0, 2, lambda j, u: {step}, {v.name})"
        elif kind == "while":
            line = (f"{name} = L.while_loop(lambda j, u: j < 2, lambda j, u: (j + 1, {step}), "
                    f"(torch.zeros((), dtype=torch.int64, device=dev), {v.name}))[1]")
        else:
            inner = _Writer(self.draw, self.env + [Var("u", v.dtype, v.shape), Var("e", v.dtype, v.shape)], depth=1)
            step = f"torch.tanh({inner.expr(v.dtype, v.shape)})"
            line = f"{name} = L.scan(lambda u, e: ({step}, u.sum()), {v.name}, torch.stack([{v.name}, {v.name} * 0.5]))[0]"
        self.lines.append(line)
        self.env.append(Var(name, v.dtype, v.shape))


_OPS = {
    "float": ["unary", "binary", "scalar", "reduce", "matmul", "where", "in_place", "index"],
    "int": ["binary", "scalar", "where", "in_place", "constant", "index"],
    "bool": ["logic", "compare_int", "compare_float", "scalar", "index"],
}


def _structure(draw: Callable, names: list[str]) -> tuple[str, dict[str, str]]:
    """A pytree of the carries as source text, and each carry's access path in it."""
    form = draw(st.sampled_from(["tuple", "dict", "nested"])) if len(names) > 1 else draw(st.sampled_from(["tuple", "dict"]))
    if form == "tuple":
        return "(" + ", ".join(names) + ",)", {n: f"[{k}]" for k, n in enumerate(names)}
    if form == "dict":
        return "{" + ", ".join(f'"{n}": {n}' for n in names) + "}", {n: f'["{n}"]' for n in names}
    head, rest = names[0], names[1:]
    return (
        "{" + f'"{head}": {head}, "rest": [' + ", ".join(rest) + "]}",
        {head: f'["{head}"]', **{n: f'["rest"][{k}]' for k, n in enumerate(rest)}},
    )


@st.composite
def loop_programs(draw: Callable) -> LoopProgram:
    """A random LoopProgram (see the module docstring)."""
    count = draw(st.integers(1, 3))
    carries = [Var(f"c{k}", draw(st.sampled_from(DTYPES)), draw(st.sampled_from(SHAPES))) for k in range(count)]
    kind = draw(st.sampled_from(["while", "fori_static", "fori_tensor", "scan", "scan_reverse"]))
    tree, paths = _structure(draw, [c.name for c in carries])
    closures = [Var(k, "float32", s) for k, s in CLOSURES.items()]
    inputs = list(carries)
    env = [*carries, *closures, Var("n", "int64", ())]
    xs: list[Var] = []
    if kind.startswith("scan"):
        length = draw(st.integers(1, 5))
        xs = [Var("x", "float32", draw(st.sampled_from(SHAPES)))]
        if draw(st.booleans()):
            xs.append(Var("xk", draw(st.sampled_from(INT_DTYPES)), draw(st.sampled_from(SHAPES))))
        inputs += [Var(f"xs_{x.name}", x.dtype, (length, *x.shape)) for x in xs]
        env += xs
    if kind in ("while", "fori_static", "fori_tensor"):
        env.append(Var("i", "int64", ()))

    body = _Writer(draw, env)
    unpack = [f"{c.name} = t{paths[c.name]}" for c in carries]
    body.statements(loops_left=1)
    updates = [f"{c.name} = {body.carry_update(c)}" for c in carries]
    signature = ", ".join(["n", *(v.name for v in inputs), *CLOSURES])
    src = [f"def program({signature}):", "    dev = n.device"]
    if kind == "while":
        cond = "i < n"
        data = [c for c in carries if c.kind in ("int", "bool")]
        if data and draw(st.booleans()):
            c = draw(st.sampled_from(data))
            cond += f" & ({c.name}.sum() < 2500)" if c.kind == "int" else f" & ~{c.name}.all()"
        src += ["    def cond(i, t):", *_nested(*unpack, f"return {cond}")]
        src += ["    def body(i, t):", *_nested(*unpack, *body.lines, *updates, f"return i + 1, {tree}")]
        src += ["    i0 = torch.zeros((), dtype=torch.int64, device=dev)", f"    return L.while_loop(cond, body, (i0, {tree}))"]
    elif kind.startswith("fori"):
        upper = str(draw(st.integers(1, 5))) if kind == "fori_static" else "n"
        src += ["    def body(i, t):", *_nested(*unpack, *body.lines, *updates, f"return {tree}")]
        src += [f"    return L.fori_loop(0, {upper}, body, {tree})"]
    else:
        ys = [body.expr(draw(st.sampled_from(DTYPES)), draw(st.sampled_from(SHAPES)), 1) for _ in range(draw(st.integers(1, 2)))]
        xs_tree = "{" + ", ".join(f'"{x.name}": xs_{x.name}' for x in xs) + "}"
        slices = [f'{x.name} = xs["{x.name}"]' for x in xs]
        src += ["    def combine(t, xs):", *_nested(*slices, *unpack, *body.lines, *updates, f"return {tree}, ({', '.join(ys)},)")]
        src += [f"    return L.scan(combine, {tree}, {xs_tree}, reverse={kind == 'scan_reverse'})"]
    source = "\n".join(src) + "\n"
    seed = draw(st.integers(0, 2**31 - 1))
    trips = (draw(st.integers(2, 6)), draw(st.integers(2, 6)))
    return LoopProgram(source, tuple(inputs), seed, trips)


def _nested(*lines: str) -> list[str]:
    """Lines of a function nested in `program`."""
    return [f"        {line}" for line in lines]
