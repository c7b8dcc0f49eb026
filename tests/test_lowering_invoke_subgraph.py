"""lowering/invoke_subgraph.py: functions marked with torch.compiler.nested_compile_region
(Dynamo's invoke_subgraph) compute in line, at top level, inside loop bodies and with loops
inside them; forward and gradients equal eager PyTorch / the Python loop on CPU."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_xla
from loop_testing import MetricsDelta, xla_device
from training_testing import assert_grads_close, grads

import reference_loops
import xla_loop_backend

nested_compile_region = torch.compiler.nested_compile_region


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))

    @nested_compile_region
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x)) * self.scale


class Blocks(torch.nn.Module):
    """Repeated marked blocks at top level."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(3))

    def forward(self, x: torch.Tensor, python: bool = False) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.pow(2).mean()


class MarkedInScan(torch.nn.Module):
    """A scan whose body calls a marked function twice."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = torch.nn.GRUCell(8, 8)

    @nested_compile_region
    def step(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.cell(x, h)

    def forward(self, xs: torch.Tensor, python: bool = False) -> torch.Tensor:
        def body(h, x):
            h = self.step(self.step(h, x), x * 0.5)
            return h, h.sum(-1)

        h = torch.zeros(xs.shape[1], 8, device=xs.device)
        h, ys = (reference_loops if python else xla_loop_backend).scan(body, h, xs)
        return h.pow(2).mean() + ys.pow(2).mean()


class LoopsInMarked(torch.nn.Module):
    """Marked functions holding a scan and a trained while_loop, called twice each."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = torch.nn.GRUCell(8, 8)
        self.fc = torch.nn.Linear(8, 8)

    @nested_compile_region
    def encode(self, h: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return xla_loop_backend.scan(lambda h, x: (self.cell(x, h), None), h, xs)[0]

    @nested_compile_region
    def refine(self, n: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=torch.int64, device=h.device)
        return xla_loop_backend.while_loop(lambda i, h: i < n, lambda i, h: (i + 1, torch.tanh(self.fc(h))), (zero, h))[1]

    def forward(self, n: torch.Tensor, xs: torch.Tensor, python: bool = False) -> torch.Tensor:
        h = torch.zeros(xs.shape[1], 8, device=xs.device)
        if python:
            for _ in range(2):
                for x in xs:
                    h = self.cell(x, h)
                for _ in range(int(n)):
                    h = torch.tanh(self.fc(h))
        else:
            for _ in range(2):
                h = self.refine(n, self.encode(h, xs))
        return h.pow(2).mean()


def _train_against_eager(model_type, *calls, options=None):
    """Each call's loss and gradients, compiled with xla_loop on the device, against the same
    model run eagerly (Python loops) on CPU; every call after the first compiles nothing."""
    xla_device()  # (the XLA runtime starts before the first backward; see loop_testing)
    torch.manual_seed(0)
    reference = model_type()
    model = copy.deepcopy(reference).to(xla_device())
    compiled = torch.compile(model, backend="xla_loop", fullgraph=True, options=options)
    for k, args in enumerate(calls):
        reference.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        expected = reference(*args, python=True)
        expected.backward()
        device_args = [a.to(xla_device()) for a in args]
        torch_xla.sync()  # (torch_xla holds 0 and 1 as constants: made into data outside the count)
        with MetricsDelta() as delta:
            loss = compiled(*device_args)
            loss.backward()
        torch.testing.assert_close(loss.detach().cpu(), expected.detach(), rtol=1e-4, atol=1e-4)
        assert_grads_close(grads(model), grads(reference))
        if k > 0:
            assert delta.compiles == 0


def _graph_of(model, *args):
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=spy, fullgraph=True)(*args)
    return graphs[0]


def _invoke_subgraph_calls(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]


@pytest.mark.parametrize("roll_layers", [False, True])  # in line; rolled (passes/roll_layers.py)
def test_marked_blocks_train_like_eager(roll_layers):
    assert len(_invoke_subgraph_calls(_graph_of(Blocks(), torch.randn(4, 8)))) == 3
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    calls = [(torch.randn(4, 8, generator=gen),), (torch.randn(4, 8, generator=gen),)]
    _train_against_eager(Blocks, *calls, options={"roll_layers": roll_layers})


