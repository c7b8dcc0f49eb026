"""passes/torch_fixes.py: fixes for torch 2.9's control-flow ops, made in the ops; each has a
test that fails without it and one that notices when torch no longer needs it."""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from loop_testing import xla_device
from torch._C import DispatchKey
from torch._higher_order_ops.scan import scan, scan_op
from torch._higher_order_ops.while_loop import while_loop

import xla_loop_backend
from xla_loop_backend.passes import torch_fixes


@contextlib.contextmanager
def torch_scan_autograd():
    """torch's own scan autograd kernel, without the fix."""
    fixed = scan_op.py_kernels[DispatchKey.Autograd]
    scan_op.py_kernels[DispatchKey.Autograd] = torch_fixes.torch_scan_autograd_kernel()
    scan_op._dispatch_cache.clear()
    try:
        yield
    finally:
        scan_op.py_kernels[DispatchKey.Autograd] = fixed
        scan_op._dispatch_cache.clear()


@contextlib.contextmanager
def torch_create_bw_fn():
    """torch's own create_bw_fn in scan, map and cond, without the fix."""
    modules = [importlib.import_module(f"torch._higher_order_ops.{m}") for m in ("scan", "map", "cond")]
    for module in modules:
        module.create_bw_fn = torch_fixes._TORCH_CREATE_BW_FN
    try:
        yield
    finally:
        torch_fixes.install_vjp_fixes()


def _scan_gradients(run_scan):
    """Gradients of xs and of a closed-over weight, through `run_scan`, and through the same
    recurrence as a Python loop, with an initial carry that does not require grad."""
    torch.manual_seed(0)
    w = torch.tensor([0.9, 1.1, 0.7], requires_grad=True)
    xs = torch.randn(5, 3, requires_grad=True)
    h, ys = run_scan(lambda h, x: (torch.tanh(h * w + x), h.sum()), torch.zeros(3), xs)
    (h.sum() + ys.sum()).backward()
    got = (xs.grad.clone(), w.grad.clone())
    xs.grad = w.grad = None
    h, ys = torch.zeros(3), []
    for x in xs:
        ys.append(h.sum())
        h = torch.tanh(h * w + x)
    (h.sum() + torch.stack(ys).sum()).backward()
    return got, (xs.grad, w.grad)


def test_eager_scan_gradients_match_the_python_loop():
    xla_device()  # (the XLA runtime starts before the first backward; see loop_testing)
    for run_scan in (scan, xla_loop_backend.scan):
        (gx, gw), (ex, ew) = _scan_gradients(run_scan)
        torch.testing.assert_close(gx, ex)
        torch.testing.assert_close(gw, ew)


def test_torch_scan_autograd_still_drops_gradients():
    # pytorch/pytorch#184528: when this fails, torch's scan is right and the fix can go.
    xla_device()
    with torch_scan_autograd():
        (gx, gw), (ex, ew) = _scan_gradients(scan)
    assert not torch.allclose(gx, ex, atol=1e-3) and not torch.allclose(gw, ew, atol=1e-3), (
        "torch's scan autograd is right now: install_scan_autograd_fix can go"
    )


def test_scan_inside_a_trained_while_loop_gets_the_fix_too():
    # The fix is in the op, so it reaches a scan at any depth: here in a while_loop's body,
    # traced by the backward of xla_loop's trained while_loop.
    class ScanInWhile(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = torch.nn.GRUCell(3, 4)

        def forward(self, n, x, xs, python=False):
            def inner(x):
                h = torch.zeros(2, 4, device=x.device)  # no grad
                if python:
                    for e in xs:
                        h = self.cell(e, h)
                    return h
                return scan(lambda h, e: (self.cell(e, h), h.sum()), h, xs)[0]

            if python:
                for _ in range(int(n)):
                    x = x * 0.5 + inner(x)
            else:
                start = torch.zeros((), dtype=torch.int64, device=x.device)
                x = while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x * 0.5 + inner(x)), (start, x))[1]
            return x.pow(2).sum()

    torch.manual_seed(0)
    reference = ScanInWhile()
    model = ScanInWhile().to(xla_device())
    model.load_state_dict(reference.state_dict())
    args = (torch.tensor(3), torch.randn(2, 4), torch.randn(4, 2, 3))
    reference(*args, python=True).backward()
    xla_loop_backend.compile(model, fullgraph=True)(*[a.to(xla_device()) for a in args]).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def _carry_also_returned_as_y(h, x):
    new = h + x
    return new, new


