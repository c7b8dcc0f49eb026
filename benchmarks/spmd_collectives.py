"""SPMD: the collectives XLA's partitioner puts inside each loop's While body, per iteration.

A collective in a While body runs on every iteration, so the count per body is what a
sharded loop pays per step in communication. The programs are the SPMD test programs
(`tests/spmd_programs.py`, 4 virtual CPU devices), each run in its own process; the counts
are read from the optimized, partitioned HLO (`--xla_dump_to`); a training step has a forward
and a backward While. The table also says whether the sharded run agreed with the unsharded
one on CPU, and gives the time of one call (one training step), the median of 5 calls after
the first, waited for on the devices (4 virtual devices share this machine's cores: compare
rows of one run, not with a real mesh).

    .venv/bin/python benchmarks/spmd_collectives.py     # ~1 min on 2 cores
Writes benchmarks/results/spmd_collectives.md and spmd_collectives.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROGRAMS = HERE.parent / "tests" / "spmd_programs.py"
RESULTS = HERE / "results"

CASES = {
    "data_parallel_while": "while_loop, batch split over 4 devices (data parallel)",
    "data_parallel_scan": "scan (RNN), batch split over 4 devices",
    "tensor_parallel_mlp": "while_loop of an MLP, weights split Megatron-style over 4",
    "conflicting_shardings": "while_loop, carry split by batch, weight by columns (2x2)",
    "constraint_in_body": "while_loop with with_sharding_constraint in its body (2x2)",
    "training_through_sharded_scan": "training step through a scan, FSDP (batch and weights split over 4)",
    "batch_sharded_scan_training": "training step through a scan, batch split over 4, weight replicated, gradients seeded with ones",
    "fsdp_gru": "training step of the fsdp_rnn example's GRU, FSDP over 4, loop invariants gathered before each While (default)",
    "fsdp_gru_not_gathered": "the same, gather_invariants=False",
}


def run(case: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, str(PROGRAMS), case], capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bodies(result: dict) -> list[tuple[str, list[str]]]:
    """(which program's While, its collectives) for each While body of the case."""
    if "collectives_by_program" in result:
        names = ["forward", "backward"] if len(result["collectives_by_program"]) == 2 else None
        return [(names[p] if names else f"program {p}", body)
                for p, program in enumerate(result["collectives_by_program"]) for body in program]
    return [("", body) for body in result["collectives"]]


def describe(ops: list[str]) -> str:
    return ", ".join(f"{n} {op}" for op, n in sorted(Counter(ops).items())) or "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    rows, records = [], []
    for case, what in CASES.items():
        result = run(case)
        step = f"{result['step_s'] * 1e3:.1f} ms" if "step_s" in result else ""
        for program, ops in bodies(result):
            equal = result.get("equal")
            rows.append(f"| {what} | {program or 'the While'} | {len(ops)} | {describe(ops)} | {'yes' if equal else 'NO'} | {step} |")
            records.append({"case": case, "program": program, "collectives": ops, "equal_to_unsharded": equal, "step_s": result.get("step_s")})
        print(rows[-1], flush=True)
    table = "\n".join([
        "| program | While | collectives per iteration | which | equal to unsharded CPU | one call |",
        "|---|---|---:|---|---|---:|",
        *rows,
    ])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "spmd_collectives.md").write_text("# Collectives per While iteration (SPMD, 4 virtual CPU devices)\n\n" + table + "\n")
    (a.out / "spmd_collectives.json").write_text(json.dumps(records, indent=1) + "\n")
    print()
    print(table)
    print(f"wrote {a.out}/spmd_collectives.md and spmd_collectives.json")


if __name__ == "__main__":
    main()
