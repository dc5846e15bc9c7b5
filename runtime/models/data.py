"""A deterministic synthetic next-token dataset: a Markov chain the model can learn.

Each token has `branching` successors drawn once from the seed, taken with fixed
probabilities (0.6, 0.2, 0.1, ...), so the achievable loss (the chain's entropy, about 1.2 nats
for 4 successors) is far below log(vocab) at initialisation and the loss visibly falls.

The global batch of step s depends only on (seed, s): every rank generates it and takes its
fixed slice, so the data does not depend on the parallel layout. Micro-batch k of rank r is
rows [(k * dp + r) * micro, (k * dp + r + 1) * micro) of the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class MarkovChainData:
    def __init__(self, *, vocab: int, seq_len: int, seed: int = 0, branching: int = 4):
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed
        g = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab, (vocab, branching), generator=g)
        probs = torch.tensor([2.0 ** -i for i in range(branching)])
        self.probs = probs / probs.sum()

    @property
    def entropy(self) -> float:
        """The chain's per-token entropy in nats: the loss a perfect model reaches."""
        return float(-(self.probs * self.probs.log()).sum())

    def global_batch(self, step: int, size: int) -> torch.Tensor:
        """[size, seq_len + 1] token ids of global step `step`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        tokens = torch.empty(size, self.seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab, (size,), generator=g)
        choice = torch.multinomial(self.probs, size * self.seq_len, replacement=True, generator=g)
        choice = choice.view(size, self.seq_len)
        for t in range(self.seq_len):
            tokens[:, t + 1] = self.successors[tokens[:, t], choice[:, t]]
        return tokens

    def micro_batches(self, *, step: int, global_batch_size: int, micro_batch_size: int, dp: int,
                      dp_rank: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of step `step`, in accumulation order."""
        tokens = self.global_batch(step, global_batch_size)
        out = []
        for k in range(global_batch_size // (micro_batch_size * dp)):
            lo = (k * dp + dp_rank) * micro_batch_size
            rows = tokens[lo:lo + micro_batch_size]
            out.append({"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()})
        return out

    def iterate(self, *, global_batch_size: int, micro_batch_size: int, dp: int, dp_rank: int,
                start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches of steps start_step, start_step + 1, ... forever."""
        step = start_step
        while True:
            yield from self.micro_batches(step=step, global_batch_size=global_batch_size,
                                          micro_batch_size=micro_batch_size, dp=dp, dp_rank=dp_rank)
            step += 1
