"""`zeroplan validate` and `zeroplan schema`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from zeroplan.schemas import ConfigError, derive_degrees, load_config, resolve_batch, train_config_schema
from zeroplan.schemas.atomic import atomic_write_text
from zeroplan.schemas.types import is_auto

from .common import user_errors

ConfigArg = Annotated[Path, typer.Argument(help="Config file, JSON or YAML (DeepSpeed key names).",
                                           show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a key: dotted.key=value (value read as YAML). Repeatable; later wins.")]


@user_errors
def validate(
    config: ConfigArg,
    world_size: Annotated[Optional[int], typer.Option(
        "--world-size", min=1, help="Check the batch triple and degrees for this many processes.")] = None,
    set_: SetOpt = None,
) -> None:
    """Check a config; print it resolved (defaults filled) or every problem (exit 2)."""
    cfg = load_config(config, overrides=set_ or (), world_size=world_size)
    resolved = cfg.model_dump(mode="json", exclude_none=True, exclude={"json_schema"})
    if world_size is not None:
        resolved["_resolved"] = _resolve_for_world(cfg, world_size)
    typer.echo(json.dumps(resolved, indent=2))


def _resolve_for_world(cfg, world_size: int) -> dict:
    dp, tp, pp = derive_degrees(cfg.parallel, cfg.tensor_parallel.autotp_size, world_size=world_size)
    out: dict = {"world_size": world_size, "dp": dp, "tp": tp, "pp": pp}
    triple = (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps)
    if any(is_auto(v) for v in triple):
        out["batch"] = "auto (decided by `zeroplan compile --resolve-auto` or `zeroplan autotune`)"
    else:
        out["batch"] = resolve_batch(*triple, dp=dp).model_dump(mode="json")
    return out


@user_errors
def schema(
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write to this file.")] = None,
) -> None:
    """Print the JSON Schema of the config, for editor completion and checking."""
    text = json.dumps(train_config_schema(), indent=2)
    if output is None:
        typer.echo(text)
        return
    try:
        atomic_write_text(output, text + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write {output}: {e.strerror}") from e

