"""The training runtime: Engine, ZeRO stages 0-3, buckets, precision, checkpoints.

    engine = zeroplan.initialize(model, plan="plan.json")
    for batch in data:
        loss = engine(**batch); engine.backward(loss); engine.step()
"""

from .engine import Engine
from .initialize import PLAN_ENV, initialize

__all__ = ["Engine", "PLAN_ENV", "initialize"]
