"""Learning-rate schedules with DeepSpeed's names, parameters and formulas
(deepspeed/runtime/lr_schedules.py): WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle.

Stepping follows DeepSpeed's engine: a schedule starts at `last_batch_iteration` (-1 when
fresh), the optimizer step uses the current rate, and `step()` advances the iteration after
each optimizer step that was taken (an fp16 overflow skips both). So with log warm-up the
first steps run at warmup_min_lr: log(1) = 0 at iteration 0, as in DeepSpeed.
"""

from __future__ import annotations

import math

from zeroplan.schemas.plan import OptimizerPlan, SchedulerPlan


class Schedule:
    """Constant learning rate (no scheduler in the plan); base of the schedules."""

    def __init__(self, *, base_lr: float, last_batch_iteration: int = -1):
        self.base_lr = base_lr
        self.last_batch_iteration = last_batch_iteration

    def lr(self) -> float:
        return self.base_lr

    def beta1(self) -> float | None:
        """Adam's beta1 when the schedule cycles momentum (OneCycle), else None."""
        return None

    def step(self) -> None:
        self.last_batch_iteration += 1

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.last_batch_iteration = int(state["last_batch_iteration"])


def _warmup_gamma(it: int, *, num_steps: int, kind: str) -> float:
    """Warm-up progress in [0, 1): log (log(it+1)/log(n)) or linear (it/n)."""
    if kind == "log":
        return math.log(it + 1) / math.log(num_steps)
    return it / num_steps


class WarmupLR(Schedule):
    def __init__(self, *, warmup_min_lr: float, warmup_max_lr: float, warmup_num_steps: int, warmup_type: str,
                 last_batch_iteration: int = -1, **_unused):
        super().__init__(base_lr=warmup_max_lr, last_batch_iteration=last_batch_iteration)
        self.min_lr, self.max_lr = warmup_min_lr, warmup_max_lr
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = warmup_type

    def gamma(self) -> float:
        it = self.last_batch_iteration
        if it < self.warmup_num_steps:
            return _warmup_gamma(it, num_steps=self.warmup_num_steps, kind=self.warmup_type)
        return 1.0

    def lr(self) -> float:
        if self.last_batch_iteration < 0:
            return self.min_lr
        return self.min_lr + (self.max_lr - self.min_lr) * self.gamma()


class WarmupDecayLR(WarmupLR):
    def __init__(self, *, total_num_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.total_num_steps = total_num_steps

    def gamma(self) -> float:
        it = self.last_batch_iteration
        if it < self.warmup_num_steps:
            return _warmup_gamma(it, num_steps=self.warmup_num_steps, kind=self.warmup_type)
        return max(0.0, (self.total_num_steps - it) / max(1.0, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(Schedule):
    """The optimizer's lr times a ratio: warm-up from warmup_min_ratio to 1, cosine to cos_min_ratio."""

    def __init__(self, *, base_lr: float, total_num_steps: int, warmup_min_ratio: float, warmup_num_steps: int,
                 cos_min_ratio: float, warmup_type: str, last_batch_iteration: int = -1, **_unused):
        super().__init__(base_lr=base_lr, last_batch_iteration=last_batch_iteration)
        self.total_num_steps = total_num_steps
        self.warmup_min_ratio, self.cos_min_ratio = warmup_min_ratio, cos_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = warmup_type

    def ratio(self) -> float:
        it = self.last_batch_iteration
        if it < 0:
            return 0.0
        if it < self.warmup_num_steps:
            r = _warmup_gamma(it, num_steps=self.warmup_num_steps, kind=self.warmup_type)
            return self.warmup_min_ratio + r * (1.0 - self.warmup_min_ratio)
        progress = min(1.0, (it - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        cosine = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def lr(self) -> float:
        return self.base_lr * self.ratio()


class OneCycle(Schedule):
    """Smith's 1cycle (arXiv:1803.09820) as DeepSpeed implements it, with optional staircase."""

    def __init__(self, *, cycle_min_lr: float, cycle_max_lr: float, decay_lr_rate: float,
                 cycle_first_step_size: int, cycle_second_step_size: int | None, cycle_first_stair_count: int,
                 cycle_second_stair_count: int | None, decay_step_size: int, cycle_momentum: bool,
                 cycle_min_mom: float, cycle_max_mom: float, decay_mom_rate: float, last_batch_iteration: int = -1,
                 has_betas: bool = True, **_unused):
        super().__init__(base_lr=cycle_min_lr, last_batch_iteration=last_batch_iteration)
        self.first = float(cycle_first_step_size)
        self.second = float(cycle_second_step_size) if cycle_second_step_size is not None else self.first
        self.total = self.first + self.second
        self.step_ratio = self.first / self.total
        self.first_stairs = cycle_first_stair_count
        self.second_stairs = cycle_first_stair_count if cycle_second_stair_count is None else cycle_second_stair_count
        self.decay_step_size = decay_step_size
        self.min_lr, self.max_lr, self.decay_lr_rate = cycle_min_lr, cycle_max_lr, decay_lr_rate
        self.cycle_momentum = bool(cycle_momentum) and has_betas
        self.min_mom, self.max_mom, self.decay_mom_rate = cycle_min_mom, cycle_max_mom, decay_mom_rate
        self.skip_lr_decay = math.isclose(decay_step_size, 0) or math.isclose(decay_lr_rate, 0)
        self.skip_mom_decay = math.isclose(decay_step_size, 0) or math.isclose(decay_mom_rate, 0)

    def _scale(self) -> float:
        it = self.last_batch_iteration + 1
        cycle = math.floor(1 + it / self.total)
        x = 1.0 + it / self.total - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stairs
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stairs
        if stairs > 0:
            pos = it % self.total
            if pos <= self.first:
                position = pos * stairs / self.first
            else:
                position = (self.total - pos) * stairs / self.second
            scale = math.floor(position) / stairs
        return scale

    def lr(self) -> float:
        if self.last_batch_iteration < self.total:
            return self.min_lr + (self.max_lr - self.min_lr) * self._scale()
        if self.skip_lr_decay:
            return self.min_lr
        interval = (self.last_batch_iteration - self.total + 1) / self.decay_step_size
        return self.min_lr / (1 + self.decay_lr_rate * interval)

    def beta1(self) -> float | None:
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < 0:
            return self.min_mom
        if self.last_batch_iteration < self.total:
            return self.max_mom - (self.max_mom - self.min_mom) * self._scale()
        if self.skip_mom_decay:
            return self.max_mom
        interval = (self.last_batch_iteration - self.total + 1) / self.decay_step_size
        return self.max_mom * (1 + self.decay_mom_rate * interval)


SCHEDULES = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR,
             "OneCycle": OneCycle}


def build_schedule(*, scheduler: SchedulerPlan | None, optimizer: OptimizerPlan) -> Schedule:
    """The plan's schedule, or the optimizer's constant lr when the plan has none."""
    if scheduler is None:
        return Schedule(base_lr=optimizer.lr)
    params = dict(scheduler.params)
    missing = [k for k, v in params.items() if v is None and k not in ("cycle_second_step_size",
                                                                        "cycle_second_stair_count")]
    if missing:
        raise ValueError(f"scheduler {scheduler.type} has no value for {', '.join(missing)}; "
                         "recompile the plan so every parameter is concrete")
    if scheduler.type == "WarmupCosineLR":
        params["base_lr"] = optimizer.lr
    if scheduler.type == "OneCycle":
        params["has_betas"] = optimizer.type != "SGD"
    return SCHEDULES[scheduler.type](**params)
