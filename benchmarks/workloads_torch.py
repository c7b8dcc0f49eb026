"""Torch-side worker: runs one (system, workload, trip count) and prints BENCH JSON lines.

One process per measurement, started by suite.py: a fresh process makes the first call a
cold compile and ru_maxrss that measurement's own peak. Systems:

  xla_loop       torch.compile(backend="xla_loop") over xla_loop_backend.while_loop / scan,
                 trip count a device tensor input (one executable for every trip count)
  xla_loop_decorator  the same program under @xla_loop_backend.compile(fullgraph=True)
                 (calls.py: it drops Dynamo's guards on the loop API's internals)
  openxla_while  torch.compile(backend="openxla") over torch's while_loop / scan HOPs
  openxla_for    torch.compile(backend="openxla") over a Python loop (Dynamo unrolls it);
                 D: a compiled step in a Python while loop that reads the residual back
  eager          PyTorch on CPU, Python loops
  inductor       torch.compile (inductor) over torch's while_loop on CPU tensors; the RNN is
                 written as a while_loop too (torch 2.9 inductor rejects scan)

Run by hand:  PJRT_DEVICE=CPU .venv/bin/python benchmarks/workloads_torch.py \\
                  --system xla_loop --workload B --trips 100
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
from torch._higher_order_ops import while_loop as torch_while_loop  # noqa: E402
from torch._higher_order_ops.scan import scan as torch_scan  # noqa: E402

import _common as C  # noqa: E402

XLA_SYSTEMS = ("xla_loop", "xla_loop_decorator", "openxla_while", "openxla_for")
SYSTEMS = XLA_SYSTEMS + ("eager", "inductor")


# ---- the programs: each workload written the way each system wants it --------------------

def ab_while(loop: Callable) -> Callable:
    def prog(n, h, w):
        i0 = torch.zeros((), dtype=torch.int64, device=h.device)
        _, h = loop(lambda i, h: i < n, lambda i, h: (i + 1, torch.tanh(h @ w)), (i0, h))
        return h
    return prog


def ab_for(h, w, n: int):
    for _ in range(n):
        h = torch.tanh(h @ w)
    return h


def rnn_scan(scan: Callable) -> Callable:
    def prog(h0, xs, wx, wh):
        def step(h, x):
            h = torch.tanh(x @ wx + h @ wh)
            return h, h.clone()  # torch's scan rejects an output aliasing the carry
        return scan(step, h0, xs)
    return prog


def rnn_for(h0, xs, wx, wh):
    h, ys = h0, []
    for t in range(xs.shape[0]):
        h = torch.tanh(xs[t] @ wx + h @ wh)
        ys.append(h)
    return h, torch.stack(ys)


def rnn_while(h0, xs, wx, wh):
    """The RNN as a while_loop (for inductor): read step i with index_select, write with
    index_copy."""
    i0 = torch.zeros((), dtype=torch.int64, device=h0.device)
    ys0 = torch.zeros(xs.shape[0], *h0.shape, device=h0.device)

    def body(i, h, ys):
        x = xs.index_select(0, i.view(1)).squeeze(0)
        h = torch.tanh(x @ wx + h @ wh)
        return i + 1, h, ys.index_copy(0, i.view(1), h.unsqueeze(0))

    _, h, ys = torch_while_loop(lambda i, h, ys: i < xs.shape[0], body, (i0, h0, ys0))
    return h, ys


def rnn_loss(rnn: Callable) -> Callable:
    def loss(h0, xs, wx, wh):
        h, ys = rnn(h0, xs, wx, wh)
        return ys.pow(2).mean() + h.pow(2).mean()
    return loss


def d_step(x):
    step = C.D_ALPHA * (x - torch.cos(x))
    return x - step, step.abs().max()


def d_while(loop: Callable) -> Callable:
    def prog(x):
        i0 = torch.zeros((), dtype=torch.int64, device=x.device)
        big = torch.full((), float("inf"), device=x.device)

        def body(i, x, delta):
            x, delta = d_step(x)
            return i + 1, x, delta

        return loop(lambda i, x, delta: (delta > C.D_TOL) & (i < C.D_MAX_ITERATIONS), body, (i0, x, big))
    return prog


def d_python(step: Callable) -> Callable:
    """Python while loop: the residual is read back every iteration to decide."""
    def prog(x):
        i, delta = 0, float("inf")
        while delta > C.D_TOL and i < C.D_MAX_ITERATIONS:
            x, d = step(x)
            delta = d.item()
            i += 1
        return torch.tensor(i), x, d
    return prog


# ---- building a call for (system, workload, trips) -------------------------------------

def build(system: str, workload: str, trips: int, dev: Any) -> tuple[Callable[[], Any], Callable[[Any], dict]]:
    """Returns call() and summarize(result)."""
    def on(a):
        return torch.from_numpy(a).to(dev)

    if system in XLA_SYSTEMS:
        backend = "xla_loop" if system.startswith("xla_loop") else "openxla"
    else:
        backend = "inductor"
    compile_ = functools.partial(torch.compile, backend=backend, fullgraph=True)
    if system == "xla_loop_decorator":
        import xla_loop_backend as xl
        compile_ = functools.partial(xl.compile, fullgraph=True)
    if system.startswith("xla_loop"):
        import xla_loop_backend as xl
        loop_while, loop_scan = xl.while_loop, xl.scan
    else:
        loop_while, loop_scan = torch_while_loop, torch_scan

    if workload in ("A", "B"):
        h, w = map(on, C.ab_inputs(workload))
        if system == "eager":
            f, args = functools.partial(ab_for, n=trips), (h, w)
        elif system == "openxla_for":
            f, args = compile_(functools.partial(ab_for, n=trips)), (h, w)
        else:
            n = torch.tensor(trips, dtype=torch.int64).to(dev)  # made on CPU: 0/1 would be IR constants
            f, args = compile_(ab_while(loop_while)), (n, h, w)
        return (lambda: f(*args)), (lambda out: {"checksum": float(out.double().sum().cpu())})

    if workload in ("C", "E"):
        h0, xs, wx, wh = map(on, C.rnn_inputs(trips))
        rnn = {"eager": rnn_for, "openxla_for": rnn_for, "inductor": rnn_while}.get(system) or rnn_scan(loop_scan)
        if workload == "C":
            f = rnn if system == "eager" else compile_(rnn)
            return (lambda: f(h0, xs, wx, wh)), (lambda out: {"checksum": float(out[0].double().sum().cpu() + out[1].double().sum().cpu())})
        wx.requires_grad_(True)
        wh.requires_grad_(True)
        loss_fn = rnn_loss(rnn)
        f = loss_fn if system == "eager" else compile_(loss_fn)

        def train_step():
            wx.grad = wh.grad = None
            loss = f(h0, xs, wx, wh)
            loss.backward()
            return loss.detach(), wx.grad, wh.grad

        def summarize(out):
            loss, gx, gh = (t.double().cpu() for t in out)
            return {"checksum": float(loss + gx.abs().sum() + gh.abs().sum())}

        return train_step, summarize

    if workload == "D":
        x0 = on(C.d_inputs())
        if system == "eager":
            f = d_python(d_step)
        elif system == "openxla_for":
            f = d_python(compile_(d_step))
        else:
            f = compile_(d_while(loop_while))
        return (lambda: f(x0)), (lambda out: {"trip_count": int(out[0].cpu()), "checksum": float(out[1].double().sum().cpu())})
    raise ValueError(f"unknown workload {workload}")


def run(system: str, workload: str, trips: int, *, base: dict, **kw: Any) -> None:
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system}")
    counters = None
    if system in XLA_SYSTEMS:
        import torch_xla
        import torch_xla.debug.metrics as met

        import xla_loop_backend  # noqa: F401  (registers the backend; PJRT_DEVICE)
        from xla_loop_backend.metrics import device_counts, first_call_stages

        dev = torch_xla.device()

        def wait(result):
            # As JAX's block_until_ready: wait until the result is computed. A result still
            # pending as lazy IR is computed first (a sync); one the executable already
            # produced is only waited for.
            tensors = [t for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
            if any(torch_xla._XLAC._check_tensor_need_materialization(tensors)):
                torch_xla.sync()
            torch_xla._XLAC._xla_wait_device_ops([])

        def read() -> dict[str, float]:
            counts = device_counts()
            return {"compiles": counts["compiles"], "executions": counts["executions"],
                    "host_syncs": counts["host_syncs"], "transfers": counts["transfers_from_device"]}

        counters = (met.clear_all, read)
        stages = first_call_stages
    else:
        dev = torch.device("cpu")
        stages = None

        def wait(_):
            pass

    torch.manual_seed(0)
    base = {**base, "rss_before_mb": C.peak_rss_mb(), "versions": {"torch": torch.__version__}}
    if system in XLA_SYSTEMS:
        base["versions"]["torch_xla"] = torch_xla.__version__
    call, summarize = build(system, workload, trips, dev)
    if system in XLA_SYSTEMS:
        torch_xla.sync()  # inputs on the device before timing
        wait(None)
    C.measure(call, wait, summarize, base=base, counters=counters, stages=stages, **kw)


if __name__ == "__main__":
    C.worker_main(run)
