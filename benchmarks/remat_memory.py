"""Training memory vs compute with and without `remat`, for a GRU trained through a long scan
and for a stepper trained through a while_loop (as many checkpoints as iterations: without remat it stores every one).

Each configuration runs in its own process (peak RSS is per process): it compiles one
training step (forward + backward) with xla_loop, runs it a few times, and reports the
peak host memory (ru_maxrss; on PJRT_DEVICE=CPU the device buffers live there) and the
median time per step. Run:  .venv/bin/python benchmarks/remat_memory.py
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

STEPS, BATCH, HIDDEN = 2000, 64, 256


def measure(workload: str, remat: str) -> dict:
    import torch
    import torch_xla

    import xla_loop_backend as xl

    remat_option = {"off": False, "sqrt": True}.get(remat, remat if remat in ("off", "sqrt") else int(remat))
    dev = torch_xla.device()
    torch.manual_seed(0)
    if workload == "gru_scan":
        cell = torch.nn.GRUCell(HIDDEN, HIDDEN).to(dev)

        def loss_fn(h, xs):
            h, ys = xl.scan(lambda h, x: (cell(x, h), h.sum(-1)), h, xs)
            return ys.mean() + h.pow(2).mean()

        args = (torch.zeros(BATCH, HIDDEN, device=dev), torch.randn(STEPS, BATCH, HIDDEN, device=dev))
        params = list(cell.parameters())
    else:
        lin = torch.nn.Linear(HIDDEN, HIDDEN).to(dev)

        def loss_fn(n, x):
            start = torch.zeros((), dtype=torch.int64, device=x.device)
            _, x = xl.while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x + 0.01 * torch.tanh(lin(x))), (start, x))
            return x.pow(2).mean()

        args = (torch.tensor(STEPS, device=dev), torch.randn(BATCH, HIDDEN, device=dev))
        params = list(lin.parameters())
    compiled = xl.compile(loss_fn, fullgraph=True, checkpoints=STEPS, remat=remat_option)
    times = []
    for i in range(4):
        torch_xla.sync()
        start = time.perf_counter()
        loss = compiled(*args)
        loss.backward()
        torch_xla.sync()
        torch_xla._XLAC._xla_wait_device_ops([])
        times.append(time.perf_counter() - start)
        for p in params:
            p.grad = None
    return {
        "workload": workload,
        "remat": remat,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_step_s": times[0],
        "step_s": statistics.median(times[1:]),
    }


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(measure(sys.argv[1], sys.argv[2])))
        return
    rows = []
    for workload in ("gru_scan", "trained_while"):
        for remat in ("off", "sqrt", "100"):
            out = subprocess.run(
                [sys.executable, __file__, workload, remat], capture_output=True, text=True,
                env={**os.environ, "PJRT_DEVICE": os.environ.get("PJRT_DEVICE", "CPU")},
            )
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"training step through a {STEPS}-step loop, batch {BATCH}, hidden {HIDDEN} (PJRT_DEVICE={os.environ.get('PJRT_DEVICE', 'CPU')})")
    print("| workload | remat | peak host memory (MB) | first step (s) | step (s, median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['remat']} | {r['peak_rss_mb']:.0f} | {r['first_step_s']:.2f} | {r['step_s']:.3f} |")


if __name__ == "__main__":
    main()
