"""Sharded checkpoints: each rank writes its shard, hashed and signed with its identity; rank 0
seals the whole; every write is atomic, and every rank learns of any rank's failure.

Layout of `DIR`:
    DIR/latest                        the last complete tag (text; a tag of DIR, nothing else)
    DIR/TAG/meta.json                 rank 0: degrees, step, layouts, every manifest's sha256 (sealed)
    DIR/TAG/rank00000.safetensors     per rank: master shard, optimizer state, buffers
    DIR/TAG/rank00000.state.pt        per rank: scheduler, loss scaler, RNG, counters, client state
    DIR/TAG/rank00000.manifest.json   per rank, written last: who wrote it, the step, the sha256 of
                                      both files, each tensor's dtype and shape (sealed)
The records are checkpoint_records.py's. Tensors go through safetensors; the small state file is
read back with `torch.load(weights_only=True)`, so loading never unpickles arbitrary objects.

A tag is one path component of letters, digits, '.', '_' and '-', starting with a letter or
digit, not `latest`: it cannot name anything outside DIR, a staging directory or the `latest`
file. `latest` is read as a tag by the same rule.

Saving is crash-safe, and a failure on one rank is every rank's error (agree.py), never a hang:
  1. every rank checks the tag; rank 0 empties DIR/.TAG.staging; all agree;
  2. every rank writes its tensor and state files there, then its manifest (temp file, fsync,
     rename; the hashes are of the bytes on disk); all agree; rank 0 gathers the manifests'
     hashes and each (tp, pp) group's layout;
  3. rank 0 writes meta.json, renames any existing DIR/TAG to DIR/.TAG.old, renames the staging
     directory to DIR/TAG, removes the old one, then rewrites `latest` (temp, fsync, rename);
     all agree.
A crash before step 3 leaves `latest` and the tag it names untouched; a crash inside step 3
leaves either DIR/TAG or DIR/.TAG.old complete, and `resolve` falls back to the latter.
Loading (checkpoint_source.py, reshard.py) verifies what it reads against these records.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from zeroplan.schemas import ConfigError, Problem
from zeroplan.schemas.atomic import atomic_write

from .agree import Agreement, by_reason
from .checkpoint_records import FORMAT, FileRecord, GroupLayout, Identity, seal

TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A tag: one path component that cannot climb out of the directory or hide as a dot file."""
LATEST_MAX_BYTES = 4096


class CheckpointError(ConfigError):
    """A checkpoint is missing, damaged, incomplete or does not fit this run; each problem
    names the file (or the rank) and what differs."""


def file_name(rank: int, kind: str) -> str:
    """`rank00003.safetensors`, `.state.pt` or `.manifest.json`."""
    return f"rank{rank:05d}.{kind}"


# -- tags and `latest` ---------------------------------------------------------------------------
def check_tag(tag: object, *, where: str = "tag") -> str:
    """`tag` if it is a valid tag, else CheckpointError saying why."""
    why = None
    if not isinstance(tag, str) or not tag:
        why = "a tag must be a non-empty string"
    elif tag.casefold() == "latest":
        why = "'latest' is the name of the file that points at the last tag"
    elif ".." in tag or not TAG.fullmatch(tag):
        why = ("a tag is one path component: letters, digits, '.', '_' and '-', starting with a letter or digit, "
               "no '..', at most 128 characters")
    if why:
        raise CheckpointError(Problem(where, why, given=tag, suggestion="e.g. global_step100 (the default)"),
                              source="checkpoint tag")
    return tag


def resolve(directory: str | Path, tag: str | None) -> Path:
    """The complete checkpoint directory for `tag` (default: the one `latest` names)."""
    directory = Path(directory)
    if tag is None:
        tag = _read_latest(directory)
    else:
        check_tag(tag)
    for candidate in (directory / tag, directory / f".{tag}.old"):
        if (candidate / "meta.json").is_file():
            if candidate.resolve().parent != directory.resolve():
                raise CheckpointError(Problem(str(candidate), "leads outside the checkpoint directory (a symlink)",
                                              given=str(candidate.resolve())), source=f"checkpoints in {directory}")
            return candidate
    raise CheckpointError(Problem(str(directory / tag), f"checkpoint {tag!r} is missing or incomplete (no meta.json)",
                                  suggestion="pass an existing tag, or load the one `latest` names"),
                          source=f"checkpoints in {directory}")


def _read_latest(directory: Path) -> str:
    latest = directory / "latest"
    if not latest.is_file():
        raise CheckpointError(Problem(str(latest), f"no checkpoint in {directory}: the file is missing",
                                      suggestion="pass tag=, or save a checkpoint first"),
                              source=f"checkpoints in {directory}")
    with open(latest, "rb") as f:
        raw = f.read(LATEST_MAX_BYTES + 1)
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(Problem(str(latest), "is not a tag name (not UTF-8 text)", given=raw[:80]),
                              source=f"checkpoints in {directory}") from None
    if len(raw) > LATEST_MAX_BYTES:
        raise CheckpointError(Problem(str(latest), f"is not a tag name (over {LATEST_MAX_BYTES} bytes)",
                                      given=text[:80]), source=f"checkpoints in {directory}")
    return check_tag(text, where=str(latest))


