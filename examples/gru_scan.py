"""A GRU over a 1000-step sequence with `xla_loop_backend.scan`: one XLA While, not 1000
unrolled steps.

The recurrence runs on the XLA device as a single rolled loop (each step reads its input
with a dynamic slice and writes its output in place); the first call compiles once, a new
sequence of the same shape compiles nothing. Checked against eager PyTorch on CPU and
against torch.nn.GRU with the same weights.
"""
import copy

import torch
import torch_xla
from _measure import call_measured, report_counts, report_match, to_xla

import xla_loop_backend

STEPS, BATCH, FEATURES, HIDDEN = 1000, 4, 16, 32


class GruScan(torch.nn.Module):
    """nn.GRU's recurrence, written as a scan over time with a GRUCell."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = torch.nn.GRUCell(FEATURES, HIDDEN)
        self.readout = torch.nn.Linear(HIDDEN, 1)

    def forward(self, h0: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def step(h, x):
            h = self.cell(x, h)
            return h, self.readout(h).squeeze(-1)

        return xla_loop_backend.scan(step, h0, xs)  # xs: [time, batch, features]


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    model = GruScan()
    h0 = torch.zeros(BATCH, HIDDEN)
    xs = torch.randn(STEPS, BATCH, FEATURES)

    expected_h, expected_ys = model(h0, xs)
    # torch_xla replaces torch.nn.GRU on import by a scan-based GRU that only runs on XLA
    # tensors; the original class is kept as `_orig`.
    reference = getattr(torch.nn.GRU, "_orig", torch.nn.GRU)(FEATURES, HIDDEN)
    for ours, theirs in (("weight_ih", "weight_ih_l0"), ("weight_hh", "weight_hh_l0"), ("bias_ih", "bias_ih_l0"), ("bias_hh", "bias_hh_l0")):
        getattr(reference, theirs).copy_(getattr(model.cell, ours))
    gru_out, gru_h = reference(xs, h0.unsqueeze(0))

    compiled = xla_loop_backend.compile(copy.deepcopy(model).to(torch_xla.device()), fullgraph=True)
    (h, ys), compiles, syncs = call_measured(compiled, to_xla(h0), to_xla(xs))
    print(f"GRU over {STEPS} steps (batch {BATCH}, hidden {HIDDEN}) as one scan, backend=xla_loop")
    print(f"  readout at the last step, sequence 0: xla_loop {ys[-1, 0].item():+.6f}, eager CPU {expected_ys[-1, 0].item():+.6f}")
    report_match("final hidden state", h, expected_h)
    report_match("readout at every step", ys, expected_ys)
    report_match("final hidden state", h, gru_h[0], against="torch.nn.GRU on CPU")
    report_counts("first call", compiles, syncs)

    xs2 = torch.randn(STEPS, BATCH, FEATURES)
    (h2, _), compiles, syncs = call_measured(compiled, to_xla(h0), to_xla(xs2))
    report_match("new sequence, final hidden state", h2, model(h0, xs2)[0])
    report_counts("new sequence", compiles, syncs)


if __name__ == "__main__":
    main()
