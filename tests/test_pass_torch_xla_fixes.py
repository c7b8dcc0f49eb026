"""passes/torch_xla_fixes.py: each rewrite changes the graph as intended, and the compiled
result then matches eager PyTorch on CPU where torch_xla alone does not."""
from __future__ import annotations

import pytest
import torch
from loop_testing import xla_device
from torch.fx.experimental.proxy_tensor import make_fx

import xla_loop_backend  # noqa: F401  (registers the backend)
from xla_loop_backend.passes.torch_xla_fixes import PASS as TORCH_XLA_FIXES

aten = torch.ops.aten


def _calls(gm: torch.fx.GraphModule, target: object) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def test_amax_over_all_dims_is_spelled_out():
    gm = make_fx(lambda x: x.amax() + x.amin())(torch.randn(2, 3))
    TORCH_XLA_FIXES.run(gm)
    assert [n.args[1] for n in _calls(gm, aten.amax.default)] == [[0, 1]]
    assert [n.args[1] for n in _calls(gm, aten.amin.default)] == [[0, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_comparison_scalar_is_rounded_to_the_tensor_dtype(dtype):
    gm = make_fx(lambda x: (x > 0.2) & (x <= 0.5))(torch.randn(3, dtype=dtype))
    TORCH_XLA_FIXES.run(gm)
    (gt,) = _calls(gm, aten.gt.Scalar)
    (le,) = _calls(gm, aten.le.Scalar)
    assert gt.args[1] == torch.tensor(0.2, dtype=dtype).item() != 0.2
    assert le.args[1] == 0.5  # exact already: left alone


def test_integer_comparisons_are_left_alone():
    gm = make_fx(lambda x: x > 0.2)(torch.arange(3))
    TORCH_XLA_FIXES.run(gm)
    assert _calls(gm, aten.gt.Scalar)[0].args[1] == 0.2


def test_comparison_with_a_tied_scalar_matches_eager():
    # 1 * 0.2 in float32 is float32(0.2), which torch_xla alone finds greater than 0.2.
    def f(x):
        return x.sum(-1, keepdim=True) * 0.2 > 0.2, x * 0.2 >= 0.2, x * 0.2 == 0.2

    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    compiled = torch.compile(f, backend="xla_loop", fullgraph=True)
    for actual, expected in zip(compiled(x.to(xla_device())), f(x)):
        assert torch.equal(actual.cpu(), expected)
