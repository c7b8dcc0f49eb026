"""explain.py: `explain` reports every loop and branch of the examples, rolled layers and
fallbacks, checked against the lowered HLO and xla_loop's metrics; `TORCH_LOGS` prints one
line per loop lowered, recompile and fallback, the lowered graphs with "+", nothing unset."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from loop_testing import xla_device

import xla_loop_backend as xl
from xla_loop_backend import metrics
from xla_loop_backend.inspect import lowered_hlo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def _examples():
    """(name, function, arguments, backward) for each example of the README."""
    import cg_solver
    import diffusion_sampler
    import greedy_decode
    import gru_scan
    import seed_while_loop
    import train_stepper

    dev = xla_device()
    torch.manual_seed(0)
    a, _ = cg_solver.spd_matrix(16, 1)
    b = torch.randn(16)
    stepper = train_stepper.ResidualStepper().to(dev)
    x, n, _ = train_stepper.batch(0)
    return [
        ("seed_while_loop", seed_while_loop.count_up._torchdynamo_orig_callable, (torch.tensor(10, device=dev), torch.tensor(3, device=dev)), False),
        ("cg_solver", cg_solver.conjugate_gradient.__wrapped__, (a.to(dev), b.to(dev)), False),
        ("gru_scan", gru_scan.GruScan().to(dev), (torch.zeros(3, gru_scan.HIDDEN, device=dev), torch.randn(20, 3, gru_scan.FEATURES, device=dev)), False),
        ("diffusion_sampler", diffusion_sampler.DdimSampler().to(dev), (torch.randn(4, diffusion_sampler.DIM, device=dev),), False),
        ("greedy_decode", greedy_decode.GreedyDecoder().to(dev), (torch.tensor([2, 5], device=dev), torch.zeros(2, greedy_decode.HIDDEN, device=dev)), False),
        ("train_stepper", lambda x, n: (stepper(x, n) ** 2).mean(), (x.to(dev), n.to(dev)), True),
    ]


def _hlo_counts(fn, args) -> tuple[int, int]:
    texts = lowered_hlo(fn, *args)
    return sum(t.count(" while(") for t in texts), sum(t.count(" conditional(") for t in texts)


@pytest.mark.parametrize("index", range(6))
def test_every_loop_of_the_examples_is_reported(index):
    name, fn, args, backward = _examples()[index]
    whiles, conditionals = _hlo_counts(fn, args)
    torch._dynamo.reset()
    lowered = metrics.counter_value(metrics.LOOPS_LOWERED)
    report = xl.explain(fn, backward=backward)(*args)
    forward = [row for row in report.loops if row.graph == "forward"]
    assert whiles and len([r for r in forward if r.lowered_to.startswith("one XLA While")]) == whiles, name
    assert len([r for r in forward if r.kind == "cond"]) == conditionals, name
    assert len(report.loops) == metrics.counter_value(metrics.LOOPS_LOWERED) - lowered, name
    assert all(r.where.startswith(f"{name}.py:") or r.where.startswith("explain") for r in report.loops), report
    assert report.graphs and all(g.path == "one program" and g.hlo_ops > 0 for g in report.graphs)
    if backward:
        assert any(r.graph == "backward" for r in report.loops)
        assert any(r.stores for r in report.loops if r.graph == "forward")
    assert not report.fallbacks


def test_rolled_layers_are_reported():
    import transformer

    torch.manual_seed(0)
    model = transformer.Decoder(layers=4).to(xla_device())
    tokens, targets = transformer.batch(0)
    rolled = metrics.counter_value(metrics.LAYERS_ROLLED)
    report = xl.explain(model, backward=True)(tokens.to(xla_device()), targets.to(xla_device()))
    assert metrics.counter_value(metrics.LAYERS_ROLLED) - rolled == 4
    assert report.rolled == [line for line in report.rolled if line.startswith("rolled 4 layers")] and report.rolled
    assert [r.kind for r in report.loops if r.graph == "forward"] == ["scan"]


def test_a_fallback_is_reported_with_why():
    def f(x):
        return xl.fori_loop(0, 3, lambda t, acc: acc + torch.lgamma(acc), x)

    fallbacks = metrics.counter_value(metrics.HOST_LOOP_FALLBACKS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xl.LoopFallbackWarning)
        report = xl.explain(f)(torch.ones(3, device=xla_device()) + 1)
    assert metrics.counter_value(metrics.HOST_LOOP_FALLBACKS) > fallbacks
    assert report.fallbacks and "torch_xla runs aten::lgamma on the CPU" in report.fallbacks[0]
    assert not report.loops


_PROGRAM = """
import torch, torch_xla, warnings
import xla_loop_backend as xl
from torch._higher_order_ops.while_loop import while_loop
warnings.simplefilter("ignore")
dev = torch_xla.device()

