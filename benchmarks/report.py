"""Turns the suite's records into results.md (tables, target ratios) and the two PNG plots.

Separate from the driver so the report can be regenerated from results.json alone:
    .venv/bin/python benchmarks/report.py benchmarks/results/results.json
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ITERATION_UNIT, WORKLOAD_TITLES  # noqa: E402

SYSTEM_TITLES = {
    "xla_loop": "xla_loop: `torch.compile(backend=\"xla_loop\")`, xla_loop_backend.while_loop / scan, trip count a device tensor",
    "openxla_while": "openxla_while: `torch.compile(backend=\"openxla\")` on the same torch while_loop / scan program",
    "openxla_for": "openxla_for: `torch.compile(backend=\"openxla\")` on a Python for loop (Dynamo unrolls it; "
                   "D: compiled step, Python while loop reading the residual back)",
    "eager": "eager: PyTorch on CPU, Python loop",
    "inductor": "inductor: `torch.compile()` (inductor) on torch's while_loop, CPU tensors. C, E: torch 2.9's inductor "
                "rejects scan, so the RNN is a while_loop carrying ys and writing step i with an out-of-place "
                "index_copy (a copy of all of ys per step: C's time grows with the square of the length)",
    "jax": "jax: `jax.jit` of lax.fori_loop (traced trip count) / while_loop / scan; E: value_and_grad",
}
ORDER = list(SYSTEM_TITLES)


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def iterations(r: dict) -> int:
    return r.get("trip_count") or r["trips"]


def per_iteration(r: dict) -> float | None:
    return r["steady_s"] / iterations(r) if "steady_s" in r and iterations(r) else None


def index(results: list[dict]) -> dict[tuple[str, str, int], dict]:
    return {(r["system"], r["workload"], r["trips"]): r for r in results}


def fit(results: list[dict], system: str, workload: str) -> tuple[float, float, list[int]] | None:
    """Steady time per call = overhead + per_iteration * n, least squares in relative error
    (weights 1/t^2), so the small trip counts set the overhead and the large ones the slope."""
    pts = [(r["trips"], r["steady_s"]) for r in results
           if r["system"] == system and r["workload"] == workload and "steady_s" in r and r["trips"]]
    if len(pts) < 2:
        return None
    # minimise sum(((a + b n - t) / t)^2): normal equations of the 2x2 weighted system
    s00 = sum(1 / t**2 for _, t in pts)
    s01 = sum(n / t**2 for n, t in pts)
    s11 = sum(n * n / t**2 for n, t in pts)
    r0 = sum(1 / t for _, t in pts)
    r1 = sum(n / t for n, t in pts)
    det = s00 * s11 - s01 * s01
    overhead = (r0 * s11 - r1 * s01) / det
    slope = (s00 * r1 - s01 * r0) / det
    return overhead, slope, [n for n, _ in pts]


def steady_at(results: list[dict], system: str, workload: str, trips: int) -> tuple[float | None, str]:
    """Measured steady time, else extrapolated: the overhead + per-iteration fit when two or
    more trip counts were measured, else per-iteration time of the one measured x trips."""
    r = index(results).get((system, workload, trips))
    if r and "steady_s" in r:
        return r["steady_s"], "measured"
    f = fit(results, system, workload)
    if f:
        return max(f[0], 0.0) + f[1] * trips, f"{system} extrapolated from {', '.join(map(str, f[2]))} trips"
    measured = [r for r in results if r["system"] == system and r["workload"] == workload and "steady_s" in r]
    if not measured:
        return None, "not measured"
    return per_iteration(measured[0]) * trips, f"{system} extrapolated from {measured[0]['trips']} trips"


def notes(r: dict, reference: dict | None) -> str:
    out = []
    if "error" in r:
        out.append("error: " + r["error"].replace("|", "/"))
    for key in ("skipped", "note"):
        if key in r:
            out.append(("skipped: " if key == "skipped" else "") + r[key])
    if reference and "checksum" in r and "checksum" in reference and r is not reference:
        a, b = r["checksum"], reference["checksum"]
        if abs(a - b) > 1e-3 * max(1.0, abs(b)):
            out.append(f"result differs from eager ({a:.6g} vs {b:.6g})")
    return "; ".join(out)


def counts(r: dict) -> tuple[str, str, str, str]:
    """(compiles first call / per steady call, executions, host syncs, transfers per call)."""
    first, steady = r.get("first_call_counts") or {}, r.get("per_call") or {}
    if r["system"] == "jax":
        return (f"{first.get('compiles', '–')} / {steady.get('compiles', 0):g}" if first else "–"), "n/a", "n/a", "n/a"
    if not first:
        return "–", "–", "–", "–"

    def g(d, k):
        return f"{d[k]:g}" if k in d else "–"
    return (f"{g(first, 'compiles')} / {g(steady, 'compiles')}", g(steady, "executions"), g(steady, "host_syncs"),
            g(steady, "transfers"))


def workload_table(results: list[dict], workload: str) -> list[str]:
    rows = [r for r in results if r["workload"] == workload]
    if not rows:
        return []
    unit = ITERATION_UNIT[workload]
    trips_header = {"C": "steps", "D": "trip count (from the data)", "E": "steps"}.get(workload, "trips")
    lines = [f"### {WORKLOAD_TITLES[workload]}", "",
             f"| system | {trips_header} | first call | steady / call | per {unit} | XLA compiles (first call / per steady call) "
             "| XLA executions / call | host syncs / call | device→host transfers / call | peak RSS | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    refs = index(results)
    for r in sorted(rows, key=lambda r: (r["trips"], ORDER.index(r["system"]) if r["system"] in ORDER else 99)):
        compiles, executions, syncs, transfers = counts(r)
        trips = r.get("trip_count", r["trips"]) if workload == "D" else r["trips"]
        rss = f"{r['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r and "first_call_s" in r else "–"
        lines.append(f"| {r['system']} | {trips if trips else '–'} | {fmt_time(r.get('first_call_s'))} | "
                     f"{fmt_time(r.get('steady_s'))} | {fmt_time(per_iteration(r))} | {compiles} | {executions} | {syncs} | {transfers} | "
                     f"{rss} | {notes(r, refs.get(('eager', workload, r['trips'])))} |")
    return lines + [""]


def round_ratios(rounds: list[dict], workload: str, trips: int, other: str) -> list[tuple[float, float]]:
    """(xla_loop's steady time, other's) for each target round in which both were measured."""
    by_round: dict[int, dict[str, float]] = {}
    for r in rounds:
        if r["workload"] == workload and r["trips"] == trips and "steady_s" in r:
            by_round.setdefault(r["round"], {})[r["system"]] = r["steady_s"]
    return [(m["xla_loop"], m[other]) for _, m in sorted(by_round.items()) if "xla_loop" in m and other in m]


def targets(results: list[dict], rounds: list[dict] | None = None) -> list[str]:
    """The targets, each judged on the median of its per-round ratios when target rounds ran
    (each round: both systems back to back), else on the main table's single measurement."""
    rounds = rounds or []
    lines = ["## Targets", "",
             "| comparison | xla_loop | other | ratio | goal | met? |", "|---|---:|---:|---:|---|---|"]

    def row(label: str, workload: str, trips: int, other: str, goal: str, ratio, fmt, ok) -> None:
        pairs = round_ratios(rounds, workload, trips, other)
        if pairs:
            ratios = sorted(ratio(a, b) for a, b in pairs)
            mid = statistics.median(ratios)
            ours = statistics.median(a for a, _ in pairs)
            theirs = statistics.median(b for _, b in pairs)
            spread = f"range {fmt(ratios[0], '')}–{fmt(ratios[-1], '')}" if len(ratios) > 1 else "one round"
            verdict = "yes" if ok(mid) else "no"
            lines.append(f"| {label} | {fmt_time(ours)} | {fmt_time(theirs)} | {fmt(mid)} (median of {len(ratios)} "
                         f"rounds; {spread}) | {goal} | {verdict} |")
            return
        ours, how_ours = steady_at(results, "xla_loop", workload, trips)
        theirs, how_theirs = steady_at(results, other, workload, trips)
        if ours is None or theirs is None:
            lines.append(f"| {label} | {fmt_time(ours)} | {fmt_time(theirs)} | – | {goal} | not measured |")
            return
        hows = {h for h in (how_ours, how_theirs) if h != "measured"}
        value = ratio(ours, theirs)
        note = f" ({'; '.join(sorted(hows))})" if hows else " (one measurement each)"
        # an extrapolated baseline (openxla capped) may decide; an extrapolated xla_loop may not
        verdict = "not measured" if how_ours != "measured" else "yes" if ok(value) else "no"
        lines.append(f"| {label} | {fmt_time(ours)} | {fmt_time(theirs)} | {fmt(value)} | {goal} | {verdict}{note} |")

    def times_jax(r: float, unit: str = "× JAX") -> str:
        return f"{r:.2f}{unit}"

    def times_faster(r: float, unit: str = "× faster") -> str:
        return f"{r:.1f}{unit}" if r < 100 else f"{r:.0f}{unit}"

    row("B, 10000 trips, steady: xla_loop vs JAX", "B", 10000, "jax", "xla_loop ≤ 1.2× JAX",
        lambda a, b: a / b, times_jax, lambda r: r <= 1.2)
    row("B, 10000 trips, steady: xla_loop vs eager", "B", 10000, "eager", "≥ 8× faster than eager",
        lambda a, b: b / a, times_faster, lambda r: r >= 8)
    row("B, 10000 trips, steady: xla_loop vs openxla while_loop", "B", 10000, "openxla_while", "≥ 100× faster",
        lambda a, b: b / a, times_faster, lambda r: r >= 100)
    row("A, 1000 trips, steady: xla_loop vs JAX", "A", 1000, "jax", "xla_loop ≤ 1.05× JAX",
        lambda a, b: a / b, times_jax, lambda r: r <= 1.05)
    bullets = []
    for workload in ("A", "B"):
        ours = sorted((r for r in results if r["system"] == "xla_loop" and r["workload"] == workload and "first_call_s" in r),
                      key=lambda r: r["trips"])
        if not ours:
            continue
        steady = [r for r in ours if "steady_s" in r]
        # the first call also runs the loop once; what is left is compile and setup
        setup = [r["first_call_s"] - r["steady_s"] for r in steady]
        if len(steady) >= 2:
            span = f"{steady[0]['trips']}→{steady[-1]['trips']} trips"
            lines.append(f"| {workload}, first call minus one steady call (compile), {span} | {fmt_time(setup[0])} → "
                         f"{fmt_time(setup[-1])} | | max/min {max(setup) / min(setup):.2f} | flat: max/min ≤ 1.5 | "
                         f"{'yes' if max(setup) <= 1.5 * min(setup) else 'no'} |")
            rss = [r["peak_rss_mb"] for r in steady]
            lines.append(f"| {workload}, peak RSS, {span} | {rss[0]:.0f} MB → {rss[-1]:.0f} MB | | max/min {max(rss) / min(rss):.2f} "
                         f"| flat: max/min ≤ 1.05 | {'yes' if max(rss) <= 1.05 * min(rss) else 'no'} |")
        firsts = ", ".join(f"{r['trips']}: {fmt_time(r['first_call_s'])}" for r in ours)
        setups = ", ".join(f"{r['trips']}: {fmt_time(t)}" for r, t in zip(steady, setup))
        rss_all = ", ".join(f"{r['trips']}: {r['peak_rss_mb']:.0f} MB" for r in ours)
        bullets.append(f"- xla_loop, workload {workload}, first call by trip count (each a fresh process): {firsts}; "
                       f"first call minus one steady call (compile and setup): {setups}; peak RSS: {rss_all}")
    lines.append("")
    lines += bullets
    return lines + [""]


