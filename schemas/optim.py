"""`optimizer` and `scheduler` blocks, with DeepSpeed's type and parameter names.

Parameters left out (None) take the optimizer's or scheduler's own default when the plan
is compiled; the defaults are DeepSpeed's, listed in `OPTIMIZER_DEFAULTS` and
`SCHEDULER_DEFAULTS`. A parameter that does not belong to the chosen type (`momentum` for
Adam, `total_num_steps` for WarmupLR) is an error rather than silently ignored, and so is an
optimizer type zeroplan does not build: one problem naming it, not one per parameter.
"""

import re
from typing import Annotated

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError, Problem, raise_problems
from .types import AUTO, Auto, AutoFlag, Flag, StrictModel, is_auto_input, choice, count, real

OPTIMIZER_PARAMS: dict[str, tuple[str, ...]] = {
    "Adam": ("lr", "betas", "eps", "weight_decay", "bias_correction", "adam_w_mode", "torch_adam"),
    "AdamW": ("lr", "betas", "eps", "weight_decay", "bias_correction", "adam_w_mode", "torch_adam"),
    "SGD": ("lr", "momentum", "dampening", "nesterov", "weight_decay"),
    "Lamb": ("lr", "betas", "eps", "weight_decay", "bias_correction", "max_coeff", "min_coeff", "eps_inside_sqrt"),
    "Lion": ("lr", "betas", "weight_decay"),
    "Adagrad": ("lr", "eps", "weight_decay"),
}
"""The parameters each optimizer type takes: DeepSpeed's (deepspeed/runtime/engine.py
`_configure_basic_optimizer`: FusedAdam, torch.optim.SGD, FusedLamb, FusedLion,
torch.optim.Adagrad), less what zeroplan does not implement."""

OPTIMIZERS = tuple(OPTIMIZER_PARAMS)

OPTIMIZER_DEFAULTS: dict[str, dict[str, object]] = {
    "Adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "AdamW": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "SGD": {"lr": 1e-3, "weight_decay": 0.0},
    "Lamb": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "Lion": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0},
    "Adagrad": {"lr": 1e-2, "eps": 1e-10, "weight_decay": 0.0},
}
"""What a parameter left out means: the default of the class DeepSpeed builds (FusedAdam,
FusedLamb and FusedLion: lr 1e-3, betas (0.9, 0.999); torch.optim.Adagrad: lr 1e-2, eps 1e-10).
SGD has no default learning rate in torch; zeroplan's is 1e-3."""

SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle")

REMOVED_OPTIMIZERS = ("OneBitAdam", "OneBitLamb", "ZeroOneAdam")
"""DeepSpeed's 1-bit optimizers, gone from DeepSpeed 0.19 (its engine then looks the name up in
torch.optim and fails)."""


def _parse_betas(value: object) -> tuple[float, float] | Auto:
    if is_auto_input(value):
        return AUTO
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            b1, b2 = (float(v) for v in value if not isinstance(v, bool))
        except (TypeError, ValueError):
            pass
        else:
            if 0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0:
                return (b1, b2)
            raise PydanticCustomError("out_of_range", "each beta must be in [0, 1)")
    raise PydanticCustomError("type", "expected two numbers [beta1, beta2] or 'auto'")


Betas = Annotated[
    tuple[float, float] | Auto,
    PlainValidator(_parse_betas),
    PlainSerializer(lambda v: "auto" if v is AUTO else list(v)),
    WithJsonSchema({"anyOf": [
        {"type": "array", "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
         "minItems": 2, "maxItems": 2},
        {"const": "auto"}]}),
]


