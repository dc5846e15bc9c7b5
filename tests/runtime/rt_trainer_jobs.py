"""Rank workers of test_hf_trainer.py: Hugging Face models (small configs, random weights, nothing
downloaded) trained by `transformers.Trainer` on 2 ranks, once plainly (DDP, no sharding: the
reference) and once through ZeroplanTrainer with real DeepSpeed configs from the corpus.

The data: 20 rows of 8 tokens, read in order (`train_sampling_strategy="sequential"`), 2 rows
per rank per micro-batch, 2 micro-batches per step, 2 epochs: each epoch's 5 micro-batches per
rank make windows of 2, 2 and 1, so the Trainer's shorter last window is exercised. Each epoch
ends with an evaluation on the same rows (at ZeRO-3 the eval forward gathers too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from rt_any_model import SEQ, VOCAB, hf_model

CORPUS = Path(__file__).resolve().parents[1] / "schemas" / "corpus"
ROWS = 20
ARGS = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=3e-3,
            weight_decay=0.1, warmup_steps=2, lr_scheduler_type="linear", max_grad_norm=0.5, adam_beta2=0.99,
            logging_steps=1, save_strategy="no", report_to=[], seed=0, train_sampling_strategy="sequential",
            use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, eval_strategy="epoch",
            per_device_eval_batch_size=4)


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def corpus_config(name: str) -> dict:
    return json.loads((CORPUS / name).read_text())


def _args(out: str, **extra):
    import transformers

    return transformers.TrainingArguments(output_dir=out, **{**ARGS, **extra})


def _history(trainer) -> dict:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"losses": [h["loss"] for h in logs], "grad_norms": [h.get("grad_norm") for h in logs],
            "lrs": [h["learning_rate"] for h in logs], "steps": trainer.state.global_step,
            "eval_losses": [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]}


def plain(*, model: str, out: str) -> dict | None:
    """The reference: transformers.Trainer as it is (DDP over the 2 ranks, nothing sharded)."""
    import transformers

    trainer = transformers.Trainer(model=hf_model(model), args=_args(out), train_dataset=Rows(),
                                   eval_dataset=Rows())
    trainer.train()
    result = _history(trainer)
    result["params"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return result if dist.get_rank() == 0 else None


def sharded(*, model: str, config: str, out: str, save: bool = True, save_steps: int | None = None,
            resume: str | None = None) -> dict | None:
    """ZeroplanTrainer with the corpus config `config` (saving a Trainer checkpoint every
    `save_steps`, or resuming from `resume`); rank 0 returns the history, the plan, the
    consolidated weights and the saved model reloaded with from_pretrained."""
    from zeroplan.integrations.transformers import ZeroplanTrainer

    extra = {} if save_steps is None else {"save_strategy": "steps", "save_steps": save_steps}
    trainer = ZeroplanTrainer(model=hf_model(model), args=_args(out, **extra), train_dataset=Rows(),
                              eval_dataset=Rows(), config=corpus_config(config))
    trainer.train(resume_from_checkpoint=resume)
    result = _history(trainer)
    plan = trainer.engine.plan
    result["plan"] = plan
    result["consolidated"] = trainer.engine.full_state_dict()
    if save:
        trainer.save_model(os.path.join(out, "final"))
    dist.barrier()
    if dist.get_rank():
        return None
    if save:
        cls = type(trainer.model)
        reloaded = cls.from_pretrained(os.path.join(out, "final"))
        result["reloaded"] = {n: t.detach().clone() for n, t in reloaded.state_dict().items()}
        result["saved_files"] = sorted(os.listdir(os.path.join(out, "final")))
    return result


def refusals(*, out: str) -> dict | None:
    """Configs and arguments ZeroplanTrainer refuses, each with its message."""
    from zeroplan.integrations.transformers import ZeroplanTrainer
    from zeroplan.schemas import ConfigError

    cases = {"mismatch": ("gpt2", corpus_config("real_axolotl_zero3.json")
                          | {"gradient_clipping": 2.0, "train_micro_batch_size_per_gpu": 4}),
             "tp": ("llama", corpus_config("real_axolotl_zero2.json") | {"tensor_parallel": {"autotp_size": 2}})}
    got = {}
    for name, (model, config) in cases.items():
        trainer = ZeroplanTrainer(model=hf_model(model), args=_args(out, eval_strategy="no"), train_dataset=Rows(),
                                  config=config)
        try:
            trainer.train()
        except ConfigError as e:
            got[name] = str(e)
    return got if dist.get_rank() == 0 else None
