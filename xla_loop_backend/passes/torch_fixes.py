"""Fixes for torch 2.9 bugs in its control-flow ops, made where the bug is: in the op.

scan's autograd (pytorch/pytorch#184528, fixed after 2.9): when a floating carry of a scan
does not require grad (``h = torch.zeros(...)``), torch traces the per-step backward with a
zero gradient for that carry, so the gradient flowing back through the carries is dropped:
closed-over parameters and xs get silently wrong gradients. It happens at any depth (a scan
inside a trained loop's body, a scan xla_loop makes itself) and in torch's eager scan too.

The fix wraps scan's autograd kernel: when the scan is differentiated, such carries are
made to require grad through a link with an exactly zero gradient, ``where(False, p, carry)``,
to an operand p that does.

The backward of scan, map and cond runs its body's vector-Jacobian product (`create_bw_fn`)
as the body of another scan, map or cond, and two things go wrong in torch 2.9:
- that op refuses outputs that alias each other ("scan might be aliasing the input or the
  output!", pytorch/pytorch#185332, fixed after 2.9), but autograd returns one tensor for
  two inputs whose gradients are equal, as for ``new = carry + x`` (torch_xla's first
  scan test, trained): the VJP's outputs are made distinct tensors (`distinct_outputs`;
  the copies cost nothing in XLA);
- scan passes the VJP a gradient for every output, but the VJP takes them only for the
  floating ones, which alone are differentiable: a scan with an integer or bool y (a
  count, a token id) failed to train ("AssertionError", eagerly too). The VJP now drops
  the gradients of non-floating outputs.

Both are installed once, at import (`OP_FIXES`); tests check that torch still needs them.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import torch
from torch._C import DispatchKey
from torch._higher_order_ops.scan import scan_op
from torch.multiprocessing.reductions import StorageWeakRef

_FIXED_ATTRIBUTE = "_xla_loop_fixes_184528"


def linked_to_grad(carry: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`carry`, requiring grad through `reference` with an exactly zero gradient."""
    never = torch.zeros((), dtype=torch.bool, device=carry.device)
    return torch.where(never, reference.flatten()[0].to(carry.dtype), carry)


def carries_requiring_grad(init: Any, operands: Any) -> list[Any]:
    """The scan's carries, floating ones made to require grad when some operand does."""
    reference = next(
        (t for t in operands if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()), None
    )
    if reference is None or not torch.is_grad_enabled():
        return list(init)
    return [
        linked_to_grad(c, reference) if isinstance(c, torch.Tensor) and c.is_floating_point() and not c.requires_grad else c
        for c in init
    ]


def install_scan_autograd_fix() -> None:
    """Wrap scan's Autograd kernel (once) so every scan gets `carries_requiring_grad`."""
    kernel = scan_op.py_kernels[DispatchKey.Autograd]
    if getattr(kernel, _FIXED_ATTRIBUTE, False):
        return

    def scan_autograd(combine_fn: Any, init: Any, xs: Any, additional_inputs: Any) -> Any:
        init = carries_requiring_grad(init, (*init, *xs, *additional_inputs))
        return kernel(combine_fn, init, xs, additional_inputs)

    setattr(scan_autograd, _FIXED_ATTRIBUTE, True)
    scan_autograd.torch_kernel = kernel  # type: ignore[attr-defined]
    scan_op.py_kernels[DispatchKey.Autograd] = scan_autograd
    scan_op._dispatch_cache.clear()


def torch_scan_autograd_kernel() -> Any:
    """torch's own scan Autograd kernel, without the fix (for the test that watches the bug)."""
    kernel = scan_op.py_kernels[DispatchKey.Autograd]
    return getattr(kernel, "torch_kernel", kernel)


def distinct_outputs(values: list[Any]) -> list[Any]:
    """`values`, each tensor that shares storage with an earlier one replaced by a copy."""
    seen: set[StorageWeakRef] = set()
    distinct = []
    for value in values:
        if isinstance(value, torch.Tensor):
            storage = StorageWeakRef(value.untyped_storage())
            if storage in seen:
                value = value.clone()
            seen.add(StorageWeakRef(value.untyped_storage()))
        distinct.append(value)
    return distinct


def create_bw_fn_fixed(fn: Callable[..., Any], args: Any) -> Callable[..., Any]:
    """torch's `create_bw_fn`, taking gradients of floating outputs only and returning
    distinct tensors (see above)."""
    bw_fn = _TORCH_CREATE_BW_FN(fn, args)
    num_primals = len(args)

    @functools.wraps(bw_fn)
    def fixed_bw_fn(*args_and_grads: Any) -> list[Any]:
        primals, grads = args_and_grads[:num_primals], args_and_grads[num_primals:]
        grads = [g for g in grads if not isinstance(g, torch.Tensor) or g.is_floating_point() or g.is_complex()]
        return distinct_outputs(list(bw_fn(*primals, *grads)))

    return fixed_bw_fn


# (importlib: `torch._higher_order_ops.scan` the attribute is the function, not the module.)
_MODULES_WITH_VJP_BODIES = tuple(importlib.import_module(f"torch._higher_order_ops.{m}") for m in ("scan", "map", "cond"))
_TORCH_CREATE_BW_FN = _MODULES_WITH_VJP_BODIES[0].create_bw_fn


def install_vjp_fixes() -> None:
    """Make scan's, map's and cond's backward use `create_bw_fn_fixed`."""
    for module in _MODULES_WITH_VJP_BODIES:
        module.create_bw_fn = create_bw_fn_fixed


# Op-level fixes, in the order they are installed (pipeline.py lists them with the passes).
OP_FIXES = (install_scan_autograd_fix, install_vjp_fixes)
