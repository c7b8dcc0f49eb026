"""A graph's executable: traced, keyed, compiled and called by xla_loop itself.

Every graph AOTAutograd hands xla_loop (forward, backward, inference; its loops lowered by
the driver) becomes one XLA program this way, whatever it holds:

1. Trace. The graph runs once on lazy XLA tensors standing in for its arguments
   (`_stand_ins`): an XLA tensor is a new tensor on the argument's own device buffer, so an
   op the graph applies in place changes the stand-in and never the argument; a 0-dim one
   gets a buffer of its own (torch_xla shares one buffer among scalar constants of a value,
   and an argument on it would be mistaken for the constant); a CPU tensor is uploaded (its
   values are uploaded again each call); a Python number stays itself (the executable is
   made for that value: `call.GraphCall` keeps one per value). Random ops draw from an RNG
   seed node of their own (`own_rng_root`).
2. Lower. A LoweringContext turns what the graph returns, and the new values of arguments it
   updated in place, into one HLO computation (`lower_traced`). Each of its parameters is an
   argument, device data the graph holds (a constant, a tensor Dynamo baked in), or
   torch_xla's RNG seed.
3. Key. The computation's key is a sha256 of its HLO module (every op, its operands and
   literal constants, every parameter's shape and dtype) and, under SPMD, the arguments'
   shardings. Two graphs that differ in anything the program computes have different keys;
   constants held as device data are parameters, passed on every call, so graphs that
   differ only in their values share one compiled program, rightly.
4. Compile. The computation, named by its key, is called from a small lazy graph on its
   parameters' device buffers (`_xla_user_computation`), which torch_xla hashes and
   compiles (`_xla_warm_up_cache`). torch_xla's hash of that graph is its one node's hash,
   which is the hash of the computation's whole serialized HLO, and its operands' shapes: it
   cannot collide with another graph's (pytorch/xla#8353, a hash blind to which input an op
   reads, made torch_xla's bridge run one graph's executable for another). `_PROGRAMS`
   keeps the hash of every key compiled in this process, so a graph seen again compiles
   nothing.
5. Call. `Executable.__call__` materializes arguments still pending, uploads CPU ones,
   orders the buffers as the parameters, adds the constants and a fresh RNG seed (advancing
   torch_xla's RNG as a `torch_xla.sync()` does), runs `_run_cached_graph`, writes updated
   arguments back, and puts back the outputs XLA does not return (an argument returned as it
   is, a tensor returned twice, None, a number). If torch_xla's cache dropped the program
   (it is an LRU), it compiles it again and retries.

Which path each graph takes: every graph runs as one executable, except a graph with an op
torch_xla runs on the CPU (found while tracing: torch_xla's fallback counters move) or a
tensor whose size is a value computed in the graph (a loop's int result): `segments.py`
splits such a graph into device parts, each one executable, and host steps between them.
torch_xla's dynamo bridge is not used. `metrics.GRAPHS_ONE_PROGRAM` and
`metrics.GRAPHS_SEGMENTED` count graphs by path.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Sequence

import torch
import torch.fx

from . import metrics
from .lowering.sharding import argument_layouts
from .lowering.subgraph import lower_traced, own_rng_root

# What each output of the graph is, in `Executable.outputs`:
_COMPUTED, _INPUT, _NONE, _VALUE = 0, 1, 2, 3
# Where each parameter of the program comes from, in `Executable.sources`:
_ARG, _CONSTANT, _SEED = 0, 1, 2
_NAME = "xla_loop_graph"
_EVICTED = "Failed to get computation by hash"

# Key of every program compiled in this process -> (torch_xla's hash, its parameter order).
_PROGRAMS: dict[str, tuple[Any, list[int]]] = {}


class RunsOnHost(Exception):
    """Tracing found nodes torch_xla runs on the CPU: the graph must be split around them."""

    def __init__(self, nodes: list[torch.fx.Node]):
        super().__init__(", ".join(n.name for n in nodes))
        self.nodes = nodes


class Executable:
    """Calls one compiled program (see the module docstring)."""

    def __init__(
        self,
        key: str,
        computation: Any,
        parameters: list[tuple[int, Any]],
        shapes: list[tuple[tuple[int, ...], torch.dtype, Any]],
        outputs: list[tuple[int, Any]],
        writebacks: list[tuple[int, int]],
        structure: type | None,
        args: Sequence[Any],
    ):
        import torch_xla

        self.key, self.computation, self.shapes = key, computation, shapes
        self.graph_hash, self.order = _PROGRAMS[key] if key is not None else (None, [])
        self.sources = parameters  # parameter j: (_ARG, arg index) | (_CONSTANT, tensor) | (_SEED, None)
        self.outputs, self.writebacks, self.structure = outputs, writebacks, structure
        self.device = torch_xla.device()
        self.tensor_args = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self.all_tensors = len(self.tensor_args) == len(args)
        self.uploads = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.device.type != "xla"]
        self._build_feed()
        # When the program returns exactly the graph's outputs, in order, they pass as they are.
        self.direct = not writebacks and all(kind == _COMPUTED and k == n for n, (kind, k) in enumerate(outputs))
        xla = torch_xla._XLAC
        self._needs_data, self._sync, self._run = xla._check_tensor_need_materialization, xla._xla_sync_multi, xla._run_cached_graph

    def _build_feed(self) -> None:
        """The program's inputs, in its parameter order: from args, constants, or the seed."""
        feed = [self.sources[j] for j in self.order]
        self.arg_slots = [(slot, source) for slot, (kind, source) in enumerate(feed) if kind == _ARG]
        self.fixed = [source if kind == _CONSTANT else None for kind, source in feed]
        self.seed_slots = [slot for slot, (kind, _) in enumerate(feed) if kind == _SEED]

    def __call__(self, *args: Any) -> Any:
        tensors = args if self.all_tensors else [args[i] for i in self.tensor_args]
        pending = self._needs_data(tensors) if tensors else ()
        if any(pending):  # an input still computing lazily: it must be a device buffer
            self._sync([a for a, p in zip(tensors, pending) if p], devices=[], wait=True, sync_xla_data=True)
        given = args
        if self.uploads:
            args = list(args)
            for i in self.uploads:
                args[i] = args[i].to(self.device)
        inputs = list(self.fixed)
        for slot, i in self.arg_slots:
            inputs[slot] = args[i]
        if self.seed_slots:
            seed = _fresh_seed(self.device)
            for slot in self.seed_slots:
                inputs[slot] = seed
        results = self._results(inputs)
        if self.direct:
            return results[0] if self.structure is None else self.structure(results)
        for i, k in self.writebacks:
            _write_back(given[i], results[k])
        out = [
            results[k] if kind == _COMPUTED else given[k] if kind == _INPUT else None if kind == _NONE else k
            for kind, k in self.outputs
        ]
        return out[0] if self.structure is None else self.structure(out)

    def hlo_text(self) -> str:
        """The program's HLO (what `explain` and the DEBUG log show)."""
        import torch_xla.core.xla_builder as xb

        return xb.get_computation_hlo(self.computation) if self.computation is not None else ""

    def _results(self, inputs: list[Any]) -> list[torch.Tensor]:
        if self.graph_hash is None:  # (the graph computes nothing: its outputs are inputs or values)
            return []
        try:
            return self._run(self.graph_hash, inputs)
        except RuntimeError as error:
            if _EVICTED not in str(error):
                raise
        self._compile_again()
        return self._run(self.graph_hash, inputs)

    def _compile_again(self) -> None:
        """torch_xla's cache (an LRU) dropped the program: compile it again, on fresh buffers."""
        import torch_xla

        operands = [_fresh_buffer(shape, dtype, sharding) for shape, dtype, sharding in self.shapes]
        torch_xla._XLAC._xla_sync_multi(operands, devices=[], wait=True, sync_xla_data=True)
        _PROGRAMS.pop(self.key, None)
        _compile(self.key, self.computation, operands)
        self.graph_hash, self.order = _PROGRAMS[self.key]
        self._build_feed()