def test_trained_scan_whose_body_returns_its_carry_as_y():
    # torch_xla's first scan test: the VJP gives the carry and x one gradient tensor.
    dev = xla_device()
    init = torch.tensor([0.0, 0.0], requires_grad=True, device=dev)
    xs = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True, device=dev)
    carry, ys = xla_loop_backend.scan(_carry_also_returned_as_y, init, xs)
    (carry.sum() + ys.sum()).backward()
    assert init.grad.cpu().tolist() == [4.0, 4.0]
    assert xs.grad.cpu().tolist() == [[4.0, 4.0], [3.0, 3.0], [2.0, 2.0]]


def test_torch_scan_backward_still_refuses_aliased_gradients():
    # pytorch/pytorch#185332: when this fails, the distinct-outputs fix can go.
    init = torch.tensor([0.0, 0.0], requires_grad=True)
    xs = torch.ones(3, 2, requires_grad=True)
    with torch_create_bw_fn(), pytest.raises(RuntimeError, match="aliasing"):
        carry, ys = scan(_carry_also_returned_as_y, init, xs)
        (carry.sum() + ys.sum()).backward()


def test_distinct_outputs_copies_tensors_that_share_storage():
    a, b = torch.ones(3), torch.zeros(2)
    out = torch_fixes.distinct_outputs([a, b, a, a[1:], 7])
    assert out[0] is a and out[1] is b and out[4] == 7
    assert out[2] is not a and torch.equal(out[2], a)
    assert out[3].untyped_storage().data_ptr() != a.untyped_storage().data_ptr()


def _scan_with_an_integer_y(w, init, xs):
    return scan(lambda c, x: (c * w + x, (c > 0).sum()), init, xs)


def test_a_scan_with_an_integer_y_trains():
    w = torch.tensor([1.0, 0.5], requires_grad=True)
    init, xs = torch.ones(2), torch.tensor([[1.0, -3.0], [2.0, 1.0], [-1.0, 1.0]])
    for device in ("cpu", xla_device()):
        w_d = w.detach().to(device).requires_grad_()
        fn = _scan_with_an_integer_y if device == "cpu" else torch.compile(_scan_with_an_integer_y, backend="xla_loop", fullgraph=True)
        carry, counts = fn(w_d, init.to(device), xs.to(device))
        carry.sum().backward()
        c, expected_counts = init, []
        for x in xs:
            expected_counts.append((c > 0).sum())
            c = c * w + x
        expected = torch.autograd.grad(c.sum(), w)[0]
        assert torch.equal(counts.cpu(), torch.stack(expected_counts))
        torch.testing.assert_close(w_d.grad.cpu(), expected)


def test_torch_scan_backward_still_fails_on_an_integer_y():
    # When this fails, torch's scan takes integer ys in training and the fix can go.
    w = torch.tensor([1.0, 0.5], requires_grad=True)
    with torch_create_bw_fn(), pytest.raises(AssertionError):
        carry, _ = _scan_with_an_integer_y(w, torch.ones(2), torch.ones(3, 2))
        carry.sum().backward()


def _deduplicated_graph_of_marked_layers():
    from test_pass_roll_layers import Stack

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch._dynamo.config.patch(use_graph_deduplication=True):
        torch.compile(Stack(depth=4, per_layer=True), backend=keep, fullgraph=True)(torch.randn(3, 8))
    return graphs[0]


def test_graph_deduplication_leaves_marked_calls_alone():
    gm = _deduplicated_graph_of_marked_layers()
    invoke = torch.ops.higher_order.invoke_subgraph
    calls = [n for n in gm.graph.nodes if n.target is invoke]
    assert len(calls) == 4 and len({n.args[0].target for n in calls}) <= 2  # (the marked calls, not wrapped again)


