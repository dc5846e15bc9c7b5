"""Rank workers and references for parameters used outside their module's forward (ZeRO-3),
`zeroplan.gathered` and the Hugging Face export (run through rt_cases.run_jobs)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import zeroplan
from zeroplan.runtime import initialize
from zeroplan.runtime.schedulers import build_schedule
from zeroplan.schemas.plan import OptimizerPlan

from rt_plans import make_plan

VOCAB, WIDTH, GLOBAL_BATCH = 11, 13, 8
SGD = OptimizerPlan(type="SGD", lr=0.05, momentum=0.9, weight_decay=0.0, gradient_clipping=1.0)


class Reuse(nn.Module):
    """Applies a sibling's weight with a bias of its own: the sibling owns the weight."""

    def __init__(self, source: nn.Linear):
        super().__init__()
        self.source = (source,)  # a tuple: not a submodule, only a reference
        self.bias = nn.Parameter(torch.zeros(source.out_features))

    def forward(self, x):
        return F.linear(x, self.source[0].weight, self.bias)


class ReadsChildren(nn.Module):
    """A parent whose forward reads its children's weights: the LM head is F.linear on the
    embedding weight; `second` applies `first`'s weight. With `head_in_loss` the forward
    returns the hidden states and the caller's loss reads the embedding weight."""

    def __init__(self, *, head_in_loss: bool = False):
        super().__init__()
        self.head_in_loss = head_in_loss
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.first = nn.Linear(WIDTH, WIDTH)
        self.second = Reuse(self.first)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, ids, labels):
        h = self.emb(ids)
        h = h + torch.tanh(self.first(h))
        h = self.norm(h + torch.tanh(self.second(h)))
        if self.head_in_loss:
            return h
        return F.cross_entropy(F.linear(h, self.emb.weight), labels)


def build(case: dict) -> nn.Module:
    torch.manual_seed(1234)
    if case["model"] in ("gpt2", "llama"):
        return build_hf(case["model"])
    model = ReadsChildren(head_in_loss=case.get("head_in_loss", False))
    if case.get("register") == "before":  # ahead of initialize, as DeepSpeed users do in __init__
        register(model)
    return model


def register(model: ReadsChildren) -> None:
    zeroplan.register_external_parameter(model, model.emb.weight)
    zeroplan.register_external_parameter(model.second, model.first.weight)


def build_hf(kind: str) -> nn.Module:
    """A small Hugging Face model from its config: random weights, nothing downloaded."""
    import transformers

    torch.manual_seed(1234)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False, use_cache=False)
    return transformers.LlamaForCausalLM(config)


def plan_of(case: dict):
    """AdamW with warm-up for the test model; for the Hugging Face models SGD at a constant lr:
    GPT-2's key bias has an analytically zero gradient, whose rounding noise Adam would turn
    into full steps of either sign (rt_tolerance), and two steps of warm-up barely move a weight."""
    micro = GLOBAL_BATCH // case["world"]
    if case["model"] in ("gpt2", "llama"):
        return make_plan(stage=case["stage"], world=case["world"], micro=micro, persistence=0, optimizer=SGD,
                         scheduler=None)
    return make_plan(stage=case["stage"], world=case["world"], micro=micro, persistence=0,
                     dtype=case.get("dtype", "fp32"))


def batch(case: dict, step: int, rank: int) -> dict:
    """Rank `rank`'s rows of the global batch of `step` (rank -1: the whole global batch)."""
    g = torch.Generator().manual_seed(100 + step)
    if case["model"] in ("gpt2", "llama"):
        ids = torch.randint(0, 97, (GLOBAL_BATCH, 8), generator=g)
        rows = {"input_ids": ids, "labels": ids}
    else:
        rows = {"ids": torch.randint(0, VOCAB, (GLOBAL_BATCH,), generator=g),
                "labels": torch.randint(0, VOCAB, (GLOBAL_BATCH,), generator=g)}
    if rank < 0:
        return rows
    micro = GLOBAL_BATCH // case["world"]
    return {k: v[rank * micro:(rank + 1) * micro] for k, v in rows.items()}


def loss_of(model: nn.Module, out, labels) -> torch.Tensor:
    """The model's loss; a hidden-state output gets the head in the loss, inside gathered()."""
    if hasattr(out, "loss"):
        return out.loss
    if out.dim() == 0:
        return out
    with zeroplan.gathered(model.emb.weight):
        return F.cross_entropy(F.linear(out, model.emb.weight), labels)


