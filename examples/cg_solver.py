"""Conjugate gradient until convergence with `xla_loop_backend.while_loop`: the number of
iterations depends on the data, and the loop never leaves the device.

Solves A x = b for a symmetric positive definite A, stopping when the residual norm falls
below a tolerance (or after a cap). The convergence test runs on the device every
iteration; no value is read back to the host until the answer is. A second right-hand side
converges in a different number of iterations with no new compile.
"""
import torch
from _measure import call_measured, report_counts, report_match, to_xla

import xla_loop_backend

SIZE, TOLERANCE, MAX_ITERATIONS = 128, 1e-6, 1000


@xla_loop_backend.compile(fullgraph=True)
def conjugate_gradient(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x, iterations, final residual norm)."""

    def keep_going(k, x, r, p, rr):
        return (rr.sqrt() > TOLERANCE) & (k < MAX_ITERATIONS)

    def step(k, x, r, p, rr):
        ap = a @ p
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        return k + 1, x, r, p, rr_new

    x0 = torch.zeros_like(b)
    k0 = torch.zeros((), dtype=torch.int64, device=b.device)
    k, x, _, _, rr = xla_loop_backend.while_loop(keep_going, step, (k0, x0, b.clone(), b.clone(), b @ b))
    return x, k, rr.sqrt()


def spd_matrix(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric positive definite matrix with condition number 100, and its eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, 2, n, dtype=torch.float64)
    return ((q * eigenvalues) @ q.T).float(), q.float()


def main() -> None:
    a, eigenvectors = spd_matrix(SIZE, seed=0)
    g = torch.Generator().manual_seed(1)
    right_hand_sides = (
        ("random right-hand side", torch.randn(SIZE, generator=g)),
        # In the span of 8 eigenvectors: fewer iterations (8 in exact arithmetic; float32 needs more).
        ("right-hand side in 8 eigenvectors", eigenvectors[:, :8] @ torch.randn(8, generator=g)),
    )
    print(f"conjugate gradient on a {SIZE}x{SIZE} SPD system (condition number 100), tolerance {TOLERANCE:g}")
    for label, b in right_hand_sides:
        expected_x, expected_k, _ = conjugate_gradient.__wrapped__(a, b)
        (x, k, residual), compiles, syncs = call_measured(conjugate_gradient, to_xla(a), to_xla(b))
        print(f"  {label}: converged in {k.item()} iterations (eager CPU: {expected_k.item()}), residual {residual.item():.1e}")
        report_match("solution", x, expected_x, rtol=1e-3, atol=1e-4)
        report_match("solution", x, torch.linalg.solve(a.double(), b.double()).float(), rtol=1e-3, atol=1e-4, against="torch.linalg.solve")
        report_counts("call", compiles, syncs)


if __name__ == "__main__":
    main()
