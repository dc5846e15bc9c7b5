"""A saved checkpoint opened for reading, verified before anything in it is used.

No process group: the engine's load and the offline export (`zeroplan export`) read through
the same object. meta.json is checked when the checkpoint is opened (its seal, its format,
its records, the consistency of its degrees and layouts); a rank's manifest and files when
one of its tensors is first needed, so a load that keeps its layout reads only its own rank's
files. Checks, each refusing with a CheckpointError that names the file and what differs:
  - a manifest: its seal; the rank, coordinates and shard it was written by; the world, step
    and layout meta.json records; its sha256 against meta.json's record of that rank;
  - a tensor or state file: its size and sha256 against the manifest; every tensor's dtype and
    shape against the manifest and against what the layout needs there (the master and the
    optimizer state are float32, one shard long);
  - a state file is read with `torch.load(weights_only=True)` and its step must be the step.
The values themselves (finite master and optimizer state) are checked as reshard.py reads them.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open

from zeroplan.schemas import Problem
from zeroplan.schemas.layout import Topology, order_problem

from .checkpoint import CheckpointError, file_name, sha256_file
from .checkpoint_records import FORMAT, FileRecord, GroupLayout, Identity, Manifest, Meta, unseal
from .offload.master import MASTER

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
"""torch dtype name -> the code safetensors writes in its header."""


class Checkpoint:
    """One checkpoint directory (resolved: checkpoint.resolve), opened and verified lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        w = self.meta.world
        self.topology = Topology(dp=w.dp, tp=w.tp, pp=w.pp, order=w.order)
        self._manifests: dict[int, Manifest] = {}
        self._tensors: dict[int, object] = {}

    # -- where things are ----------------------------------------------------------------------
    def ranks(self, group: GroupLayout) -> list[int]:
        """The global ranks that saved `group` (its dp ranks), in dp order."""
        return [self.topology.rank_of(pp=group.pp, dp=d, tp=group.tp) for d in range(self.topology.dp)]

    def identity(self, rank: int) -> Identity:
        """Who wrote rank `rank`'s files, by the saved world's arithmetic."""
        c = self.topology.coords(rank)
        return Identity(rank=rank, dp=c["dp"], tp=c["tp"], pp=c["pp"], shard=c["dp"] if self.meta.world.stage else 0)

    def group_of(self, rank: int) -> GroupLayout:
        c = self.topology.coords(rank)
        return self.meta.group(tp=c["tp"], pp=c["pp"])

    def fail(self, name: str, message: str, **kwargs) -> CheckpointError:
        return CheckpointError(Problem(str(self.path / name), message, **kwargs), source=f"checkpoint {self.path}")

    # -- verified reads ------------------------------------------------------------------------
    def manifest(self, rank: int) -> Manifest:
        if rank not in self._manifests:
            self._manifests[rank] = self._read_manifest(rank)
        return self._manifests[rank]

    def tensors(self, rank: int):
        """Rank `rank`'s tensor file, hashed and its header checked (a safetensors handle)."""
        if rank not in self._tensors:
            name = file_name(rank, "safetensors")
            self._check_file(rank, name)
            try:
                handle = safe_open(str(self.path / name), framework="pt")
            except (SafetensorError, OSError) as e:
                raise self.fail(name, f"cannot be read as safetensors: {e}") from e
            self._check_header(rank, name, handle)
            self._tensors[rank] = handle
        return self._tensors[rank]

    def state(self, rank: int) -> dict:
        """Rank `rank`'s state file (scheduler, scaler, RNG, counters, client state)."""
        name = file_name(rank, "state.pt")
        data = self._check_file(rank, name)
        try:
            state = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:  # an unpickling refusal is the message
            raise self.fail(name, f"cannot be loaded with weights_only=True: {e}") from e
        counters = state.get("counters") if isinstance(state, dict) else None
        if not isinstance(counters, list) or len(counters) != 3 or counters[0] != self.meta.step:
            raise self.fail(name, f"holds counters {counters!r}; meta.json is at step {self.meta.step}")
        return state

    def _read_manifest(self, rank: int) -> Manifest:
        name = file_name(rank, "manifest.json")
        try:
            data = (self.path / name).read_bytes()
        except OSError as e:
            raise self.fail(name, f"cannot be read ({e.strerror}): rank {rank}'s save did not complete or the file "
                            "was removed") from e
        body, why = unseal(data)
        if body is None:
            raise self.fail(name, why)
        try:
            manifest = Manifest.model_validate(body)
        except ValidationError as e:
            raise self.fail(name, f"is not a manifest: {_first_error(e)}") from e
        want, meta = self.identity(rank), self.meta
        if manifest.rank != want:
            raise self.fail(name, f"was written by {manifest.rank.describe()}, shard {manifest.rank.shard}, not by "
                            f"{want.describe()}, shard {want.shard}: files of different ranks were swapped or copied")
        if manifest.world != meta.world:
            raise self.fail(name, f"was written by a run with {_world(manifest)}; meta.json records {_world(meta)}")
        if manifest.step != meta.step:
            raise self.fail(name, f"is from step {manifest.step}, but meta.json is from step {meta.step}: rank {rank}'s "
                            "files come from another save")
        if manifest.layout_sha256 != self.group_of(rank).digest():
            raise self.fail(name, "describes another parameter layout than meta.json records for its group")
        if sha256_file(self.path / name).sha256 != meta.manifests[rank]:
            raise self.fail(name, "does not belong to this save: its sha256 differs from meta.json's record "
                            "(a file of another save of the same step, or a modified one)")
        return manifest

    def _check_file(self, rank: int, name: str) -> bytes | None:
        """Size and sha256 of one of rank's files against its manifest; the bytes of a small one."""
        record = self.manifest(rank).files.get(name)
        if record is None:
            raise self.fail(file_name(rank, "manifest.json"), f"does not list {name}")
        path = self.path / name
        try:
            if name.endswith(".pt"):
                data = path.read_bytes()
                got = FileRecord(sha256=_sha256(data), bytes=len(data))
            else:
                data, got = None, sha256_file(path)
        except OSError as e:
            raise self.fail(name, f"cannot be read ({e.strerror})") from e
        if got != record:
            raise self.fail(name, f"is {got.bytes} bytes with sha256 {got.sha256[:16]}..., but its manifest records "
                            f"{record.bytes} bytes with sha256 {record.sha256[:16]}...: it was modified or damaged "
                            "after the save")
        return data

    def _check_header(self, rank: int, name: str, handle) -> None:
        """Each tensor's dtype and shape: the manifest's, and what the group's layout needs."""
        declared = self.manifest(rank).tensors
        needed = self._needed(self.group_of(rank))
        if set(handle.keys()) != set(declared) or set(declared) != set(needed):
            raise self.fail(name, f"holds tensors {_names(handle.keys())}; its manifest lists {_names(declared)} and "
                            f"the layout needs {_names(needed)}")
        for key, (dtype, shape) in needed.items():
            piece = handle.get_slice(key)
            got = [piece.get_dtype(), list(piece.get_shape())]
            if got != [SAFETENSORS_DTYPES.get(declared[key][0]), list(declared[key][1])]:
                raise self.fail(name, f"tensor {key!r} is {got[0]} {got[1]}; its manifest says {declared[key][0]} "
                                f"{list(declared[key][1])}")
            if declared[key][0] != dtype or list(declared[key][1]) != list(shape):
                raise self.fail(name, f"tensor {key!r} is {declared[key][0]} {list(declared[key][1])}; the layout needs "
                                f"{dtype} {list(shape)}")

    def _needed(self, group: GroupLayout) -> dict[str, tuple[str, tuple[int, ...]]]:
        opt = self.meta.optimizer
        out = {MASTER: ("float32", (group.numel,))}
        out.update({f"optim.{m}": ("float32", (group.numel,)) for m in opt.moments})
        out.update({f"optim.{c}": ("float32", ()) for c in opt.counters})
        out.update({t.key: (t.dtype, t.shape) for t in group.tensors})
        return out


