"""The scan-with-gradients programs of PyTorch's test/functorch/test_control_flow.py, and torch_xla's
scan rematerialization test, run through backend="xla_loop".

Sources, re-written here:

* pytorch/pytorch ``test/functorch/test_control_flow.py``, class ``TestControlFlow``, read from a
  stored copy slightly newer than torch 2.9.0 (it already imports
  ``torch._higher_order_ops.cudagraph_conditional_nodes``). Upstream runs each test for every
  combination of ``reverse``, ``compile_mode`` ("none", "eager"), ``device`` (cpu, cuda) and
  ``autograd``; here ``autograd=True`` and both ``reverse`` where upstream has it
  (test ids end in -forward / -reverse):

  - test_scan_closure_RNN_partial_autograd: an RNN step closing over W_ih, b_ih, W_hh, b_hh with
    two xs and two carries, where only some of the 8 inputs require grad: upstream's two fixed
    masks of each group "xs", "init", "additional_inputs" and "complex" (ids ``<group>_1``,
    ``<group>_2``). Only the outputs that require grad in the reference are differentiated, as
    upstream (``exp_grad_mask``);
  - test_scan_multiple_layers_gradient: 1 to 3 ``nn.Linear`` layers stacked in a scan step, the
    per-layer hidden states carried as a list (RNNScanList) or as one stacked tensor written
    with index assignment (RNNScanTensor). Upstream compiles the model (inductor, under
    ``capture_scalar_outputs=True``, patched here too), takes ``out.sum().backward()`` and
    compares the loss and the layer weight gradients with the uncompiled model (and with
    RNNLoop, which has no scan). Here the cotangent of ``out`` is ones (the same gradients), and
    all parameters, the initial states and the inputs are differentiated;
  - test_scan_compile: the (add, zeros) and (mul, ones) non-associative combine functions over
    x of shape (3, 10, 2), both scans in one compiled function;
  - test_scan_closure_RNN: an ``nn.RNN(5, 7)``'s weights, transposed, captured by the combine
    function (upstream's reference is the nn.RNN itself; here the same loop in Python);
  - test_scan_binary_operator: the S5 operator over (A repeated, projected inputs);
  - test_scan_complex_pytree: dict/list pytree carries and xs. Upstream slices the inits from
    the inputs outside the scan and differentiates w.r.t. the inits and the inputs separately;
    here the slicing is inside the compiled function, so the gradients w.r.t. the inputs are
    the total ones;
  - test_scan_closure_nested: one scan closing over W, b ("simple"), then two chained scans (over
    dim 1, then over dim 0 of the first one's ys) closing over W_1, b_1 and W_2, b_2
    ("nested"; upstream's ones/zeros inputs are randn here, so that the second call gets new
    values, and W_2, b_2 are differentiated too), and the same where the second scan closes
    over W_1 and b_1 as well ("complex");
  - test_scan_closure_combine_fn_with_no_grad_init_carries_unequal_grad: one carry computed
    under ``torch.no_grad()``; the function returns ``tree_leaves(result)[1:]``, the outputs
    upstream differentiates. Upstream takes gradients w.r.t. (x, h2); here w.r.t. h1 as well.

* pytorch/xla v2.9.0 ``test/scan/test_scan.py``, ``ScanTest.test_scan_with_rematerialization``:
  10 sines on a (4, 4) carry and 10 on each (4, 4) slice of 20 xs. Upstream runs
  ``torch_xla.experimental.scan`` with ``min_cut_rematerialization_partition`` and with
  ``default_partition`` and counts the sine ops in the backward HLO; torch.compile does not see
  that scan, so here the same function goes through torch's scan: as it is, with each step
  wrapped in ``torch.utils.checkpoint``, and with the whole scan wrapped in it (the torch way to
  ask for recomputation). The HLO sine count is left out (it checks torch_xla's partitioner).

How each program is checked, in place of upstream's harness:

* the reference is the same program with the scan replaced by a plain Python loop
  (``python_scan``, like torch's ``_fake_scan``) run eagerly on CPU -- not torch's eager scan
  autograd, which has gradient bugs in torch 2.9 (pytorch/pytorch#184528, for one);
* the compiled one is ``torch.compile(fn, backend="xla_loop", fullgraph=True)`` (upstream's
  compile_mode="eager" is ``fullgraph=True`` too) on XLA tensors, and a LoopFallbackWarning
  (a loop run eagerly or unrolled) is an error;
* gradients as upstream's ``check_autograd``: ``torch.autograd.grad`` of the outputs, with ones
  as cotangents, w.r.t. every input tensor and parameter that requires grad. The outputs
  differentiated are those that require grad in the reference; the compiled outputs'
  requires_grad flags are not compared, because torch's scan marks every output as requiring
  grad (eagerly and under aot_eager too; upstream's no_grad test says so) even a carry that no
  input with a gradient reaches;
* values and gradients are compared with rtol=atol=1e-4 (upstream: torch's default float32
  tolerance; 6e-5 absolute for the gradients) -- the reference runs the loop on another backend;
* every program is called twice, with fresh inputs of the same shapes (and fresh weights for the
  modules, copied into the compiled module's parameters); the second call, forward and backward
  up to a sync, must compile nothing and read nothing back.

Left out: the "random" partial-gradient group (random masks of the same program), every
``autograd=False`` parametrization (tests/test_lowering_scan.py covers scan forwards), the
cuda and cudagraph variants, the other no_grad tests of test_control_flow.py
(..._carries_equal_grad, ..._for_out, ..._additional_inputs_partial / _all,
..._carries_ys_same_grad) and its scan tests that expect errors.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import pytest
import torch
import torch.utils._pytree as pytree
import torch.utils.checkpoint
import torch_xla
from loop_testing import MetricsDelta, assert_same, xla_device
from torch._higher_order_ops.scan import scan as torch_scan

TOL = {"rtol": 1e-4, "atol": 1e-4}

# a loop xla_loop could not lower (run eagerly, or unrolled) fails the test
pytestmark = pytest.mark.filterwarnings("error::xla_loop_backend.LoopFallbackWarning")


def python_scan(combine_fn, init, xs, dim=0, reverse=False):
    """torch's scan as a plain Python loop, the reference: each step gets the carry in the
    structure of `init`; the final carry comes back as `combine_fn` returns it (as torch's
    scan returns it), the ys stacked along dim 0."""
    xs_leaves, xs_spec = pytree.tree_flatten(xs)
    init_spec = pytree.tree_structure(init)
    steps = range(xs_leaves[0].size(dim))
    carry, ys = init, []
    for i in reversed(steps) if reverse else steps:
        carry = pytree.tree_unflatten(pytree.tree_leaves(carry), init_spec)
        carry, y = combine_fn(carry, pytree.tree_unflatten([x.select(dim, i) for x in xs_leaves], xs_spec))
        ys.append(y)
    if reverse:
        ys.reverse()
    y_spec = pytree.tree_structure(ys[0])
    stacked = [torch.stack(column) for column in zip(*(pytree.tree_leaves(y) for y in ys))]
    return carry, pytree.tree_unflatten(stacked, y_spec)


def _randn(g: torch.Generator, *shape: int, requires_grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)


# --------------------------------------------------------------------------------------------
# Programs: each takes the scan to use first (torch's, or python_scan for the reference).
# --------------------------------------------------------------------------------------------


def rnn_partial_autograd(scan, x, x1, h, h_1, W_ih, b_ih, W_hh, b_hh, reverse):
    def RNN(x, y):
        c_new_0 = x[0] + 1
        c_new_1 = x[1] + 1
        h_new = torch.tanh(c_new_1 + x[0] @ W_hh + b_hh) + y[0] @ W_ih + y[1] @ W_ih + b_ih + x[1]
        return (c_new_0, c_new_1), h_new

    return scan(RNN, (h, h_1), (x, x1), dim=1, reverse=reverse)


def rnn_partial_autograd_args(mask):
    # [x, x1, h, h_1, W_ih, b_ih, W_hh, b_hh]; upstream's masks
    shapes = [(3, 10, 5), (3, 10, 5), (3, 7), (3, 7), (5, 7), (7,), (7, 7), (7,)]
    return lambda g: tuple(_randn(g, *s, requires_grad=m) for s, m in zip(shapes, mask))


def scan_compile_add_mul(scan, x, init_add, init_mul, reverse):
    add = scan(lambda c, y: (c + y, c + y), init_add, x, dim=0, reverse=reverse)
    mul = scan(lambda c, y: (c * y, c * y), init_mul, x, dim=0, reverse=reverse)
    return add, mul


def scan_compile_add_mul_args(g):
    x = _randn(g, 3, 10, 2)
    return x, torch.zeros(10, 2, requires_grad=True), torch.ones(10, 2, requires_grad=True)


def closure_rnn(scan, h, x, W_ih, b_ih, W_hh, b_hh):
    def RNN(c, y):
        c_new = y @ W_ih + b_ih
        h_new = torch.tanh(c_new + c @ W_hh + b_hh)
        return h_new, h_new.clone()

    return scan(RNN, h, x, dim=1, reverse=False)


def closure_rnn_args(g):
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=g)))
        rnn = torch.nn.RNN(input_size=5, hidden_size=7, batch_first=True)
    x, h = _randn(g, 3, 10, 5), _randn(g, 3, 7)
    weights = (rnn.weight_ih_l0.T, rnn.bias_ih_l0, rnn.weight_hh_l0.T, rnn.bias_hh_l0)
    return (h, x, *(w.detach().clone().requires_grad_(True) for w in weights))


def s5_operator(scan, init0, init1, e0, e1, reverse):
    def op(x, y):
        A_i, Bu_i = x
        A_j, Bu_j = y
        return (A_j * A_i, A_j * Bu_i + Bu_j), (A_j * A_i, A_j * Bu_i + Bu_j)

    return scan(op, [init0, init1], [e0, e1], reverse=reverse)


def s5_operator_args(g):
    state_dim, timesteps = 20, 10
    projected_inputs = torch.randn(timesteps, state_dim, generator=g)
    A = torch.randn(state_dim, generator=g)
    elements = (A.repeat((timesteps, 1)), projected_inputs)
    init = (torch.ones_like(elements[0][:1]), torch.zeros_like(projected_inputs[:1]))
    return tuple(t.clone().requires_grad_(True) for t in (*init, *elements))


def complex_pytree(scan, x, y, z, reverse):
    def pointwise(a, b):
        return {
            "i": a["i"] * b["i"],
            "j": ([a["j"][0][0] * b["j"][0][0]], [{"o": a["j"][1][0]["o"] + b["j"][1][0]["o"]}]),
        }

    def complex_pointwise(a, b):  # get_scan_combine_fn(..., associative=False): computed twice
        return pointwise(a, b), pointwise(a, b)

    inp = {"i": x, "j": ([y], [{"o": z}])}
    init = pytree.tree_map(lambda e: e[:1], inp)
    return scan(complex_pointwise, init, inp, dim=0, reverse=reverse)


def closure_simple(scan, x, h, W, b, reverse):
    def f1(c, y):
        c_new = y @ W + b
        return c_new, torch.tanh(c_new + c)

    return scan(f1, h, x, dim=1, reverse=reverse)


def closure_simple_args(g):
    return tuple(_randn(g, *s) for s in [(3, 20, 5), (3, 7), (5, 7), (7,)])


def closure_chained(scan, x1, h1, h2, W_1, b_1, W_2, b_2, reverse, complex_case):
    def f1(c, y):
        c_new = y @ W_1 + b_1
        return c_new, torch.tanh(c_new + c)

    def f2(c, y):
        c_new = y @ W_2 + b_2 * b_1 + y @ W_1 if complex_case else y @ W_2 + b_2
        return c_new, torch.tanh(c_new + c)

    o1 = scan(f1, h1, x1, dim=1, reverse=reverse)
    return scan(f2, h2, o1[1], dim=0, reverse=reverse)


def closure_nested_args(g):
    # upstream: ones for x1 and zeros for h1, h2 (randn here: the second call gets new values)
    return tuple(_randn(g, *s) for s in [(3, 20, 5), (3, 7), (3, 3), (5, 7), (7,), (7, 3), (3,)])


def closure_complex_args(g):
    return tuple(_randn(g, *s) for s in [(3, 20, 3), (3, 3), (3, 3), (3, 3), (3,), (3, 3), (3,)])


def no_grad_carry(scan, x, h1, h2, reverse):
    def fct_c1_no_grad(c, y):
        h_new = torch.tanh(c[0] + c[1] + y)
        c2 = c[1] + y
        with torch.no_grad():
            c1 = c[0] + y
        return (c1, c2), h_new

    result = scan(fct_c1_no_grad, (h1, h2), x, dim=1, reverse=reverse)
    return pytree.tree_leaves(result)[1:]


def no_grad_carry_args(g):
    return _randn(g, 3, 10, 7), _randn(g, 3, 7), _randn(g, 3, 7)


class RNNScanList(torch.nn.Module):
    """test_scan_multiple_layers_gradient's RNNScanList: the hidden states carried as a list."""

    def __init__(self, scan, layers, feature_dim=10):
        super().__init__()
        self.scan = scan
        self.layers = torch.nn.ModuleList([torch.nn.Linear(feature_dim * 2, feature_dim) for _ in range(layers)])

    def forward(self, initial, input_sequence):
        def step(carry, input):
            hs_list = carry[:]
            for li, layer in enumerate(self.layers):
                h_prev_li = hs_list[li]
                update = layer(torch.cat((h_prev_li, input), dim=-1))
                h_curr_li = h_prev_li + update
                hs_list[li] = h_curr_li
                input = h_curr_li
            return [t.clone() for t in hs_list], input.clone()

        _, all_outputs_scan = self.scan(step, initial, input_sequence, dim=1)
        return all_outputs_scan.transpose(0, 1)


