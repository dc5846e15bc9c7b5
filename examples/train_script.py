"""A DeepSpeed-style training script that `zeroplan train` runs and `zeroplan autotune` tunes.

    zeroplan autotune examples/autotune_user.yaml --script examples/train_script.py --out out/script -- --steps 200
    zeroplan train out/script/best_plan.json -- examples/train_script.py --steps 200

Nothing in it is about tuning: `zeroplan.initialize(model)` reads the plan from
$ZEROPLAN_PLAN. Under `zeroplan autotune` a first run only measures the model (the first
forward ends it), and each trial's engine reports its steps to the tuner and ends the run
after the trial's step count (`engine.step()` raises zeroplan.TrialComplete, a SystemExit with
status 0), so the loop below never has to know.
"""

from __future__ import annotations

import argparse

import torch.distributed as dist

import zeroplan
from user_model import build  # examples/user_model.py, beside this script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    args = p.parse_args()
    model, get_batch = build()
    engine = zeroplan.initialize(model)
    micro, accumulation = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    for index in range(args.steps * accumulation):
        loss = engine(**get_batch(micro, index))
        engine.backward(loss)
        engine.step()
        if dist.get_rank() == 0 and (index + 1) % (50 * accumulation) == 0:
            print(f"step {engine.global_steps} loss {loss.item():.4f}", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
