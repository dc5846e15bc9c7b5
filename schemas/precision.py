"""`fp16` and `bf16` blocks, with DeepSpeed's key names and defaults."""

from pydantic import model_validator

from .errors import Problem, raise_problems
from .types import AutoFlag, Flag, StrictModel, count, real


class Fp16Config(StrictModel):
    """fp16 mixed precision with dynamic loss scaling (DeepSpeed semantics)."""

    enabled: AutoFlag = False
    """Train in fp16; "auto" lets compile decide (Hugging Face configs write this)."""
    auto_cast: Flag = False
    """Cast inputs of the model's forward to fp16."""
    loss_scale: real(ge=0) = 0.0
    """Static loss scale; 0 means dynamic loss scaling."""
    initial_scale_power: count(ge=0, le=64) = 16
    """Dynamic scaling starts at 2**initial_scale_power."""
    loss_scale_window: count(ge=0) = 1000
    """Steps without overflow before the dynamic scale doubles."""
    hysteresis: count(ge=1) = 2
    """Overflows tolerated before the scale is halved."""
    consecutive_hysteresis: Flag = False
    """Refill hysteresis after each step without overflow."""
    min_loss_scale: real(gt=0) = 1.0
    """The dynamic scale never drops below this."""
    fp16_master_weights_and_grads: Flag = False
    """DeepSpeed's fp16 master weights and gradients (ZeRO stages 1-3); zeroplan keeps fp32
    masters, so true has no effect here (a notice) beyond DeepSpeed's stage rule."""

    @property
    def dynamic(self) -> bool:
        return self.loss_scale == 0

    @model_validator(mode="after")
    def _rules(self) -> "Fp16Config":
        problems = []
        if self.enabled is True and self.dynamic and self.loss_scale_window == 0:
            problems.append(Problem(
                "loss_scale_window", "must be > 0 with dynamic loss scaling (loss_scale 0)",
                given=0, suggestion="set loss_scale_window (DeepSpeed's default is 1000) or a static loss_scale"))
        raise_problems(problems)
        return self


class Bf16Config(StrictModel):
    """bf16 mixed precision: bf16 parameters and activations, fp32 master weights."""

    enabled: AutoFlag = False
    """Train in bf16; "auto" lets compile decide."""
    immediate_grad_update: Flag = False
    """Accepted for compatibility with DeepSpeed 0.15+; zeroplan always accumulates in fp32."""