class RNNScanTensor(RNNScanList):
    """test_scan_multiple_layers_gradient's RNNScanTensor: the hidden states stacked in one
    carried tensor, written with index assignment."""

    def forward(self, initial, input_sequence):
        def step(carry_tensor, xs_input):
            input = xs_input
            hs_tensor = carry_tensor
            for li, layer in enumerate(self.layers):
                current_h_prev_li_slice = hs_tensor[:, li, :]
                update = layer(torch.cat((current_h_prev_li_slice, input), dim=-1))
                h_curr_li = current_h_prev_li_slice + update
                hs_tensor = hs_tensor.clone()
                hs_tensor[:, li, :] = h_curr_li
                input = h_curr_li
            return hs_tensor.clone(), input.clone()

        hs_stacked = torch.stack(initial, dim=1)
        _, all_outputs_scan = self.scan(step, hs_stacked, input_sequence, dim=1)
        return all_outputs_scan.transpose(0, 1)


def multiple_layers_args(layers):
    # upstream: zeros initial states and randn inputs (batch 2, sequence 5, features 10), both
    # requiring grad
    def make(g):
        initial = [torch.zeros(2, 10, requires_grad=True) for _ in range(layers)]
        return initial, _randn(g, 2, 5, 10)

    return make


def _remat_step(carry, x):
    for _ in range(10):
        carry = torch.sin(carry)
    for _ in range(10):
        x = torch.sin(x)
    return carry, x


