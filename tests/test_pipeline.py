"""pipeline.py: one ordered list of passes; the backend, inspect.lowered_hlo and the tests
all run it."""
from __future__ import annotations

import pytest
import torch
from loop_testing import xla_device
from torch._C import DispatchKey
from torch._higher_order_ops.scan import scan_op
from torch._higher_order_ops.while_loop import while_loop

import xla_loop_backend
from xla_loop_backend import LoopFallbackWarning, LoopLoweringError, pipeline
from xla_loop_backend.inspect import lowered_hlo
from xla_loop_backend.traversal import GraphPass, unchanged


def test_the_passes_in_order():
    assert [p.name for p in pipeline.BEFORE_AUTOGRAD] == ["roll_layers", "unalias", "while_loops", "reports", "remat", "stacked_inputs"]
    assert [p.name for p in pipeline.AFTER_AUTOGRAD] == ["on_device", "torch_xla_fixes", "reversed_scans", "stacked_results"]
    # every pass before AOTAutograd says what it does with each kind of loop
    for graph_pass in pipeline.BEFORE_AUTOGRAD:
        assert {"while_loop", "scan", "map", "cond", "invoke_subgraph"} <= set(graph_pass.rules), graph_pass.name


def test_op_fixes_and_dynamo_rules_are_installed_on_import():
    from torch._dynamo.variables.higher_order_ops import TorchHigherOrderOperatorVariable
    from torch._dynamo.variables.functions import UserFunctionVariable
    from torch._dynamo.variables.tensor import TensorVariable

    assert getattr(scan_op.py_kernels[DispatchKey.Autograd], "_xla_loop_fixes_184528", False)
    assert [f"{rule.__module__}.{rule.__name__}" for rule in pipeline.DYNAMO_RULES] == [
        "xla_loop_backend.indexing.install",
        "xla_loop_backend.errors.install_op_labels",
        "xla_loop_backend.torch_xla_loops.install",
    ]
    assert getattr(TensorVariable.call_method, "_xla_loop_indexing", False)
    assert getattr(TorchHigherOrderOperatorVariable.call_function, "_xla_loop_labels", False)
    assert getattr(UserFunctionVariable.call_function, "_xla_loop_stand_ins", False)


def _loop(n, x):
    return while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x * 2), (torch.zeros((), dtype=torch.int64, device=x.device), x))


@pytest.fixture
def spy(monkeypatch):
    seen = []
    rules = {kind: (lambda site, context: seen.append(site.call.kind)) for kind in ("while_loop", "scan", "map", "cond", "invoke_subgraph")}
    spy_pass = GraphPass("spy", "records the loops it sees", rules)
    monkeypatch.setattr(pipeline, "BEFORE_AUTOGRAD", (*pipeline.BEFORE_AUTOGRAD, spy_pass))
    return seen


def test_backend_and_inspect_run_the_same_pipeline(spy):
    dev = xla_device()
    args = (torch.tensor(3, device=dev), torch.ones(2, device=dev))
    torch.compile(_loop, backend="xla_loop", fullgraph=True)(*args)
    assert spy == ["while_loop"]
    torch._dynamo.reset()
    lowered_hlo(_loop, *args, fullgraph=True)
    assert spy == ["while_loop", "while_loop"]


def _bounded_loop_in_cond(n, x):
    def cond(i, x):
        return (i < 3) & (_loop(n, x)[1].sum() > 0)

    return while_loop(cond, lambda i, x: (i + 1, x + 1), (torch.zeros((), dtype=torch.int64, device=x.device), x))


def test_a_pass_error_raises_under_fullgraph():
    dev = xla_device()
    compiled = xla_loop_backend.compile(_bounded_loop_in_cond, fullgraph=True, max_iterations=20)
    with pytest.raises(LoopLoweringError, match="cond_fn runs a while_loop"):
        compiled(torch.tensor(2, device=dev), torch.ones(2, device=dev))


def test_a_pass_error_otherwise_warns_and_runs_the_original_graph():
    dev = xla_device()
    compiled = xla_loop_backend.compile(_bounded_loop_in_cond, max_iterations=20)
    with pytest.warns(LoopFallbackWarning, match="cond_fn runs a while_loop"):
        i, x = compiled(torch.tensor(2, device=dev), torch.ones(2, device=dev))
    expected_i, expected_x = _bounded_loop_in_cond(torch.tensor(2), torch.ones(2))
    assert int(i) == int(expected_i) and torch.equal(x.cpu(), expected_x)
