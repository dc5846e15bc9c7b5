"""Rank workers and single-process references for models of one's own under
`zeroplan.initialize(model, config=...)`: Hugging Face GPT-2 and Llama from small configs (random
weights, nothing downloaded), a module whose parameters do not all get gradients, and the
deepspeed.initialize arguments (model_parameters, optimizer, lr_scheduler). Run through
rt_cases.run_jobs."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import zeroplan

GLOBAL_BATCH, SEQ, VOCAB = 8, 8, 97
WORLD = 2


def hf_model(kind: str, *, dropout: float = 0.0) -> nn.Module:
    import transformers

    torch.manual_seed(1234)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16,
                                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False, use_cache=False)
    return transformers.LlamaForCausalLM(config)


class Partly(nn.Module):
    """`never` is in no forward; `sometimes` only where the batch says so (per step and rank)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1234)
        self.emb = nn.Embedding(11, 13)
        self.used = nn.Linear(13, 13)
        self.sometimes = nn.Linear(13, 13)
        self.never = nn.Linear(13, 13)
        self.norm = nn.LayerNorm(13)
        self.head = nn.Linear(13, 11)

    def forward(self, ids, labels, use):
        h = self.emb(ids)
        h = h + torch.tanh(self.used(h))
        if bool(use):
            h = h + torch.tanh(self.sometimes(h))
        return F.cross_entropy(self.head(self.norm(h)), labels)


USES = [(True, True), (False, False), (True, False), (False, False)]
"""Per step, whether rank 0 and rank 1 run `sometimes`: both, neither, one, neither. At ZeRO-3
every rank must run the same modules (gathers are collectives, as in DeepSpeed): there step 2
runs it on both."""


def build(case: dict) -> nn.Module:
    return Partly() if case["model"] == "partly" else hf_model(case["model"])


def batch(case: dict, step: int, rank: int) -> dict:
    """Rank `rank`'s rows of step `step`'s global batch."""
    g = torch.Generator().manual_seed(100 + step)
    micro = GLOBAL_BATCH // WORLD
    rows = slice(rank * micro, (rank + 1) * micro)
    if case["model"] == "partly":
        ids, labels = torch.randint(0, 11, (2, GLOBAL_BATCH), generator=g)
        use = USES[step][0] if case["stage"] == 3 else USES[step][rank]
        return {"ids": ids[rows], "labels": labels[rows], "use": torch.tensor(use)}
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)[rows]
    return {"input_ids": ids, "labels": ids}


def config(case: dict) -> dict:
    zero = {"stage": case["stage"], "reduce_bucket_size": 500}
    if case["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = 0
    out = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD,
           "gradient_clipping": 1.0, "zero_optimization": zero}
    if case.get("optimizer", "AdamW") is not None:
        out["optimizer"] = {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}}
        if case.get("optimizer") == "SGD":
            out["optimizer"] = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9, "dampening": 0.1,
                                                          "weight_decay": 0.1}}
    out["param_groups"] = {k: case[k] for k in ("no_decay", "missing_grads") if k in case}
    return out


def client_args(case: dict, model: nn.Module) -> dict:
    """initialize's model_parameters / optimizer / lr_scheduler for the case (its `client` kind)."""
    kind = case.get("client")
    if kind is None:
        return {}
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("head")], "weight_decay": 0.05},
              {"params": list(model.head.parameters()), "lr": 1e-2}]
    if kind == "instance":  # DeepSpeed's client optimizer and scheduler, built by the user
        opt = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))}
    if kind == "callable":
        return {"model_parameters": groups,
                "optimizer": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9),
                "lr_scheduler": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)}
    raise ValueError(f"client kind {kind!r}")


