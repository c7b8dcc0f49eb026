"""SPMD (torch_xla's GSPMD) on 4 virtual CPU devices: sharded loops stay sharded, partition
as well as XLA allows, train, and take sharding constraints inside their bodies. Each case
runs in a process of its own (tests/spmd_programs.py), results compared with the same
program unsharded on CPU; collectives read from the optimized HLO of the While bodies."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAMS = Path(__file__).resolve().parent / "spmd_programs.py"


def run_case(name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, str(PROGRAMS), name], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["data_parallel_while", "data_parallel_scan"])
def test_data_parallel_loops_have_no_collective_in_their_body(name):
    result = run_case(name)
    assert result["equal"]
    assert result["collectives"] == [[]]
    assert result["output"] == result["input"] == "{devices=[4,1]0,1,2,3}"


def test_tensor_parallel_mlp_body_has_only_its_all_reduce():
    result = run_case("tensor_parallel_mlp")
    assert result["equal"]
    assert result["collectives"] == [["all-reduce"]]


def test_conflicting_shardings_keep_the_carry_sharding():
    # carry split by batch, weight by columns: XLA alone would hand back the result split
    # both ways; the loop pins its carry (lowering/sharding.py)
    result = run_case("conflicting_shardings")
    assert result["equal"]
    assert result["output"] == result["input"] == "{devices=[2,1,2]0,1,2,3 last_tile_dim_replicate}"


def test_sharding_constraint_inside_a_loop_body():
    result = run_case("constraint_in_body")
    assert result["equal"] and result["annotated"]
    assert result["output"] == "{devices=[2,2]0,1,2,3}"


def test_training_through_a_sharded_scan():
    result = run_case("training_through_sharded_scan")
    assert result["equal"]
    assert result["grad_shardings"] == result["param_shardings"] == ["{devices=[4,1]0,1,2,3}"] * 2


@pytest.mark.parametrize("name", ["training_steps_scan", "training_steps_while", "training_steps_replicated"])
def test_optimizer_steps_keep_gradients_right_and_trace_once(name):
    # SGD updates the parameters in place between steps; each step's gradients must be
    # those of the updated parameters (torch_xla's own bridge loses track of them under
    # SPMD: xla_loop maps parameters by the program's, not by torch_xla's tensor ids), and
    # a new batch each step must not make anything trace again.
    result = run_case(name)
    assert result["equal_per_step"] == [True] * 4
    traced = result["subgraphs_traced_per_step"]
    assert traced[0] > 0 and len(set(traced)) == 1
    assert result["sharding_retraces"] == 0
    assert result["grad_spec"] == result["param_spec"]


def test_a_new_input_sharding_traces_again():
    result = run_case("resharded_input")
    assert result["equal_per_call"] == [True, True]
    assert result["sharding_retraces"] == 1


def _same_layout(a: str, b: str) -> bool:
    return (a or "{replicated}") == (b or "{replicated}")  # ('' is a tensor uploaded replicated)


def test_batch_sharded_scan_training_backward_holds_only_the_weights_all_reduce():
    # Gradients seeded with ones outside the compiled function: the backward's carries take
    # their forward values' layouts (torch_fixes.install_scan_gradient_layouts), not the
    # seeds', so no iteration gathers the hidden gradient.
    result = run_case("batch_sharded_scan_training")
    assert result["equal"]
    assert result["collectives_by_program"] == [[[]], [["all-reduce"]]]
    assert result["output"] == result["input"] == "{devices=[4,1]0,1,2,3}"
    assert _same_layout(result["grad"], result["param"])


def test_fsdp_gru_gathers_no_weight_inside_either_loop():
    # the loop-invariant weights are gathered once before each While (lowering/sharding.py)
    result = run_case("fsdp_gru")
    assert result["equal"]
    assert result["weights_gathered_in_bodies"] == [[[]], [[]]], result["gathered_in_bodies"]
    assert result["grad_shardings"] == result["param_shardings"]


def test_without_gathering_fsdp_gathers_the_weights_every_iteration():
    # gather_invariants=False: what XLA's partitioner does alone (the tests above can fail)
    result = run_case("fsdp_gru_not_gathered")
    assert result["equal"]
    assert all(body for program in result["weights_gathered_in_bodies"] for body in program)
    assert result["grad_shardings"] == result["param_shardings"]


def test_scan_layers_trains_data_parallel():
    # xla_loop_backend.scan_layers composes with SPMD: the forward While computes each shard's
    # rows alone; the backward sums the stacked weights' gradients over the batch once.
    result = run_case("scan_layers_data_parallel")
    assert result["equal"] and result["grad_layouts_match"]
    assert result["output"] == "{devices=[4,1]0,1,2,3}"
    forward, backward = result["collectives_by_program"][:2]
    assert forward == [[]], result["collectives_by_program"]
    assert all(set(body) <= {"all-reduce"} for body in backward), result["collectives_by_program"]
