"""indexing.py: inside loop bodies and branches, indexing with a 0-dim integer tensor (a loop
counter) the way users write it lowers to XLA dynamic slices and dynamic update slices: the
results equal the same program as Python loops on CPU, nothing is read back, a second call
compiles nothing, and it trains."""
from __future__ import annotations

import pytest
import torch
import torch_xla
from loop_testing import MetricsDelta, xla_device
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

import xla_loop_backend as xl
from xla_loop_backend import LoopLoweringError
from xla_loop_backend.indexing import dynamic_slice, dynamic_update_slice
from xla_loop_backend.inspect import lowered_hlo

TABLE = torch.arange(42.0).reshape(7, 6) / 10

# Each form reads or writes with the counter t; the same function runs on CPU with t an int.
READS = {
    "x[t]": lambda tab, t: tab[t],
    "x[:, t]": lambda tab, t: tab[:, t],
    "x[t, 1:4]": lambda tab, t: tab[t, 1:4].repeat(2),
    "x[..., t]": lambda tab, t: tab[..., t],
    "x[None, t]": lambda tab, t: tab[None, t][0],
    "x[t:t + 2]": lambda tab, t: tab[t : t + 2].sum(0),
    "x[t - 1:t + 1]": lambda tab, t: tab[t - 1 : t + 1].sum(0),
    "x.narrow(0, t, 3)": lambda tab, t: tab.narrow(0, t, 3).sum(0),
    "torch.narrow(x, 1, t, 2)": lambda tab, t: torch.narrow(tab, 1, t, 2).sum(1),
    "x.select(1, t)": lambda tab, t: tab.select(1, t),
    "x[t][t]": lambda tab, t: tab[t][t].expand(6),
}
ROWS_FOR = {"x[:, t]": 7, "x[..., t]": 7, "x.select(1, t)": 7, "torch.narrow(x, 1, t, 2)": 7}  # (reads of a column: 7 long)


def _reference(read, tab, n):
    acc = torch.zeros(ROWS_FOR.get(read, 6))
    for t in range(1, n + 1):
        acc = acc * 0.5 + READS[read](tab, t)
    return acc


def _in_while(read):
    def f(tab, n):
        def body(t, acc):
            return t + 1, acc * 0.5 + READS[read](tab, t)

        start = torch.ones((), dtype=torch.int64)  # a counter made without device=
        return while_loop(lambda t, acc: t <= n, body, (start, torch.zeros(ROWS_FOR.get(read, 6), device=tab.device)))[1]

    return f


def _in_fori(read):
    def f(tab, n):
        return xl.fori_loop(1, n + 1, lambda t, acc: acc * 0.5 + READS[read](tab, t), torch.zeros(ROWS_FOR.get(read, 6), device=tab.device))

    return f


def _in_scan(read):
    def f(tab, n):
        def combine(acc, t):
            return acc * 0.5 + READS[read](tab, t), t

        ts = torch.arange(1, 4, device=tab.device)
        return scan(combine, torch.zeros(ROWS_FOR.get(read, 6), device=tab.device), ts)[0]

    return f


def _in_nested(read):
    # an outer while_loop whose body runs a fori_loop that does the reading
    def f(tab, n):
        def outer(i, acc):
            inner = xl.fori_loop(1, n + 1, lambda t, a: a * 0.5 + READS[read](tab, t), torch.zeros_like(acc))
            return i + 1, acc + inner

        zero = torch.zeros((), dtype=torch.int64, device=tab.device)
        return while_loop(lambda i, acc: i < 2, outer, (zero, torch.zeros(ROWS_FOR.get(read, 6), device=tab.device)))[1]

    return f


PLACES = {"while_loop": _in_while, "fori_loop": _in_fori, "scan": _in_scan, "nested": _in_nested}


def _expected(place, read, n):
    if place == "scan":
        return _reference(read, TABLE, 3)
    if place == "nested":
        return 2 * _reference(read, TABLE, n)
    return _reference(read, TABLE, n)


@pytest.mark.parametrize("read", list(READS))
@pytest.mark.parametrize("place", list(PLACES))
def test_reads_with_the_counter_at_every_depth(place, read):
    compiled = torch.compile(PLACES[place](read), backend="xla_loop", fullgraph=True)
    tab = TABLE.to(xla_device())
    for call, n in enumerate((3, 4)):
        n_dev = torch.tensor(n, device=xla_device()) if place != "fori_loop" else n
        with MetricsDelta() as delta:
            out = compiled(tab, n_dev)
            torch_xla.sync()
        torch.testing.assert_close(out.cpu(), _expected(place, read, n), rtol=1e-5, atol=1e-5)
        if call == 1 and place != "fori_loop":  # (fori_loop with int bounds: a new trip count is a new program)
            assert (delta.compiles, delta.host_syncs) == (0, 0)


