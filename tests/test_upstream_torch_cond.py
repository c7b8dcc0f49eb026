"""The cond-in-loop programs of PyTorch's test/functorch/test_control_flow.py (pytorch/pytorch,
commit 04cb1e8f285c1f4c172167ee358d19b94d36def4), run through backend="xla_loop".

Upstream traces them with make_fx; here each is compiled with torch.compile on the XLA
device and compared with the same function eagerly on CPU, then called with the other
predicate, which must compile nothing and read nothing back. The programs, re-written:

* test_nested_map_cond_real / _symbolic: cond inside a map body, the predicate passed to
  map as an extra argument (the symbolic variant's second shapes: dynamic=True here);
* test_nested_cond_map_cond_symbolic: a cond whose branches each run a map whose body runs
  another cond;
* test_map_unfunc_boolean_tensor_for_nested_map_cond: cond inside map on a bool predicate
  (upstream checks functionalization's graph text; here the values);
* test_cond_in_forloop: cond in a Python for loop with gradients (not a loop op, but it
  checks gradients through cond).

No upstream test puts cond inside a while_loop or a scan (tests/test_lowering_cond.py has
those).
"""
from __future__ import annotations

import pytest
import torch
from loop_testing import MetricsDelta, assert_same, xla_device
from torch._higher_order_ops.cond import cond
from torch._higher_order_ops.map import map as torch_map


def _true_fn(x, y):
    return x * y


def _false_fn(x, y):
    return x + y


def _cond_in_map(pred, xs, y):
    return torch_map(lambda x, pred, y: cond(pred, _true_fn, _false_fn, [x, y]), xs, pred, y)


def _cond_map_cond(p, pred, xs, y):
    return cond(p, lambda pred, xs, y: _cond_in_map(pred, xs, y) * 2, lambda pred, xs, y: _cond_in_map(pred, xs, y) + 1, [pred, xs, y])


def _bool_pred_in_map(pred, x):
    return torch_map(lambda x, pred: cond(pred, lambda x: x * 2, lambda x: x / 2, (x,)), x, pred)


CASES = {
    "nested_map_cond": (_cond_in_map, lambda p: (torch.tensor(p), torch.randn(3, 2, 4), torch.randn(4))),
    "nested_cond_map_cond": (_cond_map_cond, lambda p: (torch.tensor(p), torch.tensor(not p), torch.randn(3, 2, 4), torch.randn(4))),
    "map_bool_pred_nested_map_cond": (_bool_pred_in_map, lambda p: (torch.tensor(p), torch.ones(2, 3))),
}


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_upstream_cond_in_map(name, dynamic):
    fn, make_args = CASES[name]
    compiled = torch.compile(fn, backend="xla_loop", fullgraph=True, dynamic=dynamic)
    dev = xla_device()
    torch.manual_seed(0)
    for call, pred in enumerate((True, False)):
        args = make_args(pred)
        device_args = [a.to(dev) for a in args]
        with MetricsDelta() as delta:
            out = compiled(*device_args)
        assert_same(out, fn(*args), rtol=1e-5, atol=1e-6)
        if call == 1:
            assert (delta.compiles, delta.host_syncs) == (0, 0)


def test_upstream_nested_map_cond_symbolic_other_shapes():
    # upstream's symbolic variant runs on (3, 2, 2) and (2,) after tracing (3, 2, 4), (4,)
    compiled = torch.compile(_cond_in_map, backend="xla_loop", fullgraph=True, dynamic=True)
    dev = xla_device()
    for xs, y in ((torch.ones(3, 2, 4), torch.ones(4)), (torch.randn(3, 2, 2), torch.randn(2))):
        args = (torch.tensor(False), xs, y)
        assert_same(compiled(*[a.to(dev) for a in args]), _cond_in_map(*args), rtol=1e-5, atol=1e-6)


def test_upstream_cond_in_forloop_gradients():
    def true_fn(x):
        return x * x + 1

    def false_fn(x):
        return x

    def f(x):
        for i in range(3):
            x = cond(i < 3, true_fn, false_fn, (x,))
        return x

    dev = xla_device()
    x = torch.ones(4, requires_grad=True)
    expected = torch.autograd.grad(f(x).sum(), x)[0]
    x_dev = torch.ones(4, device=dev, requires_grad=True)
    got = torch.autograd.grad(torch.compile(f, backend="xla_loop", fullgraph=True)(x_dev).sum(), x_dev)[0]
    torch.testing.assert_close(got.cpu(), expected)
