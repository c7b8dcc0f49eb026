"""Programs the fuzzer (test_fuzz.py) found failing, shrunk by hypothesis, kept as regular
tests. Each entry: what was wrong, and the program as the fuzzer printed it."""
from __future__ import annotations

import pytest
from loop_programs import LoopProgram, Var
from test_fuzz import check_program

REGRESSIONS = {
    # A loop body (here fori_loop's) that reads a carry through its closure: torch's scan
    # got the same tensor as a carry and as a captured input and refused it ("scan might
    # be aliasing the input or the output!"). Fixed by aliasing.unalias_loop_operands.
    "carry also captured by the body": LoopProgram(
        source=(
            "def program(n, c0, w3, w4):\n"
            "    dev = n.device\n"
            "    def cond(i, t):\n"
            "        c0 = t[0]\n"
            "        return i < n\n"
            "    def body(i, t):\n"
            "        c0 = t[0]\n"
            "        inner1 = L.fori_loop(0, 2, lambda j, u: torch.tanh(c0), c0)\n"
            "        c0 = torch.tanh(c0)\n"
            "        return i + 1, (c0,)\n"
            "    i0 = torch.zeros((), dtype=torch.int64, device=dev)\n"
            "    return L.while_loop(cond, body, (i0, (c0,)))\n"
        ),
        inputs=(Var("c0", "float32", ()),),
        seed=0,
        trip_counts=(2, 2),
    ),
    # torch_xla keeps one device buffer per scalar constant, and `torch.tensor(3).to(xla)`
    # got that buffer: traced with n = 3 next to the constant 3 of `% 3`, the bridge baked
    # n in, so the call with n = 2 silently ran 3 iterations (openxla does the same).
    # Fixed: executable.py traces a 0-dim argument on a buffer of its own.
    "trip count equal to a constant in the body": LoopProgram(
        source=(
            "def program(n, c0, w3, w4):\n"
            "    dev = n.device\n"
            "    def body(i, t):\n"
            "        c0 = t[\"c0\"]\n"
            "        c0 = (((c0.to(torch.int64)) + (c0.to(torch.int64))) % 3 == 0)\n"
            "        return {\"c0\": c0}\n"
            "    return L.fori_loop(0, n, body, {\"c0\": c0})\n"
        ),
        inputs=(Var("c0", "bool", (4,)),),
        seed=2,
        trip_counts=(3, 2),
    ),
    # `x.amax()` (all dimensions) reduced nothing on XLA, so adding it to a carry of
    # another shape failed to lower (and would broadcast silently where shapes allow).
    # Fixed by workarounds.apply_workarounds.
    "amax over all dimensions": LoopProgram(
        source=(
            "def program(n, c0, xs_x, w3, w4):\n"
            "    dev = n.device\n"
            "    def combine(t, xs):\n"
            "        x = xs[\"x\"]\n"
            "        c0 = t[0]\n"
            "        c0 = torch.tanh(c0 + x.amax() + x.amin())\n"
            "        return (c0,), (c0.sum(),)\n"
            "    return L.scan(combine, (c0,), {\"x\": xs_x}, reverse=True)\n"
        ),
        inputs=(Var("c0", "float32", (4,)), Var("xs_x", "float32", (4, 3))),
        seed=18,
        trip_counts=(5, 6),
    ),
    # A body returning an `expand` (stride 0) for a dense carry: torch's loop ops reject
    # carries whose strides change. Fixed: the loop functions make carries dense.
    "carry returned as an expand": LoopProgram(
        source=(
            "def program(n, c0, c1, w3, w4):\n"
            "    dev = n.device\n"
            "    def body(i, t):\n"
            "        c0 = t[0]\n"
            "        c1 = t[1]\n"
            "        c1 = (~c1).index_select(0, (n.long() % 2).abs().view(1)).expand(2, 3,)\n"
            "        return (c0, c1,)\n"
            "    return L.fori_loop(0, 1, body, (c0, c1,))\n"
        ),
        inputs=(Var("c0", "int32", (2, 3)), Var("c1", "bool", (2, 3))),
        seed=2,
        trip_counts=(2, 6),
    ),
    # A combine_fn returning one new tensor both as carry and as y: torch's scan rejects
    # outputs that alias each other. Fixed: the loop functions copy a repeated output.
    "same tensor as carry and as y": LoopProgram(
        source=(
            "def program(n, c0, c1, xs_x, w3, w4):\n"
            "    dev = n.device\n"
            "    def combine(t, xs):\n"
            "        x = xs[\"x\"]\n"
            "        c0 = t[0]\n"
            "        c1 = t[1]\n"
            "        c0 = torch.tanh(c0)\n"
            "        c1 = ((c1) % 1000)\n"
            "        return (c0, c1,), (c0,)\n"
            "    return L.scan(combine, (c0, c1,), {\"x\": xs_x}, reverse=False)\n"
        ),
        inputs=(Var("c0", "float32", (2, 3)), Var("c1", "int64", (3, 4)), Var("xs_x", "float32", (1,))),
        seed=0,
        trip_counts=(2, 2),
    ),
    # `x > 0.2` with x float32 compared in float64 on XLA: a float32 0.2 was greater than
    # 0.2, so a bool carry came out True where eager says False. Fixed by
    # workarounds.apply_workarounds (the scalar is rounded to the tensor's dtype).
    "float tensor compared with a Python float": LoopProgram(
        source=(
            "def program(n, c0, w3, w4):\n"
            "    dev = n.device\n"
            "    def body(i, t):\n"
            "        c0 = t[0]\n"
            "        c0 = (((c0.to(torch.float32)).sum(-1, keepdim=True) * 0.2 + (c0.to(torch.float32))) > 0.2)\n"
            "        return (c0,)\n"
            "    return L.fori_loop(0, n, body, (c0,))\n"
        ),
        inputs=(Var("c0", "bool", (2, 3)),),
        seed=1,
        trip_counts=(2, 2),
    ),
    # A bfloat16 input carry, cast to float32 for a scan output: XLA keeps float32
    # precision between the body's ops where eager rounds to bfloat16 ("excess
    # precision"), 2e-3 apart. The harness compared it at float32's tolerance because the
    # program's source never says bfloat16; it now looks at the inputs' dtypes too.
    "bfloat16 input carry read as float32": LoopProgram(
        source=(
            "def program(n, c0, xs_x, w3, w4):\n"
            "    dev = n.device\n"
            "    def combine(t, xs):\n"
            "        x = xs[\"x\"]\n"
            "        c0 = t[0]\n"
            "        c0 = torch.tanh(torch.sin(c0).abs().sqrt())\n"
            "        return (c0,), ((c0.to(torch.float32)),)\n"
            "    return L.scan(combine, (c0,), {\"x\": xs_x}, reverse=False)\n"
        ),
        inputs=(Var("c0", "bfloat16", (2, 3)), Var("xs_x", "float32", (5,))),
        seed=292226,
        trip_counts=(3, 2),
    ),
    # A combine_fn returning a tensor it captured (n) as its y: torch's scan took it for an
    # output aliasing an input and refused the program. Fixed: every output is copied.
    "captured tensor returned as y": LoopProgram(
        source=(
            "def program(n, c0, c1, xs_x, w3, w4):\n"
            "    dev = n.device\n"
            "    def combine(t, xs):\n"
            "        x = xs[\"x\"]\n"
            "        c0 = t[0]\n"
            "        c1 = t[1]\n"
            "        c0 = torch.tanh(c0)\n"
            "        c1 = torch.tanh(c1)\n"
            "        return (c0, c1,), (n,)\n"
            "    return L.scan(combine, (c0, c1,), {\"x\": xs_x}, reverse=False)\n"
        ),
        inputs=(Var("c0", "float32", (2, 3)), Var("c1", "float32", (3, 4)), Var("xs_x", "float32", (1, 3, 4))),
        seed=0,
        trip_counts=(2, 2),
    ),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_program_found_by_the_fuzzer(name):
    check_program(REGRESSIONS[name])