WRITES = {
    "out[t] = v": lambda out, t, v: out.__setitem__(t, v),
    "out[:, t] = v": lambda out, t, v: out.__setitem__((slice(None), t), torch.cat([v, v[:1]])),
    "out[t, 2:5] = v": lambda out, t, v: out.__setitem__((t, slice(2, 5)), v[:3]),
    "out[t:t + 2] = v": lambda out, t, v: out.__setitem__(slice(t, t + 2), v),
    "out[t] = number": lambda out, t, v: out.__setitem__(t, 1.5),
    "out.index_put_((t,), v)": lambda out, t, v: out.index_put_((torch.as_tensor(t, device=out.device),), v),
}


def _writes(write, tab, n, loop):
    def body(t, out):
        out = out.clone()
        WRITES[write](out, t, tab[0] * (t + 1))
        return out

    return loop(body, torch.zeros(7, 6, device=tab.device), n)


@pytest.mark.parametrize("write", list(WRITES))
def test_writes_with_the_counter(write):
    def python(body, out, n):
        for t in range(n):
            out = body(t, out)
        return out

    def compiled_loop(body, out, n):
        zero = torch.zeros((), dtype=torch.int64, device=out.device)
        return while_loop(lambda t, o: t < n, lambda t, o: (t + 1, body(t, o)), (zero, out))[1]

    compiled = torch.compile(lambda tab, n: _writes(write, tab, n, compiled_loop), backend="xla_loop", fullgraph=True)
    for call, n in enumerate((3, 5)):
        with MetricsDelta() as delta:
            out = compiled(TABLE.to(xla_device()), torch.tensor(n, device=xla_device()))
            torch_xla.sync()
        torch.testing.assert_close(out.cpu(), _writes(write, TABLE, n, python))
        if call == 1:
            assert (delta.compiles, delta.host_syncs) == (0, 0)


def test_reads_in_a_cond_branch_inside_a_loop():
    def f(tab, n):
        def body(t, acc):
            # the branch returns its input unchanged: torch's own cond refuses that alias; here it is copied
            picked = torch.cond(t % 2 == 0, lambda a: a + tab[t], lambda a: a, (acc,))
            return t + 1, picked

        zero = torch.zeros((), dtype=torch.int64, device=tab.device)
        return while_loop(lambda t, acc: t < n, body, (zero, torch.zeros(6, device=tab.device)))[1]

    expected = sum(TABLE[t] for t in range(5) if t % 2 == 0)
    out = torch.compile(f, backend="xla_loop", fullgraph=True)(TABLE.to(xla_device()), torch.tensor(5, device=xla_device()))
    torch.testing.assert_close(out.cpu(), expected)


def test_a_greedy_decoder_writing_tokens_at_t_is_one_while():
    torch.manual_seed(0)
    emb, proj = torch.randn(11, 8), torch.randn(8, 11)

    def decode(emb, proj, first, steps):
        tokens = torch.zeros(2, 6, dtype=torch.int64, device=first.device)
        tokens[:, 0] = first

        def body(t, h, tokens):
            h = torch.tanh(h + emb[tokens[:, t - 1]])  # read the last token with the counter
            tokens = tokens.clone()
            tokens[:, t] = (h @ proj).argmax(-1)  # and write the next one
            return t + 1, h, tokens

        one = torch.ones((), dtype=torch.int64, device=first.device)
        return while_loop(lambda t, h, tokens: t < steps, body, (one, torch.zeros(2, 8, device=first.device), tokens))[2]

    def python(emb, proj, first, steps):
        tokens = torch.zeros(2, 6, dtype=torch.int64)
        tokens[:, 0] = first
        h = torch.zeros(2, 8)
        for t in range(1, steps):
            h = torch.tanh(h + emb[tokens[:, t - 1]])
            tokens[:, t] = (h @ proj).argmax(-1)
        return tokens

    dev = xla_device()
    first = torch.tensor([3, 7])
    args = (emb.to(dev), proj.to(dev), first.to(dev), torch.tensor(6, device=dev))
    compiled = torch.compile(decode, backend="xla_loop", fullgraph=True)
    assert torch.equal(compiled(*args).cpu(), python(emb, proj, first, 6))
    with MetricsDelta() as delta:
        out = compiled(*args)
        torch_xla.sync()
    assert torch.equal(out.cpu(), python(emb, proj, first, 6)) and (delta.compiles, delta.host_syncs) == (0, 0)
    (hlo,) = lowered_hlo(decode, *args, fullgraph=True)
    assert hlo.count(" while(") == 1 and "dynamic-update-slice" in hlo and "dynamic-slice" in hlo


