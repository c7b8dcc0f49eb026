"""The README's usage snippet runs as written."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_use_snippet_runs():
    readme = (ROOT / "README.md").read_text()
    use = readme[readme.index("## Use"):]
    snippet = re.search(r"```python\n(.*?)```", use, re.S).group(1)
    result = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PJRT_DEVICE": "CPU"}, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # sqrt(2), sqrt(9); ys stacked over 1000 steps; the Euler loop decays toward 0.
    assert "tensor([1.4142, 3.0000])" in result.stdout
    assert "torch.Size([1000, 2])" in result.stdout
