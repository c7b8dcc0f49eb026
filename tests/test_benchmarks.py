"""benchmarks/: the torch worker still runs, and xla_loop's figures keep their structure
(one compile on the first call; none, and no host sync or transfer, per steady call)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_worker_reports_one_compile_then_none_for_xla_loop():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "workloads_torch.py"), "--system", "xla_loop", "--workload", "B",
         "--trips", "100", "--steady-budget-s", "0.2", "--max-repeats", "3"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PJRT_DEVICE": "CPU"},
    )
    records = [json.loads(line[6:]) for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    assert records and records[-1]["event"] == "result", result.stderr[-3000:]
    record = records[-1]
    assert "error" not in record, record
    assert record["first_call_counts"]["compiles"] == 1
    assert record["per_call"] == {"compiles": 0, "executions": 1, "host_syncs": 0, "transfers": 0}
    assert record["steady_s"] > 0