class OptimizerParams(StrictModel):
    lr: real(gt=0, auto=True) | None = None
    """Learning rate; None takes the optimizer's default (OPTIMIZER_DEFAULTS). "auto" is what
    Hugging Face's Trainer fills from TrainingArguments.learning_rate; compile has no Trainer
    and asks for a number."""
    betas: Betas | None = None
    """Adam's, Lamb's and Lion's (beta1, beta2); default (0.9, 0.999); "auto": that default,
    which is also TrainingArguments' (adam_beta1, adam_beta2)."""
    eps: real(gt=0, auto=True) | None = None
    """Adam's and Lamb's epsilon (default 1e-8), Adagrad's (default 1e-10); "auto": Adam's
    1e-8, TrainingArguments' adam_epsilon."""
    weight_decay: real(ge=0, auto=True) | None = None
    """Weight decay; default 0 (DeepSpeed's classes, and TrainingArguments', which "auto" means)."""
    momentum: real(ge=0) | None = None
    """SGD momentum; default 0."""
    dampening: real(ge=0) | None = None
    """SGD dampening; default 0."""
    nesterov: Flag | None = None
    """SGD Nesterov momentum; default false."""
    adam_w_mode: Flag | None = None
    """DeepSpeed's switch for `Adam`: true (its default) applies decoupled weight decay,
    as AdamW does; false applies L2 regularisation, as torch.optim.Adam does."""
    torch_adam: Flag | None = None
    """DeepSpeed uses torch's Adam implementation when true; zeroplan picks its kernel
    from the plan's `kernels` section, so this only records the wish."""
    bias_correction: Flag | None = None
    """Adam/AdamW/Lamb: divide the moments by 1 - beta^step (true, the default); false steps
    with the raw moments (DeepSpeed's FusedAdam and FusedLamb take the same switch)."""
    max_coeff: real(gt=0) | None = None
    """Lamb: upper clamp of the trust ratio ||w|| / ||update||; default 10."""
    min_coeff: real(ge=0) | None = None
    """Lamb: lower clamp of the trust ratio; default 0.01."""
    eps_inside_sqrt: Flag | None = None
    """Lamb: sqrt(v + eps) instead of sqrt(v) + eps; default false."""
    max_grad_norm: real(ge=0) | None = None
    """Refused, as DeepSpeed refuses it (ValueError at initialize): `gradient_clipping` clips."""


def _type_problem(value: object) -> Problem | None:
    """One problem for an optimizer type zeroplan does not build (checked before the parameters,
    which would otherwise each be reported as foreign to it)."""
    if not isinstance(value, str) or value.strip().lower() in {t.lower() for t in OPTIMIZERS}:
        return None
    removed = value.strip().lower() in {t.lower() for t in REMOVED_OPTIMIZERS}
    why = ("DeepSpeed 0.19 removed its 1-bit optimizers (OneBitAdam, OneBitLamb, ZeroOneAdam) and refuses it too"
           if removed else "zeroplan does not implement it")
    return Problem("type", f"optimizer type {value.strip()!r} is not supported: {why}", given=value,
                   suggestion=f"use one of {', '.join(OPTIMIZERS)}")


class OptimizerConfig(StrictModel):
    type: choice(*OPTIMIZERS)
    """Adam, AdamW, SGD, Lamb, Lion or Adagrad (any case)."""
    params: OptimizerParams = OptimizerParams()
    """The optimizer's hyper-parameters (DeepSpeed's `optimizer.params`)."""

    @model_validator(mode="before")
    @classmethod
    def _known_type(cls, data: object) -> object:
        problem = _type_problem(data.get("type")) if isinstance(data, dict) else None
        if problem is not None:
            raise ConfigError(problem)
        return data

    @model_validator(mode="after")
    def _rules(self) -> "OptimizerConfig":
        allowed = OPTIMIZER_PARAMS[self.type]
        problems = [
            Problem(f"params.{key}", f"is not a parameter of {self.type}", given=getattr(self.params, key),
                    suggestion=f"remove it; {self.type} takes {', '.join(allowed)}")
            for key in sorted(self.params.given() - set(allowed) - {"max_grad_norm"})
        ]
        if "max_grad_norm" in self.params.given():
            problems.append(Problem("params.max_grad_norm", "DeepSpeed refuses it as an optimizer parameter",
                                    given=self.params.max_grad_norm, suggestion="set the top-level "
                                    "gradient_clipping instead"))
        if self.type == "AdamW" and self.params.adam_w_mode is False:
            problems.append(Problem("params.adam_w_mode", "AdamW always decouples weight decay",
                                    given=False, suggestion="use type 'Adam' for L2 regularisation"))
        p = self.params
        if p.max_coeff is not None and p.min_coeff is not None and p.min_coeff > p.max_coeff:
            problems.append(Problem("params.min_coeff", f"min_coeff ({p.min_coeff}) > max_coeff ({p.max_coeff})",
                                    given=p.min_coeff, suggestion="make min_coeff <= max_coeff"))
        raise_problems(problems)
        return self


