"""Repeated layers, rolled into one scan or not: first call and training step against depth.

    .venv/bin/python benchmarks/roll_layers.py [DEPTH ...]      (default: 4 48)

Each (depth, rolled or not) runs in a fresh process: a stack of `depth` blocks (LayerNorm,
Linear 64->128, GELU, Linear 128->64, residual; the block marked with
torch.compiler.nested_compile_region), batch 16, forward and backward under
`xla_loop_backend.compile(fullgraph=True, roll_layers=...)`. It prints the first call
(compile included) and the median of 5 more steps, each waited for on the device.
Not yet in `./dev bench`: no paired rounds, no openxla column.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time


def worker(depth: int, roll: bool) -> str:
    import torch
    import torch_xla

    import xla_loop_backend

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(64)
            self.fc1 = torch.nn.Linear(64, 128)
            self.fc2 = torch.nn.Linear(128, 64)

        @torch.compiler.nested_compile_region
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(depth))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x.pow(2).mean()

    device = torch_xla.device()
    model = Model().to(device)
    x = torch.randn(16, 64, device=device)
    torch_xla.sync()
    compiled = xla_loop_backend.compile(model, fullgraph=True, roll_layers=roll)

    def step() -> float:
        model.zero_grad(set_to_none=True)  # (as a training step does: no accumulation graph)
        start = time.perf_counter()
        compiled(x).backward()
        torch_xla.sync()
        torch_xla._XLAC._xla_wait_device_ops([])
        return time.perf_counter() - start

    first = step()
    steady = statistics.median(step() for _ in range(5))
    return f"{first:.2f} s | {steady * 1e3:.1f} ms"


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--worker":
        print(worker(int(argv[1]), argv[2] == "roll"))
        return
    depths = [int(a) for a in argv] or [4, 48]
    print("| layers | rolled: first call | rolled: step | unrolled: first call | unrolled: step |")
    print("|---|---|---|---|---|")
    for depth in depths:
        cells = []
        for mode in ("roll", "unrolled"):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", str(depth), mode], capture_output=True, text=True, check=True
            ).stdout.strip().splitlines()[-1]
            cells.append(out)
        print(f"| {depth} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