class _Embedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Parameter(torch.randn(10, 4))
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, ids, n, python=False):
        h = torch.zeros(4, device=ids.device)
        if python:
            for t in range(n):
                h = torch.tanh(self.lin(h) + self.emb[ids[t]])
            return h

        def body(t, h):
            return t + 1, torch.tanh(self.lin(h) + self.emb[ids[t]])

        return while_loop(lambda t, h: t < n, body, (torch.zeros((), dtype=torch.int64), h))[1]


def test_embedding_reads_train_through_a_while_loop():
    torch.manual_seed(0)
    reference = _Embedder()
    model = _Embedder().to(xla_device())
    model.load_state_dict(reference.state_dict())
    compiled = torch.compile(model, backend="xla_loop", fullgraph=True)
    for call, n in enumerate((5, 8)):
        ids = torch.tensor([1, 4, 1, 9, 0, 4, 4, 2])  # rows read more than once: their gradients add up
        reference.zero_grad()
        model.zero_grad()
        (reference(ids, n, python=True) ** 2).sum().backward()
        with MetricsDelta() as delta:
            (compiled(ids.to(xla_device()), torch.tensor(n, device=xla_device())) ** 2).sum().backward()
            torch_xla.sync()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad.cpu(), p.grad, rtol=1e-4, atol=1e-5)
        if call == 1:
            assert delta.compiles == 0


def test_writes_pass_gradients_through_and_to_the_written_value():
    def f(x, v, n):
        def body(t, out):
            out = out.clone()
            out[t] = v * (t + 1)
            return t + 1, out

        zero = torch.zeros((), dtype=torch.int64, device=x.device)
        return while_loop(lambda t, o: t < n, body, (zero, x))[1]

    x, v = torch.randn(5, 3), torch.randn(3)
    weights = torch.randn(5, 3)
    xr, vr = x.clone().requires_grad_(), v.clone().requires_grad_()
    out = xr.clone()
    for t in range(3):
        out = out.clone()
        out[t] = vr * (t + 1)
    (out * weights).sum().backward()
    xd, vd = x.to(xla_device()).requires_grad_(), v.to(xla_device()).requires_grad_()
    compiled = torch.compile(f, backend="xla_loop", fullgraph=True)
    (compiled(xd, vd, torch.tensor(3, device=xla_device())) * weights.to(xla_device())).sum().backward()
    torch.testing.assert_close(xd.grad.cpu(), xr.grad)
    torch.testing.assert_close(vd.grad.cpu(), vr.grad)


@pytest.mark.parametrize("index", [-1, -7, 6, 9, -30])
def test_an_index_out_of_range_follows_xlas_clamping(index):
    # negative counts from the end, then the start is clamped into the tensor
    n = TABLE.shape[0]
    row = min(max(index + n if index < 0 else index, 0), n - 1)
    two = min(max(index + n if index < 0 else index, 0), n - 2)

    def f(tab, t):
        return xl.fori_loop(0, 1, lambda i, acc: acc + tab[t] + tab[t : t + 2].sum(0), torch.zeros(6, device=tab.device))

    out = torch.compile(f, backend="xla_loop", fullgraph=True)(TABLE.to(xla_device()), torch.tensor(index, device=xla_device()))
    torch.testing.assert_close(out.cpu(), TABLE[row] + TABLE[two : two + 2].sum(0))