HF_NO_DECAY: tuple[str, ...] = ("type:LayerNorm", "bias", "layernorm", "rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                 r"_norm(?:$|\.)")
"""`param_groups.no_decay: true`: Hugging Face Trainer's rule (`Trainer.get_decay_parameter_names`):
no weight decay for the parameters of nn.LayerNorm modules and for those whose lowercased name
matches one of its patterns (biases, LayerNorm / RMSNorm and `norm` weights)."""


def _parse_no_decay(value: object) -> tuple[str, ...]:
    if value is True:
        return HF_NO_DECAY
    if value is False:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise PydanticCustomError("type", "expected true (Hugging Face Trainer's rule), false or a list of patterns")
    for pattern in value:
        try:
            re.compile(pattern.removeprefix("type:"))
        except re.error as e:
            raise PydanticCustomError("regex", "{pattern!r} is not a regular expression: {error}",
                                      {"pattern": pattern, "error": str(e)}) from e
    return tuple(value)


NoDecay = Annotated[
    tuple[str, ...],
    PlainValidator(_parse_no_decay),
    PlainSerializer(list),
    WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "array", "items": {"type": "string"}}]}),
]


class ParamGroupsConfig(StrictModel):
    """zeroplan's: which parameters take weight decay and what happens to a parameter without a
    gradient. DeepSpeed has no keys for either (its `model_parameters` argument carries groups,
    which `zeroplan.initialize` takes too); the ds_config.json export leaves them out."""

    no_decay: NoDecay = ()
    """Parameters stepped with weight decay 0, in every group: `true` for Hugging Face Trainer's
    rule (HF_NO_DECAY: biases and norm weights), or a list of patterns, each a regular
    expression searched in the parameter's lowercased qualified name (`transformer.h.0.ln_1.bias`),
    or `type:<regex>` matched against the class names (and base classes) of the modules that
    contain it. The default, `[]`: every parameter takes its group's weight decay."""
    missing_grads: choice("skip", "zero") = "skip"
    """A parameter that got no gradient in an optimizer step, on any dp rank: `skip` leaves it
    and its optimizer state as they are and does not count the step for it, as torch.optim does
    for a `.grad` of None; `zero` steps it with a zero gradient, as DeepSpeed's ZeRO optimizers
    do (weight decay and momentum then still move it)."""


SCHEDULER_DEFAULTS: dict[str, dict[str, object]] = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000,
                 "warmup_type": "log", "last_batch_iteration": -1},
    "WarmupDecayLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000,
                      "warmup_type": "log", "total_num_steps": None, "last_batch_iteration": -1},
    "WarmupCosineLR": {"total_num_steps": None, "warmup_min_ratio": 0.0, "warmup_num_steps": 1000,
                       "cos_min_ratio": 0.0001, "warmup_type": "log", "last_batch_iteration": -1},
    "OneCycle": {"cycle_min_lr": None, "cycle_max_lr": None, "decay_lr_rate": 0.0,
                 "cycle_first_step_size": 2000, "cycle_second_step_size": None,
                 "cycle_first_stair_count": 0, "cycle_second_stair_count": None,
                 "decay_step_size": 0, "cycle_momentum": True, "cycle_min_mom": 0.8,
                 "cycle_max_mom": 0.9, "decay_mom_rate": 0.0, "last_batch_iteration": -1},
}
"""DeepSpeed's defaults per scheduler (deepspeed/runtime/lr_schedules.py); None = required."""

_REQUIRED = {name: sorted(k for k, v in d.items() if v is None and not k.startswith("cycle_second"))
             for name, d in SCHEDULER_DEFAULTS.items()}


