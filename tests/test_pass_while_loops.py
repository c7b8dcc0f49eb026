"""passes/while_loops.py: while_loops with a bound or that may be trained become
`bounded_while` calls at every depth; the others stay torch's op."""
from __future__ import annotations

import pytest
import torch
from loop_testing import MetricsDelta, assert_same, dynamo_graph, xla_device
from torch._higher_order_ops.map import map as torch_map
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

import xla_loop_backend
from xla_loop_backend import LoopLoweringError
from xla_loop_backend.options import Options, PassContext
from xla_loop_backend.passes import while_loops
from xla_loop_backend.traversal import sites


def _count(x):
    return torch.zeros((), dtype=torch.int64, device=x.device)


def _halve(n, x):
    return while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x * 0.5), (_count(x), x))[1]


def _loops_everywhere(n, x, xs):
    """A while_loop at top level, in a scan body, in a map body and in a while body."""
    x = _halve(n, x)
    x, _ = scan(lambda c, s: (_halve(n, c) + s, c.sum()), x, xs)
    ys = torch_map(lambda s, c: _halve(n, s * c), xs, x)
    _, x = while_loop(lambda i, x: i < 2, lambda i, x: (i + 1, _halve(n, x) + 1), (_count(x), x))
    return x + ys.sum(0)


def _run_pass(gm, options, training=False):
    context = PassContext(options, training=training)
    while_loops.PASS.run(gm, context)
    return context


def _while_sites(gm):
    return [s for s in sites(gm) if s.call.kind == "while_loop"]


def test_with_max_iterations_every_while_loop_is_bounded():
    gm = dynamo_graph(_loops_everywhere, torch.tensor(3), torch.ones(2), torch.ones(4, 2))
    context = _run_pass(gm, Options(max_iterations=10))
    found = _while_sites(gm)
    assert len(found) == 5 and {s.depth for s in found} == {0, 1}
    assert all(s.call.node.target is while_loops.bounded_while for s in found)
    assert all(s.call.node.kwargs["max_iterations"] == 10 and not s.call.node.kwargs["may_train"] for s in found)
    assert len(context.reporting_loops) == 5


def test_without_a_bound_or_gradients_while_loops_stay_torch_ops():
    gm = dynamo_graph(_loops_everywhere, torch.tensor(3), torch.ones(2), torch.ones(4, 2))
    context = _run_pass(gm, Options())
    assert all(s.call.node.target is torch.ops.higher_order.while_loop for s in _while_sites(gm))
    assert context.reporting_loops == []


def test_when_training_only_loops_that_may_need_grad_are_made_trainable():
    w = torch.randn(2, requires_grad=True)

    def f(n, x):
        counted = while_loop(lambda i, k: i < n, lambda i, k: (i + 1, k + 2), (_count(x), _count(x)))[1]
        trained = while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x * w), (_count(x), x))[1]
        return trained * counted

    gm = dynamo_graph(f, torch.tensor(3), torch.ones(2))
    context = _run_pass(gm, Options(), training=True)
    counted, trained = _while_sites(gm)
    assert counted.call.node.target is torch.ops.higher_order.while_loop
    # (no bound: it reports nothing, so nothing of it is read back at call time)
    assert trained.call.node.target is while_loops.trained_while and trained.call.node.kwargs == {"checkpoints": 32}
    assert context.reporting_loops == []


@pytest.mark.parametrize("n", [0, 3])
def test_bounded_loops_at_every_depth_compute_what_eager_does(n):
    dev = xla_device()
    args = (torch.tensor(n), torch.randn(2), torch.randn(4, 2))
    compiled = xla_loop_backend.compile(_loops_everywhere, fullgraph=True, max_iterations=10)
    assert_same(compiled(*[a.to(dev) for a in args]), _loops_everywhere(*args), rtol=1e-5, atol=1e-6)


def test_a_loop_in_a_map_body_that_runs_out_is_reported():
    dev = xla_device()
    compiled = xla_loop_backend.compile(_loops_everywhere, fullgraph=True, max_iterations=10)
    with pytest.raises(LoopLoweringError, match="still running after max_iterations=10"):
        compiled(torch.tensor(11, device=dev), torch.ones(2, device=dev), torch.ones(4, 2, device=dev))


def test_python_int_carries_with_a_bound():
    def f(x):
        i, x = while_loop(lambda i, x: i < 5, lambda i, x: (i + 1, x * 2), (0, x))
        return x, i

    dev = xla_device()
    compiled = xla_loop_backend.compile(f, fullgraph=True, max_iterations=8)
    assert_same(compiled(torch.ones(2, device=dev)), f(torch.ones(2)))
    with MetricsDelta() as delta:
        compiled(torch.ones(2, device=dev))
    assert delta.compiles == 0