def _write_back(arg: torch.Tensor, value: torch.Tensor) -> None:
    """An argument the graph updated in place takes its new value."""
    import torch_xla

    if arg.device.type == "xla":
        torch_xla._XLAC._replace_xla_tensor(arg, value)
    else:
        arg.copy_(value.cpu())


def _fresh_seed(device: Any) -> torch.Tensor:
    """torch_xla's current RNG seed as a tensor, then the RNG advanced as `torch_xla.sync()`
    advances it, so every call draws new numbers (what torch_xla's bridge does)."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    seed = torch_xla._XLAC._get_base_seed_as_tensor(str(device))
    xm.set_rng_state((1012031 + torch_xla._XLAC._xla_get_rng_seed() * 7012063) % 18446744073709551615, str(device))
    return seed


def _fresh_buffer(shape: tuple[int, ...], dtype: torch.dtype, sharding: Any) -> torch.Tensor:
    import torch_xla

    t = torch.zeros(shape, dtype=dtype, device=torch_xla.device())
    if sharding is not None:
        torch_xla._XLAC._xla_mark_sharding(t, sharding)
    return t


class _Tracer(torch.fx.Interpreter):
    """Runs the graph on the stand-ins, noting the nodes torch_xla ran on the CPU."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.on_host: list[torch.fx.Node] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        from .lowering.subgraph import _fallback_count

        before = _fallback_count() if n.op == "call_function" else 0
        result = super().run_node(n)
        if n.op == "call_function" and _fallback_count() != before:
            self.on_host.append(n)
        return result