def rounds_table(rounds: list[dict]) -> list[str]:
    if not rounds:
        return []
    shown = [s for s in ORDER if any(r["system"] == s for r in rounds)]
    by_key = {(r["workload"], r["trips"], r["round"], r["system"]): r for r in rounds}
    lines = ["## Target rounds", "",
             "Each target point again, in rounds: per round the systems run back to back, each in a fresh "
             "process (order reversed every other round); steady time per call.", "",
             "| workload | trips | round | " + " | ".join(shown) + " |",
             "|---|---:|---:|" + "---:|" * len(shown)]
    keys = sorted({(r["workload"], r["trips"], r["round"]) for r in rounds}, key=lambda k: (k[0] != "B", k))
    for workload, trips, k in keys:
        cells = []
        for system in shown:
            r = by_key.get((workload, trips, k, system))
            cells.append("" if r is None else fmt_time(r.get("steady_s")) if "steady_s" in r
                         else (r.get("error") or r.get("skipped") or "–").replace("|", "/")[:60])
        lines.append(f"| {workload} | {trips} | {k} | " + " | ".join(cells) + " |")
    return lines + [""]


def fits(results: list[dict]) -> list[str]:
    lines = ["## Per-call overhead and per-iteration cost (A, B)", "",
             "Fit of steady time per call = overhead + n × per-iteration over the measured trip counts "
             "(least squares in relative error).", "",
             "| workload | system | overhead / call | per iteration | trip counts |", "|---|---|---:|---:|---|"]
    for workload in ("A", "B"):
        for system in ORDER:
            f = fit(results, system, workload)
            if f:
                lines.append(f"| {workload} | {system} | {fmt_time(f[0]) if f[0] > 0 else '≈ 0'} | {fmt_time(f[1])} | "
                             f"{', '.join(map(str, f[2]))} |")
    return lines + [""]


