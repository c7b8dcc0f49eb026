"""Greedy decoding with early stop, with `xla_loop_backend.while_loop`.

A small GRU language model emits one token per step for a batch of prompts; the loop stops
as soon as every sequence has produced the end token (or at a length cap). The stopping test
runs on the device, so decoding never reads tokens back to the host mid-loop, and batches
that stop after different numbers of steps share one compiled program.
"""
import copy

import torch
import torch_xla
from _measure import call_measured, report_counts, report_match, to_xla

import xla_loop_backend

VOCAB, EMBED, HIDDEN, MAX_LEN, BATCH = 64, 32, 64, 48, 6
PAD, EOS = 0, 1


class GreedyDecoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, EMBED)
        self.cell = torch.nn.GRUCell(EMBED, HIDDEN)
        self.logits = torch.nn.Linear(HIDDEN, VOCAB)
        # A length penalty that makes ending likelier every step (so sequences do end).
        self.register_buffer("eos_ramp", torch.nn.functional.one_hot(torch.tensor(EOS), VOCAB).float() * 0.03)

    def forward(self, first: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode from the first tokens [batch] and states [batch, hidden]; returns (tokens
        [batch, MAX_LEN] padded with PAD after each EOS, number of steps run)."""

        def not_finished(step, tokens, h, last, done):
            return (step < MAX_LEN) & ~done.all()

        def decode_one(step, tokens, h, last, done):
            h = self.cell(self.embed(last), h)
            scores = self.logits(h) + step.to(h.dtype) * self.eos_ramp
            token = torch.where(done, PAD, scores.argmax(-1))
            tokens = tokens.clone()
            tokens[:, step] = token  # a dynamic update slice at the counter
            return step + 1, tokens, h, token, done | (token == EOS)

        start = (
            torch.zeros((), dtype=torch.int64, device=first.device),
            torch.full((first.shape[0], MAX_LEN), PAD, dtype=torch.int64, device=first.device),
            h,
            first,
            torch.zeros(first.shape, dtype=torch.bool, device=first.device),
        )
        steps, tokens, *_ = xla_loop_backend.while_loop(not_finished, decode_one, start)
        return tokens, steps


def show(tokens: torch.Tensor) -> str:
    lengths = [(row == EOS).nonzero()[0].item() + 1 if (row == EOS).any() else MAX_LEN for row in tokens]
    return ", ".join(str(n) for n in lengths)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    decoder = GreedyDecoder()
    compiled = xla_loop_backend.compile(copy.deepcopy(decoder).to(torch_xla.device()), fullgraph=True)
    print(f"greedy decoding with a GRU language model, batch {BATCH}, stop at EOS (cap {MAX_LEN} tokens)")
    for label, seed in (("first prompts", 1), ("second prompts", 7)):
        g = torch.Generator().manual_seed(seed)
        first = torch.randint(2, VOCAB, (BATCH,), generator=g)
        h = torch.randn(BATCH, HIDDEN, generator=g)
        (tokens, steps), compiles, syncs = call_measured(compiled, to_xla(first), to_xla(h))
        expected_tokens, expected_steps = decoder(first, h)
        print(f"  {label}: stopped after {steps.item()} steps (eager CPU: {expected_steps.item()}); lengths {show(tokens)}")
        print(f"    sequence 0: {tokens[0, :12].tolist()}...")
        report_match("tokens", tokens, expected_tokens)
        report_counts("call", compiles, syncs)


if __name__ == "__main__":
    main()
