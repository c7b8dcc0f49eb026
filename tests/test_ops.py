"""ops.py: one description of each control-flow op's operands."""
from __future__ import annotations

import pytest
import torch
from loop_testing import dynamo_graph
from torch._higher_order_ops.map import map as torch_map
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

from xla_loop_backend.ops import CAPTURED, CARRIES, KINDS, SUBGRAPH, XS, Call, is_control_flow, register, spec_of

_hop = torch.ops.higher_order


def test_every_control_flow_op_of_torch_is_described():
    for op in (_hop.while_loop, _hop.while_loop_stack_output, _hop.scan, _hop.map_impl, _hop.cond, _hop.invoke_subgraph, _hop.associative_scan):
        assert spec_of(op) is not None, op
    assert set(KINDS) == {"while_loop", "while_loop_stack_output", "scan", "map", "cond", "invoke_subgraph", "associative_scan"}


@pytest.mark.parametrize("op", [_hop.while_loop, _hop.scan, _hop.map_impl, _hop.cond])
def test_bind_and_unbind_are_inverse(op):
    spec = spec_of(op)
    args = tuple(f"arg{i}" for i in range(len(spec.fields)))
    assert spec.unbind(spec.bind(args)) == args
    assert list(spec.bind(args)) == [name for name, _ in spec.fields]


def test_variadic_operands_of_invoke_subgraph():
    spec = spec_of(_hop.invoke_subgraph)
    named = spec.bind(("graph", "subgraph_0", "a", "b", "c"))
    assert named == {"subgraph": "graph", "identifier": "subgraph_0", "operands": ("a", "b", "c")}
    assert spec.unbind(named) == ("graph", "subgraph_0", "a", "b", "c")


def test_call_names_the_operands_of_a_dynamo_while_loop():
    def f(n, x, w):
        return while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x @ w), (torch.zeros((), dtype=torch.int64), x))

    gm = dynamo_graph(f, torch.tensor(3), torch.ones(2, 2), torch.eye(2))
    (node,) = [n for n in gm.graph.nodes if is_control_flow(n)]
    call = Call.of(gm, node)
    assert call.kind == "while_loop"
    assert set(call.subgraphs()) == {"cond_fn", "body_fn"}
    assert all(isinstance(g, torch.fx.GraphModule) for g in call.subgraphs().values())
    assert len(call.operands(CARRIES)) == 2
    # the trip count and the weight are captured: additional inputs
    assert [n.name for n in call.operands(CAPTURED)] == [a.name for a in node.args[3]]
    fields = [field for field, _, _ in call.all_operands()]
    assert fields == ["carried_inputs"] * 2 + ["additional_inputs"] * len(node.args[3])


def test_scan_and_map_fields():
    def f(h, xs):
        h, ys = scan(lambda c, x: (c + x, c.sum()), h, xs)
        return torch_map(lambda x, c: x * c, xs, h), ys

    gm = dynamo_graph(f, torch.zeros(3), torch.ones(4, 3))
    calls = [Call.of(gm, n) for n in gm.graph.nodes if is_control_flow(n)]
    assert [c.kind for c in calls] == ["scan", "map"]
    scan_call, map_call = calls
    assert scan_call.spec.names(SUBGRAPH) == ["combine_fn"] and scan_call.spec.names(XS) == ["xs"]
    assert len(scan_call.operands(CARRIES)) == 1 and len(scan_call.operands(XS)) == 1
    assert map_call.spec.names(SUBGRAPH) == ["f"] and map_call.operands(CARRIES) == []


def test_update_replaces_a_field_and_keeps_the_rest():
    def f(n, x):
        return while_loop(lambda i, x: i < n, lambda i, x: (i + 1, x * 2), (torch.zeros((), dtype=torch.int64), x))

    gm = dynamo_graph(f, torch.tensor(3), torch.ones(2))
    call = Call.of(gm, next(n for n in gm.graph.nodes if is_control_flow(n)))
    before = call.args
    carries = list(before["carried_inputs"])
    call.update(carried_inputs=carries[::-1])
    assert call["carried_inputs"] == tuple(carries[::-1])
    assert call["cond_fn"] is before["cond_fn"] and call["additional_inputs"] == before["additional_inputs"]
    with pytest.raises(AssertionError, match="no field"):
        call.update(init=[])


def test_a_registered_stand_in_is_described_like_its_op():
    def stand_in(cond_fn, body_fn, carried_inputs, additional_inputs, *, option=None):
        raise NotImplementedError

    register(stand_in, _hop.while_loop)
    assert spec_of(stand_in) == spec_of(_hop.while_loop)
    assert spec_of(torch.add) is None
