"""xla_loop_backend.while_loop / scan / fori_loop / cond (xla_loop_backend/api.py): results
match eager CPU, eagerly and compiled. (Bad input: test_errors.py.)"""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch_xla
from loop_testing import MetricsDelta, assert_same, check_against_eager, xla_device

import xla_loop_backend
from xla_loop_backend import fori_loop, scan
from xla_loop_backend.inspect import lowered_hlo

# ---------------------------------------------------------------- fori_loop


def _decay(i, carry):
    return {"h": carry["h"] * 0.5 + i.to(carry["h"].dtype), "steps": carry["steps"] + 1}


def _fori_static(h):
    return fori_loop(2, 9, _decay, {"h": h, "steps": torch.zeros((), dtype=torch.int64, device=h.device)})


def _fori_tensor_bounds(lower, upper, h):
    return fori_loop(lower, upper, _decay, {"h": h, "steps": torch.zeros((), dtype=torch.int64, device=h.device)})


def _python_fori(lower, upper, h):
    carry = {"h": h, "steps": torch.zeros((), dtype=torch.int64)}
    for i in range(lower, upper):
        carry = _decay(torch.tensor(i), carry)
    return carry


def test_fori_loop_static_bounds_matches_a_python_loop_eagerly_on_cpu():
    h = torch.randn(3)
    assert_same(_fori_static(h), _python_fori(2, 9, h))


def test_fori_loop_tensor_bounds_matches_a_python_loop_eagerly_on_cpu():
    h = torch.randn(3)
    assert_same(_fori_tensor_bounds(torch.tensor(2), torch.tensor(9), h), _python_fori(2, 9, h))


def test_fori_loop_compiled_static_and_tensor_bounds():
    check_against_eager(_fori_static, torch.randn(3))
    check_against_eager(_fori_tensor_bounds, torch.tensor(2), torch.tensor(9), torch.randn(3))
    check_against_eager(_fori_tensor_bounds, 2, torch.tensor(9), torch.randn(3))


def test_fori_loop_static_bounds_is_a_while_with_a_constant_trip_count():
    h = torch.randn(3, device=xla_device())
    (hlo,) = lowered_hlo(_fori_static, h, fullgraph=True)
    assert hlo.count("while(") == 1
    # The condition compares the step counter with the constant trip count, 9 - 2 = 7.
    assert "s64[] constant(7)" in hlo


def test_fori_loop_static_trip_count_is_known_to_xla(tmp_path):
    # XLA's own analysis, read from its optimized HLO: the While is annotated with the count.
    code = """
import torch, torch_xla
import xla_loop_backend as xl
f = xl.compile(lambda x: xl.fori_loop(2, 9, lambda i, c: c * 0.5 + i, x), fullgraph=True)
print(f(torch.ones(3, device=torch_xla.device())).cpu().tolist())
"""
    env = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_FLAGS": f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    optimized = "".join(p.read_text() for p in tmp_path.glob("*after_optimizations.txt"))
    assert optimized.count("known_trip_count") == 1
    assert '"known_trip_count":{"n":"7"}' in optimized


def test_fori_loop_tensor_bounds_reuse_one_executable_for_any_trip_count():
    compiled = torch.compile(_fori_tensor_bounds, backend="xla_loop", fullgraph=True)
    dev = xla_device()
    h = torch.randn(3, device=dev)
    compiled(torch.tensor(2, device=dev), torch.tensor(5, device=dev), h)
    for upper in (9, 3000):
        lower, upper_t = torch.tensor(2, device=dev), torch.tensor(upper, device=dev)
        torch_xla.sync()
        with MetricsDelta() as delta:
            out = compiled(lower, upper_t, h)
            torch_xla.sync()
        assert delta.compiles == 0 and delta.transfers_from_device == 0 and delta.host_syncs == 0
        assert out["steps"].item() == upper - 2


def test_fori_loop_symbolic_int_bound_under_dynamic_shapes():
    def f(h, n):
        return fori_loop(0, n, lambda i, c: c * 0.5 + i, h)

    compiled = torch.compile(f, backend="xla_loop", dynamic=True, fullgraph=True)
    for n in (5, 9):
        torch.testing.assert_close(compiled(torch.ones(2, device=xla_device()), n).cpu(), f(torch.ones(2), n))


def test_fori_loop_called_eagerly_on_xla_tensors_runs_on_the_device():
    h = torch.randn(3)
    got = _fori_static(h.to(xla_device()))
    assert_same({k: v.cpu() for k, v in got.items()}, _python_fori(2, 9, h))


def test_fori_loop_empty_range_returns_init_and_numbers_become_tensors():
    h = torch.randn(2)
    assert fori_loop(5, 5, _decay, {"h": h, "steps": 0})["h"] is h
    out = fori_loop(0, 3, lambda i, c: (c[0] + 1, c[1] * 2.0), (0, 1.0))
    assert_same(out, (torch.tensor(3), torch.tensor(8.0)))


# ---------------------------------------------------------------- scan


def _gru_like(h, xs, w):
    def step(carry, x):
        new = torch.tanh(carry["h"] @ w + x["u"]) * torch.sigmoid(x["gate"])
        return {"h": new, "t": carry["t"] + 1}, (new.sum(-1), x["u"] * 2)

    return scan(step, {"h": h, "t": torch.zeros((), device=h.device)}, xs, dim=1, reverse=True)


