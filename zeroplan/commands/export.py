"""`zeroplan export`: a sharded checkpoint of any layout as one safetensors file, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import user_errors


@user_errors
def export_checkpoint(
    checkpoint_dir: Annotated[Path, typer.Argument(help="The directory engine.save_checkpoint wrote into (it holds "
                                                   "`latest` and one directory per tag).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Directory for model.safetensors (and config.json for a "
                                      "Hugging Face model).")],
    tag: Annotated[Optional[str], typer.Option("--tag", help="The checkpoint's tag (default: the one `latest` "
                                               "names).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 (the master weights, exactly), bf16 or fp16.")] = "fp32",
) -> None:
    """Verify a checkpoint (every hash, rank and step) and write its whole model as safetensors, in one process."""
    from zeroplan.runtime.checkpoint_export import export_checkpoint as export  # imports torch: only this command

    typer.echo(f"wrote {export(directory=checkpoint_dir, tag=tag, out=out, dtype=dtype)}")