_PLACEHOLDER = 1  # what a 0-dim argument's own buffer holds while tracing (never read back)


def _stand_ins(args: Sequence[Any]) -> list[Any]:
    """A device buffer of its own for each argument, to trace on (see the module docstring, 1.)."""
    import torch_xla

    xla = torch_xla._XLAC
    device = str(torch_xla.device())
    buffers = list(args)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            if isinstance(a, (tuple, list, dict)):  # (it would be traced as a constant)
                raise AssertionError(f"xla_loop: argument {i} of a graph is a {type(a).__name__}, not a tensor or a number")
            continue
        if a.device.type != "xla":
            buffers[i] = a.to(device)
        elif a.dim() == 0:
            (buffers[i],) = xla._xla_tensors_from_aten([torch.full((), _PLACEHOLDER, dtype=a.dtype)], [str(a.device)])
        else:
            buffers[i] = _on_its_buffer(a)
    return buffers


def _on_its_buffer(a: torch.Tensor) -> torch.Tensor:
    """A new tensor on `a`'s device buffer (an op on one does not change the other)."""
    import torch_xla

    xla = torch_xla._XLAC
    _, buffers = xla._get_tensors_xla_device_data_node([a])
    if len(buffers) == 1 and buffers[0].shape == a.shape and buffers[0].dtype == a.dtype:
        _forget_ir(a)
        return buffers[0]
    return _own_copy(a)


def _forget_ir(a: torch.Tensor) -> None:
    """Put `a` back on its buffer with no IR node, as it was before its buffer was looked up.

    Looking up a tensor's buffer gives the tensor an IR node on it (torch_xla's
    `XLATensor::GetIrValue` keeps the node it makes); tracing on the stand-in then writes
    the stand-in's id into the buffer's info (`CreateTensorNode`). The next graph that
    updated `a` in place (an optimizer step after the first backward) reused `a`'s node,
    whose buffer names another tensor, so torch_xla did not donate the buffer: that graph
    compiled without the donation, and on the step after again with it. With no node, `a`
    makes a new one when next used, naming itself. `a` now holds a tensor of its own on the
    same buffer (its sharding carried over: a new torch_xla tensor id, the same buffer),
    which shares nothing with the stand-in being traced."""
    import torch_xla

    xla = torch_xla._XLAC
    _, fresh = xla._get_tensors_xla_device_data_node([a])
    if len(fresh) == 1:
        xla._replace_xla_tensor(a, fresh[0])


