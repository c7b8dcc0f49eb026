"""The examples run from the README's environment, match eager PyTorch on CPU (each exits
non-zero if not), and compile once: later calls compile nothing and never sync."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_examples(*names: str) -> dict[str, subprocess.CompletedProcess]:
    """Run several examples at once (each is a separate process, mostly waiting on compiles)."""
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / f"{name}.py")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for name in names
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def test_seed_demo_output():
    result = _run_examples("seed_while_loop")["seed_while_loop"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "while_loop(iteri > 0, add(x, 1)) from x=3, iteri=10 -> 13",
        "first call: 1 XLA compile(s), 0 host sync(s)",
        "iteri=100: 0 XLA compile(s), 0 host sync(s) during the call",
        "iteri=10000: 0 XLA compile(s), 0 host sync(s) during the call",
        "result after 10000 iterations: 10003",
    ]


LOOP_EXAMPLES = {
    # example: (number of results it compares, lines reporting compiles and syncs)
    "gru_scan": (4, ["  first call: 1 XLA compile(s), 0 host sync(s)", "  new sequence: 0 XLA compile(s), 0 host sync(s)"]),
    "cg_solver": (4, ["  call: 1 XLA compile(s), 0 host sync(s)", "  call: 0 XLA compile(s), 0 host sync(s)"]),
    "diffusion_sampler": (2, ["  call: 1 XLA compile(s), 0 host sync(s)", "  call: 0 XLA compile(s), 0 host sync(s)"]),
    "greedy_decode": (2, ["  call: 1 XLA compile(s), 0 host sync(s)", "  call: 0 XLA compile(s), 0 host sync(s)"]),
}


def test_training_example_matches_python_loop_gradients_and_learns(example_runs):
    result = example_runs["train_stepper"]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len([line for line in lines if "(matches)" in line]) == 4, result.stdout
    assert "  the loss decreased" in lines
    compiles = next(line for line in lines if line.startswith("  XLA compiles:"))
    assert compiles.endswith("n varying: 0"), compiles


@pytest.fixture(scope="module")
def example_runs():
    return _run_examples(*LOOP_EXAMPLES, "train_stepper")


@pytest.mark.parametrize("name", sorted(LOOP_EXAMPLES))
def test_example_matches_eager_and_compiles_once(name, example_runs):
    result = example_runs[name]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    comparisons, count_lines = LOOP_EXAMPLES[name]
    matched = [line for line in lines if "(matches)" in line or "identical to" in line]
    assert len(matched) == comparisons, result.stdout
    assert not [line for line in lines if "DIFFERS" in line]
    assert [line for line in lines if "compile(s)" in line] == count_lines


def test_fsdp_example_trains_like_eager_with_sharded_gradients():
    # 4 virtual devices (the example sets CPU_NUM_DEVICES itself on the CPU)
    result = _run_examples("fsdp_rnn")["fsdp_rnn"]
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 5
    for line in steps:  # "step 0: loss 0.521756 (eager CPU 0.521756)"
        ours, eager = (float(w.strip("()")) for w in (line.split()[3], line.split()[6]))
        assert abs(ours - eager) < 1e-5, line
    assert "sharding {devices=[4,1]0,1,2,3}, its gradient {devices=[4,1]0,1,2,3}" in result.stdout
    assert "While body 1 of the compiled programs" in result.stdout


def test_transformer_example_rolls_its_layers_and_trains_like_eager():
    # (8 layers and no openxla run, to keep the suite short; the README shows 24 against openxla)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "transformer.py"), "--layers", "8", "--skip-openxla"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PJRT_DEVICE": "CPU"},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "  xla_loop rolled 8 of 8 layers into one scan" in lines, result.stdout
    assert any(line.startswith("  first step: all ") and "parameter gradients match eager CPU" in line for line in lines)
    assert len([line for line in lines if line.startswith("  step ") and "(matches)" in line]) == 6, result.stdout
