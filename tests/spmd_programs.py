"""SPMD loop programs on 4 virtual CPU devices, one per process (SPMD mode is for the whole
process): `python tests/spmd_programs.py CASE` prints one JSON line. test_spmd.py runs them.

Each program runs sharded (torch_xla SPMD, `CPU_NUM_DEVICES=4`) and the same way unsharded
on CPU; the line gives whether the results (and gradients) agree, the shardings of inputs
and outputs, and the collectives XLA's partitioner put inside each While body, read from
the optimized HLO (`--xla_dump_to`).
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

DUMP = tempfile.mkdtemp(prefix="xla_loop_spmd_")
os.environ["CPU_NUM_DEVICES"] = "4"
os.environ["PJRT_DEVICE"] = "CPU"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP} --xla_dump_hlo_as_text".strip()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.distributed.spmd as xs  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402

xr.use_spmd()

import xla_loop_backend as xl  # noqa: E402

DEV = torch_xla.device()
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter)(?:-start)?\(")


def spec(t: torch.Tensor) -> str:
    return torch_xla._XLAC._get_xla_sharding_spec(t)


def sharded(t: torch.Tensor, mesh: xs.Mesh, partition: tuple) -> torch.Tensor:
    t = t.to(DEV)
    xs.mark_sharding(t, mesh, partition)
    return t


def collectives_per_while_body() -> list[list[str]]:
    """For each While of the last compiled program that has one: the collectives in its body
    (and in what the body calls)."""
    programs = collectives_by_program()
    return programs[-1] if programs else []


def collectives_by_program() -> list[list[list[str]]]:
    """For each compiled program that has a While (in compile order), for each of its
    Whiles: the collectives in the body, and in what the body calls."""
    return _per_while_body(COLLECTIVE)


def gathered_shapes_by_program() -> list[list[list[list[int]]]]:
    """Like `collectives_by_program`, the shapes all-gathers make inside each While body."""
    return _per_while_body(GATHERED)


def _per_while_body(pattern: re.Pattern) -> list[list[list[Any]]]:
    programs = []
    for path in sorted(glob.glob(f"{DUMP}/*after_optimizations.txt")):
        text = open(path).read()
        if " while(" not in text:
            continue
        computations = {}
        for block in re.split(r"\n(?=\S)", text):
            match = re.match(r"(?:ENTRY )?%?([\w.\-]+)", block)
            if match:
                computations[match.group(1)] = block
        bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", text)
        programs.append([_collectives(computations, body, set(), pattern) for body in bodies])
    return programs


GATHERED = re.compile(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(")


def _collectives(computations: dict, name: str, seen: set, pattern: re.Pattern = COLLECTIVE) -> list[Any]:
    seen.add(name)
    block = computations.get(name, "")
    if pattern is GATHERED:
        ops: list[Any] = [[int(d) for d in m.group(1).split(",") if d] for m in pattern.finditer(block)]
    else:
        ops = [m.group(1) for m in pattern.finditer(block)]
    for callee in re.findall(r"(?:to_apply|calls|body|condition|branch_computations)=\{?%?([\w.\-]+)", block):
        if callee not in seen:
            ops += _collectives(computations, callee, seen, pattern)
    return ops


def _step_time(step: Any, calls: int = 5) -> float:
    """Median seconds of one call of `step` (already compiled), waited for on the devices."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        torch_xla.sync()
        torch_xla._XLAC._xla_wait_device_ops([])
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a.detach().cpu(), b.detach().cpu(), rtol=1e-4, atol=1e-4))


def _count(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=x.device)


def stepper(n: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return xl.while_loop(lambda i, x: i < n, lambda i, x: (i + 1, torch.tanh(x @ w)), (_count(x), x))[1]


def data_parallel_while() -> dict:
    mesh = xs.Mesh(np.arange(4), (4, 1), ("data", "model"))
    x, w = torch.randn(8, 16), torch.randn(16, 16) * 0.3
    compiled, args = xl.compile(stepper, fullgraph=True), (torch.tensor(5, device=DEV), sharded(x, mesh, ("data", None)), w.to(DEV))
    out = compiled(*args)
    return {"equal": close(out, stepper(torch.tensor(5), x, w)), "input": spec_of(x, mesh, ("data", None)), "output": spec(out),
            "collectives": collectives_per_while_body(), "step_s": _step_time(lambda: compiled(*args))}


def spec_of(t: torch.Tensor, mesh: xs.Mesh, partition: tuple) -> str:
    return spec(sharded(t, mesh, partition))


def rnn(h: torch.Tensor, xs_: torch.Tensor, wx: torch.Tensor, wh: torch.Tensor):
    return xl.scan(lambda h, x: (torch.tanh(x @ wx + h @ wh), h.sum(-1)), h, xs_)


def data_parallel_scan() -> dict:
    mesh = xs.Mesh(np.arange(4), (4, 1), ("data", "model"))
    h, seq, wx, wh = torch.zeros(8, 16), torch.randn(6, 8, 16), torch.randn(16, 16) * 0.3, torch.randn(16, 16) * 0.3
    compiled = xl.compile(rnn, fullgraph=True)
    args = (sharded(h, mesh, ("data", None)), sharded(seq, mesh, (None, "data", None)), wx.to(DEV), wh.to(DEV))
    out_h, ys = compiled(*args)
    ref_h, ref_ys = rnn(h, seq, wx, wh)
    return {"equal": close(out_h, ref_h) and close(ys, ref_ys), "input": spec_of(h, mesh, ("data", None)), "output": spec(out_h),
            "collectives": collectives_per_while_body(), "step_s": _step_time(lambda: compiled(*args))}


def mlp_steps(n: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return xl.while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x + torch.tanh(x @ w1) @ w2), (_count(x), x))[1]


