"""xla_loop's own counters: loops lowered, subgraphs traced, host-loop fallbacks,
recompiles to grow the stack of trained while_loops, (SPMD) traces again because an
input's sharding changed, layers rolled into a scan (one per call of a rolled chain),
(inference) stackings of rolled layers' weights, made again only when a weight changed, and
the execution paths of graphs (`executable.py`): graphs run as one program, graphs split
around host steps (`segments.py`), and XLA programs compiled by xla_loop.

They live here, apart from torch_xla's counter registry, which a user (or torch_xla's own
dynamo bridge, for graphs compiled with `openxla`) may clear. Read torch_xla's metrics
(compiles, executions, `aten::_local_scalar_dense`) from `torch_xla.debug.metrics` as usual.
"""
from __future__ import annotations

from collections import Counter

LOOPS_LOWERED = "loops_lowered"
SUBGRAPHS_TRACED = "subgraphs_traced"
HOST_LOOP_FALLBACKS = "host_loop_fallbacks"
SHARDING_RETRACES = "sharding_retraces"
LAYERS_ROLLED = "layers_rolled"
LAYER_STACKINGS = "layer_stackings"
GRAPHS_ONE_PROGRAM = "graphs_one_program"
GRAPHS_SEGMENTED = "graphs_segmented"
PROGRAMS_COMPILED = "programs_compiled"

_counters: Counter[str] = Counter()


def increment(name: str, amount: int = 1) -> None:
    _counters[name] += amount


def counter_value(name: str) -> int:
    return _counters[name]


def counters() -> dict[str, int]:
    return dict(_counters)


def device_counts() -> dict[str, int]:
    """torch_xla's running totals that tell whether a loop stayed on the device: XLA
    compiles and executions, host syncs (`aten::_local_scalar_dense`, a `.item()`-style read
    that stalls the host) and device-to-host transfers. Subtract two readings for a delta."""
    import torch_xla.debug.metrics as met

    def samples(name: str) -> int:
        data = met.metric_data(name)
        return int(data[0]) if data else 0

    return {
        "compiles": samples("CompileTime"),
        "executions": samples("ExecuteTime"),
        "host_syncs": int(met.counter_value("aten::_local_scalar_dense") or 0),
        "transfers_from_device": samples("TransferFromDeviceTime"),
    }


def first_call_stages() -> dict[str, float]:
    """Where a process's compiles went, in seconds (read after a first call: the benchmarks
    split it so): Dynamo's bytecode tracing, AOTAutograd (xla_loop's passes and lowering
    included), the lowering alone, making the executables (trace and XLA compile), and XLA's
    compile alone (torch_xla's CompileTime). From Dynamo's compile times, which xla_loop's
    stages join (`dynamo_timed`)."""
    import torch_xla.debug.metrics as met
    from torch._dynamo.utils import compilation_time_metrics

    timed = {name: sum(values) for name, values in compilation_time_metrics.items()}
    xla = met.metric_data("CompileTime")
    return {
        "dynamo_s": timed.get("bytecode_tracing", 0.0),
        "aot_s": timed.get("create_aot_dispatcher_function", 0.0),
        "lowering_s": timed.get("xla_loop_lowering", 0.0),
        "executable_s": timed.get("xla_loop_executable", 0.0),
        "xla_compile_s": xla[1] / 1e9 if xla else 0.0,
    }
