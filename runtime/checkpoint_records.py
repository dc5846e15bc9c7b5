"""What a checkpoint says about itself: meta.json and each rank's manifest, as strict models.

Both files are untrusted input, read like a config: every level forbids unknown keys, and a
file that does not parse names itself and the field. Both are sealed: the `sha256` field is
the hash of the rest of the file in canonical JSON (sorted keys, no spaces), so a damaged
file is told apart from one that belongs to another save.

meta.json (rank 0, written last): the run's degrees and step, the optimizer's state names,
the model's class (and a Hugging Face model's config), one `GroupLayout` per (tp, pp)
coordinate, and the sha256 of every rank's manifest. A manifest (each rank): who wrote it
(global rank, dp/tp/pp coordinates, shard index), the world, the step, the sha256 and size of
the rank's tensor and state files, the dtype and shape of every tensor in its tensor file, and
the sha256 of its group's layout. Torch-free, like the records' readers in checkpoint.py.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

from zeroplan.schemas.layout import DEFAULT_ORDER

FORMAT = 2
"""Format 1 (no hashes, no layout) was written before checkpoints could be verified or resharded."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitRecord(_Record):
    """A tensor-parallel cut (runtime/parallel/tensor.py TpSplit)."""

    dim: int
    sizes: tuple[int, ...]
    """Each tp rank's extent of one fused block along `dim`."""
    fused: int = 1


class ParamRecord(_Record):
    """One trainable parameter of a group's flat shards (runtime/zero/layout.py Slot)."""

    names: tuple[str, ...]
    """Its names in the plain model's state_dict (a tied parameter has several)."""
    shape: tuple[int, ...]
    """This tp rank's slice (the whole parameter when `split` is None)."""
    split: SplitRecord | None = None
    offset: int
    """Where its chunk starts in each rank's shard."""
    chunk: int
    """Elements per shard (ceil(numel / shard_world)); shard s holds [s * chunk, (s + 1) * chunk)."""

    @property
    def numel(self) -> int:
        return _prod(self.shape)

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The shape before the tp cut."""
        return full_shape(self.shape, self.split)

    def piece(self, shard: int) -> tuple[int, int]:
        """[lo, hi) of the flattened slice that shard `shard` holds (padding excluded)."""
        lo = min(shard * self.chunk, self.numel)
        return lo, min(lo + self.chunk, self.numel)


class TensorRecord(_Record):
    """A buffer or frozen parameter: whole on every rank of its group, outside the shards."""

    key: str
    """Its key in the rank's tensor file."""
    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    split: SplitRecord | None = None

    @property
    def full_shape(self) -> tuple[int, ...]:
        return full_shape(self.shape, self.split)


class GroupLayout(_Record):
    """What every rank of one (tp, pp) coordinate holds; its dp ranks differ only in the shard."""

    tp: int
    pp: int
    shard_world: int
    """Shards the parameters are cut into (the dp size; 1 at ZeRO stage 0)."""
    numel: int
    """Elements of each rank's flat shard, padding included."""
    params: tuple[ParamRecord, ...]
    tensors: tuple[TensorRecord, ...]

    def digest(self) -> str:
        return canonical_sha256(self.model_dump(mode="json"))


class WorldRecord(_Record):
    world_size: int
    dp: int
    tp: int
    pp: int
    stage: int
    order: tuple[str, str, str] = DEFAULT_ORDER
    """The saving run's rank layout (the plan's `layout.order`); checkpoints written before it
    was recorded used the default."""


class Identity(_Record):
    """The rank that wrote a manifest."""

    rank: int
    dp: int
    tp: int
    pp: int
    shard: int
    """Its shard of the group's parameters (the dp coordinate; 0 at ZeRO stage 0)."""

    def describe(self) -> str:
        return f"rank {self.rank} (dp {self.dp}, tp {self.tp}, pp {self.pp})"


class FileRecord(_Record):
    sha256: str
    bytes: int


class Manifest(_Record):
    format: Literal[2]
    tag: str
    step: int
    rank: Identity
    world: WorldRecord
    layout_sha256: str
    files: dict[str, FileRecord]
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    """Key in the tensor file -> (dtype, shape) as written."""


class OptimizerRecord(_Record):
    moments: tuple[str, ...]
    """Element-wise state, one flat fp32 tensor per name, cut like the master (`optim.<name>`)."""
    counters: tuple[str, ...]
    """Scalar state (step counts), the same on every rank."""


class ModelRecord(_Record):
    cls: str | None
    """The trained module's class (None for one pipeline stage)."""
    hf_config: dict | None = None
    """A Hugging Face model's config.json, so an export is loadable with from_pretrained."""


class Meta(_Record):
    format: Literal[2]
    tag: str
    step: int
    world: WorldRecord
    param_dtype: str
    optimizer: OptimizerRecord
    model: ModelRecord
    groups: tuple[GroupLayout, ...]
    manifests: tuple[str, ...]
    """sha256 of each rank's sealed manifest, in rank order."""

    def group(self, *, tp: int, pp: int) -> GroupLayout | None:
        return next((g for g in self.groups if g.tp == tp and g.pp == pp), None)


def full_shape(shape: tuple[int, ...], split: SplitRecord | None) -> tuple[int, ...]:
    """The shape of a tp slice before the cut."""
    if split is None:
        return tuple(shape)
    out = list(shape)
    out[split.dim] = split.fused * sum(split.sizes)
    return tuple(out)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def canonical_sha256(body: dict) -> str:
    """sha256 of `body` as canonical JSON: the seal of meta.json and the manifests."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(body: dict) -> str:
    """The file text of a sealed record: `body` plus its own hash."""
    return json.dumps({**body, "sha256": canonical_sha256(body)}, indent=1) + "\n"


def unseal(text: bytes) -> tuple[dict | None, str]:
    """(body, "") of a sealed file, or (None, why it is damaged)."""
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"is damaged: it is not JSON ({e})"
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
        return None, "has no sha256 seal"
    want = data.pop("sha256")
    if canonical_sha256(data) != want:
        return None, "is damaged: its content does not match its sha256 seal"
    return data, ""


__all__ = ["FORMAT", "FileRecord", "GroupLayout", "Identity", "Manifest", "Meta", "ModelRecord", "OptimizerRecord",
           "ParamRecord", "SplitRecord", "TensorRecord", "WorldRecord", "canonical_sha256", "seal", "unseal"]