def _own_copy(a: torch.Tensor) -> torch.Tensor:
    """A copy of `a` in a device buffer of its own (same sharding), computed now."""
    import torch_xla

    copy = a * 1 if a.dtype != torch.bool else a | False
    torch_xla._XLAC._xla_sync_multi([copy], devices=[], wait=True, sync_xla_data=True)
    return copy


def trace(gm: torch.fx.GraphModule, args: Sequence[Any]) -> Executable:
    """The graph's executable, traced on stand-ins of `args` (see the module docstring).

    Raises `RunsOnHost` when an op ran on the CPU. Leaves no pending IR on live tensors."""
    import torch_xla

    xla = torch_xla._XLAC
    for a in args:  # (torch_xla's tensors wrap functional views: bring them up to date)
        if isinstance(a, torch.Tensor) and a.device.type == "xla":
            torch._functionalize_sync(a)
    pending = [a for a in args if isinstance(a, torch.Tensor) and a.device.type == "xla"]
    if pending and any(xla._check_tensor_need_materialization(pending)):
        xla._xla_sync_multi(pending, devices=[], wait=True, sync_xla_data=True)
    xla._xla_wait_device_ops(devices=[])  # (finding an argument's buffer needs it computed)
    stand_ins = _stand_ins(args)
    while True:
        staged, plan, writebacks, structure = _trace_on(gm, stand_ins)
        if staged is None:
            return Executable(None, None, [], [], plan, [], structure, args)
        if not staged.shared_inputs:
            break
        for _, j in staged.shared_inputs:  # (two arguments on one buffer: one gets a copy)
            stand_ins[j] = _own_copy(stand_ins[j])
    key = _key(staged.hlo, stand_ins)
    parameters: list[tuple[int, Any]] = []
    operands: list[torch.Tensor] = []
    if not staged.param_sources:  # (torch_xla calls a computation only with operands: give it one)
        staged.computation, unused = _with_unused_parameter(staged.computation)
        parameters.append((_CONSTANT, unused))
        operands.append(unused)
    for j, (kind, source) in enumerate(staged.param_sources):
        if kind == "input":
            parameters.append((_ARG, source))
            operands.append(stand_ins[source])
        elif j in staged.seed_params:
            parameters.append((_SEED, None))
            operands.append(source)
        else:
            parameters.append((_CONSTANT, source))
            operands.append(source)
    if key not in _PROGRAMS:
        _compile(key, staged.computation, operands)
    from .lowering.sharding import shardings_of

    shapes = [(tuple(t.shape), t.dtype, s) for t, s in zip(operands, shardings_of(operands))]
    return Executable(key, staged.computation, parameters, shapes, plan, writebacks, structure, args)


def _trace_on(gm: torch.fx.GraphModule, stand_ins: list[Any]) -> tuple[Any, list[tuple[int, Any]], list[tuple[int, int]], type | None]:
    import torch_xla

    xla = torch_xla._XLAC
    tracer = _Tracer(gm)
    # The graph runs on new tensors on the same buffers: one it updates in place no longer
    # reads its buffer, which `stand_ins` (unchanged) still name as the parameter.
    traced = [_on_its_buffer(s) if isinstance(s, torch.Tensor) else s for s in stand_ins]
    with own_rng_root(), argument_layouts(stand_ins):
        out = tracer.run(*traced)
    if tracer.on_host:
        raise RunsOnHost(tracer.on_host)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    structure = type(out) if isinstance(out, (tuple, list)) else None
    plan, computed = _output_plan(outs, traced)
    tensors = [(i, s) for i, s in enumerate(traced) if isinstance(s, torch.Tensor)]
    updated = xla._check_tensor_need_materialization([s for _, s in tensors]) if tensors else []
    writebacks = []
    for (i, s), u in zip(tensors, updated):
        if u:  # (the graph updated argument i in place)
            writebacks.append((i, len(computed)))
            computed.append(s)
    staged = lower_traced(_NAME, computed, stand_ins) if computed else None
    return staged, plan, writebacks, structure


