"""A training script for `zeroplan train PLAN -- mn_train.py OUT STEPS`: the built-in tiny GPT on
the Markov-chain data, as runtime/train.py trains it; rank 0 then saves the whole model
(`consolidated_state_dict`, tp/pp joined) to OUT, and touches OUT.started after the first step
(the multi-node test waits for it before killing a node)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import zeroplan
from zeroplan.runtime.models import GPT, MarkovChainData
from zeroplan.schemas import ModelSpec


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    spec = ModelSpec.load("tiny")
    engine = zeroplan.initialize(GPT(spec))
    batch = engine.plan.batch
    data = MarkovChainData(vocab=spec.vocab, seq_len=spec.seq_len, seed=0).iterate(
        global_batch_size=batch.global_batch_size, micro_batch_size=batch.micro_batch_size,
        dp=engine.groups.dp_size, dp_rank=engine.groups.dp_rank)
    for step in range(steps):
        engine.train_batch(data)
        if step == 0 and engine.groups.rank == 0:
            Path(f"{out}.started").touch()
    state = engine.consolidated_state_dict()
    if engine.groups.rank == 0:
        torch.save(state, out)
    engine.close()


if __name__ == "__main__":
    main()
