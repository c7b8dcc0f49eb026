"""After AOTAutograd: a scan over flipped tensors reads them from the end instead.

Why: torch runs a scan backwards by flipping its inputs and outputs around a forward scan.
The backward of every scan does it (torch's scan autograd flips the stored per-step values
and the xs, and flips the gradients of the xs back), and so does `scan(..., reverse=True)`.
Each flip is a copy of the whole tensor: with `scan_layers` the backward copied every
layer's weights twice (in, and the gradients out) and every stored activation once, and XLA
compiled a kernel for each (16 `reverse` kernels of 85 in a decoder's backward).

What: `scan(f, init, [flip(x0, 0), ..., flip(xn, 0)], extras)`, every xs flipped along the
scanned dimension (seen through permutes that change nothing), becomes `scan_from_the_end(f, init, [x0, ..., xn], extras)`
(`lowering.scan`): its While reads step i's slices at `length - 1 - i` and writes its ys
there, so its ys are the flipped scan's ys flipped back. Where the graph flipped those ys
back (`flip(ys, 0)`), it now reads them as they are; where it read them unflipped, it gets
them flipped, as before. A scan with some xs not flipped is left as it is. At every depth
(a scan in a loop body too).
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from ..lowering.scan import scan_from_the_end
from ..ops import Call
from ..traversal import NodeRewrite

_FLIP = torch.ops.aten.flip.default


def _reversed_scans(graph: torch.fx.Graph) -> bool:
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.higher_order.scan:
            continue
        call = Call.of(graph.owning_module, node)
        xs = list(call["xs"])
        unflipped = [_unflipped(x) for x in xs]
        if not xs or any(x is None for x in unflipped):
            continue
        if not all(user.op == "call_function" and user.target is operator.getitem for user in node.users):
            continue
        call.update(xs=unflipped)
        node.target = scan_from_the_end
        num_carries = len(call["init"])
        for ys in [user for user in node.users if user.args[1] >= num_carries]:
            _read_ys_reversed(graph, ys)
        for x in dict.fromkeys(xs):
            _erase_if_unused(graph, x)
        changed = True
    return changed


def _read_ys_reversed(graph: torch.fx.Graph, ys: torch.fx.Node) -> None:
    """`ys` is now the old ys flipped: its flips read it as it is, other users get it flipped."""
    others = []
    for user in list(ys.users):
        if _flipped_along_0(user):  # (a flip's one tensor operand: ys)
            user.replace_all_uses_with(ys)
            graph.erase_node(user)
        else:
            others.append(user)
    if not others:
        return
    with graph.inserting_after(ys):
        flipped = graph.call_function(_FLIP, (ys, [0]))
    flipped.meta = dict(ys.meta)
    for user in others:
        user.replace_input_with(ys, flipped)


def _unflipped(node: object) -> torch.fx.Node | None:
    """`x` when `node` is `flip(x, [0])`, seen through permutes that change nothing (Dynamo
    puts one between the flip and the scan); else None."""
    while _is_identity_permute(node):
        node = node.args[0]
    return node.args[0] if _flipped_along_0(node) else None


def _is_identity_permute(node: object) -> bool:
    return (
        isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is torch.ops.aten.permute.default
        and list(node.args[1]) == list(range(len(node.args[1])))
    )


def _erase_if_unused(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase `node` and the permutes and flip it was made of, as far as nothing else uses them."""
    while isinstance(node, torch.fx.Node) and not node.users and (_is_identity_permute(node) or _flipped_along_0(node)):
        source = node.args[0]
        graph.erase_node(node)
        node = source


def _flipped_along_0(node: object) -> bool:
    """Whether `node` is `flip(x, [0])` (or its dimension counted from the end)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is _FLIP):
        return False
    value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    dims = list(node.args[1])
    return isinstance(value, torch.Tensor) and value.dim() > 0 and len(dims) == 1 and dims[0] % value.dim() == 0


PASS = NodeRewrite(
    "reversed_scans",
    "a scan over flipped tensors reads them from the end (no copy of each)",
    (_reversed_scans,),
)
