"""torch_xla_loops.py: torch_xla's `scan`, `scan_layers` and `fori_loop` (torch_xla.experimental)
under xla_loop lower like xla_loop's own: results against eager CPU and torch_xla's own eager
run, gradients against plain Python loops on CPU, one XLA While in the HLO, one layer traced
by Dynamo whatever the depth, and a partition_fn xla_loop does not honour refused."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from functorch.compile import default_partition, min_cut_rematerialization_partition
from loop_testing import MetricsDelta, assert_same, dynamo_graph, xla_device
from torch_xla.experimental.scan import scan as torch_xla_scan
from torch_xla.experimental.scan_layers import scan_layers as torch_xla_scan_layers

import xla_loop_backend as xl
from xla_loop_backend.inspect import lowered_hlo


class Block(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, h):
        return h + torch.tanh(self.linear(h)) * self.scale


class Stack(torch.nn.Module):
    def __init__(self, depth: int, scan_layers=torch_xla_scan_layers, **options):
        super().__init__()
        torch.manual_seed(depth)
        self.layers = torch.nn.ModuleList([Block() for _ in range(depth)])
        self.scan_layers, self.options = scan_layers, options

    def forward(self, h):
        return self.scan_layers(self.layers, h, **self.options)


def _sequential_on_cpu(model: Stack, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    xla_device()  # (before the first backward: torch 2.9's autograd engine, docs/errors-and-limits.md)
    cpu = copy.deepcopy(model).cpu()
    out = h.cpu()
    for layer in cpu.layers:  # (a plain Python loop: the reference)
        out = layer(out)
    (out ** 2).sum().backward()
    return out.detach(), [p.grad for p in cpu.parameters()]


def _compiled_step(model: Stack, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    dev = xla_device()
    model = copy.deepcopy(model).to(dev)
    out = xl.compile(model, fullgraph=True)(h.to(dev))
    (out ** 2).sum().backward()  # (the loss outside the compiled function, as users write it)
    return out.detach().cpu(), [p.grad.cpu() for p in model.parameters()]


# ---- scan ----------------------------------------------------------------------------------


def _cumulative(init, xs, weight):
    def step(carry, x):
        carry = torch.tanh(carry * weight + x)
        return carry, carry * 2

    return torch_xla_scan(step, init, xs)


def test_scan_matches_torch_xla_eager_and_cpu_with_gradients():
    torch.manual_seed(0)
    init, xs, weight = torch.randn(3), torch.randn(6, 3), torch.randn(3, requires_grad=True)
    dev = xla_device()
    # Reference: the Python loop on CPU, forward and backward.
    carry, ys = init, []
    for x in xs:
        carry = torch.tanh(carry * weight + x)
        ys.append(carry * 2)
    expected = (carry, torch.stack(ys))
    (expected[0].sum() + expected[1].sum()).backward()
    expected_grad, weight.grad = weight.grad.clone(), None
    # Under xla_loop (torch_xla's own scan cannot close over a tensor: its eager trace fails).
    w_dev = weight.detach().to(dev).requires_grad_()
    actual = xl.compile(_cumulative, fullgraph=True)(init.to(dev), xs.to(dev), w_dev)
    (actual[0].sum() + actual[1].sum()).backward()
    assert_same([t.detach().cpu() for t in actual], [t.detach() for t in expected])
    assert_same(w_dev.grad.cpu(), expected_grad, rtol=1e-4, atol=1e-5)


def test_scan_is_one_while_and_a_later_call_compiles_nothing():
    dev = xla_device()
    args = (torch.zeros(3, device=dev), torch.randn(6, 3, device=dev), torch.ones(3, device=dev))
    (hlo,) = lowered_hlo(_cumulative, *args)
    assert hlo.count(" while(") == 1
    compiled = xl.compile(_cumulative, fullgraph=True)
    compiled(*args)
    init = torch.ones(3).to(dev)  # (uploaded: torch.ones on the device would be a graph of its own)
    with MetricsDelta() as delta:
        compiled(init, *args[1:])
    assert delta.compiles == 0 and delta.host_syncs == 0


@pytest.mark.parametrize("partition_fn", [default_partition, None])
def test_scan_equals_torch_xla_eager_with_its_options(partition_fn):
    dev = xla_device()

    def f(init, xs):
        options = {} if partition_fn is None else {"partition_fn": partition_fn}
        return torch_xla_scan(lambda c, x: (c + x, c * x), init, xs, is_fn_pure=True, **options)

    init, xs = torch.ones(2), torch.arange(8.0).reshape(4, 2)
    actual = xl.compile(f, fullgraph=True)(init.to(dev), xs.to(dev))
    carry, ys = init, []
    for x in xs:
        ys.append(carry * x)
        carry = carry + x
    assert_same([t.cpu() for t in actual], [carry, torch.stack(ys)])
    assert_same([t.cpu() for t in actual], [t.cpu() for t in f(init.to(dev), xs.to(dev))])  # (torch_xla's own, eagerly)


def test_a_partition_fn_xla_loop_does_not_honour_is_refused_by_name():
    dev = xla_device()

    def f(init, xs):
        return torch_xla_scan(lambda c, x: (c + x, c * x), init, xs, partition_fn=min_cut_rematerialization_partition)

    with pytest.raises(xl.LoopLoweringError, match=r"partition_fn=min_cut_rematerialization_partition .*remat=True"):
        xl.compile(f, fullgraph=True)(torch.zeros(2, device=dev), torch.ones(4, 2, device=dev))
    # The process goes on.
    assert torch.equal(xl.compile(lambda x: x + 1)(torch.ones(2, device=dev)).cpu(), torch.full((2,), 2.0))


# ---- scan_layers ---------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [torch_xla_scan_layers, xl.scan_layers], ids=["torch_xla", "xla_loop"])
def test_scan_layers_trains_with_each_layers_gradients_in_its_own_grad(scan_layers):
    model, h = Stack(5, scan_layers), torch.randn(4, 8)
    expected, expected_grads = _sequential_on_cpu(model, h)
    actual, grads = _compiled_step(model, h)
    assert_same(actual, expected, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(expected_grads) == 10
    for got, want in zip(grads, expected_grads):
        assert_same(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{"is_layer_pure": True}, {"partition_fn": default_partition}])
def test_scan_layers_options_torch_xla_takes(options):
    model, h = Stack(3, **options), torch.randn(2, 8)
    expected, _ = _sequential_on_cpu(model, h)
    actual, _ = _compiled_step(model, h)
    assert_same(actual, expected, rtol=1e-5, atol=1e-5)


def _traced_ops(depth: int, scan_layers) -> list[str]:
    gm = dynamo_graph(Stack(depth, scan_layers), torch.zeros(2, 8))  # (Dynamo's graph: the same on any device)
    ops = []
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            ops += [getattr(n.target, "__name__", str(n.target)) for n in module.graph.nodes if n.op == "call_function"]
    return sorted(ops)


@pytest.mark.parametrize("scan_layers", [torch_xla_scan_layers, xl.scan_layers], ids=["torch_xla", "xla_loop"])
def test_dynamo_traces_one_layer_whatever_the_depth(scan_layers):
    """What compile time must not grow with: the graph Dynamo traces has the same ops at 2 and
    at 16 layers (one layer's, in one scan body; the parameters stacked once each)."""
    shallow, deep = _traced_ops(2, scan_layers), _traced_ops(16, scan_layers)
    assert shallow == deep
    assert sum("linear" in op for op in deep) == 1 and deep.count("scan") == 1


def _guards(depth: int, scan_layers) -> int:
    counts = []

    def count(entries):
        counts.append(len(entries))
        return [True] * len(entries)

    torch._dynamo.reset()
    xl.compile(Stack(depth, scan_layers), fullgraph=True, options={"guard_filter_fn": count})(torch.zeros(2, 8))
    (guards,) = counts
    return guards


@pytest.mark.parametrize("scan_layers", [torch_xla_scan_layers, xl.scan_layers], ids=["torch_xla", "xla_loop"])
def test_dynamo_guards_grow_only_with_the_layers_tensors(scan_layers):
    """The layers' structure is checked on the real modules, not traced, and the rule hands
    Dynamo each layer's tensors by their sources: a layer adds one guard per tensor (3), not
    the guards on its modules and their tables of parameters and buffers (traced, the check
    added 22 a layer; with the tensors read by attribute, 9)."""
    per_layer = (_guards(16, scan_layers) - _guards(2, scan_layers)) / 14
    assert per_layer <= 2 * 3


@pytest.mark.parametrize("scan_layers", [torch_xla_scan_layers, xl.scan_layers], ids=["torch_xla", "xla_loop"])
def test_a_layer_added_or_a_tensor_replaced_after_the_compile_is_seen(scan_layers):
    """With fewer guards the compiled function still follows the layers: a layer appended
    to the ModuleList, and a layer's weight replaced by another tensor, change the result
    as they change the Python loop's (each call with other data, through a constant made
    without device=, as users write it)."""
    model = Stack(3, scan_layers).to(xla_device())

    def scaled(h):
        return model(h) * torch.tensor(0.5)

    forward = xl.compile(scaled)
    g = torch.Generator().manual_seed(0)

    def check():
        h = torch.randn(2, 8, generator=g)
        with torch.no_grad():
            expected = h.to(xla_device())
            for layer in model.layers:  # (a plain Python loop: the reference)
                expected = layer(expected)
            assert_same(forward(h.to(xla_device())), expected.cpu() * 0.5, rtol=1e-5, atol=1e-5)

    check()
    check()
    model.layers.append(Block().to(xla_device()))
    check()
    model.layers[2].linear.weight = torch.nn.Parameter(torch.randn(8, 8, device=xla_device()))
    check()


def test_scan_layers_over_an_iterator_is_traced_as_it_is():
    class OverIterator(Stack):
        def forward(self, h):
            return xl.scan_layers(iter(self.layers), h)

    model, h = OverIterator(3, xl.scan_layers), torch.randn(2, 8)
    expected, _ = _sequential_on_cpu(model, h)
    actual, _ = _compiled_step(model, h)
    assert_same(actual, expected, rtol=1e-5, atol=1e-5)


def test_scan_layers_is_one_while():
    model = Stack(6).to(xla_device())
    (forward,) = lowered_hlo(model, torch.zeros(2, 8, device=xla_device()))
    assert forward.count(" while(") == 1


def test_layers_of_different_structure_are_an_error_naming_the_layer():
    model = Stack(3, xl.scan_layers)
    model.layers[2].linear = torch.nn.Linear(8, 8, bias=False)
    with pytest.raises(xl.LoopLoweringError, match=r"layers\[2\]\.linear holds 1, layers\[0\]\.linear holds 2 \(weight, bias\)"):
        xl.compile(model, fullgraph=True)(torch.zeros(2, 8))
    model = Stack(3, xl.scan_layers)
    model.layers[1].linear.extra = torch.nn.Parameter(torch.ones(8))
    with pytest.raises(xl.LoopLoweringError, match=r"layers\[1\]\.linear holds 3, layers\[0\]\.linear holds 2 \(weight, bias\)"):
        xl.compile(model, fullgraph=True)(torch.zeros(2, 8))
    del model.layers[1].linear.extra
    model.layers[2].scale = torch.ones(2)  # (a buffer of another shape)
    with pytest.raises(xl.LoopLoweringError, match=r"layers\[2\]\.scale is float32\[2\], layers\[0\]\.scale is float32\[\]"):
        xl.scan_layers(model.layers, torch.zeros(2, 8))


def test_no_layers_returns_the_input():
    h = torch.randn(2, 8, device=xla_device())
    assert xl.scan_layers([], h) is h


def test_xla_loop_scan_layers_runs_outside_torch_compile():
    model, h = Stack(4, xl.scan_layers), torch.randn(2, 8)
    expected, _ = _sequential_on_cpu(model, h)
    dev_model = copy.deepcopy(model).to(xla_device())
    assert_same(dev_model(h.to(xla_device())).detach().cpu(), expected, rtol=1e-5, atol=1e-5)


# ---- fori_loop and while_loop (a subprocess: importing torch_xla's fori_loop module registers an
# eager kernel for torch's while_loop op, which would change every later test) ---------------------

_IMPORTS = {
    "xla_loop first": "import xla_loop_backend as xl\nfrom torch_xla.experimental.fori_loop import fori_loop\n",
    "torch_xla first": "from torch_xla.experimental.fori_loop import fori_loop\nimport xla_loop_backend as xl\n",
}
_FORI = """
import torch, torch_xla
from torch._higher_order_ops.while_loop import while_loop
dev = torch_xla.device()

def plus_one(lower, upper, x):
    return fori_loop(lower, upper, lambda v: v + 1, x)

zeros = torch.zeros(2, device=dev)
eager = plus_one(torch.tensor(0, device=dev), torch.tensor(3, device=dev), zeros)   # torch_xla's own (fragile: it fails
ours = xl.compile(plus_one, fullgraph=True)(torch.tensor(0, device=dev), torch.tensor(3, device=dev), zeros)   # on most bodies)
assert isinstance(ours, list) and len(ours) == 2, ours
assert int(ours[0]) == int(eager[0]) == 0 and torch.equal(ours[1].cpu(), eager[1].cpu()), (ours, eager)

def affine(lower, upper, x):
    return fori_loop(lower, upper, lambda v: v * 2 + 1, x)

compiled = xl.compile(affine, fullgraph=True)
x, lower = torch.arange(3.0, device=dev), torch.tensor(2, device=dev)
for n in (4, 1, 0):
    expected = torch.arange(3.0)
    for _ in range(n):
        expected = expected * 2 + 1
    got = compiled(lower, lower + n, x)
    assert int(got[0]) == 0 and torch.equal(got[1].cpu(), expected), (n, got)

def two(x, y):   # several values (torch_xla's own takes one)
    return fori_loop(0, 3, lambda a, b: (a + b, b * 2), x, y)

count, a, b = xl.compile(two, fullgraph=True)(torch.zeros(2, device=dev), torch.ones(2, device=dev))
assert int(count) == 0 and a.cpu().tolist() == [7.0, 7.0] and b.cpu().tolist() == [8.0, 8.0], (a, b)

def wl(x):   # torch's while_loop with torch_xla's kernel registered: xla_loop still lowers it
    return while_loop(lambda i, x: i < 5, lambda i, x: (i + 1, x * 2), (torch.zeros((), dtype=torch.int64), x))

i, y = xl.compile(wl, fullgraph=True)(torch.ones(2, device=dev))
assert int(i) == 5 and y.cpu().tolist() == [32.0, 32.0], (i, y)
print("ok")
"""


@pytest.mark.parametrize("order", list(_IMPORTS))
def test_torch_xla_fori_loop_and_while_loop_lower(order):
    """Either import order works (torch takes one eager XLA kernel per op: xla_loop's gives way)."""
    program = _IMPORTS[order] + _FORI
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_scan_layers_composes_with_remat():
    from xla_loop_backend.explain import _collecting

    model, h = Stack(6, xl.scan_layers), torch.randn(4, 8)
    expected, expected_grads = _sequential_on_cpu(model, h)
    dev_model = copy.deepcopy(model).to(xla_device())
    with _collecting() as collector:
        out = xl.compile(dev_model, fullgraph=True, remat=2)(h.to(xla_device()))
    (out ** 2).sum().backward()
    assert_same(out.detach().cpu(), expected, rtol=1e-5, atol=1e-5)
    for p, want in zip(dev_model.parameters(), expected_grads):
        assert_same(p.grad.cpu(), want, rtol=1e-4, atol=1e-5)
    stores = [r.getMessage() for r in collector.records if getattr(r, "xla_loop_event", None) == "stores"]
    assert len(stores) == 1 and "segment starts" in stores[0] and "(remat=2)" in stores[0], stores


@pytest.mark.parametrize("scan_layers", [torch_xla_scan_layers, xl.scan_layers], ids=["torch_xla", "xla_loop"])
def test_layers_that_share_a_weight_train_like_the_python_loop(scan_layers):
    """One Parameter in every layer (tied weights): Dynamo meets it under each layer's
    source; its gradient sums every layer's, as in the Python loop."""

    def tied(model):
        for layer in model.layers[1:]:
            layer.linear.weight = model.layers[0].linear.weight
        return model

    model, h = tied(Stack(3, scan_layers)), torch.randn(2, 8)
    expected = _sequential_on_cpu(model, h)
    on_device = tied(copy.deepcopy(model).to(xla_device()))  # (.to(xla) makes each layer a Parameter of its own)
    out = xl.compile(on_device, fullgraph=True)(h.to(xla_device()))
    (out**2).sum().backward()
    grads = [p.grad.cpu() for p in on_device.parameters()]
    assert len(grads) == 4  # (one weight, three biases)
    assert_same((out.detach().cpu(), grads), expected, rtol=1e-5, atol=1e-5)