def _with_unused_parameter(computation: Any) -> tuple[Any, torch.Tensor]:
    """The computation with one parameter it does not read, and a device value for it."""
    import torch_xla
    import torch_xla.core.xla_builder as xb

    unused = torch.zeros((), dtype=torch.int32, device=torch_xla.device())
    torch_xla._XLAC._xla_sync_multi([unused], devices=[], wait=True, sync_xla_data=True)
    builder = xb.create_builder(_NAME)
    xb.mkparam(builder, 0, xb.tensor_shape(unused))
    return xb.Op.call(computation, [], builder=builder).build(_NAME), unused


def _output_plan(outs: list[Any], inputs: Sequence[Any]) -> tuple[list[tuple[int, Any]], list[torch.Tensor]]:
    """Where each output comes from: the k-th computed tensor, the k-th input returned as it
    is (XLA returns no output that is an input), None, or a value (a number); and the
    computed tensors, each once."""
    input_position = {id(a): i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)}
    computed: list[torch.Tensor] = []
    computed_position: dict[int, int] = {}
    plan: list[tuple[int, Any]] = []
    for out in outs:
        if out is None:
            plan.append((_NONE, None))
        elif not isinstance(out, torch.Tensor):
            plan.append((_VALUE, out))
        elif id(out) in input_position:
            plan.append((_INPUT, input_position[id(out)]))
        else:
            if id(out) not in computed_position:
                computed_position[id(out)] = len(computed)
                computed.append(out)
            plan.append((_COMPUTED, computed_position[id(out)]))
    return plan, computed


def _key(hlo: bytes, stand_ins: Sequence[Any]) -> str:
    """The program's key: its HLO module and (SPMD) its arguments' shardings."""
    import torch_xla
    import torch_xla.runtime as xr

    digest = hashlib.sha256(hlo)
    if xr.is_spmd():
        tensors = [s for s in stand_ins if isinstance(s, torch.Tensor)]
        digest.update("|".join(torch_xla._XLAC._get_xla_sharding_specs(tensors)).encode())
    return digest.hexdigest()


def _compile(key: str, computation: Any, operands: list[torch.Tensor]) -> None:
    """Compile the computation as torch_xla's executable of a graph that calls it on
    `operands` (device buffers, one per parameter, in parameter order); record its hash and
    the order torch_xla gives those parameters."""
    import torch_xla
    from torch_xla.utils.buffer_donor_context import alias_with_buffer_donor_config

    xla = torch_xla._XLAC
    name = f"xla_loop::graph_{key[:32]}"
    results = xla._xla_user_computation(name, operands, computation)
    try:
        order = _parameter_order(xla._get_xla_tensors_text(results), name, len(operands))
        with alias_with_buffer_donor_config():
            graph_hash = xla._get_graph_hash(results)
            xla._xla_warm_up_cache(results, [])
    finally:
        del results
    metrics.increment(metrics.PROGRAMS_COMPILED)
    _PROGRAMS[key] = (graph_hash, order)


_DEVICE_DATA = re.compile(r"%(\d+) = \S+ xla::device_data\(")


def _parameter_order(text: str, name: str, count: int) -> list[int]:
    """For each parameter of the compiled graph, in order, which operand of the call it is:
    torch_xla numbers the graph's device data in its post order, which it walks from the
    call's last operand (read from the graph's IR text, not assumed)."""
    data = [int(m) for m in _DEVICE_DATA.findall(text)]
    call = re.search(re.escape(name) + r"\(([^)]*)\)", text)
    if call is None or len(data) != count:
        raise AssertionError(f"xla_loop: cannot read the parameters of {name} from torch_xla's IR:\n{text}")
    refs = [int(r.strip().lstrip("%")) for r in call.group(1).split(",")] if count else []
    order = [-1] * count
    for operand, ref in enumerate(refs):
        order[data.index(ref)] = operand
    if sorted(order) != list(range(count)):
        raise AssertionError(f"xla_loop: the parameters of {name} are not its operands, one each:\n{text}")
    return order