def remat(scan, carry, xs):
    return scan(_remat_step, carry, xs)


def remat_checkpoint_step(scan, carry, xs):
    return scan(lambda c, x: torch.utils.checkpoint.checkpoint(_remat_step, c, x, use_reentrant=False), carry, xs)


def remat_checkpoint_scan(scan, carry, xs):
    return torch.utils.checkpoint.checkpoint(lambda c, x: scan(_remat_step, c, x), carry, xs, use_reentrant=False)


def remat_args(g):
    return _randn(g, 4, 4), _randn(g, 20, 4, 4)


# --------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------


class Case(NamedTuple):
    program: Callable[..., Any]  # program(scan, *args), or a module class built with (scan, layers)
    make_args: Callable[[torch.Generator], tuple]  # CPU inputs, from a seeded generator
    layers: int = 0  # > 0: program is a module class with this many layers
    dynamo_config: dict = {}


# test_scan_closure_RNN_partial_autograd's fixed masks, requires_grad of
# [x, x1, h, h_1, W_ih, b_ih, W_hh, b_hh]: xs, then inits, then closed-over tensors
PARTIAL_GRAD_MASKS = {
    "xs_1": "10111111",
    "xs_2": "00111111",
    "init_1": "11011111",
    "init_2": "11001111",
    "additional_inputs_1": "11110101",
    "additional_inputs_2": "11110000",
    "complex_1": "10000001",
    "complex_2": "00110001",
}