def test_the_ops_agree_on_cpu_and_on_the_device_and_have_gradients():
    x = torch.randn(5, 4, dtype=torch.float64)
    update = torch.randn(2, 4, dtype=torch.float64)
    for t in (-9, -1, 0, 2, 4, 8):
        start = [torch.tensor(t)]
        on_device = [torch.tensor(t, device=xla_device())]
        torch.testing.assert_close(dynamic_slice(x.to(xla_device()), [0], on_device, [2]).cpu(), dynamic_slice(x, [0], start, [2]))
        torch.testing.assert_close(
            dynamic_update_slice(x.to(xla_device()), update.to(xla_device()), [0], on_device).cpu(),
            dynamic_update_slice(x, update, [0], start),
        )
    t = torch.tensor(1)
    torch.autograd.gradcheck(lambda x: dynamic_slice(x, [0, 1], [t, t], [2, 3]), (x.requires_grad_(),))
    torch.autograd.gradcheck(lambda x, u: dynamic_update_slice(x, u, [0], [t]), (x, update.requires_grad_()))


def test_a_slice_whose_length_is_data_is_a_clear_error():
    @xl.compile(fullgraph=True)
    def f(tab, n):
        def body(t, acc):
            return acc + tab[:t].sum(0)

        return xl.fori_loop(0, 3, body, torch.zeros(6, device=tab.device))

    with pytest.raises(LoopLoweringError) as raised:
        f(TABLE.to(xla_device()), 3)
    message = str(raised.value)
    assert "a slice whose length depends on data" in message and "x[t:t + k]" in message and "torch.where" in message
    assert "capture_scalar_outputs" not in message
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if "return acc + tab[:t].sum(0)" in text)
    assert message.splitlines()[-1].strip() == f"at test_indexing.py:{line}: return acc + tab[:t].sum(0)"


def test_reading_a_value_back_in_a_body_says_what_to_write_and_where():
    @xl.compile(fullgraph=True)
    def f(tab):
        return xl.fori_loop(0, 3, lambda t, acc: acc + tab[int(t.item())], torch.zeros(6, device=tab.device))

    with pytest.raises(LoopLoweringError) as raised:
        f(TABLE.to(xla_device()))
    message = str(raised.value)
    lines = message.splitlines()
    assert len(lines) > 3, "torch's message keeps its line breaks"
    assert "Index with the 0-dim tensor itself" in message
    assert not any(line.lstrip().startswith("Hint:") and "capture_scalar_outputs" in line for line in lines)
    assert lines[-1].strip().startswith("at test_indexing.py:") and "tab[int(t.item())]" in lines[-1]


def test_an_error_in_torchs_cond_inside_a_loop_names_the_cond():
    @xl.compile(fullgraph=True)
    def f(x, n):
        def body(i, x):
            return i + 1, torch.cond(x.sum() > 0, lambda x: x.nonzero().float().sum() * x, lambda x: x, (x,))

        return xl.while_loop(lambda i, x: i < n, body, (torch.zeros((), dtype=torch.int64, device=x.device), x))

    with pytest.raises(LoopLoweringError, match=r"^cond at test_indexing.py:\d+: tracing"):
        f(torch.ones(3, device=xla_device()), torch.tensor(2, device=xla_device()))


def test_torchs_while_loop_body_may_return_a_carry_unchanged():
    def f(x, y, n):
        zero = torch.zeros((), dtype=torch.int64, device=x.device)
        return while_loop(lambda i, x, y: i < n, lambda i, x, y: (i + 1, x, y + x), (zero, x, y))

    x, y = torch.randn(3), torch.randn(3)
    _, x_out, y_out = torch.compile(f, backend="xla_loop", fullgraph=True)(x.to(xla_device()), y.to(xla_device()), torch.tensor(4, device=xla_device()))
    torch.testing.assert_close(x_out.cpu(), x)
    torch.testing.assert_close(y_out.cpu(), y + 4 * x)


_TORCH_ALONE = """
import torch
from torch._higher_order_ops.while_loop import while_loop

def f(tab, n):
    return while_loop(lambda t, acc: t < n, lambda t, acc: (t + 1, acc + tab[t]), (torch.zeros((), dtype=torch.int64), torch.zeros(4)))[1]

try:
    torch.compile(f, backend="eager", fullgraph=True)(torch.ones(5, 4), torch.tensor(3))
    print("traced")
except Exception as error:
    print("refused", "Data dependent operator" in str(error) or "data-dependent" in str(error))
"""


def test_dynamo_still_refuses_a_counter_index_in_a_body_without_xla_loops_rules():
    # torch alone (no xla_loop imported, so no rules of its own): when this fails, Dynamo traces
    # `x[t]` in a body itself and indexing.install may go (the dynamic-slice lowering may stay).
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TORCH_ALONE], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "refused True", done.stdout + done.stderr[-2000:]
