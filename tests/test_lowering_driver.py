"""The lowering driver (xla_loop_backend/lowering/driver.py): loop nodes leave the graph before
torch_xla's bridge sees it; int results are recorded for one read-back at the end."""
from __future__ import annotations

import operator

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from xla_loop_backend import LoopLoweringError, while_loop
from xla_loop_backend.lowering.driver import find_loop_nodes, lower_loops


def _aot_graphs(fn, *args):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch.compile(fn, backend=aot_autograd(fw_compiler=keep), fullgraph=True)(*args)
    return graphs


def test_loop_nodes_are_replaced_and_subgraphs_dropped():
    def f(n, x):
        _, x = while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x + 1), (n, x))
        _, x = while_loop(lambda i, x: i > 0, lambda i, x: (i - 1, x * 2), (n, x))
        return x

    (gm,) = _aot_graphs(f, torch.tensor(2), torch.zeros(2))
    assert len(find_loop_nodes(gm)) == 2
    lowered = lower_loops(gm)
    assert lowered.num_loops == 2
    assert find_loop_nodes(lowered.module) == []
    assert not any(n.op == "get_attr" for n in lowered.module.graph.nodes)
    targets = [n.target.__name__ for n in lowered.module.graph.nodes if n.op == "call_function" and "xla_loop" in str(n.target)]
    assert targets == ["xla_loop_while_loop_0", "xla_loop_while_loop_1"]
    assert lowered.scalar_outputs == {}


def test_int_results_are_marked_for_read_back():
    def f(x):
        i, x = while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, x + 1), (0, x))
        return x, i, i * 2

    (gm,) = _aot_graphs(f, torch.zeros(2))
    lowered = lower_loops(gm)
    assert lowered.scalar_outputs == {1: int, 2: int}


def test_data_dependent_shape_in_body_is_rejected_at_compile_time():
    def f(n, x):
        def body(i, x):
            return i - 1, x + x.nonzero().sum()

        return while_loop(lambda i, x: i > 0, body, (n, x))

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (gm,) = _aot_graphs(f, torch.tensor(2), torch.ones(3))
    with pytest.raises(LoopLoweringError, match=r"while_loop at test_lowering_driver.py:\d+: .*nonzero.* depends on data"):
        lower_loops(gm)
