"""Differential fuzzing of training: random training programs (training_programs.py)
compiled with xla_loop on the XLA device must give the loss and the gradients (of every
parameter and of the inputs) that the same program gives as plain Python loops on CPU
(1e-4; a gradient to 1e-4 of its largest entry, see TOLERANCE),
on two calls with different trip counts; the second call must compile nothing, read at
most one value back (the loops' report) and transfer nothing else.

CI runs GRAD_FUZZ_EXAMPLES programs, the same ones every run (derandomized). The long mode
draws new ones, in processes of 250 programs (tests/long_fuzz.sh):
    ./dev fuzz grad 2000 1 2      # 2000 programs, seeds 1-8, two processes at a time
or in this one process:
    XLA_LOOP_GRAD_FUZZ_EXAMPLES=250 XLA_LOOP_GRAD_FUZZ_SEED=1 ./dev test tests/test_grad_fuzz.py
A failure is shrunk by hypothesis to a small program, printed with its source; add it to
test_grad_fuzz_regressions.py so it stays a regular test. With XLA_LOOP_FUZZ_LOG=FILE each
program is appended to FILE before it runs (the last one is the culprit if the process dies),
and "# passed N" after it passed.
"""
from __future__ import annotations

import os

import torch
import torch_xla
from hypothesis import given, note
from loop_testing import MetricsDelta, fullgraph, fuzz_settings, xla_device
from training_programs import TrainingProgram, training_programs, xla_loops

import reference_loops
import xla_loop_backend

GRAD_FUZZ_EXAMPLES = int(os.environ.get("XLA_LOOP_GRAD_FUZZ_EXAMPLES", "50"))
GRAD_FUZZ_SEED = os.environ.get("XLA_LOOP_GRAD_FUZZ_SEED")
FUZZ_LOG = os.environ.get("XLA_LOOP_FUZZ_LOG")
# Loss and gradients match to 1e-4, each gradient to 1e-4 of its largest entry: through
# nested loops with LayerNorm, float32 rounding grows (XLA's tanh and reduction order are
# not CPU's). Seen: 1.7e-4 off float64 on an entry of 0.29 in a gradient whose largest
# entry is 11.5 (CPU float32: 1.8e-5 off), a while_loop around a scan around a reverse
# scan, 18 steps deep. A wrong gradient is off by a part of its own size, not 1e-5 of it.
TOLERANCE = 1e-4

_programs_run = 0


def _gradients(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients by name (parameters, then inputs); none counts as zeros."""
    named = {**dict(module.named_parameters()), **inputs}
    return {name: torch.zeros(t.shape) if t.grad is None else t.grad.detach().cpu() for name, t in named.items()}


def check_training_program(program: TrainingProgram) -> None:
    """Run `program` both ways for both calls; compare loss and gradients; count call 2."""
    global _programs_run
    _programs_run += 1
    if FUZZ_LOG:
        with open(FUZZ_LOG, "a") as log:
            log.write(f"# program {_programs_run}: {program!r}\n")
    if _programs_run % 25 == 0:
        torch._dynamo.reset()  # keep Dynamo's caches from growing over hundreds of programs
    dev = xla_device()
    torch.zeros((), device=dev)  # the XLA runtime starts before any backward (see loop_testing)
    reference = program.module(reference_loops)
    model = program.module(xla_loops).to(dev)
    compiled = xla_loop_backend.compile(
        model, fullgraph=fullgraph(program.seed), remat=program.remat, max_iterations=program.max_iterations
    )
    for call in range(2):
        n, m, x, xs = program.arguments(call)
        x_ref, xs_ref = x.clone().requires_grad_(), xs.clone().requires_grad_()
        reference.zero_grad(set_to_none=True)
        expected_loss = reference(n, m, x_ref, xs_ref)
        expected_loss.backward()
        expected = _gradients(reference, {"x": x_ref, "xs": xs_ref})

        model.zero_grad(set_to_none=True)
        x_dev = x.to(dev).requires_grad_()
        xs_dev = xs.to(dev).requires_grad_()
        n_dev, m_dev = n.to(dev), m.to(dev)
        torch_xla.sync()
        with MetricsDelta() as delta:
            loss = compiled(n_dev, m_dev, x_dev, xs_dev)
            loss.backward()
            torch_xla.sync()
        actual = _gradients(model, {"x": x_dev, "xs": xs_dev})
        torch.testing.assert_close(loss.detach().cpu(), expected_loss.detach(), rtol=TOLERANCE, atol=TOLERANCE)
        for name in expected:
            torch.testing.assert_close(
                actual[name],
                expected[name],
                rtol=TOLERANCE,
                atol=TOLERANCE * max(1.0, expected[name].abs().max().item()),
                msg=lambda msg: f"gradient of {name}: {msg}",
            )
        if call == 1:
            counts = (delta.compiles, delta.host_syncs, delta.transfers_from_device)
            assert delta.compiles == 0 and delta.host_syncs <= 1 and delta.transfers_from_device <= 1, (
                f"second call: (compiles, host syncs, transfers) = {counts}"
            )
    if FUZZ_LOG:
        with open(FUZZ_LOG, "a") as log:
            log.write(f"# passed {_programs_run}\n")


@fuzz_settings(GRAD_FUZZ_EXAMPLES, GRAD_FUZZ_SEED)
@given(training_programs())
def test_random_training_programs_match_python_loops_on_cpu(program):
    note(
        f"program (seed {program.seed}, trip counts {program.trip_counts}, remat={program.remat}, "
        f"max_iterations={program.max_iterations}, fullgraph={fullgraph(program.seed)}):\n{program.source}"
    )
    check_training_program(program)