# -- meta.json -------------------------------------------------------------------------------------
def _read_meta(path: Path) -> Meta:
    where = str(path / "meta.json")
    source = f"checkpoint {path}"
    try:
        data = (path / "meta.json").read_bytes()
    except OSError as e:
        raise CheckpointError(Problem(where, f"cannot be read ({e.strerror})"), source=source) from e
    body, why = unseal(data)
    if body is not None and body.get("format") != FORMAT:
        body, why = None, (f"is format {body.get('format')!r}; this zeroplan reads format {FORMAT} (format 1, from "
                           "before checkpoints carried hashes and layouts, loads with the release that wrote it)")
    if body is None:
        raise CheckpointError(Problem(where, why), source=source)
    try:
        meta = Meta.model_validate(body)
    except ValidationError as e:
        raise CheckpointError(Problem(where, f"is not a checkpoint record: {_first_error(e)}"), source=source) from e
    problems = _meta_problems(meta)
    if problems:
        raise CheckpointError([Problem(where, p) for p in problems], source=source)
    return meta


def _meta_problems(meta: Meta) -> list[str]:
    """Degrees, groups and layouts that do not add up (the arithmetic downstream relies on them)."""
    w = meta.world
    if min(w.dp, w.tp, w.pp) < 1 or w.world_size != w.dp * w.tp * w.pp or w.stage not in (0, 1, 2, 3):
        return [f"world {w.model_dump()} is not dp x tp x pp with a ZeRO stage 0-3"]
    if order_problem(w.order):
        return [f"world order {order_problem(w.order)}"]
    problems = []
    if len(meta.manifests) != w.world_size:
        problems.append(f"records {len(meta.manifests)} manifests for a world of {w.world_size}")
    coords = sorted((g.tp, g.pp) for g in meta.groups)
    if coords != sorted((t, p) for t in range(w.tp) for p in range(w.pp)):
        problems.append(f"has layouts for (tp, pp) {coords}, not one for each of tp {w.tp} x pp {w.pp}")
    for g in meta.groups:
        problems += _group_problems(g, w.tp, 1 if w.stage == 0 else w.dp)
    return problems


