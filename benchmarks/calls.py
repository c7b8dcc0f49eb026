"""Calls and compiles against JAX: per-call time, first call by stage, pinned and unpinned.

    .venv/bin/python benchmarks/calls.py [--rounds 3] [--quick]     (also the end of ./dev bench)

Each point (workload, trip count) runs xla_loop (`torch.compile(backend="xla_loop")`),
xla_loop_decorator (`@xla_loop_backend.compile`, which drops Dynamo's guards on the loop API's
internals) and JAX back to back, in rounds (order reversed every other round), once pinned to one CPU and once unpinned (every CPU of the
machine, as users run), each in a fresh process (workers of suite.py). A call is waited for
on the device: JAX with `block_until_ready`, xla_loop with torch_xla's `wait_device_ops`
(a sync first only where the result is still lazy IR). Per call: the median of every call
made in about a second (thousands for B at 10 trips). Targets are judged on the median of
the per-round ratios, with their range. The first call of xla_loop is split into Dynamo's
tracing, AOTAutograd (with xla_loop's passes and lowering), making the executable (the
graph's one trace and XLA's compile) and XLA's compile alone.
Output: benchmarks/results/calls.{md,json}.

    .venv/bin/python benchmarks/calls.py --torch-logs [--rounds 5]

pairs xla_loop with TORCH_LOGS unset and set to "xla_loop_backend" (B 10 trips, pinned and
unpinned, order reversed every other round): what logging adds to a call, as the per-round
ratio of per-call medians. Output: benchmarks/results/calls_torch_logs.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import suite  # noqa: E402

POINTS = (("B", 10), ("A", 1000), ("B", 10000), ("C", 1000), ("E", 100))
QUICK_POINTS = (("B", 10), ("A", 1000), ("B", 10000))
PINNINGS = ("pinned", "unpinned")
OURS = ("xla_loop", "xla_loop_decorator")
# (label, workload, trips, pinnings judged, goal as a ratio to JAX, or None for an absolute first-call goal)
TARGETS = (
    ("per call, B 10 trips", "B", 10, PINNINGS, 2.0),
    ("A 1000 trips", "A", 1000, ("unpinned",), 1.0),
    ("B 10000 trips", "B", 10000, ("unpinned",), 1.0),
    ("C (RNN scan) 1000 steps", "C", 1000, PINNINGS, 1.2),
    ("E (training step) 100 steps", "E", 100, PINNINGS, 1.5),
)
FIRST_CALL_GOAL_S = 0.5  # first call of B (10 trips)


def run(rounds: int, points: tuple, jax_python: Path | None, log_dir: Path) -> list[dict]:
    allowed = sorted(os.sched_getaffinity(0))
    records = []
    for k in range(rounds):
        for workload, trips in points:
            for pinning in PINNINGS:
                cfg = {"cap": 120.0, "steady_budget": 1.0, "max_repeats": 5000,
                       "cpus": {allowed[-1]} if pinning == "pinned" else None}
                order = [*OURS, "jax"] if k % 2 == 0 else ["jax", *OURS[::-1]]
                for system in order:
                    record = suite.run_worker(system, workload, trips, cfg, jax_python, log_dir)
                    record.update(round=k, pinning=pinning)
                    records.append(record)
                    print(f"  round {k} {workload} {trips:<6d} {pinning:8s} {system:8s} {suite.summary(record)}", flush=True)
    return records


def fmt(s: float | None) -> str:
    return "–" if s is None else f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.2f} s"


def pairs(records: list[dict], workload: str, trips: int, pinning: str, ours: str = "xla_loop") -> list[tuple[dict, dict]]:
    """(ours, JAX) for each round in which both were measured at this point and pinning."""
    by_round: dict[int, dict[str, dict]] = {}
    for r in records:
        if (r["workload"], r["trips"], r["pinning"]) == (workload, trips, pinning) and "steady_s" in r:
            by_round.setdefault(r["round"], {})[r["system"]] = r
    return [(m[ours], m["jax"]) for _, m in sorted(by_round.items()) if ours in m and "jax" in m]


def markdown(meta: dict, records: list[dict]) -> str:
    lines = [
        "# Calls and compiles: xla_loop against JAX", "",
        f"- date: {meta['date']}; `{meta['command']}`; {meta['total_s']:.0f} s in all; {meta['rounds']} rounds",
        f"- machine: {meta['cpu_model']}, {meta['cores']} cores; load average at start "
        f"{', '.join(f'{x:.2f}' for x in meta['load_average_start'])}, at end {', '.join(f'{x:.2f}' for x in meta['load_average_end'])}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta.get('versions', {}).items())}",
        "- each measurement a fresh process; pinned: to one CPU; unpinned: every CPU. Per call: median of the calls "
        "made in about 1 s after one warm-up, each waited for on the device. xla_loop runs with its CPU defaults "
        "(xla_loop_cpu_defaults.py), JAX with its own.",
        "", "## Targets", "",
        "| point | pinning | system | ours | JAX | ratio (median of rounds; range) | goal | met? |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for label, workload, trips, judged, goal in TARGETS:
        for pinning, ours_system in ((p, o) for p in PINNINGS for o in OURS):
            matched = pairs(records, workload, trips, pinning, ours_system)
            if not matched:
                continue
            ratios = sorted(a["steady_s"] / b["steady_s"] for a, b in matched)
            mid = statistics.median(ratios)
            ours = statistics.median(a["steady_s"] for a, _ in matched)
            theirs = statistics.median(b["steady_s"] for _, b in matched)
            verdict = ("yes" if mid <= goal else "no") if pinning in judged else "(not a goal)"
            lines.append(f"| {label} | {pinning} | {ours_system} | {fmt(ours)} | {fmt(theirs)} | {mid:.2f}× "
                         f"({ratios[0]:.2f}–{ratios[-1]:.2f}) | ≤ {goal:g}× JAX | {verdict} |")
    for pinning, ours_system in ((p, o) for p in PINNINGS for o in OURS):
        matched = pairs(records, "B", 10, pinning, ours_system)
        if matched:
            values = sorted(a["first_call_s"] for a, _ in matched)
            mid = statistics.median(values)
            jax_first = statistics.median(b["first_call_s"] for _, b in matched)
            lines.append(f"| first call, B 10 trips | {pinning} | {ours_system} | {fmt(mid)} | {fmt(jax_first)} | "
                         f"({values[0]:.2f}–{values[-1]:.2f} s) | ≤ {FIRST_CALL_GOAL_S:g} s | {'yes' if mid <= FIRST_CALL_GOAL_S else 'no'} |")
    lines += ["", "## First call of xla_loop (torch.compile) by stage (median over rounds)", "",
              "| point | pinning | first call | Dynamo | AOTAutograd (passes, lowering) | executable (trace + XLA compile) "
              "| XLA compile | JAX first call |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for workload, trips in dict.fromkeys((r["workload"], r["trips"]) for r in records):
        for pinning in PINNINGS:
            matched = pairs(records, workload, trips, pinning)
            ours = [a for a, _ in matched if "first_call_stages" in a]
            if not ours:
                continue
            stage = {k: statistics.median(r["first_call_stages"][k] for r in ours) for k in ours[0]["first_call_stages"]}
            lines.append(f"| {workload} {trips} | {pinning} | {fmt(statistics.median(r['first_call_s'] for r in ours))} | "
                         f"{fmt(stage['dynamo_s'])} | {fmt(stage['aot_s'])} | {fmt(stage['executable_s'])} | "
                         f"{fmt(stage['xla_compile_s'])} | {fmt(statistics.median(b['first_call_s'] for _, b in matched))} |")
    lines += ["", "## Every measurement", "", "| round | point | pinning | system | first call | per call | calls timed |",
              "|---:|---|---|---|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['round']} | {r['workload']} {r['trips']} | {r['pinning']} | {r['system']} | "
                     f"{fmt(r.get('first_call_s'))} | {fmt(r.get('steady_s'))} | {r.get('repeats', r.get('error', '–'))} |")
    return "\n".join(lines) + "\n"


def torch_logs(rounds: int, log_dir: Path) -> str:
    """Per call with TORCH_LOGS="xla_loop_backend" against unset, paired by round."""
    allowed = sorted(os.sched_getaffinity(0))
    systems = ("xla_loop", "xla_loop" + suite.LOGGED)
    rows = ["# Per call with TORCH_LOGS=\"xla_loop_backend\" against unset", "",
            f"- {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; `benchmarks/calls.py --torch-logs "
            f"--rounds {rounds}`; B 10 trips; each a fresh process; per call: the median of the calls made in about 1 s",
            "", "| pinning | round | unset | logged | logged / unset |", "|---|---:|---:|---:|---:|"]
    for pinning in PINNINGS:
        ratios = []
        for k in range(rounds):
            cfg = {"cap": 120.0, "steady_budget": 1.0, "max_repeats": 5000,
                   "cpus": {allowed[-1]} if pinning == "pinned" else None}
            got = {system: suite.run_worker(system, "B", 10, cfg, None, log_dir) for system in (systems if k % 2 == 0 else systems[::-1])}
            off, on = (got[s_].get("steady_s") for s_ in systems)
            if off and on:
                ratios.append(on / off)
                rows.append(f"| {pinning} | {k} | {fmt(off)} | {fmt(on)} | {on / off:.3f} |")
            print(rows[-1], flush=True)
        if ratios:
            rows.append(f"| {pinning} | median | | | **{statistics.median(ratios):.3f}** ({min(ratios):.3f}–{max(ratios):.3f}) |")
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    p.add_argument("--quick", action="store_true", help="one round of B 10, A 1000 and B 10000")
    p.add_argument("--jax-venv", type=Path, default=suite.DEFAULT_JAX_VENV)
    p.add_argument("--out", type=Path, default=suite.RESULTS)
    p.add_argument("--torch-logs", action="store_true", help="per call with TORCH_LOGS=xla_loop_backend against unset")
    a = p.parse_args()
    if a.torch_logs:
        text = torch_logs(a.rounds or 5, Path(tempfile.mkdtemp(prefix="xla_loop_calls_logs_")))
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "calls_torch_logs.md").write_text(text)
        print(text)
        return
    rounds = a.rounds or (1 if a.quick else 3)
    started = time.monotonic()
    meta = suite.machine()
    jax_python = suite.ensure_jax(a.jax_venv)
    log_dir = Path(tempfile.mkdtemp(prefix="xla_loop_calls_logs_"))
    print(f"logs of each worker: {log_dir}", flush=True)
    records = run(rounds, QUICK_POINTS if a.quick else POINTS, jax_python, log_dir)
    meta.update({"rounds": rounds, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                 "total_s": time.monotonic() - started, "load_average_end": os.getloadavg(),
                 "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
    for r in records:
        meta.setdefault("versions", {}).update(r.get("versions", {}))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "calls.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    text = markdown(meta, records)
    (a.out / "calls.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
