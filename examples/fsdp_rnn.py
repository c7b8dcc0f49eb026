"""FSDP-style sharded training of a recurrent model through `xla_loop_backend.scan`.

On 4 devices (on the CPU: 4 virtual devices, `CPU_NUM_DEVICES=4`, set here when
PJRT_DEVICE=CPU), with torch_xla's SPMD:
- the batch is split over the mesh axis "fsdp", and every parameter is split along its
  first dimension over the same axis (fully sharded data parallel: each device holds a
  quarter of each weight; XLA gathers a weight where a step needs it whole);
- the GRU runs over a 64-step sequence as one XLA While; its carry keeps the batch
  sharding through the loop, and the gradients come back sharded like their parameters;
- a few SGD steps, with the loss next to the same model trained eagerly on CPU.
It prints, per While body of the training step, the collectives XLA's partitioner put there.
"""
import copy
import glob
import os
import re
import tempfile

DUMP = tempfile.mkdtemp(prefix="fsdp_rnn_hlo_")
if os.environ.get("PJRT_DEVICE", "CPU").upper() == "CPU":
    os.environ.setdefault("CPU_NUM_DEVICES", "4")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP} --xla_dump_hlo_as_text".strip()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.distributed.spmd as xs  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402

xr.use_spmd()

import xla_loop_backend  # noqa: E402

STEPS, BATCH, FEATURES, HIDDEN, TRAIN_STEPS = 64, 16, 16, 32, 5


class GruScan(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = torch.nn.GRUCell(FEATURES, HIDDEN)
        self.readout = torch.nn.Linear(HIDDEN, 1)

    def forward(self, xs_: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        def step(h, x):
            h = self.cell(x, h)
            return h, self.readout(h).squeeze(-1)

        h0 = torch.zeros(xs_.shape[1], HIDDEN, device=xs_.device)
        _, ys = xla_loop_backend.scan(step, h0, xs_)  # xs_: [time, batch, features]
        return (ys - targets).pow(2).mean()


def collectives_in_while_bodies() -> list[list[str]]:
    found = []
    for path in sorted(glob.glob(f"{DUMP}/*after_optimizations.txt")):
        text = open(path).read()
        for body in re.findall(r"while\(.*?body=%?([\w.\-]+)", text):
            block = re.search(rf"\n%?{re.escape(body)} .*?\n}}", text, re.S)
            found.append(re.findall(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(", block.group(0) if block else ""))
    return found


def main() -> None:
    devices = xr.global_runtime_device_count()
    mesh = xs.Mesh(np.arange(devices), (devices,), ("fsdp",))
    torch.manual_seed(0)
    reference = GruScan()
    model = copy.deepcopy(reference).to(torch_xla.device())
    for param in model.parameters():  # each parameter split along its first dimension
        xs.mark_sharding(param, mesh, ("fsdp",) + (None,) * (param.dim() - 1))
    compiled = xla_loop_backend.compile(model, fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.2)

    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(STEPS, BATCH, FEATURES, generator=g)
    targets = torch.sin(inputs.sum(-1))
    xs_dev = inputs.to(torch_xla.device())
    xs.mark_sharding(xs_dev, mesh, (None, "fsdp", None))  # the batch over the devices
    targets_dev = targets.to(torch_xla.device())
    xs.mark_sharding(targets_dev, mesh, (None, "fsdp"))

    print(f"FSDP over {devices} devices, GRU over {STEPS} steps, batch {BATCH}")
    for step in range(TRAIN_STEPS):
        optimizer.zero_grad()
        loss = compiled(xs_dev, targets_dev)
        loss.backward()
        optimizer.step()
        torch_xla.sync()
        reference_optimizer.zero_grad()
        expected = reference(inputs, targets)
        expected.backward()
        reference_optimizer.step()
        print(f"step {step}: loss {loss.item():.6f} (eager CPU {expected.item():.6f})")
    weight = model.cell.weight_hh
    print(f"cell.weight_hh {tuple(weight.shape)}: sharding {torch_xla._XLAC._get_xla_sharding_spec(weight)}, "
          f"its gradient {torch_xla._XLAC._get_xla_sharding_spec(weight.grad)}")
    for k, ops in enumerate(collectives_in_while_bodies()):
        print(f"While body {k} of the compiled programs: {len(ops)} collectives per iteration {sorted(set(ops))}")


if __name__ == "__main__":
    main()
