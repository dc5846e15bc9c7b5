"""`zero_optimization` block: ZeRO stage, buckets and offload, with DeepSpeed's keys.

Bucket sizes and thresholds count elements, not bytes, as in DeepSpeed. Defaults are
DeepSpeed's (deepspeed/runtime/zero/config.py), so a config that omits a key behaves as it
would there.

DeepSpeed's pydantic model names six of these fields without the `stage3_` prefix and takes
the prefixed spelling as an alias, so real configs use both (`max_live_parameters` in axolotl's,
`stage3_max_live_parameters` in Hugging Face's). zeroplan's fields carry the prefixed name;
`DEEPSPEED_FIELD_NAMES` lists the other spelling, which the loader reads as the same key.
"""

from pydantic import model_validator

from .errors import Problem, raise_problems
from .types import AutoFlag, AutoSize, Flag, Positive, Size, StrictModel, choice, count, real

OFFLOAD_DEVICES = ("none", "cpu", "nvme")

DEEPSPEED_FIELD_NAMES = {
    "prefetch_bucket_size": "stage3_prefetch_bucket_size",
    "param_persistence_threshold": "stage3_param_persistence_threshold",
    "model_persistence_threshold": "stage3_model_persistence_threshold",
    "max_live_parameters": "stage3_max_live_parameters",
    "max_reuse_distance": "stage3_max_reuse_distance",
    "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
}
"""DeepSpeed's field name -> zeroplan's field (DeepSpeed's alias): two spellings of one key."""


class OffloadOptimizerConfig(StrictModel):
    device: choice(*OFFLOAD_DEVICES, auto=True) = "none"
    """Where the fp32 master weights and optimizer states live: none (the accelerator),
    cpu (host memory) or nvme (files under nvme_path); "auto" lets the tuner choose."""
    nvme_path: str | None = None
    """Directory for swap files; required with device nvme."""
    pin_memory: Flag = False
    """Page-lock host buffers (faster host<->device copies, only with CUDA)."""
    buffer_count: Positive = 4
    """Swap buffers for NVMe double buffering."""
    buffer_size: Positive = 100_000_000
    """Elements per swap buffer."""
    pipeline_read: Flag = False
    """Overlap NVMe reads with the optimizer step (DeepSpeed key)."""
    pipeline_write: Flag = False
    """Overlap NVMe writes with the optimizer step (DeepSpeed key)."""
    fast_init: Flag = False
    """DeepSpeed's fast NVMe initialisation; recorded, no effect on numerics."""
    ratio: real(ge=0, le=1) = 1.0
    """Fraction of the optimizer step offloaded (ZeRO-3 partial offload); < 1 only at stage 3."""


class OffloadParamConfig(StrictModel):
    device: choice(*OFFLOAD_DEVICES, auto=True) = "none"
    """Where ZeRO-3 parameter partitions live between uses; only at stage 3."""
    nvme_path: str | None = None
    """Directory for swap files; required with device nvme."""
    pin_memory: Flag = False
    """Page-lock host buffers."""
    buffer_count: Positive = 5
    """Swap buffers for parameters."""
    buffer_size: Positive = 100_000_000
    """Elements per swap buffer."""
    max_in_cpu: Size = 1_000_000_000
    """Elements of parameters kept in host memory when swapping to NVMe."""