# upstream patches capture_scalar_outputs=True around test_scan_multiple_layers_gradient
_LAYERS_CONFIG = {"capture_scalar_outputs": True}

TORCH_CASES = {
    **{
        f"closure_RNN_partial_autograd-{name}-{direction}": Case(
            functools.partial(rnn_partial_autograd, reverse=direction == "reverse"),
            rnn_partial_autograd_args([bit == "1" for bit in mask]),
        )
        for name, mask in PARTIAL_GRAD_MASKS.items()
        for direction in ("forward", "reverse")
    },
    **{
        f"multiple_layers_gradient-{kind}-{layers}_layers": Case(
            cls, multiple_layers_args(layers), layers, _LAYERS_CONFIG
        )
        for kind, cls in (("list", RNNScanList), ("tensor", RNNScanTensor))
        for layers in (1, 2, 3)
    },
    "closure_RNN": Case(closure_rnn, closure_rnn_args),
    **{
        f"{name}-{direction}": Case(functools.partial(program, reverse=direction == "reverse"), make_args)
        for name, program, make_args in (
            ("scan_compile-add_mul", scan_compile_add_mul, scan_compile_add_mul_args),
            ("binary_operator-s5", s5_operator, s5_operator_args),
            ("complex_pytree", complex_pytree, lambda g: tuple(_randn(g, 3, 2, 2) for _ in range(3))),
            ("closure_nested-simple", closure_simple, closure_simple_args),
            ("closure_nested-nested", functools.partial(closure_chained, complex_case=False), closure_nested_args),
            ("closure_nested-complex", functools.partial(closure_chained, complex_case=True), closure_complex_args),
            ("combine_fn_with_no_grad_init_carries_unequal_grad", no_grad_carry, no_grad_carry_args),
        )
        for direction in ("forward", "reverse")
    },
}

