"""A fixed-step diffusion sampler (DDIM, 200 steps) with `xla_loop_backend.fori_loop`.

Each step calls a small denoising network, reads its noise-schedule entries with the step
index (a device tensor, so the body is the same program for every step), and updates the
sample. With Python int bounds the trip count is static: one XLA While whose trip count
XLA knows. Checked against the same sampler run eagerly on CPU.
"""
import copy
import math

import torch
import torch_xla
from _measure import call_measured, report_counts, report_match, to_xla

import xla_loop_backend

STEPS, BATCH, DIM, HIDDEN = 200, 16, 8, 64


class Denoiser(torch.nn.Module):
    """Predicts the noise in x at diffusion time t (an MLP with a sinusoidal time embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(DIM + 16, HIDDEN), torch.nn.SiLU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.SiLU(), torch.nn.Linear(HIDDEN, DIM)
        )
        self.register_buffer("frequencies", torch.exp(torch.linspace(0, -math.log(1000.0), 8)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(x.dtype) * self.frequencies
        embedding = torch.cat([angles.sin(), angles.cos()]).expand(x.shape[0], -1)
        return self.net(torch.cat([x, embedding], dim=-1))


class DdimSampler(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.denoiser = Denoiser()
        betas = torch.linspace(1e-4, 0.02, STEPS)
        alpha_bar = torch.cumprod(1 - betas, 0)
        # alpha_bar at t and at t-1 (1.0 before the first step), indexed by t.
        self.register_buffer("alpha_bar", alpha_bar)
        self.register_buffer("alpha_bar_prev", torch.cat([torch.ones(1), alpha_bar[:-1]]))

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        def step(i, x):
            t = STEPS - 1 - i  # from the noisiest step down to 0
            # Indexing with the counter is a dynamic slice on the device (nothing read back).
            a, a_prev = self.alpha_bar[t], self.alpha_bar_prev[t]
            eps = self.denoiser(x, t)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

        return xla_loop_backend.fori_loop(0, STEPS, step, noise)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    sampler = DdimSampler()
    compiled = xla_loop_backend.compile(copy.deepcopy(sampler).to(torch_xla.device()), fullgraph=True)
    print(f"DDIM sampler, {STEPS} steps of a {DIM}-d denoising MLP (batch {BATCH}), as one fori_loop")
    for label in ("first batch of noise", "second batch of noise"):
        noise = torch.randn(BATCH, DIM)
        samples, compiles, syncs = call_measured(compiled, to_xla(noise))
        expected = sampler(noise)
        print(f"  {label}: sample 0 = {[round(v, 4) for v in samples[0, :4].tolist()]} (eager CPU: {[round(v, 4) for v in expected[0, :4].tolist()]})")
        report_match("samples", samples, expected, rtol=1e-4, atol=1e-4)
        report_counts("call", compiles, syncs)


if __name__ == "__main__":
    main()