# -- rank workers ---------------------------------------------------------------------------------
def train(*, case: dict) -> dict | None:
    """Train `case` through initialize(model, config=...) with no shape; rank 0 returns the fp32
    parameters, the initial ones, the plan's provenance and the lr of every step."""
    rank = dist.get_rank()
    model = build(case)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = zeroplan.initialize(model, config=config(case), **client_args(case, model))
    lrs = []
    for step in range(case["steps"]):
        if step == case.get("resume_after"):  # a new run resumes from the checkpoint
            engine.save_checkpoint(case["ckpt"])
            engine.close()
            model = build(case)
            engine = zeroplan.initialize(model, config=config(case), **client_args(case, model))
            engine.load_checkpoint(case["ckpt"])
        out = engine(**batch(case, step, rank))
        engine.backward(out if isinstance(out, torch.Tensor) else out.loss)
        lrs.append([g["lr"] for g in engine.param_groups])
        engine.step()
    params = engine.full_state_dict()
    plan = engine.plan
    engine.close()
    if rank:
        return None
    return {"params": params, "initial": initial, "lrs": lrs, "plan": plan,
            "model_source": plan.provenance.model_source, "warnings": plan.estimates.warnings}


def eval_mode(*, stage: int) -> dict | None:
    """GPT-2 with dropout 0.5: two training forwards differ, two eval forwards (at ZeRO-3 too,
    gathering every module) agree, and training steps on after eval."""
    rank = dist.get_rank()
    model = hf_model("gpt2", dropout=0.5)
    engine = zeroplan.initialize(model, config=config({"stage": stage}))
    rows = batch({"model": "gpt2"}, 0, rank)
    with torch.no_grad():
        train_pair = [engine(**rows).logits for _ in range(2)]
        evaluated = engine.eval()
        eval_pair = [engine(**rows).logits for _ in range(2)]
    out = {"returns_engine": evaluated is engine, "module_eval": not model.training and not engine.training,
           "train_differs": not torch.equal(*train_pair), "eval_equal": torch.equal(*eval_pair),
           "finite": bool(torch.isfinite(eval_pair[0]).all()), "is_the_model": engine.module is model}
    engine.train()
    loss = engine(**rows).loss
    engine.backward(loss)
    engine.step()
    out["trains_after"] = model.training and engine.global_steps == 1
    engine.close()
    return out if rank == 0 else None


# -- single-process references --------------------------------------------------------------------
def reference(case: dict) -> dict[str, torch.Tensor]:
    """torch.optim on one process: every rank's micro-batch backward in turn (a parameter no
    backward reached keeps .grad None, as under DDP when no rank used it), the sum over ranks
    averaged, clipped, stepped."""
    model = build(case)
    opt, scheduler = _reference_optimizer(case, model)
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(case["steps"]):
        for rank in range(WORLD):
            out = model(**batch(case, step, rank))
            (out if isinstance(out, torch.Tensor) else out.loss).backward()
        for p in params:
            if p.grad is None and case.get("missing_grads") == "zero":
                p.grad = torch.zeros_like(p)
            if p.grad is not None:
                p.grad /= WORLD
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def _reference_optimizer(case: dict, model: nn.Module):
    args = client_args(case, model)
    if "optimizer" in args:
        opt = args["optimizer"]
        if callable(opt) and not isinstance(opt, torch.optim.Optimizer):
            opt = opt(args["model_parameters"])
        scheduler = args["lr_scheduler"]
        return opt, scheduler(opt) if callable(scheduler) and not hasattr(scheduler, "optimizer") else scheduler
    decay, exempt = _decay_split(model, no_decay=case.get("no_decay", False))
    if case.get("optimizer") == "SGD":
        make = lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.1)
    else:
        make = lambda groups: torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.1)
    return make([{"params": decay}] + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])), None


def _decay_split(model: nn.Module, *, no_decay: bool) -> tuple[list, list]:
    """Hugging Face Trainer's own split (get_decay_parameter_names) when `no_decay`."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay:
        return [p for _, p in params], []
    import transformers

    names = set(transformers.Trainer.get_decay_parameter_names(None, model))
    return [p for n, p in params if n in names], [p for n, p in params if n not in names]
