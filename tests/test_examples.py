"""The README's demo (examples/seed_while_loop.py) prints what the README promises."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_seed_demo_output():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "seed_while_loop.py")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PJRT_DEVICE": "CPU"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines == [
        "while_loop(iteri > 0, add(x, 1)) from x=3, iteri=10 -> 13",
        "first call: 1 XLA compile(s), 0 host sync(s)",
        "iteri=100: 0 XLA compile(s), 0 host sync(s) during the call",
        "iteri=10000: 0 XLA compile(s), 0 host sync(s) during the call",
        "result after 10000 iterations: 10003",
    ]
