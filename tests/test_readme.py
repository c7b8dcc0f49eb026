"""The README's usage snippets run as written."""
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


def test_spmd_snippet_runs_sharded_and_equals_cpu():
    readme = (ROOT / "README.md").read_text()
    spmd = readme[readme.index("## Scaling out: SPMD"):]
    snippet = re.search(r"```python\n(.*?)```", spmd, re.S).group(1)
    check = """
x, w = torch.randn(8, 16), torch.randn(16, 16) * 0.3
x_dev = x.to(torch_xla.device())
xs.mark_sharding(x_dev, mesh, ("data", None))
out = steps(torch.tensor(3, device=x_dev.device), x_dev, w.to(x_dev.device))
ref = x
for _ in range(3):
    ref = torch.tanh(ref @ w)
print("max error", float((out.cpu() - ref).abs().max()), torch_xla._XLAC._get_xla_sharding_spec(out))
"""
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
    result = subprocess.run([sys.executable, "-c", snippet + check], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    error, spec = re.search(r"max error (\S+) (.*)", result.stdout).groups()
    assert float(error) < 1e-5
    assert spec == "{devices=[2,1,2]0,1,2,3 last_tile_dim_replicate}"  # the carry kept x's sharding