class SchedulerParams(StrictModel):
    warmup_min_lr: real(ge=0, auto=True) | None = None
    """Learning rate at step 0 of warm-up."""
    warmup_max_lr: real(ge=0, auto=True) | None = None
    """Learning rate at the end of warm-up."""
    warmup_num_steps: count(ge=0, auto=True) | None = None
    """Warm-up length in optimizer steps."""
    warmup_type: choice("log", "linear") | None = None
    """Shape of the warm-up ramp."""
    total_num_steps: count(ge=1, auto=True) | None = None
    """Optimizer steps of the whole run (decay schedules)."""
    warmup_min_ratio: real(ge=0, le=1) | None = None
    """WarmupCosineLR: warm-up starts at this fraction of the optimizer's lr."""
    cos_min_ratio: real(ge=0, le=1) | None = None
    """WarmupCosineLR: the cosine decay ends at this fraction of the optimizer's lr."""
    cycle_min_lr: real(ge=0) | None = None
    """OneCycle: learning rate at the start and end of the cycle."""
    cycle_max_lr: real(ge=0) | None = None
    """OneCycle: learning rate at the peak of the cycle."""
    decay_lr_rate: real(ge=0) | None = None
    """OneCycle: after the cycle, the learning rate decays from cycle_min_lr by this rate per decay_step_size steps."""
    cycle_first_step_size: count(ge=1) | None = None
    """OneCycle: optimizer steps of the rising half of the cycle."""
    cycle_second_step_size: count(ge=1) | None = None
    """OneCycle: optimizer steps of the falling half; None means cycle_first_step_size."""
    cycle_first_stair_count: count(ge=0) | None = None
    """OneCycle: stairs in the rising half (0 is a smooth ramp)."""
    cycle_second_stair_count: count(ge=0) | None = None
    """OneCycle: stairs in the falling half (0 is a smooth ramp); None means cycle_first_stair_count."""
    decay_step_size: count(ge=0) | None = None
    """OneCycle: optimizer steps between decays after the cycle (0 never decays)."""
    cycle_momentum: AutoFlag | None = None
    """OneCycle: cycle momentum (beta1) against the learning rate."""
    cycle_min_mom: real(ge=0, le=1) | None = None
    """OneCycle: momentum at the peak of the learning rate."""
    cycle_max_mom: real(ge=0, le=1) | None = None
    """OneCycle: momentum at the start and end of the cycle."""
    decay_mom_rate: real(ge=0) | None = None
    """OneCycle: after the cycle, momentum grows from cycle_max_mom by this rate per decay_step_size steps."""
    last_batch_iteration: count(ge=-1) | None = None
    """Resume point as DeepSpeed counts it; -1 starts fresh."""


class SchedulerConfig(StrictModel):
    type: choice(*SCHEDULERS)
    """WarmupLR, WarmupDecayLR, WarmupCosineLR or OneCycle."""
    params: SchedulerParams = SchedulerParams()
    """The scheduler's parameters; each type takes only its own (DeepSpeed's `scheduler.params`)."""

    @model_validator(mode="after")
    def _rules(self) -> "SchedulerConfig":
        allowed = SCHEDULER_DEFAULTS[self.type]
        given = self.params.given()
        problems = [
            Problem(f"params.{key}", f"is not a parameter of {self.type}", given=getattr(self.params, key),
                    suggestion=f"{self.type} takes {', '.join(allowed)}")
            for key in sorted(given - set(allowed))
        ]
        problems += [
            Problem(f"params.{key}", f"is required by {self.type}",
                    suggestion=f"give it, or 'auto' to have it derived" if key == "total_num_steps" else "give it")
            for key in _REQUIRED[self.type] if getattr(self.params, key) is None
        ]
        raise_problems(problems)
        return self

    def resolved_params(self) -> dict[str, object]:
        """DeepSpeed's defaults for this type, overlaid with what the user gave."""
        out = dict(SCHEDULER_DEFAULTS[self.type])
        out.update({k: getattr(self.params, k) for k in self.params.given()})
        return out