# -- atomic, hashed writes -------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> FileRecord:
    """The sha256 and size of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        size = f.tell()
    return FileRecord(sha256=digest.hexdigest(), bytes=size)


def _atomic_write(path: Path, write: Callable[[str], None]) -> FileRecord:
    """Written atomically (schemas/atomic.py), then its record read back from the file in place."""
    return sha256_file(atomic_write(path, write))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None) -> FileRecord:
    return _atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                                     tmp, metadata=metadata))


def write_state(path: Path, state: dict) -> FileRecord:
    """`state` with torch.save, refused unless `torch.load(weights_only=True)` reads it back."""
    def write(tmp: str) -> None:
        torch.save(state, tmp)
        try:
            torch.load(tmp, weights_only=True)
        except Exception as e:
            raise TypeError("client_state must hold only tensors, numbers, strings, lists and dicts (checkpoints "
                            f"are read back without unpickling objects): {e}") from e
    return _atomic_write(path, write)


def write_text(path: Path, text: str) -> FileRecord:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)
    return _atomic_write(path, write)


# -- the save protocol ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RankPart:
    """What one rank saves."""

    identity: Identity
    tensors: dict[str, torch.Tensor]
    state: dict
    layout: GroupLayout
    """Its (tp, pp) group's layout; rank 0 keeps the one of each group's dp rank 0."""


def save(*, directory: str | Path, tag: str, part: RankPart, meta: dict, agreement: Agreement) -> Path:
    """Write this rank's part of checkpoint `tag` (a collective: every rank calls it); `meta`
    is rank 0's record of the run without the layouts and manifests (checkpoint_records.Meta)."""
    directory = Path(directory)
    rank = part.identity.rank
    error = None
    try:
        staging = directory / f".{check_tag(tag)}.staging"
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
    except Exception as e:  # every rank hears of it
        error = e
    _agree(agreement, error, directory, "cannot start the save")
    manifest = None
    try:
        manifest = _write_rank(staging, tag=tag, part=part, meta=meta)
    except Exception as e:
        error = e
    _agree(agreement, error, directory, "cannot write its files")
    gathered = agreement.gather((manifest, part.layout if part.identity.dp == 0 else None))
    try:
        if rank == 0:
            _publish(directory, staging, tag=tag, meta=meta, gathered=gathered)
    except Exception as e:
        error = e
    _agree(agreement, error, directory, "cannot publish the checkpoint")
    return directory / tag


def _write_rank(staging: Path, *, tag: str, part: RankPart, meta: dict) -> str:
    """Phase 2 on one rank: tensors, state, then the manifest; returns the manifest's sha256."""
    r = part.identity.rank
    files = {file_name(r, "safetensors"): write_tensors(staging / file_name(r, "safetensors"), part.tensors),
             file_name(r, "state.pt"): write_state(staging / file_name(r, "state.pt"), part.state)}
    body = {"format": FORMAT, "tag": tag, "step": meta["step"], "rank": part.identity.model_dump(),
            "world": meta["world"], "layout_sha256": part.layout.digest(),
            "files": {k: v.model_dump() for k, v in files.items()},
            "tensors": {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in part.tensors.items()}}
    return write_text(staging / file_name(r, "manifest.json"), seal(body)).sha256


def _publish(directory: Path, staging: Path, *, tag: str, meta: dict, gathered: list) -> None:
    """Phase 3 on rank 0: meta.json, the renames, `latest`."""
    groups = sorted((layout for _, layout in gathered if layout is not None), key=lambda g: (g.pp, g.tp))
    body = {"format": FORMAT, "tag": tag, **meta, "groups": [g.model_dump(mode="json") for g in groups],
            "manifests": [sha for sha, _ in gathered]}
    write_text(staging / "meta.json", seal(body))
    _fsync_dir(staging)
    final, old = directory / tag, directory / f".{tag}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    write_text(directory / "latest", tag + "\n")
    _fsync_dir(directory)


def _agree(agreement: Agreement, error: Exception | None, directory: Path, what: str) -> None:
    failures = agreement.failures(error)
    if failures:
        problems = [Problem(ranks, f"{what}: {reason}") for ranks, reason in by_reason(failures)]
        raise CheckpointError(problems, source=f"checkpoint save in {directory}") from error


__all__ = ["CheckpointError", "RankPart", "check_tag", "file_name", "resolve", "save", "sha256_file",
           "write_state", "write_tensors", "write_text"]