class ZeroConfig(StrictModel):
    stage: count(ge=0, le=3, auto=True) = 0
    """0: plain data parallel; 1: shard optimizer states; 2: also gradients; 3: also parameters."""
    contiguous_gradients: Flag = True
    """Copy gradients into one contiguous buffer as they are produced."""
    overlap_comm: AutoFlag = False
    """Let every gradient bucket's collective run during backward, a buffer each; false keeps one
    bucket in flight at a time, in one buffer (DeepSpeed's memory without it; runtime/zero/comm.py)."""
    reduce_scatter: Flag = True
    """Reduce gradients with reduce-scatter (True) or all-reduce (False)."""
    reduce_bucket_size: count(ge=1, auto=True) = 500_000_000
    """Elements per gradient reduction bucket; at least 1, as DeepSpeed requires (gt=0);
    "auto": hidden^2 of the model, Hugging Face's rule."""
    allgather_partitions: Flag = True
    """All-gather updated partitions (True) or broadcast them (False)."""
    allgather_bucket_size: AutoSize = 500_000_000
    """Elements per all-gather bucket of updated parameters (stages 1-2)."""
    round_robin_gradients: Flag = False
    """Stage 1-2: copy gradients to CPU round-robin over ranks (DeepSpeed offload optimisation)."""
    sub_group_size: Size = 1_000_000_000
    """Elements per optimizer-step tile (the NVMe swap unit). 0 is DeepSpeed's smallest
    setting: its ZeRO-3 closes a sub-group after every parameter (`_create_fp16_sub_groups`
    adds parameters until the group holds >= sub_group_size elements), so each parameter's
    partition is stepped and swapped alone; zeroplan's tiles are element ranges, so compile
    reads 0 as tiles of the largest parameter's per-rank partition, the same peak buffer."""
    load_from_fp32_weights: Flag = True
    """Restore fp32 master weights from the checkpoint rather than from 16-bit parameters."""
    ignore_unused_parameters: Flag = True
    """Stage 2-3: tolerate parameters that receive no gradient."""
    elastic_checkpoint: Flag = False
    """Accepted for compatibility; zeroplan checkpoints are resharded on load."""
    offload_optimizer: OffloadOptimizerConfig = OffloadOptimizerConfig()
    """Where optimizer states (and their step) live: the device, host memory or NVMe."""
    offload_param: OffloadParamConfig = OffloadParamConfig()
    """Stage 3: where parameters live between uses: the device, host memory or NVMe."""
    stage3_prefetch_bucket_size: AutoSize = 50_000_000
    """Stage 3: elements of parameters fetched ahead of use (also `prefetch_bucket_size`);
    "auto": 0.9 * hidden^2, Hugging Face's rule."""
    stage3_param_persistence_threshold: AutoSize = 100_000
    """Stage 3: parameters with fewer elements stay whole on every rank (also
    `param_persistence_threshold`); "auto": 10 * hidden, Hugging Face's rule."""
    stage3_model_persistence_threshold: Size = 2**63 - 1
    """Stage 3: cap on the elements kept whole by the persistence threshold (also
    `model_persistence_threshold`)."""
    stage3_max_live_parameters: Size = 1_000_000_000
    """Stage 3: elements of gathered parameters resident at once (also `max_live_parameters`)."""
    stage3_max_reuse_distance: Size = 1_000_000_000
    """Stage 3: keep a gathered parameter if it is reused within this many elements (also
    `max_reuse_distance`)."""
    stage3_gather_16bit_weights_on_model_save: AutoFlag = False
    """Stage 3: consolidate 16-bit weights when saving the model (also
    `gather_16bit_weights_on_model_save`); "auto" (Accelerate fills it from
    zero3_save_16bit_model): false, its default and DeepSpeed's."""

    @model_validator(mode="after")
    def _rules(self) -> "ZeroConfig":
        raise_problems(self._offload_problems())
        return self

    def _offload_problems(self) -> list[Problem]:
        problems = []
        stage = self.stage
        at_stage3 = stage == 3 or not isinstance(stage, int)  # "auto" may resolve to 3
        for block in ("offload_optimizer", "offload_param"):
            cfg = getattr(self, block)
            if cfg.device == "nvme" and not cfg.nvme_path:
                problems.append(Problem(f"{block}.nvme_path", "is required with device 'nvme'",
                                        suggestion=f"set {block}.nvme_path to a directory on a local NVMe disk"))
        if self.offload_param.device in ("cpu", "nvme") and not at_stage3:
            problems.append(Problem(
                "offload_param.device", f"parameter offload needs stage 3, but stage is {stage}",
                given=self.offload_param.device,
                suggestion="set zero_optimization.stage to 3 or offload_param.device to 'none'"))
        if self.offload_optimizer.device in ("cpu", "nvme") and stage == 0:
            problems.append(Problem(
                "offload_optimizer.device", "optimizer offload needs a ZeRO stage >= 1, but stage is 0",
                given=self.offload_optimizer.device,
                suggestion="set zero_optimization.stage to 1, 2 or 3, or offload_optimizer.device to 'none'"))
        if self.offload_optimizer.ratio < 1 and not at_stage3:
            problems.append(Problem(
                "offload_optimizer.ratio", f"partial offload (ratio < 1) needs stage 3, but stage is {stage}",
                given=self.offload_optimizer.ratio,
                suggestion="set zero_optimization.stage to 3 or remove offload_optimizer.ratio"))
        return problems

    def stage3_keys_given(self) -> list[str]:
        """stage3_* keys the user wrote (they have no effect below stage 3)."""
        return sorted(k for k in self.given() if k.startswith("stage3_"))
