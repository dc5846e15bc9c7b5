"""`optimizer` and `scheduler` blocks, with DeepSpeed's type and parameter names.

Parameters left out (None) take the optimizer's or scheduler's own default when the plan
is compiled; the defaults are DeepSpeed's, listed in `SCHEDULER_DEFAULTS`. A parameter that
does not belong to the chosen type (`momentum` for Adam, `total_num_steps` for WarmupLR) is
an error rather than silently ignored.
"""

from typing import Annotated

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from .errors import Problem, raise_problems
from .types import AUTO, Auto, AutoFlag, Flag, StrictModel, is_auto_input, choice, count, real

OPTIMIZERS = ("Adam", "AdamW", "SGD")
SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle")

_ADAM_ONLY = {"betas", "eps", "adam_w_mode", "torch_adam"}
_SGD_ONLY = {"momentum", "dampening", "nesterov"}


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
    """Learning rate; None takes the optimizer's default (1e-3 for Adam/AdamW)."""
    betas: Betas | None = None
    """Adam's (beta1, beta2); default (0.9, 0.999)."""
    eps: real(gt=0, auto=True) | None = None
    """Adam's epsilon; default 1e-8."""
    weight_decay: real(ge=0, auto=True) | None = None
    """Weight decay; default 0 (DeepSpeed's Adam) or 0.01 (torch's AdamW)."""
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


class OptimizerConfig(StrictModel):
    type: choice(*OPTIMIZERS)
    """Adam, AdamW or SGD (any case)."""
    params: OptimizerParams = OptimizerParams()

    @model_validator(mode="after")
    def _rules(self) -> "OptimizerConfig":
        wrong = _SGD_ONLY if self.type != "SGD" else _ADAM_ONLY
        problems = [
            Problem(f"params.{key}", f"is not a parameter of {self.type}",
                    given=getattr(self.params, key),
                    suggestion=f"remove it; {self.type} takes {_allowed_params(self.type)}")
            for key in sorted(wrong & self.params.given())
        ]
        if self.type == "AdamW" and self.params.adam_w_mode is False:
            problems.append(Problem("params.adam_w_mode", "AdamW always decouples weight decay",
                                    given=False, suggestion="use type 'Adam' for L2 regularisation"))
        raise_problems(problems)
        return self


def _allowed_params(optimizer: str) -> str:
    wrong = _SGD_ONLY if optimizer != "SGD" else _ADAM_ONLY
    return ", ".join(k for k in OptimizerParams.model_fields if k not in wrong)


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
    cos_min_ratio: real(ge=0, le=1) | None = None
    cycle_min_lr: real(ge=0) | None = None
    cycle_max_lr: real(ge=0) | None = None
    decay_lr_rate: real(ge=0) | None = None
    cycle_first_step_size: count(ge=1) | None = None
    cycle_second_step_size: count(ge=1) | None = None
    cycle_first_stair_count: count(ge=0) | None = None
    cycle_second_stair_count: count(ge=0) | None = None
    decay_step_size: count(ge=0) | None = None
    cycle_momentum: AutoFlag | None = None
    cycle_min_mom: real(ge=0, le=1) | None = None
    cycle_max_mom: real(ge=0, le=1) | None = None
    decay_mom_rate: real(ge=0) | None = None
    last_batch_iteration: count(ge=-1) | None = None
    """Resume point as DeepSpeed counts it; -1 starts fresh."""


class SchedulerConfig(StrictModel):
    type: choice(*SCHEDULERS)
    """WarmupLR, WarmupDecayLR, WarmupCosineLR or OneCycle."""
    params: SchedulerParams = SchedulerParams()

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
