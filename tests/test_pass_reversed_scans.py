"""passes/reversed_scans.py: a scan over flipped xs reads them from the end instead of
copying each flipped (torch's scan backward and `scan(reverse=True)` flip around a forward
scan), with the same results and gradients as the Python loop on the CPU."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_xla
from loop_testing import assert_same, graphs_as_lowered, xla_device
from torch._higher_order_ops.scan import scan

import xla_loop_backend as xl
from xla_loop_backend.inspect import lowered_hlo
from xla_loop_backend.lowering.scan import scan_from_the_end

FLIP = torch.ops.aten.flip.default


def _python_scan_from_the_end(init, xs, w):
    c, ys = init, [None] * xs.shape[0]
    for i in reversed(range(xs.shape[0])):
        c = torch.tanh(c * w + xs[i])
        ys[i] = c * 2
    return c, torch.stack(ys)


def _reverse_scan(init, xs, w):
    def step(c, x):
        c = torch.tanh(c * w + x)
        return c, c * 2

    return scan(step, init, xs, reverse=True)


def _calls(gm, target):
    return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.find_nodes(op="call_function", target=target)]


def test_a_reversed_scan_reads_its_xs_from_the_end_with_no_flip():
    init, xs, w = torch.randn(3), torch.randn(5, 3), torch.randn(3)
    expected = _python_scan_from_the_end(init, xs, w)
    dev_args = [t.to(xla_device()) for t in (init, xs, w)]
    (hlo,) = lowered_hlo(_reverse_scan, *dev_args)
    assert hlo.count(" while(") == 1 and " reverse(" not in hlo
    actual = xl.compile(_reverse_scan, fullgraph=True)(*dev_args)
    assert_same([t.cpu() for t in actual], list(expected), rtol=1e-5, atol=1e-5)


def test_ys_read_unflipped_and_flipped_keep_their_values():
    """Where the graph reads the flipped scan's ys as they are, it gets them flipped."""

    def fn(init, xs, w):
        def step(c, x):
            c = torch.tanh(c * w + x)
            return c, c * 2

        c, ys = scan(step, init, xs.flip(0))
        return c, ys, ys.flip(0) + 1

    init, xs, w = torch.randn(3), torch.randn(5, 3), torch.randn(3)
    c, ys_from_the_end = _python_scan_from_the_end(init, xs, w)
    with graphs_as_lowered() as graphs:
        actual = xl.compile(fn, fullgraph=True)(*[t.to(xla_device()) for t in (init, xs, w)])
    (forward,) = graphs
    assert len(_calls(forward, scan_from_the_end)) == 1 and len(_calls(forward, FLIP)) == 1  # (the ys read as they were)
    assert_same([t.cpu() for t in actual], [c, ys_from_the_end.flip(0), ys_from_the_end + 1], rtol=1e-5, atol=1e-5)