def halve_first(model: nn.Module, rank: int) -> None:
    """The write of the modifier tests: rank 0 halves row 0 of `first.weight`; another rank's
    write is lost."""
    with torch.no_grad():
        if rank == 0:
            model.first.weight[0].mul_(0.5)
        else:
            model.first.weight.fill_(7.0)


# -- rank workers --------------------------------------------------------------------------------
def train(*, case: dict) -> dict | None:
    """Train `case`; rank 0 returns the consolidated parameters, and every rank's checks: what
    reading a released parameter raised, what `gathered` showed."""
    rank = dist.get_rank()
    model = build(case)
    engine = initialize(model, plan=plan_of(case))
    if case.get("register") == "after":
        register(model)
    checks: dict = {}
    for step in range(case["steps"]):
        rows = batch(case, step, rank)
        engine.backward(loss_of(model, engine(**rows), rows["labels"]))
        engine.step()
        if case.get("modify_after") == step:
            checks.update(_modify(engine, model, rank))
    checks["errors"] = _released_reads(engine, model, case)
    params = engine.consolidated_state_dict()
    if case.get("save"):
        checks["saved"] = str(engine.save_pretrained(case["save"]))
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, checks)
    engine.close()
    return {"params": params, "ranks": every} if rank == 0 else None


def _modify(engine, model: nn.Module, rank: int) -> dict[str, bool]:
    """Halve row 0 of `first.weight` through gathered(modifier_rank=0); what this rank saw."""
    whole, masters = engine.consolidated_state_dict()["first.weight"], engine.full_state_dict()
    with zeroplan.gathered(model.first.weight):
        before = model.first.weight.detach().clone()
    with zeroplan.gathered(model.first.weight, modifier_rank=0):
        unchanged = torch.equal(model.first.weight.detach(), before)
        halve_first(model, rank)
    want = before.clone()
    want[0] *= 0.5
    with zeroplan.gathered(list(model.parameters())):
        after = model.first.weight.detach().clone()
    now = engine.full_state_dict()
    kept = all(torch.equal(now[k], v) for k, v in masters.items() if k != "first.weight")
    return {"gathered_is_whole": torch.equal(before, whole), "entered_unchanged": unchanged,
            "sees_rank0_write": torch.equal(after, want),
            "consolidated_has_it": torch.equal(engine.consolidated_state_dict()["first.weight"], want),
            "master_took_row_0": torch.equal(now["first.weight"][0], want[0].float()),
            "master_kept_the_rest": kept and torch.equal(now["first.weight"][1:], masters["first.weight"][1:])}


def _released_reads(engine, model: nn.Module, case: dict) -> dict[str, str]:
    """What each read of a released parameter outside a gather raised (type: message); {} at stages 0-2."""
    if engine.zero.stage != 3:
        return {}
    if case["model"] == "gpt2":
        reads = {"transformer.h.0.attn.c_attn.weight": lambda: model.transformer.h[0].attn.c_attn.weight * 2}
    elif case["model"] == "llama":
        reads = {"lm_head.weight": lambda: model.lm_head.weight.sum()}
    else:
        reads = {"emb.weight": lambda: model.emb.weight.sum(), "norm.weight": lambda: model.norm.weight * 2}
    reads["state_dict"] = model.state_dict
    if "module_save" in case:  # the model's own save_pretrained at ZeRO-3
        reads["save_pretrained"] = lambda: model.save_pretrained(case["module_save"])
    out = {}
    for name, read in reads.items():
        try:
            value = read()
            out[name] = f"no error; NaN: {bool(torch.isnan(value).any()) if torch.is_tensor(value) else '?'}"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


# -- single-process references ---------------------------------------------------------------------
def reference(case: dict) -> dict[str, torch.Tensor]:
    """One process, torch.optim on the whole global batch of every step, the same schedule and
    clipping; `modify_after` halves first.weight after that step, as rank 0 did."""
    plan = plan_of(case)
    model = build(case)
    params = [p for p in model.parameters() if p.requires_grad]
    o = plan.optimizer
    if o.type == "SGD":
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    schedule = build_schedule(scheduler=plan.scheduler, optimizer=o)
    for step in range(case["steps"]):
        rows = batch(case, step, -1)
        out = model(**rows)
        loss = out.loss if hasattr(out, "loss") else out
        if loss.dim():
            loss = F.cross_entropy(F.linear(loss, model.emb.weight), rows["labels"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.gradient_clipping)
        opt.param_groups[0]["lr"] = schedule.lr()
        opt.step()
        schedule.step()
        if case.get("modify_after") == step:
            halve_first(model, 0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