def test_scan_wrapper_matches_eager_for_pytrees_dim_and_reverse():
    xs = {"u": torch.randn(2, 7, 4), "gate": torch.randn(2, 7, 4)}
    check_against_eager(_gru_like, torch.randn(2, 4), xs, torch.randn(4, 4), atol=1e-5, rtol=1e-5)
    actual = _gru_like(torch.randn(2, 4).to(xla_device()), {k: v.to(xla_device()) for k, v in xs.items()}, torch.randn(4, 4).to(xla_device()))
    assert actual[1][0].shape == (7, 2)  # ys stack along dim 0, as torch's scan does


def test_scan_combine_may_return_its_inputs_as_outputs():
    # torch's scan rejects outputs aliasing inputs; the wrapper copies them.
    check_against_eager(lambda h, xs: scan(lambda c, x: (c + x, (c, x)), h, xs), torch.zeros(3), torch.randn(4, 3))


def _returns_captured_and_views(n, h, w):
    """Bodies whose outputs alias something: a captured tensor, a view of a carry."""
    i0 = torch.zeros((), dtype=torch.int64, device=h.device)
    _, a, b = xla_loop_backend.while_loop(lambda i, a, b: i < n, lambda i, a, b: (i + 1, w, a[:]), (i0, h, h * 2))
    c, ys = scan(lambda c, x: (c.view(c.shape), (w, n)), h, torch.stack([h, h]))
    d = fori_loop(0, n, lambda i, d: w.t().t(), h)
    return a, b, c, ys, d


def test_bodies_may_return_captured_tensors_and_views_of_carries():
    # torch's loop ops reject outputs aliasing inputs (captured tensors are inputs too).
    check_against_eager(_returns_captured_and_views, torch.tensor(3), torch.randn(4), torch.randn(4))


def test_copied_outputs_add_no_copy_to_the_while_body():
    # The copies that keep torch's loop ops happy are no ops in the XLA program.
    def f(n, h, w):
        i0 = torch.zeros((), dtype=torch.int64, device=h.device)
        return xla_loop_backend.while_loop(lambda i, h: i < n, lambda i, h: (i + 1, torch.tanh(h @ w)), (i0, h))[1]

    dev = xla_device()
    (hlo,) = lowered_hlo(f, torch.tensor(3).to(dev), torch.randn(2, 4).to(dev), torch.randn(4, 4).to(dev))
    assert " while(" in hlo and " copy(" not in hlo, hlo


# ---------------------------------------------------------------- all


def test_one_import_gives_every_loop_form():
    assert {"while_loop", "scan", "fori_loop", "compile"} <= set(xla_loop_backend.__all__)


# ---------------------------------------------------------------- what torch_xla's own loop tests pass


def _scan_without_ys(init, xs):
    return scan(lambda c, x: (torch.cos(c) + x, None), init, xs)


def _scan_with_some_ys(init, xs):
    return scan(lambda c, x: (c + x, (c * 2, None, {"skip": None, "keep": x.sum()})), init, xs)


def test_scan_ys_may_be_none_or_hold_nones():
    # torch_xla's scan and scan_layers return None for the ys they do not need.
    (carry, ys), _ = check_against_eager(_scan_without_ys, torch.ones(2), torch.randn(3, 2))
    assert ys is None
    (_, ys), _ = check_against_eager(_scan_with_some_ys, torch.ones(2), torch.randn(3, 2))
    assert ys[1] is None and ys[2]["skip"] is None and ys[0].shape == (3, 2)


def test_scan_without_ys_trains():
    # torch_xla's test_scan_output_none: gradients through a scan whose ys are None.
    dev = xla_device()
    init = torch.tensor([1.0, 1.0], device=dev, requires_grad=True)
    xs = torch.tensor([[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]], device=dev, requires_grad=True)
    carry, ys = _scan_without_ys(init, xs)
    carry.sum().backward()
    init_cpu, xs_cpu = init.detach().cpu().requires_grad_(), xs.detach().cpu().requires_grad_()
    c = init_cpu
    for x in xs_cpu:
        c = torch.cos(c) + x
    c.sum().backward()
    assert ys is None
    torch.testing.assert_close(init.grad.cpu(), init_cpu.grad)
    torch.testing.assert_close(xs.grad.cpu(), xs_cpu.grad)


def test_fori_loop_bounds_may_be_one_element_tensors():
    # torch_xla's fori_loop tests pass bounds as torch.tensor([n]).
    def f(lower, upper, x):
        return fori_loop(lower, upper, lambda i, x: x * 2 + i.to(x.dtype), x)

    check_against_eager(f, torch.tensor([1]), torch.tensor([4]), torch.ones(2))


def test_cond_eagerly_and_compiled():
    from xla_loop_backend import cond

    x = torch.tensor([1.0, -2.0, 3.0])
    for pred in (torch.tensor(True), torch.tensor(False)):
        expected = x if pred else -x
        assert torch.equal(cond(pred, lambda x: x, lambda x: -x, (x,)), expected)  # on CPU: torch's cond
        assert torch.equal(cond(pred, lambda x: x, lambda x: -x, (x.to(xla_device()),)).cpu(), expected)
    check_against_eager(lambda p, x: cond(p.sum() > 0, lambda x: x * 2, lambda x: x, (x,)), torch.tensor([1]), x)
