"""Differential fuzzing: random loop programs (loop_programs.py) compiled with xla_loop on
the XLA device must give what the same program gives as plain Python loops eagerly on
CPU (reference_loops.py), on two calls with different trip counts; the second call must
reuse the executable with no host transfer (so none per iteration either).

CI runs FUZZ_EXAMPLES programs, the same ones every run (derandomized). The long mode
draws new ones:  ./dev fuzz forward 3000 1 2  (processes of 250 programs, tests/long_fuzz.sh)
or XLA_LOOP_FUZZ_EXAMPLES=3000 XLA_LOOP_FUZZ_SEED=1 ./dev test tests/test_fuzz.py (one process).
A failure is shrunk by hypothesis to a small program, printed with its source; add that
source to test_fuzz_regressions.py so it stays a regular test.
"""
from __future__ import annotations

import os

import torch
import torch.utils._pytree as pytree
import torch_xla
from hypothesis import given, note
from loop_programs import LoopProgram, loop_programs
from loop_testing import MetricsDelta, fullgraph, fuzz_settings, to_device, xla_device

import reference_loops
import xla_loop_backend

FUZZ_EXAMPLES = int(os.environ.get("XLA_LOOP_FUZZ_EXAMPLES", "250"))
FUZZ_SEED = os.environ.get("XLA_LOOP_FUZZ_SEED")

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # rtol = atol; ints and bools exact


def assert_close_by_dtype(actual: object, expected: object, loose: bool = False) -> None:
    """Compare leaf by leaf; `loose`: every float at bfloat16's tolerance (XLA may keep a
    bfloat16 value in float32 between ops, "excess precision", which eager rounds)."""
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    assert a_spec == e_spec, f"structure differs: {a_spec} vs {e_spec}"
    for k, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"output {k}: {a.dtype}{list(a.shape)} vs {e.dtype}{list(e.shape)}"
        tol = TOLERANCE[torch.bfloat16] if loose and e.is_floating_point() else TOLERANCE.get(e.dtype, 0)
        torch.testing.assert_close(a.cpu(), e, rtol=tol, atol=tol, msg=lambda m: f"output {k}: {m}")


_programs_run = 0


def check_program(program: LoopProgram) -> None:
    """Run `program` both ways for both trip counts; compare; count the second call."""
    global _programs_run
    _programs_run += 1
    if _programs_run % 50 == 0:
        torch._dynamo.reset()  # keep Dynamo's caches from growing over hundreds of programs
    reference = program.function(reference_loops)
    compiled = torch.compile(program.function(xla_loop_backend), backend="xla_loop", fullgraph=fullgraph(program.seed))
    dev = xla_device()
    for call, n in enumerate(program.trip_counts):
        args = program.arguments(n)
        expected = reference(*args)
        device_args = to_device(args, dev)
        torch_xla.sync()
        with MetricsDelta() as delta:
            out = compiled(*device_args)
            torch_xla.sync()
        assert_close_by_dtype(to_device(out, "cpu"), expected, loose=program.uses_bfloat16)
        if call == 1:
            counts = (delta.compiles, delta.host_syncs, delta.transfers_from_device)
            assert counts == (0, 0, 0), f"second call: (compiles, host syncs, transfers) = {counts}"


@fuzz_settings(FUZZ_EXAMPLES, FUZZ_SEED)
@given(loop_programs())
def test_random_loop_programs_match_python_loops_on_cpu(program):
    note(f"program (seed {program.seed}, trip counts {program.trip_counts}, fullgraph={fullgraph(program.seed)}):\n{program.source}")
    check_program(program)