XLA_CASES = {
    "plain": Case(remat, remat_args),
    "checkpoint_step": Case(remat_checkpoint_step, remat_args),
    # fails at present: xla_loop does not lower a scan inside torch's tag_activation_checkpoint
    # (a LoopLoweringError under fullgraph; without it, an eager fallback with a warning)
    "checkpoint_scan": Case(remat_checkpoint_scan, remat_args),
}


def _grad_inputs(fn: Callable, args: tuple) -> list[torch.Tensor]:
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    return params + [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.requires_grad]


def _grads(out: Any, fn: Callable, args: tuple, mask: list[bool]) -> tuple[torch.Tensor, ...]:
    """check_autograd: d(outputs picked by mask)/d(inputs and parameters that require grad),
    with ones as cotangents."""
    outs = [t for t, m in zip(pytree.tree_leaves(out), mask) if m]
    return torch.autograd.grad(outs, _grad_inputs(fn, args), [torch.ones_like(t) for t in outs])


def _to_xla(args: tuple) -> tuple:
    dev = xla_device()
    return pytree.tree_map(lambda t: t.detach().to(dev).requires_grad_(t.requires_grad), args)


def check_scan_autograd(case: Case) -> None:
    """Compile case.program with xla_loop, call it twice with fresh inputs, and compare values
    and gradients with the Python-loop reference on CPU; the second call must compile
    nothing and read nothing back."""
    # Start the XLA runtime before the reference's backward: the autograd engine sizes its
    # per-device queues once, at its first backward, from the device counts then.
    dev = xla_device()
    if case.layers:
        model = case.program(torch_scan, case.layers).to(dev)
    else:
        reference = functools.partial(case.program, python_scan)
        model = functools.partial(case.program, torch_scan)
    compiled = torch.compile(model, backend="xla_loop", fullgraph=True)

    with torch._dynamo.config.patch(case.dynamo_config):
        for call, seed in enumerate((1, 2)):
            g = torch.Generator().manual_seed(1234 + seed)
            if case.layers:  # fresh weights, copied into the compiled module's parameters
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    reference = case.program(python_scan, case.layers)
                model.load_state_dict(reference.state_dict())
            args = case.make_args(g)
            expected = reference(*args)
            mask = [t.requires_grad for t in pytree.tree_leaves(expected)]
            expected_grads = _grads(expected, reference, args, mask)

            xla_args = _to_xla(args)
            with MetricsDelta() as delta:
                out = compiled(*xla_args)
                grads = _grads(out, model, xla_args, mask)
                torch_xla.sync()

            assert_same(pytree.tree_map(torch.Tensor.detach, out), pytree.tree_map(torch.Tensor.detach, expected), **TOL)
            assert_same(list(grads), list(expected_grads), **TOL)
            if call == 1:
                assert (delta.compiles, delta.host_syncs) == (0, 0)


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_upstream_torch_scan_autograd(name):
    check_scan_autograd(TORCH_CASES[name])


_NOT_YET = pytest.mark.xfail(
    strict=True,
    raises=torch._dynamo.exc.BackendCompilerFailed,
    reason="xla_loop does not lower a loop inside torch.utils.checkpoint (tag_activation_checkpoint) yet",
)


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=_NOT_YET) if name == "checkpoint_scan" else name for name in XLA_CASES]
)
def test_upstream_xla_scan_with_rematerialization(name):
    check_scan_autograd(XLA_CASES[name])
