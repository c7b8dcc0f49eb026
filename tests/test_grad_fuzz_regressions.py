"""Training programs the gradient fuzzer (test_grad_fuzz.py) found failing, kept as regular
tests. Each entry: what was wrong, and the program as the fuzzer printed it."""
from __future__ import annotations

import pytest
from test_grad_fuzz import check_training_program
from training_programs import TrainingProgram

REGRESSIONS = {
    # The loss adds two carries of a trained while_loop, so autograd hands both one gradient
    # tensor; the backward While refused its aliased carries ("cond_fn might be aliasing
    # the input or the output!"). Fixed: checkpointed_while makes the gradients distinct.
    "two carries, one gradient tensor": TrainingProgram(
        source=(
            'class Program(torch.nn.Module):\n'
            '    def __init__(self):\n'
            '        super().__init__()\n'
            '        self.p0 = torch.nn.Linear(4, 4)\n'
            '        self.p1 = torch.nn.Linear(4, 1)\n'
            '\n'
            '    def forward(self, n, m, x, xs):\n'
            '        dev = x.device\n'
            '        def body2(i, c0, acc):\n'
            '            h3 = torch.tanh(self.p0(c0))\n'
            '            return i + 1, h3, torch.tanh(acc + c0 * 0.5)\n'
            '        _, h1, acc4 = L.while_loop(lambda i, c0, acc: i < n, body2, (torch.zeros((), dtype=torch.int64, device=dev), x, torch.zeros_like(x)))\n'
            '        h1 = h1 + acc4\n'
            '        return self.p1(h1).pow(2).mean() + h1.pow(2).mean()\n'
        ),
        seed=0,
        trip_counts=((2, 1), (0, 1)),
    ),
    # The forward graph returned clones of one loop result (and of inputs); torch_xla's
    # bridge then handed the outputs back in the wrong order: the loss came back as a
    # (2, 1) tensor. Fixed: xla_loop runs its own executables (executable.py), which return
    # every output in its place.
    "outputs sharing a value": TrainingProgram(
        source=(
            'class Program(torch.nn.Module):\n'
            '    def __init__(self):\n'
            '        super().__init__()\n'
            '        self.p0 = torch.nn.Linear(4, 1)\n'
            '\n'
            '    def forward(self, n, m, x, xs):\n'
            '        dev = x.device\n'
            '        def body2(i, c0):\n'
            '            h3 = torch.tanh(c0 + 0.5 * x)\n'
            '            return h3 + i.to(c0.dtype) * 0.05\n'
            '        h1 = L.fori_loop(0, n, body2, x)\n'
            '        def body5(c0, s0):\n'
            '            h6 = torch.tanh(c0 - 0.5 * h1)\n'
            '            return h6, (h6 * s0).sum(-1)\n'
            '        h4, ys7 = L.scan(body5, h1, torch.stack([h1, h1 * 0.5, -h1]), reverse=True)\n'
            '        h4 = h4 + ys7.mean(0).unsqueeze(-1) * 0.1\n'
            '        return self.p0(h4).pow(2).mean() + h4.pow(2).mean()\n'
        ),
        seed=0,
        trip_counts=((0, 4), (2, 2)),
        remat=2,
        max_iterations=16,
    ),
    # remat segmented a scan nested in a trained loop's body; torch's alias check of the
    # enclosing scan (gen_schema) runs that body in a fake mode of its own, where a scan of
    # Python functions cannot be traced. Fixed: remat applies to top-level loops.
    "segmented scan inside a loop body": TrainingProgram(
        source=(
            'class Program(torch.nn.Module):\n'
            '    def __init__(self):\n'
            '        super().__init__()\n'
            '        self.p0 = torch.nn.Linear(4, 4)\n'
            '        self.p1 = torch.nn.GRUCell(4, 4)\n'
            '        self.p2 = torch.nn.Linear(4, 1)\n'
            '\n'
            '    def forward(self, n, m, x, xs):\n'
            '        dev = x.device\n'
            '        def body2(i, c0):\n'
            '            def body4(c1, s1):\n'
            '                h5 = torch.tanh(c1 - 0.5 * x)\n'
            '                h6 = torch.tanh(self.p0(h5))\n'
            '                return h6, (h6 * s1).sum(-1)\n'
            '            h3, ys7 = L.scan(body4, c0, torch.stack([c0, c0 * 0.5, -c0]), reverse=True)\n'
            '            h3 = h3 + ys7.mean(0).unsqueeze(-1) * 0.1\n'
            '            return h3 + i.to(c0.dtype) * 0.05\n'
            '        h1 = L.fori_loop(0, 1, body2, x)\n'
            '        def body9(i, c0):\n'
            '            def body11(i, c1, acc):\n'
            '                h12 = self.p1(x, c1)\n'
            '                def body14(c2, s2):\n'
            '                    h15 = torch.tanh(c2 - 0.5 * h12)\n'
            '                    h16 = torch.tanh(h15 + 0.5 * s2)\n'
            '                    return h16, (h16 * s2).sum(-1)\n'
            '                h13, ys17 = L.scan(body14, h12, xs, reverse=True)\n'
            '                h13 = h13 + ys17.mean(0).unsqueeze(-1) * 0.1\n'
            '                return i + 1, h13, torch.tanh(acc + c1 * 0.5)\n'
            '            _, h10, acc18 = L.while_loop(lambda i, c1, acc: i < m, body11, (torch.zeros((), dtype=torch.int64, device=dev), c0, torch.zeros_like(c0)))\n'
            '            h10 = h10 + acc18\n'
            '            return h10 + i.to(c0.dtype) * 0.05\n'
            '        h8 = L.fori_loop(0, 1, body9, h1)\n'
            '        return self.p2(h8).pow(2).mean() + h8.pow(2).mean()\n'
        ),
        seed=0,
        trip_counts=((0, 1), (2, 3)),
        remat=2,
    ),
    # Repeated layers whose first one reads x twice (as h and as x): torch 2.9's graph
    # deduplication made one subgraph for regions wired differently, and the second layer
    # computed 0.1 * h for 0.1 * x (a wrong loss, silently; torch's eager backend too).
    # Fixed: torch_fixes.install_dedup_fix groups regions by wiring.
    "repeated layers wired differently": TrainingProgram(
        source=(
            'class Program(torch.nn.Module):\n'
            '    def __init__(self):\n'
            '        super().__init__()\n'
            '        self.p0 = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))\n'
            '        self.p1 = torch.nn.Linear(4, 1)\n'
            '\n'
            '    def forward(self, n, m, x, xs):\n'
            '        dev = x.device\n'
            '        h1 = x\n'
            '        for layer in self.p0:\n'
            '            h1 = torch.tanh(layer(h1) + 0.1 * x) + 0.5 * h1\n'
            '        return self.p1(h1).pow(2).mean() + h1.pow(2).mean()\n'
        ),
        seed=0,
        trip_counts=((0, 1), (0, 1)),
    ),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_grad_fuzz_regression(name):
    check_training_program(REGRESSIONS[name])


def _bounded_by(bound: str) -> TrainingProgram:
    return TrainingProgram(
        source=(
            'class Program(torch.nn.Module):\n'
            '    def __init__(self):\n'
            '        super().__init__()\n'
            '        self.p0 = torch.nn.Linear(4, 4)\n'
            '        self.p1 = torch.nn.Linear(4, 4)\n'
            '        self.p2 = torch.nn.Linear(4, 1)\n'
            '\n'
            '    def forward(self, n, m, x, xs):\n'
            '        dev = x.device\n'
            '        def body2(i, c0):\n'
            '            return i + 1, torch.tanh(self.p0(c0))\n'
            '        h1 = L.while_loop(lambda i, c0: i < n + m, body2, (torch.zeros((), dtype=torch.int64, device=dev), x))[1]\n'
            '        def body3(i, c0):\n'
            '            return i + 1, torch.tanh(self.p1(c0))\n'
            f'        h4 = L.while_loop(lambda i, c0: i < {bound}, body3, (torch.zeros((), dtype=torch.int64, device=dev), h1))[1]\n'
            '        return self.p2(h4).pow(2).mean() + h4.pow(2).mean()\n'
        ),
        seed=0,
        trip_counts=((2, 1), (1, 3)),
    )


def test_a_program_differing_only_in_a_loop_bound_gets_an_executable_of_its_own():
    # Found as a run of programs in one process: after a program whose second loop ran to
    # n, the same program with the loop running to m (both already used before it) computed
    # with n: torch_xla's graph hash could not tell the two apart (pytorch/xla#8353), so the
    # second reused the first's executable. Fixed: executable.py keys programs by their HLO.
    check_training_program(_bounded_by("n"))
    check_training_program(_bounded_by("m"))