def test_a_scan_with_xs_not_all_flipped_is_left_as_it_is():
    def fn(init, xs, w):
        def step(c, xy):
            x, y = xy
            c = torch.tanh(c * w + x * y)
            return c, c

        return scan(step, init, (xs.flip(0), xs))

    init, xs, w = torch.randn(3), torch.randn(5, 3), torch.randn(3)
    c, ys = init, []
    for x, y in zip(xs.flip(0), xs):
        c = torch.tanh(c * w + x * y)
        ys.append(c)
    with graphs_as_lowered() as graphs:
        actual = xl.compile(fn, fullgraph=True)(*[t.to(xla_device()) for t in (init, xs, w)])
    (forward,) = graphs
    assert not _calls(forward, scan_from_the_end) and _calls(forward, FLIP)
    assert_same([t.cpu() for t in actual], [c, torch.stack(ys)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_the_backward_scan_reads_the_stored_steps_from_the_end(reverse):
    """torch's scan backward flips the stored steps and the xs in, and the xs' gradients
    out: none of that is copied, and the gradients are the Python loop's."""

    def fn(init, xs, w):
        def step(c, x):
            c = torch.tanh(c * w + x)
            return c, c * 2

        c, ys = scan(step, init, xs, reverse=reverse)
        return c.sum() + ys.square().sum()

    torch.manual_seed(0)
    init, xs, w = torch.randn(3), torch.randn(6, 3), torch.randn(3)
    xs_ref, w_ref = xs.clone().requires_grad_(), w.clone().requires_grad_()
    c, ys = init, [None] * 6
    for i in reversed(range(6)) if reverse else range(6):  # (the Python loop on the CPU)
        c = torch.tanh(c * w_ref + xs_ref[i])
        ys[i] = c * 2
    (c.sum() + torch.stack(ys).square().sum()).backward()

    xs_dev, w_dev = xs.to(xla_device()).requires_grad_(), w.to(xla_device()).requires_grad_()
    with graphs_as_lowered() as graphs:
        loss = xl.compile(fn)(init.to(xla_device()), xs_dev, w_dev)  # (default options, as users)
        loss.backward()
        torch_xla.sync()
    forward, backward = graphs
    assert len(_calls(backward, scan_from_the_end)) == 1
    # Left: with reverse=True, the user's own flips (of the xs in, of the ys out) in the
    # forward, and their gradients in the backward; the backward scan's four are gone.
    assert len(_calls(forward, FLIP)) == len(_calls(backward, FLIP)) == (2 if reverse else 0)
    assert_same(xs_dev.grad.cpu(), xs_ref.grad, rtol=1e-5, atol=1e-5)
    assert_same(w_dev.grad.cpu(), w_ref.grad, rtol=1e-5, atol=1e-5)


def test_scan_layers_backward_copies_no_weight_to_flip_it():
    """The layers' stacked weights (xs of the scan) and their gradients (its ys) are read
    and written from the end: no `reverse` in the backward's program."""

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(4))

        def forward(self, h):
            return xl.scan_layers(self.layers, h) * torch.tensor(0.5)  # (a constant made without device=)

    torch.manual_seed(0)
    model, h = Layers(), torch.randn(2, 8)
    reference = copy.deepcopy(model)
    out = h
    for layer in reference.layers:
        out = layer(out)
    (out * 0.5).square().sum().backward()
    model.to(xla_device())
    with graphs_as_lowered() as graphs:
        xl.compile(model)(h.to(xla_device())).square().sum().backward()
        torch_xla.sync()
    _, backward = graphs
    assert not _calls(backward, FLIP) and _calls(backward, scan_from_the_end)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_same(p.grad.cpu(), q.grad, rtol=1e-5, atol=1e-5)


def test_the_stand_in_run_as_it_is_is_the_flipped_scan():
    """`scan_from_the_end` is also a function of its own (what the lowering implements)."""
    from torch._higher_order_ops.scan import scan_op

    def combine(c, x):
        return c + x, c * x

    init, xs = [torch.zeros(3)], [torch.arange(15.0).reshape(5, 3)]
    c, ys = scan_op(combine, init, [xs[0].flip(0)], ())
    ours = scan_from_the_end(combine, init, xs, ())
    assert_same(ours, [c, ys.flip(0)])


def test_a_reversed_scan_in_a_loop_body_reads_from_the_end_too():
    """The pass runs at every depth: a `reverse=True` scan inside a while_loop's body (a
    counter made without device=) has no flip in the program, and eager's values."""

    def fn(n, init, xs, w):
        def body(i, c):
            def step(h, x):
                h = torch.tanh(h * w + x)
                return h, h

            h, _ = scan(step, c, xs, reverse=True)
            return i + 1, h

        return xl.while_loop(lambda i, c: i < n, body, (torch.zeros((), dtype=torch.int64), init))[1]

    init, xs, w = torch.randn(3), torch.randn(4, 3), torch.randn(3)
    expected = init
    for _ in range(3):  # (the Python loops on the CPU)
        for i in reversed(range(4)):
            expected = torch.tanh(expected * w + xs[i])
    args = [torch.tensor(3).to(xla_device()), *[t.to(xla_device()) for t in (init, xs, w)]]
    (hlo,) = lowered_hlo(fn, *args)
    assert hlo.count(" while(") == 2 and " reverse(" not in hlo
    assert_same(xl.compile(fn)(*args).cpu(), expected, rtol=1e-5, atol=1e-5)
