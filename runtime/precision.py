"""Training dtypes and fp16 loss scaling.

`DynamicLossScaler` follows DeepSpeed's semantics exactly
(deepspeed/runtime/fp16/loss_scaler.py, `DynamicLossScaler.update_scale`), which come from
Micikevicius et al., "Mixed Precision Training", arXiv:1710.03740:
- the scale starts at 2**initial_scale_power;
- an overflow (inf/nan in any rank's gradients) skips the step on every rank; the scale is
  divided by 2 (not below `min_scale`) once `hysteresis` overflows have been absorbed: each
  overflow first spends one unit of hysteresis, and the one that finds a single unit left
  lowers the scale;
- after `window` consecutive steps without overflow the scale doubles (and the hysteresis is
  refilled; with `consecutive_hysteresis` it is refilled after every clean step);
- an overflow when the scale is already `min_scale` raises, as DeepSpeed does: training
  cannot make progress.
"""

from __future__ import annotations

import torch

from zeroplan.schemas.plan import LossScalePlan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LossScaleAtMinimum(RuntimeError):
    """fp16 gradients overflow at `min_loss_scale`: the step can never be taken."""


class NonFiniteError(RuntimeError):
    """fp32/bf16: the step's loss or gradient norm is inf or nan, and `precision.nonfinite` is
    "stop". Raised on every rank at once (the norm and the loss are agreed over the world):
    applying such a step would make every later loss nan too."""

    def __init__(self, *, step: int, what: str, value: float, local_loss: float | None):
        self.step, self.what, self.value, self.local_loss = step, what, value, local_loss
        own = "" if local_loss is None else f"; this rank's own loss was {local_loss:.6g}"
        super().__init__(f"{what} is {value} at step {step}{own} (set failures.nonfinite to 'skip' to skip "
                         "such steps instead, as fp16's loss scaler does)")


class LossScaler:
    """No scaling (fp32, bf16) or a static scale; overflow still skips the step."""

    def __init__(self, *, scale: float = 1.0, check_overflow: bool = False):
        self.cur_scale = float(scale)
        self.check_overflow = check_overflow

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        return None

    def state_dict(self) -> dict:
        return {"cur_scale": self.cur_scale}

    def load_state_dict(self, state: dict) -> None:
        self.cur_scale = float(state["cur_scale"])


class DynamicLossScaler(LossScaler):
    def __init__(self, *, init_scale: float, scale_window: int, min_scale: float, delayed_shift: int,
                 consecutive_hysteresis: bool, scale_factor: float = 2.0):
        super().__init__(scale=init_scale, check_overflow=True)
        self.scale_window, self.min_scale, self.scale_factor = scale_window, min_scale, scale_factor
        self.delayed_shift, self.cur_hysteresis = delayed_shift, delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis
        self.cur_iter = 0
        self.last_overflow_iter = -1

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale:
                    raise LossScaleAtMinimum(
                        f"fp16 gradients overflow at the minimum loss scale {self.min_scale}; lower the "
                        "learning rate, train in bf16, or lower fp16.min_loss_scale")
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict:
        return {"cur_scale": self.cur_scale, "cur_iter": self.cur_iter, "last_overflow_iter": self.last_overflow_iter,
                "cur_hysteresis": self.cur_hysteresis}

    def load_state_dict(self, state: dict) -> None:
        self.cur_scale = float(state["cur_scale"])
        self.cur_iter = int(state["cur_iter"])
        self.last_overflow_iter = int(state["last_overflow_iter"])
        self.cur_hysteresis = int(state["cur_hysteresis"])


def build_loss_scaler(*, loss_scaling: LossScalePlan, param_dtype: str) -> LossScaler:
    """DeepSpeed's fp16 scaler when the plan enables it; no scaling otherwise."""
    if param_dtype != "fp16" or not loss_scaling.enabled:
        return LossScaler(check_overflow=param_dtype == "fp16")
    if not loss_scaling.dynamic:
        return LossScaler(scale=loss_scaling.static_scale, check_overflow=True)
    return DynamicLossScaler(init_scale=2.0 ** loss_scaling.initial_scale_power, scale_window=loss_scaling.window,
                             min_scale=loss_scaling.min_scale, delayed_shift=loss_scaling.hysteresis,
                             consecutive_hysteresis=loss_scaling.consecutive_hysteresis)
