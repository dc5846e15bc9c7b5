"""Write a compiled plan's files into a directory, each atomically (temp file, fsync, rename).

- plan.json: the Plan (what `zeroplan train` reads);
- launch.sh: torchrun on one node (`--standalone`) or on several with c10d rendezvous;
- launch.sbatch: the Slurm variant (srun + torchrun per node);
- report.md: what was given, derived and predicted, for a person;
- ds_config.json: the equivalent DeepSpeed config.
JSON files are written from data with `json.dumps` so they are always valid JSON; the shell
scripts and the report come from the jinja2 templates in `templates/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2

from zeroplan.schemas import MODEL_PRESETS, ClusterSpec, ConfigError, ModelSpec, Plan, Problem, TrainConfig
from zeroplan.schemas.atomic import atomic_write_text

from .deepspeed import ds_config
from .placement import crossing_line
from .report import report_context

_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                          undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                          autoescape=False)
_ENV.filters["size"] = lambda n: _size(n)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _launch_context(plan: Plan, model: ModelSpec) -> dict[str, Any]:
    preset = model.name in MODEL_PRESETS and MODEL_PRESETS[model.name] == model
    return {"short_hash": plan.provenance.config_hash[:12] or "plan", "world_size": plan.world.world_size,
            "nnodes": plan.world.nnodes, "nproc": plan.world.nproc_per_node, "device": plan.world.device,
            "backend": plan.world.backend, "version": plan.provenance.zeroplan_version,
            "model_arg": f" --model {model.name}" if preset else "",
            "layout": f"node n runs ranks n x {plan.world.nproc_per_node} onwards; layout {', '.join(plan.layout.order)} "
                      f"(slowest first): {crossing_line(plan.layout)}"}


def render(plan: Plan, *, config: TrainConfig, model: ModelSpec, cluster: ClusterSpec,
           source: str = "config") -> dict[str, str]:
    """File name -> text of every emitted file."""
    launch = _launch_context(plan, model)
    return {
        "plan.json": plan.to_json() + "\n",
        "launch.sh": _ENV.get_template("launch.sh.j2").render(**launch),
        "launch.sbatch": _ENV.get_template("launch.sbatch.j2").render(**launch),
        "report.md": _ENV.get_template("report.md.j2").render(
            **report_context(plan, config=config, model=model, cluster=cluster, source=source)),
        "ds_config.json": json.dumps(ds_config(plan), indent=2) + "\n",
    }


def emit(plan: Plan, *, config: TrainConfig, model: ModelSpec, cluster: ClusterSpec, out: str | Path,
         source: str = "config") -> list[Path]:
    """Write every file into `out` (created if missing); ConfigError if it cannot be written."""
    out = Path(out)
    files = render(plan, config=config, model=model, cluster=cluster, source=source)
    try:
        out.mkdir(parents=True, exist_ok=True)
        return [atomic_write_text(out / name, text, mode=0o755 if name.startswith("launch") else 0o644)
                for name, text in files.items()]
    except OSError as e:
        raise ConfigError(Problem("", f"cannot write {e.filename or out}: {e.strerror}",
                                  suggestion="choose another --out directory"), source="--out") from e