def test_torch_graph_deduplication_still_fails_on_marked_calls():
    # When this fails, Dynamo's deduplication takes graphs with marked calls: install_dedup_fix can go.
    from torch._dynamo.graph_region_tracker import GraphRegionTracker

    fixed = GraphRegionTracker.track_node
    GraphRegionTracker.track_node = fixed.__wrapped__
    try:
        with pytest.raises(Exception, match="example_value"):
            _deduplicated_graph_of_marked_layers()
    finally:
        GraphRegionTracker.track_node = fixed


class _WiredDifferently(torch.nn.Module):
    """The first layer reads x as both h and x; the others read two values."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.layers:
            h = torch.tanh(layer(h) + 0.1 * x) + 0.5 * h
        return h


def _deduplicated_on_cpu(model, x):
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(use_graph_deduplication=True):
        return torch.compile(model, backend="eager", fullgraph=True)(x)


def test_graph_deduplication_groups_regions_by_wiring():
    torch.manual_seed(5)
    model, x = _WiredDifferently(), torch.randn(2, 4)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_deduplicated_on_cpu(model, x), expected)


def test_torch_graph_deduplication_still_mixes_up_regions_wired_differently():
    # When this fails, Dynamo groups regions by wiring itself: the wiring split can go.
    from torch._dynamo.graph_region_tracker import GraphRegionTracker

    torch.manual_seed(5)
    model, x = _WiredDifferently(), torch.randn(2, 4)
    with torch.no_grad():
        expected = model(x)
    fixed = GraphRegionTracker.get_identical_regions
    GraphRegionTracker.get_identical_regions = fixed.__wrapped__
    try:
        got = _deduplicated_on_cpu(model, x)
    finally:
        GraphRegionTracker.get_identical_regions = fixed
    assert not torch.allclose(got, expected, atol=1e-3), "Dynamo's deduplication is right now: _by_wiring can go"


def _files_tokenized_while_compiling() -> int:
    """How many source files Dynamo tokenizes while it compiles a small function (its
    trace logs off; its per-file cache emptied first)."""
    from torch._dynamo import funcname_cache

    tokenized = []
    add_file = funcname_cache._add_file
    funcname_cache.clearcache()
    funcname_cache._add_file = lambda filename: (tokenized.append(filename), add_file(filename))[1]
    try:
        torch._dynamo.reset()
        torch.compile(lambda x: torch.sin(x) * 2 + torch.cos(x), backend="eager", fullgraph=True)(torch.randn(3))
    finally:
        funcname_cache._add_file = add_file
    return len(tokenized)


def test_dynamo_tokenizes_no_source_file_for_a_log_that_is_off():
    assert _files_tokenized_while_compiling() == 0


def test_torch_dynamo_still_tokenizes_source_files_for_logs_that_are_off():
    # When this fails, Dynamo no longer names functions for logs that are off: install_funcname_fix can go.
    from torch._dynamo import symbolic_convert

    fixed = symbolic_convert.get_funcname
    symbolic_convert.get_funcname = fixed.__wrapped__
    try:
        tokenized = _files_tokenized_while_compiling()
    finally:
        symbolic_convert.get_funcname = fixed
    assert tokenized > 0, "Dynamo no longer tokenizes files for its trace logs while they are off: install_funcname_fix can go"


def _cond_returning_its_input(x):
    return torch.cond(x.sum() > 0, lambda g: g, lambda g: g * 2, (x,))


def test_torchs_cond_may_return_its_input_unchanged():
    from loop_testing import xla_device

    x = torch.ones(3, device=xla_device())
    assert torch.compile(_cond_returning_its_input, backend="xla_loop", fullgraph=True)(x).cpu().tolist() == [1.0] * 3


def test_torch_still_refuses_a_cond_branch_returning_its_input():
    # When this fails, torch accepts the alias itself: install_aliasing_fix can go.
    from loop_testing import xla_device
    from torch._dynamo.output_graph import SubgraphTracer

    fixed = SubgraphTracer.has_aliasing
    SubgraphTracer.has_aliasing = fixed.__wrapped__
    try:
        with pytest.raises(Exception, match="aliasing"):
            torch.compile(_cond_returning_its_input, backend="xla_loop", fullgraph=True)(torch.ones(3, device=xla_device()))
    finally:
        SubgraphTracer.has_aliasing = fixed