def tensor_parallel_mlp() -> dict:
    # Megatron's layout: w1 split by columns, w2 by rows; x replicated. One all-reduce a step.
    mesh = xs.Mesh(np.arange(4), (1, 4), ("data", "model"))
    x, w1, w2 = torch.randn(8, 16), torch.randn(16, 32) * 0.2, torch.randn(32, 16) * 0.2
    compiled = xl.compile(mlp_steps, fullgraph=True)
    args = (torch.tensor(4, device=DEV), x.to(DEV), sharded(w1, mesh, (None, "model")), sharded(w2, mesh, ("model", None)))
    out = compiled(*args)
    return {"equal": close(out, mlp_steps(torch.tensor(4), x, w1, w2)), "output": spec(out), "collectives": collectives_per_while_body(),
            "step_s": _step_time(lambda: compiled(*args))}


def conflicting_shardings() -> dict:
    # The carry split by batch, the weight by columns: the loop keeps the carry's layout.
    mesh = xs.Mesh(np.arange(4), (2, 2), ("data", "model"))
    x, w = torch.randn(8, 16), torch.randn(16, 16) * 0.3
    x_dev = sharded(x, mesh, ("data", None))
    compiled, args = xl.compile(stepper, fullgraph=True), (torch.tensor(3, device=DEV), x_dev, sharded(w, mesh, (None, "model")))
    out = compiled(*args)
    return {"equal": close(out, stepper(torch.tensor(3), x, w)), "input": spec(x_dev), "output": spec(out),
            "collectives": collectives_per_while_body(), "step_s": _step_time(lambda: compiled(*args))}


def constraint_in_body() -> dict:
    mesh = xs.Mesh(np.arange(4), (2, 2), ("data", "model"))

    def program(n, x, w):
        def body(i, x):
            y = torch.tanh(x @ w)
            return i + 1, xl.with_sharding_constraint(y, mesh, ("data", "model"))
        return xl.while_loop(lambda i, x: i < n, body, (_count(x), x))[1]

    x, w = torch.randn(8, 16), torch.randn(16, 16) * 0.3
    x_dev = sharded(x, mesh, ("data", "model"))
    compiled, args = xl.compile(program, fullgraph=True), (torch.tensor(3, device=DEV), x_dev, sharded(w, mesh, (None, "model")))
    out = compiled(*args)
    eager = program(torch.tensor(3), x, w)  # on CPU the constraint is the identity
    text = "".join(open(p).read() for p in glob.glob(f"{DUMP}/*before_optimizations.txt"))
    return {"equal": close(out, eager), "input": spec(x_dev), "output": spec(out), "annotated": "sharding={devices=[2,2]" in text,
            "collectives": collectives_per_while_body(), "step_s": _step_time(lambda: compiled(*args))}


def training_through_sharded_scan() -> dict:
    # FSDP-style: the batch split over "data", each weight split by rows over "data" too.
    mesh = xs.Mesh(np.arange(4), (4, 1), ("data", "model"))
    torch.manual_seed(0)
    h, seq = torch.zeros(8, 16), torch.randn(6, 8, 16)
    wx, wh = torch.randn(16, 16) * 0.3, torch.randn(16, 16) * 0.3
    params = [sharded(w, mesh, ("data", None)).requires_grad_() for w in (wx, wh)]

    def loss(h, seq, wx, wh):
        out_h, ys = rnn(h, seq, wx, wh)
        return out_h.pow(2).mean() + ys.pow(2).mean()

    compiled, args = xl.compile(loss, fullgraph=True), (sharded(h, mesh, ("data", None)), sharded(seq, mesh, (None, "data", None)), *params)

    def step() -> None:
        for p in params:
            p.grad = None
        compiled(*args).backward()

    step()
    reference = [w.clone().requires_grad_() for w in (wx, wh)]
    loss(h, seq, *reference).backward()
    return {"equal": all(close(p.grad, r.grad) for p, r in zip(params, reference)), "step_s": _step_time(step),
            "param_shardings": [spec(p) for p in params], "grad_shardings": [spec(p.grad) for p in params],
            "collectives_by_program": collectives_by_program()}


