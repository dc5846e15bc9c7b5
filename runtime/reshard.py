"""Any checkpoint into any layout: world size, ZeRO stage, dp x tp x pp, offload, or one process.

A checkpoint's records (checkpoint_records.py) give, for every (tp, pp) group, each parameter's
names in the plain model, its tp cut and where each dp shard keeps its elements; a rank of
that group holds shard s = [s * chunk, (s + 1) * chunk) of the flattened tp slice, at `offset`
in its flat master and in each flat optimizer moment. Reading a target shard, per parameter:
  1. find the saved parameter by any of its names (a tied parameter is saved under all of
     them; a pipeline stage knows it under the name its stage uses) and check the shape
     before the tp cut;
  2. the same tp cut (or none on either side): copy the target's element range straight from
     the saved shards that overlap it, the rank's own file first (so a load that keeps its
     layout reads only its own files);
  3. another cut: join the saved tp slices (TpSplit.merge), take this rank's (TpSplit.take),
     then its element range. This step holds one whole parameter in memory.
Buffers and frozen parameters are whole per group and cut the same way. Every element of the
master and the optimizer state is checked finite as it is read. No process group: the
engine's load and the offline export (`consolidate`) run the same code.
"""

from __future__ import annotations

import torch

from zeroplan.schemas import Problem

from .checkpoint import CheckpointError, file_name
from .checkpoint_records import GroupLayout, ParamRecord, SplitRecord, TensorRecord, full_shape
from .checkpoint_source import MASTER, Checkpoint
from .parallel.tensor import TpSplit

Source = tuple[GroupLayout, ParamRecord]