def _group_problems(g: GroupLayout, tp: int, shard_world: int) -> list[str]:
    where = f"layout of tp {g.tp}, pp {g.pp}"
    if g.shard_world != shard_world:
        return [f"{where}: cut into {g.shard_world} shards, the world's degrees give {shard_world}"]
    problems = []
    for record in (*g.params, *g.tensors):
        split, shape = record.split, record.shape
        if not record.names or min(shape, default=1) < 0:
            problems.append(f"{where}: {record.names} has no name or a negative extent")
        elif split is not None and not (0 <= split.dim < len(shape) and len(split.sizes) == tp and split.fused >= 1
                                        and min(split.sizes) >= 0 and shape[split.dim] == split.fused * split.sizes[g.tp]):
            problems.append(f"{where}: {record.names[0]} of shape {list(shape)} does not fit its tp cut {split}")
    for t in g.tensors:
        if t.dtype not in SAFETENSORS_DTYPES:
            problems.append(f"{where}: {t.names[0]} has dtype {t.dtype!r}, none of {sorted(SAFETENSORS_DTYPES)}")
    for p in g.params:
        if p.chunk != -(-p.numel // shard_world) or p.offset < 0 or p.offset + p.chunk > g.numel:
            problems.append(f"{where}: {p.names[0]} (chunk {p.chunk} at {p.offset}) does not fit a shard of {g.numel}")
    return problems


# -- small helpers ---------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _world(record) -> str:
    w = record.world
    return f"world {w.world_size} (dp {w.dp}, tp {w.tp}, pp {w.pp}), ZeRO stage {w.stage}"


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}"


__all__ = ["Checkpoint", "MASTER", "SAFETENSORS_DTYPES"]
