"""The catalogue of bad input (xla_loop_backend/errors.py, tracing.py, bounds.py).

Each bad loop gets a LoopLoweringError that names the loop, the carry (by pytree path)
and what was expected vs found, when called eagerly on XLA tensors and when compiled;
afterwards the same process compiles and runs a good loop correctly (no poisoned cache).
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from loop_testing import MetricsDelta, assert_same, check_against_eager, xla_device

import xla_loop_backend
from xla_loop_backend import LoopLoweringError, fori_loop, scan, while_loop


def _count(n: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=n.device)


def _on(n: torch.Tensor, x: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.ones(*shape, device=x.device)


def _raise_value_error(i, x):
    raise ValueError("boom: bad step")


_W = {}  # a tensor the loops below capture (put on the device by the test)


# (loop program over (n: int64[] = 3, x: float32[2]), expected message after the loop's name)
CATALOGUE: dict[str, tuple[Callable[..., Any], str]] = {
    # -- carries whose shape, dtype or structure the body changes
    "body changes a carry's shape": (
        lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, torch.cat([x, x])), (n, x), name="L"),
        r"while_loop 'L'.*body_fn changes carry carried_inputs\[1\]: expected float32\[2\] \(as passed in\), found float32\[4\]",
    ),
    "body changes a carry's dtype": (
        lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x.double()), (n, x), name="L"),
        r"while_loop 'L'.*body_fn changes carry carried_inputs\[1\]: expected float32\[2\] \(as passed in\), found float64\[2\]",
    ),
    "body drops a carry": (
        lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1,), (n, x), name="L"),
        r"while_loop 'L'.*body_fn must return carries structured like carried_inputs: expected \(int64\[\], float32\[2\]\), found \(int64\[\],\)",
    ),
    "fori body changes a pytree carry": (
        lambda n, x: fori_loop(0, 3, lambda i, c: {"h": c["h"][:1], "k": c["k"]}, {"h": x, "k": n}, name="F"),
        r"fori_loop 'F'.*body_fn changes carry init\['h'\]: expected float32\[2\] \(as passed in\), found float32\[1\]",
    ),
    "fori body drops a dict key": (
        lambda n, x: fori_loop(0, 3, lambda i, c: {"h": c["h"]}, {"h": x, "k": n}, name="F"),
        r"fori_loop 'F'.*body_fn must return carries structured like init: expected \{h: float32\[2\], k: int64\[\]\}, found \{h: float32\[2\]\}",
    ),
    "scan combine returns no pair": (
        lambda n, x: scan(lambda c, y: c + y, x, _on(n, x, 4, 2), name="S"),
        r"scan 'S'.*combine_fn must return a pair \(next carry, y\), found float32\[2\]",
    ),
    "scan combine changes the carry's structure": (
        lambda n, x: scan(lambda c, y: ((c, c), y), x, _on(n, x, 4, 2), name="S"),
        r"scan 'S'.*combine_fn must return carries structured like init: expected float32\[2\], found \(float32\[2\], float32\[2\]\)",
    ),
    "scan combine changes the carry's shape": (
        lambda n, x: scan(lambda c, y: (c.sum(), y), x, _on(n, x, 4, 2), name="S"),
        r"scan 'S'.*combine_fn changes carry init: expected float32\[2\] \(as passed in\), found float32\[\]",
    ),
    # -- conds that are not a scalar bool computed from the carries
    "cond returns a non-scalar": (
        lambda n, x: while_loop(lambda i, x: x > 0, lambda i, x: (i - 1, x - 1), (n, x), name="L"),
        r"while_loop 'L'.*cond_fn must return a scalar bool tensor \(bool\[\]\) or a bool, found bool\[2\]",
    ),
    "cond returns an int tensor": (
        lambda n, x: while_loop(lambda i, x: i, lambda i, x: (i - 1, x), (n, x), name="L"),
        r"while_loop 'L'.*cond_fn must return a scalar bool tensor \(bool\[\]\) or a bool, found int64\[\]",
    ),
    "cond returns a float tensor": (
        lambda n, x: while_loop(lambda i, x: x.sum(), lambda i, x: (i - 1, x - 1), (n, x), name="L"),
        r"while_loop 'L'.*cond_fn must return a scalar bool tensor \(bool\[\]\) or a bool, found float32\[\]",
    ),
    "cond returns the constant True": (
        lambda n, x: while_loop(lambda i, x: True, lambda i, x: (i - 1, x), (n, x), name="L"),
        r"while_loop 'L'.*cond_fn must return a bool tensor computed from the carries, found the Python constant True",
    ),
    "cond returns the constant False": (
        lambda n, x: while_loop(lambda i, x: False, lambda i, x: (i - 1, x), (n, x), name="L"),
        r"while_loop 'L'.*cond_fn must return a bool tensor computed from the carries, found the Python constant False",
    ),
    "cond returns the constant 1": (
        lambda n, x: while_loop(lambda i, x: 1, lambda i, x: (i - 1, x), (n, x), name="L"),
        r"while_loop 'L'.*cond_fn must return a bool tensor computed from the carries, found the Python constant 1",
    ),
    # -- unsupported carry types
    "float carry": (
        lambda n, x: while_loop(lambda i, s: i > 0, lambda i, s: (i - 1, s), (n, {"x": x, "extra": [1.5]}), name="L"),
        r"while_loop 'L'.*carry carried_inputs\[1\]\['extra'\]\[0\] must be a tensor or a Python int, found float",
    ),
    "str carry": (
        lambda n, x: while_loop(lambda i, s: i > 0, lambda i, s: (i - 1, s), (n, {"x": x, "extra": ["text"]}), name="L"),
        r"while_loop 'L'.*carry carried_inputs\[1\]\['extra'\]\[0\] must be a tensor or a Python int, found str",
    ),
    "None carry": (
        lambda n, x: while_loop(lambda i, s: i > 0, lambda i, s: (i - 1, s), (n, {"x": x, "extra": [None]}), name="L"),
        r"while_loop 'L'.*carry carried_inputs\[1\]\['extra'\]\[0\] must be a tensor or a Python int, found NoneType",
    ),
    "bool carry": (
        lambda n, x: while_loop(lambda i, s: i > 0, lambda i, s: (i - 1, s), (n, {"x": x, "extra": [True]}), name="L"),
        r"while_loop 'L'.*carry carried_inputs\[1\]\['extra'\]\[0\] must be a tensor or a Python int, found bool",
    ),
    "carries not in a sequence": (
        lambda n, x: while_loop(lambda x: x.sum() > 0, lambda x: x - 1, x, name="L"),
        r"while_loop 'L'.*carried_inputs must be a tuple or list, found float32\[2\]",
    ),
    "scan over an int": (
        lambda n, x: scan(lambda c, y: (c + y["a"], c), x, {"a": _on(n, x, 4, 2), "n": 3}, name="S"),
        r"scan 'S'.*xs xs\['n'\] must be a tensor, found int",
    ),
    "fori_loop with a float bound": (
        lambda n, x: fori_loop(0, n.float(), lambda i, c: c * 2, x, name="F"),
        r"fori_loop 'F'.*upper bound must be an int or an integer tensor with one element, found float32\[\]",
    ),
    # -- bodies that update tensors in place
    "body updates its input carry in place": (
        lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x.add_(1)), (n, x), name="L"),
        r"while_loop 'L'.*body_fn updates carried_inputs\[1\] in place: expected new tensors computed from the carries \(e\.g\. `x = x \+ 1`\), found an in-place update of an input",
    ),
    "scan combine updates its carry in place": (
        lambda n, x: scan(lambda c, y: ({"h": c["h"].mul_(y)}, c["h"] * 1), {"h": x}, _on(n, x, 4, 2), name="S"),
        r"scan 'S'.*combine_fn updates init\['h'\] in place: expected new tensors",
    ),
    "scan combine updates its xs slice in place": (
        lambda n, x: scan(lambda c, y: (c + y.mul_(2), c * 1), x, _on(n, x, 4, 2), name="S"),
        r"scan 'S'.*combine_fn updates xs in place: expected new tensors",
    ),
    "fori body updates its carry in place": (
        lambda n, x: fori_loop(0, n, lambda i, c: {"a": c["a"].sub_(i)}, {"a": x}, name="F"),
        r"fori_loop 'F'.*body_fn updates init\['a'\] in place: expected new tensors",
    ),
    "body updates a captured tensor in place": (
        lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x + _W["w"].add_(1)), (n, x), name="L"),
        r"while_loop 'L'.*updates a tensor it captured in place: expected captured tensors to be read only .*found an in-place update",
    ),
    # -- exceptions while tracing cond or body
    "body raises": (
        lambda n, x: while_loop(lambda i, x: i > 0, _raise_value_error, (n, x), name="L"),
        r"while_loop 'L'.*body_fn raised ValueError while being traced: boom: bad step",
    ),
    "cond raises": (
        lambda n, x: while_loop(lambda i, x: 1 / 0, lambda i, x: (i - 1, x), (n, x), name="L"),
        r"while_loop 'L'.*cond_fn raised ZeroDivisionError while being traced: division by zero",
    ),
    "fori body indexes past a list": (
        lambda n, x: fori_loop(0, 3, lambda i, c: [c[5]], [x], name="F"),
        r"fori_loop 'F'.*body_fn raised IndexError while being traced: list index out of range",
    ),
    "body has a shape error": (
        lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x @ torch.ones(3, 3, device=x.device)), (n, x), name="L"),
        r"while_loop 'L'.*tracing its cond or body failed: .*a and b must have same reduction dim",
    ),
    # -- scans over empty or mismatched xs
    "scan over empty xs": (
        lambda n, x: scan(lambda c, y: (c + y["a"], c), x, {"a": _on(n, x, 0, 2)}, name="S"),
        r"scan 'S'.*xs are empty along dim 0 \(xs\['a'\] is float32\[0, 2\]\)",
    ),
    "scan over no tensors": (
        lambda n, x: scan(lambda c, y: (c, c), x, {}, name="S"),
        r"scan 'S'.*xs must hold at least one tensor",
    ),
    "scan over xs of different lengths": (
        lambda n, x: scan(lambda c, y: (c + y["a"], c), x, {"a": _on(n, x, 4, 2), "b": _on(n, x, 5, 2)}, name="S"),
        r"scan 'S'.*every xs must have the same length along dim 0: xs\['a'\] has 4 \(float32\[4, 2\]\), xs\['b'\] has 5 \(float32\[5, 2\]\)",
    ),
    "scan along a missing dim": (
        lambda n, x: scan(lambda c, y: (c + y, c), x, _on(n, x, 4, 2), dim=2, name="S"),
        r"scan 'S'.*xs has no dimension 2 to scan over, found float32\[4, 2\]",
    ),
}


def _good(n: torch.Tensor, x: torch.Tensor) -> Any:
    return while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x * 3 + i.to(x.dtype)), (n, x))


def _assert_process_still_works() -> None:
    """A good loop now traces, compiles and runs correctly: eagerly on the device (a fresh
    trace each call) and compiled (a new function)."""
    expected = _good(torch.tensor(3), torch.ones(2))
    dev = xla_device()
    assert_same(_good(torch.tensor(3, device=dev), torch.ones(2, device=dev)), expected)
    check_against_eager(lambda n, x: _good(n, x), torch.tensor(3), torch.ones(2))


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_loop_error_names_loop_carry_expected_and_found(case, mode):
    program, message = CATALOGUE[case]
    dev = xla_device()
    _W["w"] = torch.ones(2, device=dev)
    run = xla_loop_backend.compile(program, fullgraph=True) if mode == "compiled" else program
    with pytest.raises(LoopLoweringError, match=message):
        run(torch.tensor(3, device=dev), torch.ones(2, device=dev))
    _assert_process_still_works()


def test_bad_input_on_cpu_gets_the_same_errors():
    # Eager on CPU tensors (torch's own loops, no XLA): the same checks apply.
    for case in ["body changes a carry's dtype", "cond returns the constant True", "body updates its input carry in place", "body raises", "scan over empty xs"]:
        program, message = CATALOGUE[case]
        with pytest.raises(LoopLoweringError, match=message):
            program(torch.tensor(3), torch.ones(2))


def test_plain_torch_compile_keeps_the_message():
    # Without the decorator Dynamo wraps the error, but its text still names loop and carry.
    program, message = CATALOGUE["body changes a carry's shape"]
    dev = xla_device()
    with pytest.raises(Exception, match=message):
        torch.compile(program, backend="xla_loop", fullgraph=True)(torch.tensor(3, device=dev), torch.ones(2, device=dev))
    _assert_process_still_works()


# ---------------------------------------------------------------- runaway loops


def _until(n: torch.Tensor, x: torch.Tensor) -> Any:
    """Counts up to n: never stops for n < 0."""
    return while_loop(lambda i, x: i != n, lambda i, x: (i + 1, x * 0.5), (_count(n), x))


def test_runaway_loop_with_max_iterations_raises_then_the_same_compiled_function_works():
    dev = xla_device()
    bounded = xla_loop_backend.compile(_until, fullgraph=True, max_iterations=40)
    x = torch.ones(2, device=dev)
    assert_same(bounded(torch.tensor(7, device=dev), x), _until(torch.tensor(7), torch.ones(2)))
    with pytest.raises(LoopLoweringError, match=r"while_loop at test_errors.py:\d+: still running after max_iterations=40 iterations"):
        bounded(torch.tensor(-1, device=dev), x)
    # Same executable, no recompile: one host read per call (the bound check), none per iteration.
    with MetricsDelta() as delta:
        out = bounded(torch.tensor(40, device=dev), x)
    assert (delta.compiles, delta.host_syncs) == (0, 1)
    assert_same(out, _until(torch.tensor(40), torch.ones(2)))


def _nested_until(n: torch.Tensor, x: torch.Tensor) -> Any:
    def body(i, x):
        _, x = _until(n, x)
        return i + 1, x

    return while_loop(lambda i, x: i < 3, body, (_count(n), x))


def _scan_until(n: torch.Tensor, x: torch.Tensor) -> Any:
    return scan(lambda c, y: (_until(n, c + y)[1], c.sum()), x, torch.ones(4, 2, device=x.device))


@pytest.mark.parametrize("program, outer", [(_nested_until, "while_loop at test_errors.py:\\d+ or "), (_scan_until, "")])
def test_runaway_inner_loop_is_reported_through_the_enclosing_loop(program, outer):
    dev = xla_device()
    bounded = xla_loop_backend.compile(program, fullgraph=True, max_iterations=30)
    x = torch.ones(2, device=dev)
    assert_same(bounded(torch.tensor(4, device=dev), x), program(torch.tensor(4), torch.ones(2)), rtol=1e-5, atol=1e-6)
    with pytest.raises(LoopLoweringError, match=rf"{outer}while_loop at test_errors.py:\d+: still running after max_iterations=30"):
        bounded(torch.tensor(-2, device=dev), x)
    assert_same(bounded(torch.tensor(5, device=dev), x), program(torch.tensor(5), torch.ones(2)), rtol=1e-5, atol=1e-6)


def test_without_max_iterations_a_loop_is_not_counted():
    # The bound costs one host read per call; without it there is none.
    dev = xla_device()
    compiled = xla_loop_backend.compile(_until, fullgraph=True)
    compiled(torch.tensor(5, device=dev), torch.ones(2, device=dev))
    with MetricsDelta() as delta:
        compiled(torch.tensor(9, device=dev), torch.ones(2, device=dev))
    assert (delta.compiles, delta.host_syncs, delta.transfers_from_device) == (0, 0, 0)


_OP_ON_THE_CPU_IN_A_BODY = """
import traceback, torch, torch_xla
import xla_loop_backend as xl

@xl.compile(fullgraph=True)
def f(x):
    return xl.fori_loop(0, 3, lambda i, x: torch.lgamma(x) * 0.1 + 1, x)

try:
    f(torch.rand(3, device=torch_xla.device()) + 1)
except xl.LoopLoweringError as error:
    # every frame's values, as pytest's long tracebacks and debuggers show them
    traceback.TracebackException.from_exception(error, capture_locals=True).format()
    print("ERROR", str(error).splitlines()[0])
print("alive", f.__name__)
"""


def test_an_op_torch_xla_runs_on_the_cpu_inside_a_body_is_an_error_whose_traceback_prints():
    # Traced on placeholders (no device buffer), the op would read one back and abort the
    # process; so would printing a traceback's frames that still held one.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _OP_ON_THE_CPU_IN_A_BODY], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ERROR scan at <string>:7" in done.stdout and "torch_xla runs aten::lgamma on the CPU" in done.stdout
    assert "alive" in done.stdout