class Reader:
    """Saved values by name, cut for any layout; `prefer` is the global rank whose files are
    read first (the loading rank's own number)."""

    def __init__(self, ckpt: Checkpoint, *, prefer: int):
        self.ckpt = ckpt
        self.prefer = prefer if prefer < ckpt.meta.world.world_size else 0
        mine = ckpt.identity(self.prefer)
        groups = sorted(ckpt.meta.groups, key=lambda g: (g.tp, g.pp) != (mine.tp, mine.pp))
        self.params: dict[str, list[Source]] = {}
        self.tensors: dict[str, list[tuple[GroupLayout, TensorRecord]]] = {}
        for g in groups:
            for p in g.params:
                for name in p.names:
                    self.params.setdefault(name, []).append((g, p))
            for t in g.tensors:
                for name in t.names:
                    self.tensors.setdefault(name, []).append((g, t))

    # -- what a target needs -----------------------------------------------------------------------
    def problems(self, target: GroupLayout, *, moments: tuple[str, ...], counters: tuple[str, ...],
                 whole: bool) -> list[Problem]:
        """Everything that keeps `target` from loading, at once: parameters missing or of another
        shape, another optimizer; with `whole` (the target holds the whole model), parameters
        the model lacks."""
        where, meta = str(self.ckpt.path / "meta.json"), self.ckpt.meta
        out = []
        opt = meta.optimizer
        if (tuple(opt.moments), tuple(opt.counters)) != (tuple(moments), tuple(counters)):
            out.append(Problem(where, f"was saved with optimizer state {list(opt.moments) + list(opt.counters)}; "
                               f"this run's optimizer keeps {list(moments) + list(counters)}",
                               suggestion="resume with the optimizer type the checkpoint was trained with"))
        for record in (*target.params, *target.tensors):
            found = self.find(record.names, trainable=isinstance(record, ParamRecord))
            saved = found[0][1] if found else None
            if saved is None:
                out.append(Problem(where, f"has no tensor {record.names[0]!r}" + self._as_buffer(record)))
            elif saved.full_shape != record.full_shape:
                out.append(Problem(where, f"{record.names[0]!r} has shape {list(saved.full_shape)}; this model's is "
                                   f"{list(record.full_shape)}", suggestion="load into the model that was saved"))
        if whole:
            mine = {n for r in (*target.params, *target.tensors) for n in r.names}
            extra = sorted(n for n in (*self.params, *self.tensors) if n not in mine)
            if extra:
                out.append(Problem(where, f"holds {len(extra)} tensor(s) this model lacks: {', '.join(extra[:5])}"
                                   + (" ..." if len(extra) > 5 else ""), suggestion="load into the model that was saved"))
        return out

    def _as_buffer(self, record) -> str:
        if isinstance(record, ParamRecord) and any(n in self.tensors for n in record.names):
            return " with optimizer state: it was saved frozen (or as a buffer)"
        return ""

    def find(self, names: tuple[str, ...], *, trainable: bool) -> list:
        """The saved copies of a tensor known by `names`: parameters; for a buffer or frozen
        parameter its saved copies, or (trained then, frozen now) the parameter's."""
        tables = (self.params,) if trainable else (self.tensors, self.params)
        for table in tables:
            for name in names:
                if name in table:
                    return table[name]
        return []

    # -- parameters --------------------------------------------------------------------------------
    def shard(self, target: GroupLayout, *, shard: int, tp: int, key: str) -> torch.Tensor:
        """Target shard `shard` of tp rank `tp` of the saved `key` (MASTER or `optim.<moment>`)."""
        out = torch.zeros(target.numel, dtype=torch.float32)
        for p in target.params:
            lo, hi = p.piece(shard)
            if hi > lo:
                out[p.offset:p.offset + hi - lo] = self.param_range(p, tp=tp, key=key, lo=lo, hi=hi)
        return out

    def param_range(self, target: ParamRecord, *, tp: int, key: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of tp rank `tp`'s flattened slice of `target`."""
        sources = self.find(target.names, trainable=True)
        saved = sources[0][1]
        if saved.split is None and target.split is None or saved.split == target.split:
            return self._local_range(sources, key, tp=tp if target.split else None, lo=lo, hi=hi)
        return _cut(self.full(sources, key), target.split, tp).reshape(-1)[lo:hi]

    def full(self, sources: list[Source], key: str) -> torch.Tensor:
        """The whole saved parameter (its tp slices joined)."""
        saved = sources[0][1]
        if saved.split is None:
            return self._local_range(sources, key, tp=None, lo=0, hi=saved.numel).view(saved.shape)
        parts = []
        for t, size in enumerate(saved.split.sizes):
            shape = _slice_shape(saved, size)
            parts.append(self._local_range(sources, key, tp=t, lo=0, hi=_numel(shape)).view(shape))
        return _tp(saved.split).merge(parts)

    def _local_range(self, sources: list[Source], key: str, *, tp: int | None, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened slice tp rank `tp` saved (None: a parameter with no
        tp cut, any copy), from the saved shards that overlap them."""
        out = torch.empty(hi - lo, dtype=torch.float32)
        missing = [(lo, hi)] if hi > lo else []
        for g, p in sources:
            if tp is not None and g.tp != tp:
                continue
            for rank in sorted(self.ckpt.ranks(g), key=lambda r: r != self.prefer):
                a, b = p.piece(self.ckpt.identity(rank).shard)
                for m0, m1 in list(missing):
                    x0, x1 = max(a, m0), min(b, m1)
                    if x0 < x1:
                        out[x0 - lo:x1 - lo] = self._read(rank, key, p, p.offset + x0 - a, p.offset + x1 - a)
                        missing.remove((m0, m1))
                        missing += [r for r in ((m0, x0), (x1, m1)) if r[0] < r[1]]
                if not missing:
                    return out
        raise self.ckpt.fail("meta.json", f"no saved rank holds elements {missing} of {key} of "
                             f"{sources[0][1].names[0]!r}" + ("" if tp is None else f" (tp slice {tp})"))

    def _read(self, rank: int, key: str, p: ParamRecord, a: int, b: int) -> torch.Tensor:
        values = self.ckpt.tensors(rank).get_slice(key)[a:b]
        bad = values.numel() - int(torch.isfinite(values).sum())
        if bad:
            raise self.ckpt.fail(file_name(rank, "safetensors"), f"{key} of {p.names[0]!r} holds {bad} non-finite "
                                 "value(s) (NaN or inf): the run had diverged when it saved, or the file was altered",
                                 suggestion="resume from an earlier checkpoint")
        return values

    def counter(self, name: str) -> torch.Tensor:
        """A scalar optimizer state (the same on every rank), from the preferred rank's file."""
        value = self.ckpt.tensors(self.prefer).get_tensor(f"optim.{name}")
        if not bool(torch.isfinite(value).all()):
            raise self.ckpt.fail(file_name(self.prefer, "safetensors"), f"optim.{name} is {value.item()}")
        return value

    # -- buffers and frozen parameters ---------------------------------------------------------------
    def tensor(self, target: TensorRecord, *, tp: int) -> torch.Tensor:
        """A buffer or frozen parameter for tp rank `tp`, in `target`'s dtype."""
        sources = self.find(target.names, trainable=False)
        saved = sources[0][1]
        if isinstance(saved, ParamRecord):  # trained when saved, frozen now
            value = _cut(self.full(sources, MASTER), target.split, tp)
        elif saved.split is None and target.split is None or saved.split == target.split:
            value = self._whole(sources, tp=tp if target.split else None)
        else:
            joined = self._whole(sources, tp=None) if saved.split is None else _tp(saved.split).merge(
                [self._whole(sources, tp=t) for t in range(len(saved.split.sizes))])
            value = _cut(joined, target.split, tp)
        if value.dtype != getattr(torch, target.dtype):
            if not (value.is_floating_point() and getattr(torch, target.dtype).is_floating_point):
                raise self.ckpt.fail("meta.json", f"{target.names[0]!r} was saved as {value.dtype}; this model holds "
                                     f"it as {target.dtype}")
            value = value.to(getattr(torch, target.dtype))
        return value

    def _whole(self, sources: list[tuple[GroupLayout, TensorRecord]], *, tp: int | None) -> torch.Tensor:
        for g, t in sources:
            if tp is None or g.tp == tp:
                rank = min(self.ckpt.ranks(g), key=lambda r: r != self.prefer)
                return self.ckpt.tensors(rank).get_tensor(t.key)
        raise self.ckpt.fail("meta.json", f"no saved rank holds tp slice {tp} of {sources[0][1].names[0]!r}")


def consolidate(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The plain model's whole state_dict from any checkpoint, one process, no process group:
    parameters as their fp32 master weights, buffers and frozen parameters as saved; every
    name of a tied parameter shares one tensor."""
    reader = Reader(ckpt, prefer=0)
    out: dict[str, torch.Tensor] = {}
    for g in sorted(ckpt.meta.groups, key=lambda g: (g.pp, g.tp)):
        for record in (*g.params, *g.tensors):
            if all(n in out for n in record.names):
                continue
            whole = TensorRecord(key="", names=record.names, shape=record.full_shape, split=None,
                                 dtype=getattr(record, "dtype", "float32"))
            if isinstance(record, ParamRecord):
                value = reader.full(reader.find(record.names, trainable=True), MASTER)
            else:
                value = reader.tensor(whole, tp=0)
            for name in record.names:
                out.setdefault(name, value)
    return out


def _tp(split: SplitRecord) -> TpSplit:
    return TpSplit(dim=split.dim, sizes=tuple(split.sizes), fused=split.fused)


def _cut(full: torch.Tensor, split: SplitRecord | None, tp: int) -> torch.Tensor:
    return full if split is None else _tp(split).take(full, tp).contiguous()


def _slice_shape(saved: ParamRecord, size: int) -> tuple[int, ...]:
    shape = list(full_shape(saved.shape, saved.split))
    shape[saved.split.dim] = saved.split.fused * size
    return tuple(shape)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


__all__ = ["Reader", "consolidate"]