def f(x, k):
    return while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, x * k), (torch.zeros((), dtype=torch.int64), x))[1]

compiled = torch.compile(f, backend="xla_loop", dynamic=True)
compiled(torch.ones(2, device=dev), 2)
compiled(torch.ones(3, device=dev), 2)   # a new size (symbolic to Dynamo): xla_loop compiles a program for it
xl.compile(lambda x: xl.fori_loop(0, 2, lambda t, a: a + torch.lgamma(a), x))(torch.ones(2, device=dev) + 1)
print("done")
"""


def _run_with_logs(value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    if value is not None:
        env["TORCH_LOGS"] = value
    return subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True, timeout=600, env=env)


def test_torch_logs_prints_a_line_per_loop_and_fallback():
    done = _run_with_logs("xla_loop_backend")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if " xla_loop_backend/" in line]
    assert sum("while_loop at <string>:9: lowered to one XLA While" in line for line in lines) >= 1, done.stderr[-3000:]
    assert any("fallback: could not lower a loop" in line for line in lines)
    assert any("graph made one program" in line for line in lines)
    assert any("forward graph compiles again: a new value of the Python numbers and sizes it takes" in line for line in lines)
    assert any("xla_loop_backend/lowering/while_loop.py" in line for line in lines)  # (where the line was written)
    assert not any("its loops lowered" in line for line in lines)  # (the graphs: "+" only)


def test_torch_logs_plus_adds_the_lowered_graphs():
    done = _run_with_logs("+xla_loop_backend")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "forward graph, its loops lowered:" in done.stderr and "def forward(" in done.stderr
    assert "its HLO:" in done.stderr and "HloModule" in done.stderr


def test_without_torch_logs_nothing_of_xla_loop_is_printed():
    done = _run_with_logs(None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert " xla_loop_backend/" not in done.stderr and "lowered to one XLA While" not in done.stderr
    assert done.stdout.strip().endswith("done")


def _recompile_lines(run) -> list[str]:
    from xla_loop_backend.explain import _collecting

    with _collecting() as collector:
        run()
    return [r.getMessage() for r in collector.records if getattr(r, "xla_loop_event", None) == "recompile"]


def test_a_new_python_number_is_a_recompile_with_its_reason():
    dev = xla_device()

    @xl.compile(fullgraph=True, dynamic=True)  # (k a symbolic int: one Dynamo graph for every k)
    def scaled(x, k):
        return xl.fori_loop(0, 3, lambda t, acc: acc * 2, x * k)

    def run():
        for k in (2, 3, 3, 4):
            assert scaled(torch.ones(2, device=dev), k).cpu().tolist() == [8.0 * k] * 2

    lines = _recompile_lines(run)
    assert len(lines) == 2, lines  # (3, then 4; the second 3 compiles nothing)
    for line, k in zip(lines, (3, 4)):
        assert line.startswith("forward graph compiles again: a new value of the Python numbers and sizes it takes (")
        assert re.search(rf"s\d+=2, s\d+={k}\)", line), line  # (x's size 2, symbolic under dynamic=True, and k)


def test_a_trained_while_loop_running_longer_than_its_checkpoints_is_no_recompile():
    dev = xla_device()
    w = torch.nn.Parameter(torch.full((2,), 0.5, device=dev))

    @xl.compile(fullgraph=True, checkpoints=4)
    def f(n, x):
        def body(i, x):
            return i + 1, x * w

        return xl.while_loop(lambda i, x: i < n, body, (torch.zeros((), dtype=torch.int64, device=dev), x))[1].sum()

    def run():
        f(torch.tensor(3, device=dev), torch.ones(2, device=dev)).backward()
        f(torch.tensor(9, device=dev), torch.ones(2, device=dev)).backward()

    assert _recompile_lines(run) == []
    assert torch.allclose(w.grad.cpu(), torch.tensor([3 * 0.5**2 + 9 * 0.5**8] * 2))
