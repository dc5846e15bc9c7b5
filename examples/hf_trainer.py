"""transformers.Trainer trained through zeroplan, with a DeepSpeed config as Hugging Face writes it.

    torchrun --nproc-per-node 2 examples/hf_trainer.py --config examples/hf_zero3.json --out out/hf_trainer
    python examples/hf_trainer.py --out out/hf_trainer        # one process works too

A GPT-2 built from a small config (random weights, nothing downloaded) learns a synthetic
sequence task; the script is an ordinary Trainer script except for the one line building
`ZeroplanTrainer` instead of `Trainer`. The config's "auto" values (batch sizes,
accumulation, clipping, bf16/fp16, bucket sizes) come from the TrainingArguments. The saved
model reloads with `from_pretrained`.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from zeroplan.integrations.transformers import ZeroplanTrainer


class Counting(torch.utils.data.Dataset):
    """Rows of consecutive token ids modulo the vocabulary: predictable, so the loss falls."""

    def __init__(self, rows: int, *, seq: int, vocab: int):
        starts = torch.randint(0, vocab, (rows, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(seq)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/hf_zero3.json", help="DeepSpeed config (\"auto\" allowed)")
    p.add_argument("--out", default="out/hf_trainer")
    p.add_argument("--epochs", type=float, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    training = transformers.TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        num_train_epochs=args.epochs, learning_rate=3e-3, warmup_steps=5, weight_decay=0.01, logging_steps=5,
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available())
    trainer = ZeroplanTrainer(model=model, args=training, train_dataset=Counting(512, seq=16, vocab=128),
                              config=args.config)
    trainer.train()
    trainer.save_model(f"{args.out}/model")  # every rank: the shards are gathered, rank 0 writes
    if trainer.is_world_process_zero():
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(f"{args.out}/model")
        print(f"saved to {args.out}/model; reloaded {sum(p.numel() for p in reloaded.parameters())} parameters")


if __name__ == "__main__":
    main()
