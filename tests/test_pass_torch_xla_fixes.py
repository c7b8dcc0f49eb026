"""passes/torch_xla_fixes.py: each rewrite changes the graph as intended, and the compiled
result then matches eager PyTorch on CPU where torch_xla alone does not."""
from __future__ import annotations

import pytest
import torch
import torch_xla
from loop_testing import MetricsDelta, xla_device
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


def _two_clones_of_one_input(a, b):
    return b * 2, a.clone(), a.clone(), b + 1, b.sum()


def _bridge(fn, *args):
    from torch_xla._dynamo import dynamo_bridge

    return dynamo_bridge.extract_compiled_graph(torch.fx.symbolic_trace(fn), list(args))(*args)


def test_torch_xla_bridge_still_mixes_up_outputs_that_share_a_value():
    # When this fails, torch_xla's bridge keeps its outputs in order and DISTINCT_OUTPUTS can go.
    a, b = torch.tensor(3, device=xla_device()), torch.ones(2, device=xla_device())
    out = [t.cpu() for t in _bridge(_two_clones_of_one_input, a, b)]
    assert not torch.equal(out[3], torch.full((2,), 2.0)), "torch_xla's bridge is right now: DISTINCT_OUTPUTS can go"


def test_outputs_sharing_a_value_become_copies_and_come_back_in_order():
    from xla_loop_backend.passes.torch_xla_fixes import DISTINCT_OUTPUTS, _device_copy

    gm = torch.fx.symbolic_trace(_two_clones_of_one_input)
    for node in gm.graph.nodes:  # what AOTAutograd gives: aten ops with their values
        if node.op == "call_method" and node.target == "clone":
            node.op, node.target = "call_function", aten.clone.default
    DISTINCT_OUTPUTS.run(gm)
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert [getattr(o.target, "__name__", o.target) for o in outs[1:3]] == ["clone.default", "_device_copy"]
    assert outs[2].target is _device_copy
    from torch_xla._dynamo import dynamo_bridge

    a, b = torch.tensor(3, device=xla_device()), torch.ones(2, device=xla_device())
    out = [t.cpu().tolist() for t in dynamo_bridge.extract_compiled_graph(gm, [a, b])(a, b)]
    assert out == [[2.0, 2.0], 3, 3, [2.0, 2.0], 2.0]


# Two functions that differ only in which input the last op reads. Each test uses shapes of
# its own: torch_xla's executable cache lives as long as the process.
def _reads_x(x, y):
    return torch.sin(x) * y + x


def _reads_y(x, y):
    return torch.sin(x) * y + y


def _inputs(shape):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def test_torch_xla_still_runs_another_graphs_executable():
    # When this fails, torch_xla's graph hash tells these graphs apart (pytorch/xla#8353)
    # and KEYED_BY_WIRING can go.
    x, y = _inputs((7, 5))
    dev = xla_device()
    torch.compile(_reads_x, backend="openxla")(x.to(dev), y.to(dev))
    wrong = torch.compile(_reads_y, backend="openxla")(x.to(dev), y.to(dev)).cpu()
    assert not torch.allclose(wrong, _reads_y(x, y)), "torch_xla tells the graphs apart now: KEYED_BY_WIRING can go"


def test_graphs_differing_only_in_which_input_an_op_reads_get_executables_of_their_own():
    x, y = _inputs((5, 7))
    dev = xla_device()
    for fn in (_reads_x, _reads_y, _reads_x):
        out = torch.compile(fn, backend="xla_loop", fullgraph=True)(x.to(dev), y.to(dev))
        torch.testing.assert_close(out.cpu(), fn(x, y))


def test_the_same_graph_compiled_again_reuses_its_executable():
    # The key is a digest of the traced graph, the same on every trace: a second compile of
    # the same function (after Dynamo forgot it) runs the executable the first one built.
    x, y = _inputs((3, 7))
    dev = xla_device()
    torch.compile(_reads_y, backend="xla_loop", fullgraph=True)(x.to(dev), y.to(dev))
    torch._dynamo.reset()
    with MetricsDelta() as delta:
        out = torch.compile(_reads_y, backend="xla_loop", fullgraph=True)(x.to(dev), y.to(dev))
    torch.testing.assert_close(out.cpu(), _reads_y(x, y))
    assert delta.compiles == 0


def test_one_computed_output_passes_through_the_key():
    from xla_loop_backend.passes.torch_xla_fixes import KEYED_BY_WIRING, keyed_by_wiring

    gm = torch.fx.symbolic_trace(lambda a, b: (a, a * b, b + 1))
    KEYED_BY_WIRING.run(gm)
    (key,) = _calls(gm, keyed_by_wiring)
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert all(o.args[0] is key for o in outs) and [o.args[1] for o in outs] == [0, 1, 2]

    dev = xla_device()
    a, b = torch.randn(2, 3, device=dev), torch.randn(2, 3, device=dev)
    torch_xla.sync()
    keyed = keyed_by_wiring((a, a * b, b + 1))
    assert keyed[0] is a  # an input returned as it is stays itself
    hlo = torch_xla._XLAC._get_xla_tensors_hlo(keyed[1:])
    assert "xla_loop_key" in hlo and hlo.count("xla_loop_key") >= 1
    assert torch.equal(keyed[1].cpu(), (a * b).cpu()) and torch.equal(keyed[2].cpu(), (b + 1).cpu())


def test_a_graph_the_bridge_splits_runs_right():
    # A CPU tensor constant makes the bridge split the graph into parts it traces alone;
    # such a graph goes unkeyed (a key node would form a part the bridge cannot run).
    from torch._higher_order_ops.while_loop import while_loop

    def f(n, x):
        _, x = while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x * 2), (n, x))
        _, y = while_loop(lambda i, y: i < 4, lambda i, y: (i + 1, y - 1), (torch.tensor(0), x.sum()))
        return x, y

    n, x = torch.tensor(3), torch.ones(2)
    out = torch.compile(f, backend="xla_loop", fullgraph=True)(n.to(xla_device()), x.to(xla_device()))
    for actual, expected in zip(out, f(n, x)):
        torch.testing.assert_close(actual.cpu(), expected)
