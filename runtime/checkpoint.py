"""Sharded checkpoints: each rank writes its shard, rank 0 the metadata, all atomically.

Layout of `DIR`:
    DIR/latest                      the last complete tag (text)
    DIR/TAG/meta.json               rank 0: format, stage, world size, parameter slots, counters
    DIR/TAG/rank00000.safetensors   per rank: master shard, optimizer state, buffers
    DIR/TAG/rank00000.state.pt      per rank: scheduler, loss scaler, RNG, client state

Tensors go through safetensors; the small state file is read back with
`torch.load(weights_only=True)`, so loading never unpickles arbitrary objects.

Saving is crash-safe:
  1. rank 0 empties DIR/.TAG.staging; barrier;
  2. every rank writes its files there (temp file, fsync, rename); barrier;
  3. rank 0 writes meta.json, renames any existing DIR/TAG to DIR/.TAG.old, renames the staging
     directory to DIR/TAG, removes the old one, then rewrites `latest` (temp, fsync, rename);
     barrier.
A crash before step 3 leaves `latest` and the tag it names untouched; a crash inside step 3
leaves either DIR/TAG or DIR/.TAG.old complete, and `load` falls back to the latter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    _atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp))


def write_state(path: Path, state: dict) -> None:
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)
    _atomic_write(path, write)


def save(*, directory: str | Path, tag: str, rank: int, tensors: dict[str, torch.Tensor], state: dict,
         meta: dict, barrier: Callable[[], None]) -> Path:
    """Write this rank's part of checkpoint `tag` (a collective: every rank calls it)."""
    directory = Path(directory)
    staging, final, old = directory / f".{tag}.staging", directory / tag, directory / f".{tag}.old"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()
    write_tensors(staging / f"rank{rank:05d}.safetensors", tensors)
    write_state(staging / f"rank{rank:05d}.state.pt", state)
    barrier()
    if rank == 0:
        write_text(staging / "meta.json", json.dumps({"format": FORMAT, **meta}, indent=1))
        _fsync_dir(staging)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
        write_text(directory / "latest", tag + "\n")
        _fsync_dir(directory)
    barrier()
    return final


def resolve(directory: str | Path, tag: str | None) -> Path:
    """The complete checkpoint directory for `tag` (default: the one `latest` names)."""
    directory = Path(directory)
    if tag is None:
        latest = directory / "latest"
        if not latest.is_file():
            raise CheckpointError(f"no checkpoint in {directory}: {latest} is missing; pass tag= or save first")
        tag = latest.read_text().strip()
    for candidate in (directory / tag, directory / f".{tag}.old"):
        if (candidate / "meta.json").is_file():
            return candidate
    raise CheckpointError(f"checkpoint {tag!r} in {directory} is missing or incomplete (no meta.json)")


def load(*, path: Path, rank: int) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(meta, tensors, state) of this rank from a resolved checkpoint directory."""
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
    tensor_file, state_file = path / f"rank{rank:05d}.safetensors", path / f"rank{rank:05d}.state.pt"
    if not tensor_file.is_file() or not state_file.is_file():
        raise CheckpointError(f"{path} has no files for rank {rank}; it was saved by {meta.get('world_size')} ranks")
    tensors = load_file(str(tensor_file))
    state = torch.load(state_file, weights_only=True)
    return meta, tensors, state
