"""`initialize(model, config=...)` compiles the config in-process (one process, no launcher)."""

from __future__ import annotations

import pytest
import torch

import zeroplan
from zeroplan.runtime.models import GPT, MarkovChainData
from zeroplan.schemas import MODEL_PRESETS, ConfigError

CONFIG = {"train_batch_size": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def test_config_is_compiled_for_the_builtin_model(one_thread):
    torch.manual_seed(0)
    spec = MODEL_PRESETS["tiny"]
    engine = zeroplan.initialize(GPT(spec), config=CONFIG)
    try:
        assert engine.plan.zero.stage == 2 and engine.plan.batch.micro_batch_size == 2
        assert engine.plan.world.world_size == 1 and engine.plan.estimates.memory_per_rank
        data = MarkovChainData(vocab=spec.vocab, seq_len=32, seed=0).iterate(
            global_batch_size=2, micro_batch_size=2, dp=1, dp_rank=0)
        losses = [float(engine.train_batch(data)) for _ in range(3)]
        assert losses[-1] < losses[0]
    finally:
        engine.close()


def test_a_foreign_model_gets_a_measured_shape_and_auto_is_refused(one_thread):
    engine = zeroplan.initialize(torch.nn.Linear(4, 4), config=CONFIG)
    try:
        assert engine.plan.provenance.model_source.startswith("measured from its module tree")
        assert any("approximate" in w for w in engine.plan.estimates.warnings)
    finally:
        engine.close()
    with pytest.raises(ConfigError, match="zeroplan autotune"):
        zeroplan.initialize(GPT(MODEL_PRESETS["tiny"]), config={**CONFIG, "zero_optimization": {"stage": "auto"}})
    with pytest.raises(ConfigError, match="not both"):
        zeroplan.initialize(GPT(MODEL_PRESETS["tiny"]), config=CONFIG, plan="plan.json")
