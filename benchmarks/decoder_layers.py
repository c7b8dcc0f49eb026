"""A decoder-only model's training step against depth: scan_layers, automatic rolling,
openxla and torch_xla's lazy mode (issue 26).

The model is written here, shaped like torch_xla's decoder example: token embedding, `depth`
decoder layers (RMS norm, 4-head causal self-attention, RMS norm, gated SiLU MLP, residuals),
a final norm and an output projection; hidden 64, 4 heads, MLP 128, vocabulary 256, sequence
32, batch 4. A step is the forward, a cross-entropy loss outside the compiled model, the
backward and an SGD update, waited for on the device. Systems:

  xla_loop_scan_layers   the layers run by xla_loop_backend.scan_layers, under
                         xla_loop_backend.compile: Dynamo traces one layer
  torch_xla_scan_layers  the layers run by torch_xla's scan_layers, under
                         xla_loop_backend.compile (xla_loop traces its own in its place)
  rolling                a Python loop over the layers, xla_loop_backend.compile: the
                         repeated layers roll into one scan after Dynamo traced each
  openxla                a Python loop, torch.compile(backend="openxla")
  lazy_scan_layers       torch_xla's scan_layers in lazy mode, no torch.compile (torch_xla's
                         documented way; a step ends with torch_xla.sync())

Each (system, depth) runs in a fresh process: the first step split by stage (Dynamo's
tracing, AOTAutograd with xla_loop's passes, making executables, XLA's compile alone), the
second step, the steady step (median of 10) and the process's peak RSS (on the CPU device
buffers are host memory). Rounds alternate the order of systems; the ratios the issue's
targets name are medians of per-round ratios.

    .venv/bin/python benchmarks/decoder_layers.py                 # depths 4 16 32, 2 rounds
    .venv/bin/python benchmarks/decoder_layers.py --quick         # depths 4 and 32, 1 round, no openxla
Writes benchmarks/results/decoder_layers.{md,json} (--name: another stem).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SYSTEMS = ("xla_loop_scan_layers", "torch_xla_scan_layers", "rolling", "openxla", "lazy_scan_layers")
HIDDEN, HEADS, MLP, VOCAB, SEQ, BATCH = 64, 4, 128, 256, 32, 4


def build(depth: int, layers_by: str) -> Any:
    """The model; `layers_by` is "loop", "xla_loop" or "torch_xla" (whose scan_layers runs the layers)."""
    import torch
    import torch.nn.functional as F

    class RmsNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(HIDDEN))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = RmsNorm(), RmsNorm()
            self.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
            self.out = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.gate = torch.nn.Linear(HIDDEN, MLP, bias=False)
            self.up = torch.nn.Linear(HIDDEN, MLP, bias=False)
            self.down = torch.nn.Linear(MLP, HIDDEN, bias=False)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            b, s, _ = h.shape
            q, k, v = self.qkv(self.norm1(h)).view(b, s, 3, HEADS, HIDDEN // HEADS).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS)
            causal = torch.ones(s, s, dtype=torch.bool, device=h.device).tril()
            attention = scores.masked_fill(~causal, -1e9).softmax(-1) @ v
            h = h + self.out(attention.transpose(1, 2).reshape(b, s, HIDDEN))
            x = self.norm2(h)
            return h + self.down(F.silu(self.gate(x)) * self.up(x))

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
            self.layers = torch.nn.ModuleList([Layer() for _ in range(depth)])
            self.norm = RmsNorm()
            self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = self.embed(tokens)
            if layers_by == "xla_loop":
                import xla_loop_backend as xl

                h = xl.scan_layers(self.layers, h)
            elif layers_by == "torch_xla":
                from torch_xla.experimental.scan_layers import scan_layers

                h = scan_layers(self.layers, h)
            else:
                for layer in self.layers:
                    h = layer(h)
            return self.head(self.norm(h))

    torch.manual_seed(0)
    return Decoder()


def batch(step: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def worker(system: str, depth: int, steps: int) -> dict:
    import torch
    import torch_xla

    dev = torch_xla.device()
    layers_by = {"xla_loop_scan_layers": "xla_loop", "torch_xla_scan_layers": "torch_xla", "lazy_scan_layers": "torch_xla"}.get(system, "loop")
    model = build(depth, layers_by).to(dev)
    if system == "openxla":
        forward = torch.compile(model, backend="openxla")
    elif system == "lazy_scan_layers":
        forward = model
    else:
        import xla_loop_backend as xl

        forward = xl.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(k: int) -> float:
        tokens, targets = batch(k)
        start = time.perf_counter()
        logits = forward(tokens.to(dev))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.to(dev).reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        torch_xla.sync()
        torch_xla._XLAC._xla_wait_device_ops([])  # (JAX's block_until_ready)
        seconds = time.perf_counter() - start
        return seconds, float(loss)

    first, first_loss = step(0)
    stages = {}
    if system != "lazy_scan_layers":
        from xla_loop_backend.metrics import first_call_stages  # (Dynamo's and torch_xla's compile times)

        stages = first_call_stages()
    second, _ = step(1)
    steady = [step(2 + k)[0] for k in range(steps)]
    return {
        "system": system, "depth": depth, "first_s": first, "second_s": second,
        "steady_s": statistics.median(steady), "stages": stages, "first_loss": first_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_worker(system: str, depth: int, steps: int, cache: str | None = None) -> dict:
    env = {**os.environ, "PJRT_DEVICE": "CPU", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--worker", system, str(depth), str(steps)]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"system": system, "depth": depth, "error": done.stderr[-2000:], "wall_s": time.monotonic() - start}
    return {**json.loads(lines[-1][7:]), "wall_s": time.monotonic() - start}


def fmt(s: float | None) -> str:
    return "–" if s is None else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def report(records: list[dict], meta: dict) -> str:
    ok = [r for r in records if "first_s" in r]

    def med(system: str, depth: int, key: str) -> float | None:
        values = [r[key] for r in ok if (r["system"], r["depth"]) == (system, depth)]
        return statistics.median(values) if values else None

    def stage(system: str, depth: int, key: str) -> float | None:
        values = [r["stages"][key] for r in ok if (r["system"], r["depth"]) == (system, depth) and r["stages"]]
        return statistics.median(values) if values else None

    depths = sorted({r["depth"] for r in records})
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in records)]
    lines = [
        "# Decoder-only model: a training step against depth", "",
        f"- {meta['date']}; `{meta['command']}`; {meta['rounds']} round(s), {meta['total_s']:.0f} s in all; "
        f"{meta['cores']} cores; load average at start {meta['load_start']:.2f}",
        f"- hidden {HIDDEN}, {HEADS} heads, MLP {MLP}, vocabulary {VOCAB}, sequence {SEQ}, batch {BATCH}; SGD; "
        "each (system, depth) a fresh process; medians over rounds", "",
        "| system | layers | first step | Dynamo | AOTAutograd + passes | executables (trace + XLA compile) | XLA compile "
        "| second step | steady step | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system in systems:
        for depth in depths:
            if med(system, depth, "first_s") is None:
                errors = [r.get("error", "")[-200:] for r in records if (r["system"], r["depth"]) == (system, depth)]
                lines.append(f"| {system} | {depth} | failed: {' '.join(errors).splitlines()[-1:] if errors else ''} | | | | | | | |")
                continue
            lines.append(
                f"| {system} | {depth} | {fmt(med(system, depth, 'first_s'))} | {fmt(stage(system, depth, 'dynamo_s'))} | "
                f"{fmt(stage(system, depth, 'aot_s'))} | {fmt(stage(system, depth, 'executable_s'))} | "
                f"{fmt(stage(system, depth, 'xla_compile_s'))} | {fmt(med(system, depth, 'second_s'))} | "
                f"{fmt(med(system, depth, 'steady_s'))} | {med(system, depth, 'peak_rss_mb'):.0f} MB |"
            )
    lines += ["", "## Targets (issue 26)", "", "Each ratio is the median over rounds of that round's own ratio (the two "
              "runs it compares ran minutes apart in one round); the rounds' ratios follow it.", ""]

    def per_round(system: str, depth: int, key: str) -> dict[int, float]:
        return {r.get("round", 0): r[key] for r in ok if (r["system"], r["depth"]) == (system, depth)}

    def ratios(top: dict[int, float], bottom: dict[int, float]) -> list[float]:
        return [top[k] / bottom[k] for k in sorted(top) if k in bottom]

    lo, hi = min(depths), max(depths)
    for system in ("xla_loop_scan_layers", "torch_xla_scan_layers"):
        rs = ratios(per_round(system, hi, "first_s"), per_round(system, lo, "first_s"))
        if rs:
            m = statistics.median(rs)
            lines.append(f"- {system}: first step at {hi} layers / at {lo} layers = {m:.2f} (goal ≤ 1.3): "
                         f"{'met' if m <= 1.3 else 'not met'}; rounds: {', '.join(f'{r:.2f}' for r in rs)}")
    if 16 in depths:
        first, second = per_round("lazy_scan_layers", 16, "first_s"), per_round("lazy_scan_layers", 16, "second_s")
        lazy = {k: first[k] + second[k] for k in first if k in second}
        for system in ("xla_loop_scan_layers", "torch_xla_scan_layers"):
            rs = ratios(per_round(system, 16, "first_s"), lazy)
            if rs:
                m = statistics.median(rs)
                lines.append(f"- {system} at 16 layers: first step / torch_xla's lazy first two steps = {m:.2f} "
                             f"(goal: ≤ 1, no slower): {'met' if m <= 1 else 'not met'}; rounds: {', '.join(f'{r:.2f}' for r in rs)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=3, metavar=("SYSTEM", "DEPTH", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="depths 4 and 32, one round, without openxla")
    p.add_argument("--name", default="decoder_layers", help="results file stem in benchmarks/results/ (default decoder_layers)")
    a = p.parse_args()
    if a.worker:
        system, depth, steps = a.worker
        print("RESULT " + json.dumps(worker(system, int(depth), int(steps))), flush=True)
        return
    if a.quick:
        a.depths, a.rounds, a.systems = [4, 32], 1, [s for s in a.systems if s != "openxla"]
    started, load = time.monotonic(), os.getloadavg()[0]
    records = []
    for k in range(a.rounds):
        for depth in a.depths:
            for system in (a.systems if k % 2 == 0 else a.systems[::-1]):
                record = run_worker(system, depth, a.steps)
                record["round"] = k
                records.append(record)
                print(f"round {k} {system:22s} {depth:3d} layers: first {fmt(record.get('first_s'))} "
                      f"second {fmt(record.get('second_s'))} steady {fmt(record.get('steady_s'))}"
                      + (f" ERROR {record['error'][-300:]}" if "error" in record else ""), flush=True)
    import datetime

    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "rounds": a.rounds,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "total_s": time.monotonic() - started,
            "cores": len(os.sched_getaffinity(0)), "load_start": load}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    text = report(records, meta)
    (RESULTS / f"{a.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