def batch_sharded_scan_training() -> dict:
    # The batch split over 4 devices, the weight replicated; the gradients seeded with ones
    # outside the compiled function (torch's check_autograd), so the seeds' own layout says
    # nothing: each backward carry takes its forward value's.
    mesh = xs.Mesh(np.arange(4), (4, 1), ("data", "model"))
    torch.manual_seed(0)
    h, seq, w = torch.zeros(8, 16), torch.randn(6, 8, 16), torch.randn(16, 16) * 0.3
    param = w.to(DEV).requires_grad_()

    def run(h, seq, w):
        return xl.scan(lambda h, x: (torch.tanh(x + h @ w), h.sum(-1)), h, seq)

    compiled = xl.compile(run, fullgraph=True)
    args = (sharded(h, mesh, ("data", None)), sharded(seq, mesh, (None, "data", None)))

    def step() -> list:
        param.grad = None
        outs = compiled(*args, param)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return outs

    outs = step()
    reference = w.clone().requires_grad_()
    expected = run(h, seq, reference)
    torch.autograd.backward(expected, [torch.ones_like(o) for o in expected])
    return {"equal": close(param.grad, reference.grad) and all(close(o, e) for o, e in zip(outs, expected)),
            "input": spec(args[0]), "output": spec(outs[0]), "grad": spec(param.grad), "param": spec(param),
            "collectives_by_program": collectives_by_program(), "step_s": _step_time(step)}


