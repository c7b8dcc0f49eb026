"""The seed example of torch_xla's while_loop guide, through backend="xla_loop".

Prints the result, and what torch_xla did: XLA compiles and host syncs (device-to-host
reads) for the first call and for calls with other trip counts.
"""
import torch
import torch_xla
from _measure import call_measured

import xla_loop_backend  # noqa: F401  (not needed for the backend; sets PJRT_DEVICE=CPU if unset)
from xla_loop_backend import while_loop


def cond_fn(iteri, x):
    return iteri > 0


def body_fn(iteri, x):
    return iteri - 1, torch.add(x, 1)


@torch.compile(backend="xla_loop", fullgraph=True)
def count_up(iteri, x):
    return while_loop(cond_fn, body_fn, (iteri, x))


def call_and_count(n: int, init_val: torch.Tensor) -> tuple[int, int, int]:
    """Run the compiled loop for n iterations; return (result, compiles, host syncs)."""
    (_, res), compiles, syncs = call_measured(count_up, torch.tensor(n, device=init_val.device), init_val)
    return res.item(), compiles, syncs


def main() -> None:
    init_val = torch.tensor(3, device=torch_xla.device())
    result, compiles, syncs = call_and_count(10, init_val)
    print(f"while_loop(iteri > 0, add(x, 1)) from x=3, iteri=10 -> {result}")
    print(f"first call: {compiles} XLA compile(s), {syncs} host sync(s)")
    for n in (100, 10_000):
        result, compiles, syncs = call_and_count(n, init_val)
        print(f"iteri={n}: {compiles} XLA compile(s), {syncs} host sync(s) during the call")
    print(f"result after 10000 iterations: {result}")


if __name__ == "__main__":
    main()
