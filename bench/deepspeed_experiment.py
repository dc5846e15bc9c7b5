"""One experiment of DeepSpeed's autotuner (bench/deepspeed_autotune.py): the user script that
`deepspeed --autotuning run` launches once per candidate config, as a file, so it imports
absolutely (the repository root is on PYTHONPATH).

DeepSpeed's engine times steps START_STEP..END_STEP, writes the throughput and exits inside
`engine.step()`; `--steps` only bounds the final run with the best config.
"""

from __future__ import annotations

import argparse
import sys

START_STEP, END_STEP = 2, 3
"""One warm-up step, two timed: zeroplan's grid uses warmup_steps 1, measured_steps 2."""


def train(argv: list[str]) -> None:
    """The user script of every experiment: DeepSpeed's loop on the built-in GPT and Markov data."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from zeroplan.runtime.models import GPT, MarkovChainData
    from zeroplan.schemas import MODEL_PRESETS

    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=END_STEP + 3)
    deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    spec = MODEL_PRESETS[args.model]
    torch.manual_seed(0)
    model = GPT(spec)
    engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    data = MarkovChainData(vocab=spec.vocab, seq_len=spec.seq_len, seed=0)
    for step in range(args.steps):  # an experiment exits inside engine.step() after END_STEP
        for batch in data.micro_batches(step=step, global_batch_size=engine.train_batch_size(),
                                        micro_batch_size=engine.train_micro_batch_size_per_gpu(),
                                        dp=dist.get_world_size(), dp_rank=dist.get_rank()):
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()


if __name__ == "__main__":
    train(sys.argv[1:])
