"""A plan whose `kernels.optimizer` is cpu_adam trains with the native kernel and matches
the same plan on torch's fused AdamW (one process, no launcher)."""

from __future__ import annotations

import torch
from rt_plans import make_plan

import zeroplan
from zeroplan.runtime.models import GPT, MarkovChainData
from zeroplan.schemas import MODEL_PRESETS
from zeroplan.schemas.plan import KernelsPlan


def _train(kernel: str, steps: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    spec = MODEL_PRESETS["tiny"]
    plan = make_plan(stage=1, world=1, micro=2).model_copy(update={"kernels": KernelsPlan(optimizer=kernel)})
    engine = zeroplan.initialize(GPT(spec), plan=plan)
    assert type(engine.optimizer.optimizer).__name__ == ("KernelAdam" if kernel == "cpu_adam" else "TorchAdam")
    data = MarkovChainData(vocab=spec.vocab, seq_len=32, seed=0).iterate(
        global_batch_size=2, micro_batch_size=2, dp=1, dp_rank=0)
    try:
        for _ in range(steps):
            engine.train_batch(data)
        return engine.full_state_dict()
    finally:
        engine.close()


def test_cpu_adam_plan_matches_torch_fused(cpu_adam_ext, one_thread):
    native, reference = _train("cpu_adam"), _train("torch_fused")
    for name, value in reference.items():
        torch.testing.assert_close(native[name], value, rtol=1e-6, atol=1e-6, msg=name)