class FsdpGru(torch.nn.Module):
    """The fsdp_rnn example's model: a GRU through a scan, a readout, a loss."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = torch.nn.GRUCell(16, 32)
        self.readout = torch.nn.Linear(32, 1)

    def forward(self, seq: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        def step(h, x):
            h = self.cell(x, h)
            return h, self.readout(h).squeeze(-1)

        _, ys = xl.scan(step, torch.zeros(seq.shape[1], 32, device=seq.device), seq)
        return (ys - targets).pow(2).mean()


def _fsdp_gru(gather: Any) -> dict:
    import copy

    mesh = xs.Mesh(np.arange(4), (4,), ("fsdp",))
    torch.manual_seed(0)
    reference = FsdpGru()
    model = copy.deepcopy(reference).to(DEV)
    for p in model.parameters():
        xs.mark_sharding(p, mesh, ("fsdp",) + (None,) * (p.dim() - 1))
    compiled = xl.compile(model, fullgraph=True, gather_invariants=gather)
    seq = torch.randn(32, 16, 16)
    targets = torch.sin(seq.sum(-1))
    seq_dev, targets_dev = sharded(seq, mesh, (None, "fsdp", None)), sharded(targets, mesh, (None, "fsdp"))

    def step() -> torch.Tensor:
        model.zero_grad()
        loss = compiled(seq_dev, targets_dev)
        loss.backward()
        return loss

    loss = step()
    expected = reference(seq, targets)
    expected.backward()
    weights = [sorted(p.shape) for p in model.parameters()]  # (a weight may be gathered transposed)
    gathered = gathered_shapes_by_program()
    return {"equal": close(loss, expected) and all(close(p.grad, r.grad) for p, r in zip(model.parameters(), reference.parameters())),
            "param_shardings": [spec(p) for p in model.parameters()], "grad_shardings": [spec(p.grad) for p in model.parameters()],
            "weights_gathered_in_bodies": [[[s for s in body if sorted(s) in weights] for body in program] for program in gathered],
            "gathered_in_bodies": gathered,
            "collectives_by_program": collectives_by_program(), "step_s": _step_time(step)}


def fsdp_gru() -> dict:
    return _fsdp_gru(None)


def fsdp_gru_not_gathered() -> dict:
    return _fsdp_gru(False)


class Recurrent(torch.nn.Module):
    """h <- tanh(h @ w + b + x) over a sequence, by scan or by a trained while_loop."""

    def __init__(self, loop: str) -> None:
        super().__init__()
        self.loop = loop
        self.w = torch.nn.Parameter(torch.randn(16, 16) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(16) * 0.1)

    def step(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.w + self.b + x)

    def forward(self, seq: torch.Tensor, python: bool = False) -> torch.Tensor:
        h = torch.zeros(seq.shape[1], 16, device=seq.device)
        if python or self.loop == "python":
            for x in seq:
                h = self.step(h, x)
        elif self.loop == "scan":
            h, _ = xl.scan(lambda h, x: (self.step(h, x), h.sum()), h, seq)
        else:
            _, h = xl.while_loop(lambda i, h: i < seq.shape[0],
                                 lambda i, h: (i + 1, self.step(h, seq.index_select(0, i.view(1)).squeeze(0))), (_count(h), h))
        return h.pow(2).mean()


def _training_steps(loop: str, backend: str | None, shard: bool, steps: int = 4) -> dict:
    """SGD steps (in-place parameter updates) on the device and on CPU with plain Python
    loops; per step, whether the gradients agree."""
    import copy

    warm = torch.ones(2, device=DEV, requires_grad=True)  # an XLA backward first (README: traps)
    (warm * 2).sum().backward()
    torch.manual_seed(0)
    reference = Recurrent(loop)
    model = copy.deepcopy(reference).to(DEV)
    mesh = xs.Mesh(np.arange(4), (4, 1), ("data", "model"))
    if shard:
        xs.mark_sharding(model.w, mesh, ("data", None))
    compiled = torch.compile(model, backend=backend, fullgraph=True) if backend else xl.compile(model, fullgraph=True)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, reference))
    equal, traced = [], []
    for step in range(steps):
        seq = torch.randn(5, 8, 16)
        dev_seq = seq.to(DEV)
        if shard:
            xs.mark_sharding(dev_seq, mesh, (None, "data", None))
        for o in (opt, ref_opt):
            o.zero_grad()
        compiled(dev_seq).backward()
        reference(seq, python=True).backward()
        equal.append(all(close(p.grad, r.grad) for p, r in zip(model.parameters(), reference.parameters())))
        opt.step(), ref_opt.step()
        torch_xla.sync()
        traced.append(xl.metrics.counter_value(xl.metrics.SUBGRAPHS_TRACED))
    return {"equal_per_step": equal, "subgraphs_traced_per_step": traced,
            "sharding_retraces": xl.metrics.counter_value(xl.metrics.SHARDING_RETRACES),
            "grad_spec": spec(model.w.grad), "param_spec": spec(model.w)}


def training_steps_scan() -> dict:
    return _training_steps("scan", None, shard=True)


def training_steps_while() -> dict:
    return _training_steps("while", None, shard=True)


def training_steps_replicated() -> dict:
    return _training_steps("scan", None, shard=False)


def resharded_input() -> dict:
    # The same shapes called with another input sharding: traced again, right both times.
    mesh = xs.Mesh(np.arange(4), (2, 2), ("data", "model"))
    h, seq, wx, wh = torch.zeros(8, 16), torch.randn(6, 8, 16), torch.randn(16, 16) * 0.3, torch.randn(16, 16) * 0.3
    compiled = xl.compile(rnn, fullgraph=True)
    ref_h, _ = rnn(h, seq, wx, wh)
    results = []
    for partition in ((None, "data", None), (None, "data", "model")):
        # the args just computed by an asynchronous sync when the call traces
        args = [t.to(DEV) * 1 for t in (h, seq, wx, wh)]
        xs.mark_sharding(args[1], mesh, partition)
        torch_xla.sync()
        out_h, _ = compiled(*args)
        results.append(close(out_h, ref_h))
    return {"equal_per_call": results, "sharding_retraces": xl.metrics.counter_value(xl.metrics.SHARDING_RETRACES)}


def scan_layers_data_parallel() -> dict:
    """xla_loop_backend.scan_layers over 4 layers, the batch split over 4 devices, trained:
    results and each layer's gradient against the same layers on CPU."""
    mesh = xs.Mesh(np.arange(4), (4, 1), ("data", "model"))
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(4))
    x = torch.randn(8, 16)
    expected = x
    for layer in layers:
        expected = layer(expected)
    expected.pow(2).sum().backward()
    grads = [p.grad.clone() for p in layers.parameters()]
    layers.zero_grad(set_to_none=True)
    layers.to(DEV)
    compiled = xl.compile(lambda h: xl.scan_layers(layers, h), fullgraph=True)
    out = compiled(sharded(x, mesh, ("data", None)))
    out.pow(2).sum().backward()
    return {"equal": close(out, expected) and all(close(p.grad, g) for p, g in zip(layers.parameters(), grads)),
            "output": spec(out), "grad_layouts_match": all(
                (spec(p.grad) or "{replicated}") == (spec(p) or "{replicated}") for p in layers.parameters()),
            "collectives_by_program": collectives_by_program()}


CASES = {f.__name__: f for f in (scan_layers_data_parallel, data_parallel_while, data_parallel_scan, tensor_parallel_mlp, conflicting_shardings,
                                   constraint_in_body, training_through_sharded_scan, training_steps_scan,
                                   training_steps_while, training_steps_replicated, resharded_input,
                                   batch_sharded_scan_training, fsdp_gru, fsdp_gru_not_gathered)}

if __name__ == "__main__":
    print(json.dumps({"case": sys.argv[1], **CASES[sys.argv[1]]()}))
