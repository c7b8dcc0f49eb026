"""The backend entry (xla_loop_backend/backend.py): registration, device default, and the
no-silent-host-loop policy."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch_xla
from loop_testing import MetricsDelta, check_against_eager, xla_device
from torch._higher_order_ops.map import map as torch_map
from torch._higher_order_ops.scan import scan as torch_scan
from torch._higher_order_ops.while_loop import while_loop as torch_while_loop

import xla_loop_backend
from xla_loop_backend import LoopFallbackWarning, metrics, while_loop
from xla_loop_backend.lowering import LOWERING_RULES


def _run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_backend_found_by_entry_point_without_import_and_after_import():
    code = """
        import sys, torch, torch_xla
        from torch._higher_order_ops.while_loop import while_loop
        f = lambda n, x: while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x + 1), (n, x))
        dev = torch_xla.device()
        assert "xla_loop_backend" not in sys.modules
        out = torch.compile(f, backend="xla_loop", fullgraph=True)(torch.tensor(4, device=dev), torch.zeros(2, device=dev))
        print(out[1].cpu().tolist())
        import xla_loop_backend  # importing after lookup must not register it twice
        torch._dynamo.reset()
        out = torch.compile(f, backend="xla_loop")(torch.tensor(2, device=dev), torch.zeros(2, device=dev))
        print(out[1].cpu().tolist(), "xla_loop" in torch._dynamo.list_backends())
    """
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["[4.0, 4.0]", "[2.0, 2.0] True"]


def test_pjrt_device_defaults_to_cpu():
    env = {k: v for k, v in os.environ.items() if k != "PJRT_DEVICE"}
    result = subprocess.run(
        [sys.executable, "-c", "import os, xla_loop_backend; print(os.environ['PJRT_DEVICE'])"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "CPU"
    kept = _run_python("import os, xla_loop_backend; print(os.environ['PJRT_DEVICE'])", {"PJRT_DEVICE": "CPU"})
    assert kept.stdout.strip() == "CPU"


def test_cpu_matrix_products_run_single_threaded_unless_xla_flags_say_otherwise():
    # The runtime starts with the flag (XLA aborts on flags it does not know).
    code = (
        "import os, torch, xla_loop_backend, torch_xla\n"
        "assert (torch.ones(2, 2, device=torch_xla.device()) @ torch.ones(2, 2, device=torch_xla.device())).sum().item() == 8\n"
        "print(os.environ['XLA_FLAGS'])"
    )
    default = _run_python(code, {"PJRT_DEVICE": "CPU", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})
    assert default.returncode == 0, default.stderr[-2000:]
    assert "--xla_cpu_multi_thread_eigen=false" in default.stdout.split()
    chosen = _run_python(code, {"PJRT_DEVICE": "CPU", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"})
    assert chosen.returncode == 0, chosen.stderr[-2000:]
    assert [f for f in chosen.stdout.split() if "multi_thread_eigen" in f] == ["--xla_cpu_multi_thread_eigen=true"]


def _map_program(xs, y):
    return torch_map(lambda x, y: x * y + 1, xs, y)


@pytest.fixture
def map_without_rule(monkeypatch):
    """Pretend `map` has no lowering rule, to exercise the policy for loops xla_loop cannot lower."""
    monkeypatch.delitem(LOWERING_RULES, "map")


def test_loop_without_rule_is_an_error_under_fullgraph(map_without_rule):
    compiled = torch.compile(_map_program, backend="xla_loop", fullgraph=True)
    dev = xla_device()
    with pytest.raises(Exception, match="no lowering for `torch.ops.higher_order.map_impl`"):
        compiled(torch.ones(4, 3, device=dev), torch.ones(3, device=dev))


def test_loop_without_rule_warns_and_still_computes_without_fullgraph(map_without_rule):
    before = metrics.counter_value(metrics.HOST_LOOP_FALLBACKS)
    with pytest.warns(LoopFallbackWarning, match="map_impl"):
        check_against_eager(_map_program, torch.randn(4, 3), torch.randn(3), fullgraph=False)
    assert metrics.counter_value(metrics.HOST_LOOP_FALLBACKS) > before


def test_torch_while_loop_called_eagerly_on_xla_tensors_warns():
    dev = xla_device()
    with pytest.warns(LoopFallbackWarning, match="outside a compiled graph"):
        i, x = torch_while_loop(
            lambda i, x: i > 0, lambda i, x: (i - 1, x + 1), (torch.tensor(3, device=dev), torch.zeros(2, device=dev))
        )
    assert x.cpu().tolist() == [3.0, 3.0]


def test_torch_scan_called_eagerly_on_xla_tensors_warns_that_it_unrolls():
    dev = xla_device()
    with pytest.warns(LoopFallbackWarning, match="unrolled"):
        carry, ys = torch_scan(lambda c, x: (c + x, c * 2), torch.zeros(2, device=dev), torch.ones(3, 2, device=dev))
    assert ys.cpu().tolist() == [[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]]


def test_xla_loop_while_loop_called_eagerly_on_xla_tensors_is_one_xla_while(recwarn):
    dev = xla_device()
    body = lambda i, x: (i - 1, x + 1)  # noqa: E731
    for n in (7, 9):
        start, x = torch.tensor(n, device=dev), torch.zeros(2, device=dev)
        torch_xla.sync()
        lowered = metrics.counter_value(metrics.LOOPS_LOWERED)
        with MetricsDelta() as delta:
            i, x = while_loop(lambda i, x: i > 0, body, (start, x))
            torch_xla.sync()
        assert x.cpu().tolist() == [float(n), float(n)]
        assert metrics.counter_value(metrics.LOOPS_LOWERED) > lowered  # it compiled itself
        assert delta.transfers_from_device == 0
    assert delta.compiles == 0  # the second trip count reuses the first executable
    assert not [w for w in recwarn if issubclass(w.category, LoopFallbackWarning)]


def test_eager_while_loop_on_cpu_does_not_warn(recwarn):
    while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x + 1), (torch.tensor(3), torch.zeros(2)))
    assert not [w for w in recwarn if issubclass(w.category, LoopFallbackWarning)]


def test_compile_decorator_bare_and_with_options():
    @xla_loop_backend.compile
    def bare(n, x):
        return while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x * 2), (n, x))

    @xla_loop_backend.compile(fullgraph=True, dynamic=False)
    def configured(n, x):
        return while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x * 2), (n, x))

    dev = xla_device()
    for fn in (bare, configured):
        _, x = fn(torch.tensor(3, device=dev), torch.ones(2, device=dev))
        assert x.cpu().tolist() == [8.0, 8.0]
    assert bare.__name__ == "bare" and configured.__name__ == "configured"


def test_compile_decorator_raises_the_loop_error_itself():
    @xla_loop_backend.compile(fullgraph=True)
    def bad(x):
        return xla_loop_backend.fori_loop(0, 3, lambda i, c: torch.cat([c, c]), x, name="doubling")

    with pytest.raises(xla_loop_backend.LoopLoweringError, match=r"fori_loop 'doubling'.*expected float32\[3\].*found float32\[6\]"):
        bad(torch.ones(3, device=xla_device()))


def test_compile_decorator_on_a_module_returns_torch_compiled_module():
    module = torch.nn.Linear(3, 3).to(xla_device())
    compiled = xla_loop_backend.compile(module)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    with torch.no_grad():
        assert compiled(torch.ones(2, 3, device=xla_device())).shape == (2, 3)


# ---- the decorator's guard filter ----------------------------------------------------------

class _Entry:
    def __init__(self, name: str):
        self.name = name


def test_the_guard_filter_drops_guards_on_library_internals_only():
    from xla_loop_backend.backend import without_library_guards

    names = {
        "G['__import_xla_loop_backend_dot_api']._dense.__code__": False,
        "G['__import_torch_dot_utils_dot__pytree'].TreeSpec": False,
        "G['__import_torch_dot__dynamo_dot_polyfills_dot_builtins'].functools": False,
        "G['__import_torch_dot__higher_order_ops_dot_while_loop'].while_loop_op": False,
        "L['x']": True,
        "G['torch'].tanh": True,
        "G['SCALE']": True,
        "G['__builtins_dict___0']['len']": True,
    }
    assert without_library_guards([_Entry(n) for n in names]) == list(names.values())


SCALE = 2.0


def _scaled(n, x):
    i0 = torch.zeros((), dtype=torch.int64, device=x.device)
    return while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x * SCALE), (i0, x))[1]


def test_under_the_decorator_library_guards_go_and_the_users_stay(monkeypatch):
    from xla_loop_backend import backend

    seen, original = [], backend.without_library_guards

    def recording(entries):
        keep = original(entries)
        seen.append((len(keep), keep.count(False)))
        return keep

    monkeypatch.setattr(backend, "without_library_guards", recording)
    f = xla_loop_backend.compile(_scaled, fullgraph=True)
    dev = xla_device()
    n, x = torch.tensor(3, device=dev), torch.ones(2, device=dev)
    assert f(n, x).cpu().tolist() == [8.0, 8.0]
    assert seen and seen[0][1] > 0, seen  # the filter ran, and dropped the API's guards
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)  # a global the user's code reads
    assert f(n, x).cpu().tolist() == [27.0, 27.0]
    assert f(n, torch.ones(3, device=dev)).cpu().tolist() == [27.0] * 3  # a new shape


def test_deduplication_is_on_only_while_a_decorated_call_compiles(monkeypatch):
    from xla_loop_backend import backend

    flags, original = [], backend.pipeline.compile

    def recording(*args, **kwargs):  # (the backend runs inside Dynamo's compile)
        flags.append(torch._dynamo.config.use_graph_deduplication)
        return original(*args, **kwargs)

    monkeypatch.setattr(backend.pipeline, "compile", recording)
    f = xla_loop_backend.compile(lambda x: x + 1)
    torch._dynamo.reset()  # (drops Dynamo's compile callbacks: the decorator registers its own again)
    f(torch.ones(2, device=xla_device()))
    assert flags == [True] and torch._dynamo.config.use_graph_deduplication is False
    xla_loop_backend.compile(lambda x: x + 2, roll_layers=False)(torch.ones(3, device=xla_device()))
    torch.compile(lambda x: x + 3, backend="xla_loop")(torch.ones(4, device=xla_device()))
    assert flags == [True, False, False]
