"""A stand-in trainer for tuner tests: a real child process whose behaviour follows the plan.

It lets the tests inject a crash, a hang and a NaN for chosen ZeRO stages without depending
on the speed of real training. The end-to-end test uses the real `zeroplan train`.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

FAKE_TRAINER = textwrap.dedent('''
    import json, os, sys, time
    plan = json.load(open(sys.argv[1]))
    steps = int(sys.argv[2])
    behaviour = json.loads(os.environ["FAKE_BEHAVIOUR"]).get(str(plan["zero"]["stage"]), "ok")
    out = open(sys.argv[3], "a")
    micro = plan["batch"]["micro_batch_size"]
    for step in range(1, steps + 1):
        if behaviour == "crash" and step == 1:
            sys.exit("RuntimeError: injected crash")
        if behaviour == "hang" and step == 1:
            time.sleep(600)
        loss = float("nan") if behaviour == "nan" and step == 2 else 2.0 - 0.1 * step
        step_time = 0.5 / micro + 0.01 * plan["zero"]["stage"]
        out.write(json.dumps({"step": step, "step_time_s": step_time, "loss": loss,
                              "samples_per_s": plan["batch"]["global_batch_size"] / step_time,
                              "peak_rss_bytes": 1000 * micro}) + "\\n")
        out.flush()
    out.write(json.dumps({"summary": True, "peak_rss_bytes_per_rank": [1000 * micro, 1001 * micro]}) + "\\n")
''')


@pytest.fixture
def fake_launcher(tmp_path_factory, monkeypatch):
    """launcher(behaviour by stage) -> a Launcher running the stand-in trainer."""
    script = tmp_path_factory.mktemp("fake") / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)

    def make(behaviour: dict[int, str] | None = None):
        monkeypatch.setenv("FAKE_BEHAVIOUR", json.dumps({str(k): v for k, v in (behaviour or {}).items()}))
        return lambda plan, steps, metrics: [sys.executable, str(script), str(plan), str(steps), str(metrics)]

    return make


def tiny_config(**extra) -> dict:
    data = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto",
            "zero_optimization": {"stage": "auto"},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    data.update(extra)
    return data


def trial_dirs(out: Path) -> list[str]:
    """The trials' folders under `out` (trials/<study>/trial-NNNN), as "<study>/trial-NNNN"."""
    return sorted(f"{p.parent.name}/{p.name}" for p in (out / "trials").glob("*/trial-*"))
