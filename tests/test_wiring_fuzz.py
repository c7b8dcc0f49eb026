"""Wiring fuzzer: families of programs that differ in one operand, one constant or one device
placement (wiring_programs.py), compiled with xla_loop in one process in random order, each
against eager on CPU, then each called again in another order (a later compile must not
have replaced an earlier program's executable) with nothing compiled on that call.

CI runs WIRING_FUZZ_FAMILIES families (the same every run: derandomized). The long mode
draws new ones, in processes of 250 families (tests/long_fuzz.sh):
    ./dev fuzz wiring 250 1      # 250 families, about 1000 programs
A failure is shrunk by hypothesis; its members are printed with their sources.
"""
from __future__ import annotations

import os

import torch
import torch_xla
from hypothesis import given, note
from loop_testing import MetricsDelta, fullgraph, fuzz_settings, xla_device
from wiring_programs import Family, families

import xla_loop_backend

WIRING_FUZZ_FAMILIES = int(os.environ.get("XLA_LOOP_WIRING_FUZZ_EXAMPLES", "20"))
WIRING_FUZZ_SEED = os.environ.get("XLA_LOOP_WIRING_FUZZ_SEED")
FUZZ_LOG = os.environ.get("XLA_LOOP_FUZZ_LOG")
TOLERANCE = 1e-5

_families_run = 0


def check_family(family: Family) -> None:
    global _families_run
    _families_run += 1
    if FUZZ_LOG:
        with open(FUZZ_LOG, "a") as log:
            log.write(f"# program {_families_run}\n{family.describe()}\n")
    if _families_run % 25 == 0:
        torch._dynamo.reset()  # keep Dynamo's caches from growing over hundreds of programs
    args = family.arguments()
    dev = xla_device()
    device_args = [a.to(dev) for a in args]
    torch_xla.sync()
    expected = [m.function(xla_loop_backend, i)(*args) for i, m in enumerate(family.members)]
    compiled = {}
    for i in family.order:
        compiled[i] = torch.compile(family.members[i].function(xla_loop_backend, i), backend="xla_loop", fullgraph=fullgraph(family.seed))
        _check(family, i, compiled[i](*device_args), expected[i])
    for i in family.again:
        with MetricsDelta() as delta:
            out = compiled[i](*device_args)
            torch_xla.sync()
        _check(family, i, out, expected[i])
        assert delta.compiles == 0, f"member {i} ({family.members[i].description}) compiled again on its second call"


def _check(family: Family, i: int, actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(
        actual.cpu(), expected, rtol=TOLERANCE, atol=TOLERANCE, msg=lambda m: f"member {i} ({family.members[i].description}): {m}"
    )


@fuzz_settings(WIRING_FUZZ_FAMILIES, WIRING_FUZZ_SEED)
@given(families())
def test_programs_one_change_apart_each_get_their_own_results(family):
    note(f"family (seed {family.seed}, order {family.order}, again {family.again}, fullgraph={fullgraph(family.seed)}):\n{family.describe()}")
    check_family(family)
    if FUZZ_LOG:
        with open(FUZZ_LOG, "a") as log:
            log.write(f"# passed {_families_run}\n")
