"""xla_loop_backend.while_loop / scan / fori_loop (xla_loop_backend/api.py): results match
eager CPU, eagerly and compiled; bad loops get errors naming the loop, the carry, and
expected vs found; the process keeps working afterwards."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch_xla
from loop_testing import MetricsDelta, assert_same, check_against_eager, xla_device

import xla_loop_backend
from xla_loop_backend import LoopLoweringError, fori_loop, scan, while_loop
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
        assert delta.compiles == 0 and delta.transfers_from_device == 0 and delta.local_scalar_dense == 0
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


@pytest.mark.parametrize(
    "body, message",
    [
        (lambda i, c: {"h": c["h"]}, r"body_fn must return carries structured like init: expected \{h: float32\[3\], steps: int64\[\]\}, found \{h: float32\[3\]\}"),
        (lambda i, c: {"h": torch.cat([c["h"], c["h"]]), "steps": c["steps"]}, r"body_fn changes carry init\['h'\]: expected float32\[3\] \(as passed in\), found float32\[6\]"),
        (lambda i, c: {"h": c["h"].double(), "steps": c["steps"]}, r"body_fn changes carry init\['h'\]: expected float32\[3\] \(as passed in\), found float64\[3\]"),
    ],
)
@pytest.mark.parametrize("mode", ["eager cpu", "eager xla", "compiled"])
def test_fori_loop_body_changing_the_carry_is_rejected_then_process_still_works(body, message, mode):
    device = "cpu" if mode == "eager cpu" else xla_device()

    def bad(h):
        return fori_loop(0, 3, body, {"h": h, "steps": torch.zeros((), dtype=torch.int64, device=h.device)}, name="bad_step")

    run = xla_loop_backend.compile(bad, fullgraph=True) if mode == "compiled" else bad
    with pytest.raises(LoopLoweringError, match=rf"fori_loop 'bad_step'.*{message}"):
        run(torch.ones(3, device=device))
    check_against_eager(_fori_static, torch.randn(3))


def test_fori_loop_rejects_bad_bounds():
    with pytest.raises(LoopLoweringError, match=r"fori_loop '_decay'.*upper bound must be an int or a 0-dim integer tensor, found float32\[\]"):
        fori_loop(0, torch.tensor(3.0), _decay, {"h": torch.ones(2), "steps": torch.tensor(0)})


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


@pytest.mark.parametrize(
    "xs, message",
    [
        ({"a": torch.ones(4, 3), "b": torch.ones(5, 3)}, r"every xs must have the same length along dim 0: xs\['a'\] has 4 \(float32\[4, 3\]\), xs\['b'\] has 5 \(float32\[5, 3\]\)"),
        ({"a": torch.ones(0, 3)}, r"xs are empty along dim 0 \(xs\['a'\] is float32\[0, 3\]\)"),
        ({}, r"xs must hold at least one tensor"),
        ({"a": torch.ones(4, 3), "n": 3}, r"xs xs\['n'\] must be a tensor, found int"),
    ],
)
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_scan_bad_xs_is_rejected(xs, message, mode):
    def bad(h, xs):
        return scan(lambda c, x: (c + x["a"], c), h, xs, name="acc")

    run = xla_loop_backend.compile(bad, fullgraph=True) if mode == "compiled" else bad
    with pytest.raises(LoopLoweringError, match=rf"scan 'acc'.*{message}"):
        run(torch.zeros(3, device=xla_device()), {k: v.to(xla_device()) if isinstance(v, torch.Tensor) else v for k, v in xs.items()})


def test_scan_combine_may_return_its_inputs_as_outputs():
    # torch's scan rejects outputs aliasing inputs; the wrapper copies them.
    check_against_eager(lambda h, xs: scan(lambda c, x: (c + x, (c, x)), h, xs), torch.zeros(3), torch.randn(4, 3))


@pytest.mark.parametrize(
    "combine, message",
    [
        (lambda c, x: c + x, r"combine_fn must return a pair \(next carry, y\), found float32\[3\]"),
        (lambda c, x: ((c, c), x), r"combine_fn must return carries structured like init: expected float32\[3\], found \(float32\[3\], float32\[3\]\)"),
        (lambda c, x: (c.sum(), x), r"combine_fn changes carry init: expected float32\[3\] \(as passed in\), found float32\[\]"),
    ],
)
def test_scan_combine_returning_the_wrong_structure_is_rejected(combine, message):
    def bad(h, xs):
        return scan(combine, h, xs, name="acc")

    with pytest.raises(LoopLoweringError, match=rf"scan 'acc'.*{message}"):
        xla_loop_backend.compile(bad, fullgraph=True)(torch.zeros(3, device=xla_device()), torch.ones(4, 3, device=xla_device()))
    check_against_eager(lambda h, xs: scan(lambda c, x: (c + x, c), h, xs), torch.zeros(3), torch.ones(4, 3))


# ---------------------------------------------------------------- while_loop


def _loop_with_carry(bad):
    def f(n, x):
        def body(i, state):
            return i - 1, state

        return while_loop(lambda i, s: i > 0, body, (n, {"x": x, "extra": [bad]}))

    return f


@pytest.mark.parametrize("bad, found", [(1.5, "float"), ("text", "str"), (None, "NoneType"), (True, "bool")])
def test_unsupported_carry_type_named_by_path(bad, found):
    f = _loop_with_carry(bad)
    dev = xla_device()
    expected = rf"while_loop 'body'.*carry carried_inputs\[1\]\['extra'\]\[0\] must be a tensor or a Python int, found {found}"
    with pytest.raises(LoopLoweringError, match=expected):
        f(torch.tensor(2, device=dev), torch.ones(2, device=dev))
    with pytest.raises(LoopLoweringError, match=expected):
        xla_loop_backend.compile(f, fullgraph=True)(torch.tensor(2, device=dev), torch.ones(2, device=dev))


def test_carried_inputs_must_be_a_sequence():
    with pytest.raises(LoopLoweringError, match=r"while_loop 'decay'.*carried_inputs must be a tuple or list, found float32\[2\]"):
        while_loop(lambda x: x.sum() > 0, lambda x: x - 1, torch.ones(2), name="decay")


@pytest.mark.parametrize(
    "body, message",
    [
        (lambda i, x: (i - 1, torch.cat([x, x])), r"body_fn changes carry carried_inputs\[1\]: expected float32\[2\] \(as passed in\), found float32\[4\]"),
        (lambda i, x: (i - 1, x.double()), r"body_fn changes carry carried_inputs\[1\]: expected float32\[2\] \(as passed in\), found float64\[2\]"),
        (lambda i, x: (i - 1,), r"body_fn must return carries structured like carried_inputs: expected \(int64\[\], float32\[2\]\), found \(int64\[\],\)"),
    ],
)
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_body_changing_a_carry_is_rejected_then_process_still_works(body, message, mode):
    dev = xla_device()

    def bad(n, x):
        return while_loop(lambda i, x: i > 0, body, (n, x), name="bad_body")

    run = xla_loop_backend.compile(bad, fullgraph=True) if mode == "compiled" else bad
    with pytest.raises(LoopLoweringError, match=rf"while_loop 'bad_body'.*{message}"):
        run(torch.tensor(3, device=dev), torch.ones(2, device=dev))
    # No poisoned state: another loop compiles and runs correctly in the same process.
    good = lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x * 3), (n, x))  # noqa: E731
    check_against_eager(good, torch.tensor(3), torch.ones(2))


def test_cond_that_is_not_a_scalar_bool_is_rejected():
    dev = xla_device()

    def bad(n, x):
        return while_loop(lambda i, x: x > 0, lambda i, x: (i - 1, x - 1), (n, x), name="countdown")

    with pytest.raises(LoopLoweringError, match=r"while_loop 'countdown'.*cond_fn must return a scalar bool tensor \(bool\[\]\) or a bool, found bool\[2\]"):
        xla_loop_backend.compile(bad, fullgraph=True)(torch.tensor(3, device=dev), torch.ones(2, device=dev))
    check_against_eager(
        lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x - 1), (n, x)), torch.tensor(3), torch.ones(2)
    )


def test_one_import_gives_every_loop_form():
    assert {"while_loop", "scan", "fori_loop", "compile"} <= set(xla_loop_backend.__all__)
