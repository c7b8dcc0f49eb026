"""A small decoder-only transformer, 24 layers deep, trained a few steps: its repeated blocks
compile once, as one scan.

    for block in self.blocks: x = block(x, self.mask)

Under `xla_loop_backend.compile` (no marker needed) the 24 calls reach xla_loop as calls of
one subgraph, which it rolls into one scan over the stacked per-layer weights
(`passes/roll_layers.py`): XLA compiles one attention + MLP block, forward and backward,
not 24. Printed: the first call (compile included) and the steady training step of xla_loop
next to torch_xla's `openxla` backend (which compiles every layer), and each step's loss
next to eager PyTorch on CPU; the first step's gradients are checked against eager too.

    ./dev example transformer [--layers N] [--skip-openxla]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch_xla
from _measure import report_match

import xla_loop_backend
from xla_loop_backend import metrics

VOCAB, WIDTH, HEADS, SEQ, BATCH, STEPS = 64, 64, 4, 16, 8, 6


class Block(torch.nn.Module):
    """Pre-norm causal self-attention, then a GELU MLP, each with a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(WIDTH), torch.nn.LayerNorm(WIDTH)
        self.qkv, self.proj = torch.nn.Linear(WIDTH, 3 * WIDTH), torch.nn.Linear(WIDTH, WIDTH)
        self.up, self.down = torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * (WIDTH // HEADS) ** -0.5
        attention = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, WIDTH))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class Decoder(torch.nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.position = torch.nn.Parameter(0.02 * torch.randn(SEQ, WIDTH))
        self.blocks = torch.nn.ModuleList(Block() for _ in range(layers))
        self.norm, self.head = torch.nn.LayerNorm(WIDTH), torch.nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position
        for block in self.blocks:
            x = block(x, self.mask)
        logits = self.head(self.norm(x))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that count up modulo VOCAB from a random start: the next token is learnable."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    tokens = (start + torch.arange(SEQ + 1)) % VOCAB
    return tokens[:, :-1], tokens[:, 1:]


def train(model: torch.nn.Module, step_fn, device: torch.device, steps: int) -> tuple[list[float], list[float]]:
    """`steps` SGD steps; returns each step's loss and wall time (waited for on the device)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, times = [], []
    for step in range(steps):
        tokens, targets = (t.to(device) for t in batch(step))
        if device.type == "xla":
            torch_xla.sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = step_fn(tokens, targets)
        loss.backward()
        optimizer.step()
        if device.type == "xla":
            torch_xla.sync()
            torch_xla._XLAC._xla_wait_device_ops([])
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, times


def first_gradients(model: torch.nn.Module, step_fn, device: torch.device) -> dict[str, torch.Tensor]:
    tokens, targets = (t.to(device) for t in batch(0))
    model.zero_grad(set_to_none=True)
    step_fn(tokens, targets).backward()
    return {name: p.grad.cpu() for name, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--skip-openxla", action="store_true")
    args = parser.parse_args()
    device = torch_xla.device()
    torch.manual_seed(0)
    reference = Decoder(args.layers)
    print(f"decoder-only transformer, {args.layers} layers, width {WIDTH}, {HEADS} heads, batch {BATCH} x {SEQ} tokens")

    ours = copy.deepcopy(reference).to(device)
    compiled = xla_loop_backend.compile(ours, fullgraph=True)
    rolled_before = metrics.counter_value(metrics.LAYERS_ROLLED)
    expected_grads = first_gradients(reference, reference, torch.device("cpu"))
    got_grads = first_gradients(ours, compiled, device)
    print(f"  xla_loop rolled {metrics.counter_value(metrics.LAYERS_ROLLED) - rolled_before} of {args.layers} layers into one scan")
    worst = max((got_grads[n] - expected_grads[n]).abs().max().item() for n in expected_grads)
    differ = [n for n in expected_grads if not torch.allclose(got_grads[n], expected_grads[n], rtol=1e-4, atol=1e-4)]
    if differ:
        sys.exit(f"first step: the gradients of {differ} differ from eager CPU (largest difference {worst:.1e})")
    print(f"  first step: all {len(expected_grads)} parameter gradients match eager CPU (max difference {worst:.1e})")

    rows = {}
    eager_model = copy.deepcopy(reference)
    eager_losses, _ = train(eager_model, eager_model, torch.device("cpu"), STEPS)
    ours = copy.deepcopy(reference).to(device)
    torch._dynamo.reset()
    losses, times = train(ours, xla_loop_backend.compile(ours, fullgraph=True), device, STEPS)
    rows["xla_loop"] = (times[0], statistics.median(times[1:]))
    for step, (got, expected) in enumerate(zip(losses, eager_losses)):
        report_match(f"step {step} loss {got:.4f}", torch.tensor(got), torch.tensor(expected), rtol=1e-3, atol=1e-3)
    if not args.skip_openxla:
        theirs = copy.deepcopy(reference).to(device)
        _, times = train(theirs, torch.compile(theirs, backend="openxla", fullgraph=True), device, STEPS)
        rows["openxla"] = (times[0], statistics.median(times[1:]))
    print("  | backend | first step (compile) | steady step |")
    for name, (first, steady) in rows.items():
        print(f"  | {name} | {first:.2f} s | {steady * 1e3:.1f} ms |")
    print(f"  loss: {eager_losses[0]:.3f} -> {eager_losses[-1]:.3f} over {STEPS} steps (eager CPU); xla_loop's matches at every step")


if __name__ == "__main__":
    main()