def markdown(meta: dict, results: list[dict], rounds: list[dict] | None = None) -> str:
    v = meta.get("versions", {})
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "torch_xla", "jax", "jaxlib") if k in v)
    cpus = meta.get("pinned_cpus")
    lines = [
        "# Loop benchmarks: xla_loop vs openxla, eager, inductor, JAX", "",
        f"- date: {meta['date']}; mode: {meta['mode']} (`{meta['command']}`), {meta.get('total_s', 0):.0f} s in all",
        f"- machine: {meta['cpu_model']}, {meta['cores']} cores, {meta['memory_gb']} GB; {meta['platform']}; "
        f"Python {meta['python']}; {versions}",
        f"- load average at start {', '.join(f'{x:.2f}' for x in meta['load_average_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in meta.get('load_average_end', ()))}; niceness {meta.get('niceness')}",
        "- each (system, workload, trip count) is its own process (cold first call, own peak RSS), "
        + (f"pinned to CPU {cpus} (every system single-threaded)" if cpus != "all" else "on all CPUs")
        + ", PJRT_DEVICE=CPU (the torch_xla systems import xla_loop_backend, so all run XLA's CPU matrix products "
        "on the calling thread, xla_loop's default; JAX runs with its defaults)"
        + f"; killed at {meta['cap_s']:g} s; steady state = median of up to {meta['max_repeats']} "
        f"calls (about {meta['steady_budget_s']:g} s) after one warm-up call, same inputs; inductor with an empty cache",
        "- a trip count is skipped when the two smaller ones predict (linearly) that its first call passes the cap; "
        "results are compared with eager's (a note says when they differ by more than 1e-3 relative)",
        "- first call: compile included. XLA compiles / host syncs (`aten::_local_scalar_dense`) / device→host "
        "transfers: torch_xla metrics; for JAX, backend compiles seen by `jax.monitoring`",
        *([f"- targets: each target point also ran in {meta['target_rounds']} rounds, xla_loop and the system it is "
           "compared with back to back per round (a shared machine's speed drifts by up to 2x over minutes); the "
           "ratio is the median of the per-round ratios, with their range (table: Target rounds)"]
          if meta.get("target_rounds") else []),
        "", "Systems:", "",
        *[f"- {SYSTEM_TITLES[s]}" for s in ORDER if any(r["system"] == s for r in results)],
        "",
    ]
    lines += targets(results, rounds)
    lines += ["## Results", ""]
    for workload in WORKLOAD_TITLES:
        lines += workload_table(results, workload)
    lines += rounds_table(rounds or [])
    lines += fits(results)
    return "\n".join(lines)


def plots(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, value, ylabel in (("first_call", lambda r: r.get("first_call_s"), "first call (s, compile included)"),
                                ("per_iteration", per_iteration, "steady-state time per iteration (s)")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, workload in zip(axes, ("A", "B")):
            for system in ORDER:
                pts = sorted((r["trips"], value(r)) for r in results
                             if r["system"] == system and r["workload"] == workload and value(r))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=system)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("trip count")
            ax.set_ylabel(ylabel)
            ax.set_title(WORKLOAD_TITLES[workload].split(" (")[0], fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)


def write_all(meta: dict, results: list[dict], out: Path, rounds: list[dict] | None = None) -> str:
    text = markdown(meta, results, rounds)
    (out / "results.md").write_text(text + "\n")
    plots(results, out)
    return text


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "results.json")
    data = json.loads(path.read_text())
    print(write_all(data["meta"], data["results"], path.parent, data.get("target_rounds")))
