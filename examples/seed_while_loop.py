"""The seed example of torch_xla's while_loop guide, through backend="xla_loop".

Prints the result, and what torch_xla did: XLA compiles and host syncs (device-to-host
reads) for the first call and for calls with other trip counts.
"""
import torch
import torch_xla
import torch_xla.debug.metrics as met

import xla_loop_backend  # noqa: F401  (not needed for the backend; sets PJRT_DEVICE=CPU if unset)
from xla_loop_backend import while_loop


def cond_fn(iteri, x):
    return iteri > 0


def body_fn(iteri, x):
    return iteri - 1, torch.add(x, 1)


@torch.compile(backend="xla_loop", fullgraph=True)
def count_up(iteri, x):
    return while_loop(cond_fn, body_fn, (iteri, x))


def counts() -> tuple[int, int]:
    compiles = met.metric_data("CompileTime")
    host_syncs = met.counter_value("aten::_local_scalar_dense") or 0
    transfers = met.metric_data("TransferFromDeviceTime")
    return (compiles[0] if compiles else 0), host_syncs + (transfers[0] if transfers else 0)


def main() -> None:
    device = torch_xla.device()
    init_val = torch.tensor(3, device=device)
    iteri = torch.tensor(10, device=device)
    torch_xla.sync()  # inputs on the device before we start counting
    met.clear_all()

    _, res = count_up(iteri, init_val)
    torch_xla.sync()
    compiles, syncs = counts()
    print(f"while_loop(iteri > 0, add(x, 1)) from x=3, iteri=10 -> {res.cpu().item()}")
    print(f"first call: {compiles} XLA compile(s), {syncs} host sync(s)")

    for n in (100, 10_000):
        iteri = torch.tensor(n, device=device)
        torch_xla.sync()
        met.clear_all()
        _, res = count_up(iteri, init_val)
        torch_xla.sync()
        compiles, syncs = counts()
        print(f"iteri={n}: {compiles} XLA compile(s), {syncs} host sync(s) during the call")
    print(f"result after 10000 iterations: {res.cpu().item()}")


if __name__ == "__main__":
    main()