def test_marked_function_inside_a_scan_body_runs_like_the_python_loop():
    xla_device()
    torch.manual_seed(0)
    reference = MarkedInScan()
    model = copy.deepcopy(reference).to(xla_device())
    compiled = torch.compile(model, backend="xla_loop", fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k in range(2):
            xs = torch.randn(5, 2, 8, generator=gen)
            with MetricsDelta() as delta:
                loss = compiled(xs.to(xla_device()))
            torch.testing.assert_close(loss.cpu(), reference(xs, python=True), rtol=1e-4, atol=1e-4)
            if k > 0:
                assert delta.compiles == 0


def test_torch_still_cannot_trace_a_marked_function_in_a_loop_body_with_grad():
    # torch 2.9's Dynamo fails before any backend runs (scan's alias check makes a fake mode
    # of its own inside invoke_subgraph's). When this fails, train MarkedInScan above.
    model = MarkedInScan()
    with pytest.raises(Exception, match="fake mode"):
        torch.compile(model, backend="eager", fullgraph=True)(torch.randn(5, 2, 8))


@pytest.mark.parametrize("trips", [(0, 3), (2, 1)])
def test_loops_inside_marked_functions_train_like_the_python_loops(trips):
    gen = torch.Generator().manual_seed(2)
    calls = [(torch.tensor(n), torch.randn(3, 2, 8, generator=gen)) for n in trips]
    _train_against_eager(LoopsInMarked, *calls)


def test_dynamo_graph_deduplication_runs_like_eager():
    class Repeated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

        def forward(self, x: torch.Tensor, python: bool = False) -> torch.Tensor:
            for layer in self.layers:
                x = x + torch.tanh(layer(x))
            return x.pow(2).mean()

    with torch._dynamo.config.patch(use_graph_deduplication=True):
        assert len(_invoke_subgraph_calls(_graph_of(Repeated(), torch.randn(4, 8)))) == 3
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(3)
        _train_against_eager(Repeated, (torch.randn(4, 8, generator=gen),), (torch.randn(4, 8, generator=gen),))


def test_openxla_still_cannot_take_invoke_subgraph():
    # When this fails, torch_xla's bridge takes invoke_subgraph itself (xla_loop still
    # lowers it, so that loops inside the subgraph lower too).
    model = Blocks().to(xla_device())
    with pytest.raises(Exception, match="number or tensor"):
        torch.compile(model, backend="openxla", fullgraph=True)(torch.randn(4, 8, device=xla_device()))


class NormBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.norm = torch.nn.BatchNorm1d(8)

    @nested_compile_region
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.norm(self.fc(x)))  # training mode: updates running stats


class NormBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(NormBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.pow(2).mean()


def test_a_marked_function_that_updates_its_inputs_is_an_error_not_a_bridge_crash():
    # AOTAutograd wraps such a call in auto_functionalized_v2, which torch_xla's bridge
    # cannot take (an assertion); xla_loop says what is wrong, or runs the graph eagerly.
    torch.manual_seed(0)
    reference = NormBlocks()
    x = torch.randn(4, 8)
    model = copy.deepcopy(reference).to(xla_device())
    eager_on_device = copy.deepcopy(reference).to(xla_device())
    with torch.no_grad():
        with pytest.raises(xla_loop_backend.LoopLoweringError, match="updates one of its inputs in place"):
            xla_loop_backend.compile(copy.deepcopy(model), fullgraph=True)(x.to(xla_device()))
        torch._dynamo.reset()
        expected = reference(x)
        with pytest.warns(xla_loop_backend.LoopFallbackWarning, match="nested_compile_region"):
            loss = torch.compile(model, backend="xla_loop")(x.to(xla_device()))
        eager_on_device(x.to(xla_device()))
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-4, atol=1e-4)
    # The running statistics as torch_xla's eager BatchNorm leaves them (its running_var
    # differs from CPU's, compiled or not: torch_xla's, not this test's concern).
    for (name, buffer), (_, device_buffer) in zip(eager_on_device.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(device_buffer.cpu(), buffer.cpu(), rtol=1e-4, atol=1e-4, msg=name)
