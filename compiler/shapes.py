"""Parameter tensors of a `ModelSpec` as one rank holds them under tensor and pipeline parallelism.

Megatron-LM's layout (Shoeybi et al. 2019, "Megatron-LM", section 3): the QKV and first MLP
matrices are split by columns, the attention output and second MLP matrices by rows, the
embedding by vocabulary rows; norms and the biases of row-split layers are replicated on every
tp rank. Pipeline stages take consecutive layers of the sequence the built-in GPT hands the
runtime (the embeddings, each block, the final norm with the LM head), cut by the plan's
`pipeline_partition_method` with the runtime's own partition (partition.py), so the first
stage holds the embedding and the last the head; with tied embeddings and pp > 1 the last
stage keeps a copy of the embedding matrix (Narayanan et al. 2021, section 2.2 of "Efficient
Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"). With tp = pp = 1 the
counts equal `ModelSpec.total_params` exactly (a test checks it).

A model other than the built-in GPT is modelled by the same sequence: its stages are predicted
as well as its ModelSpec describes it, and a `type:<regex>` method is matched against the
built-in class names (`PIPELINE_LAYER_CLASSES`), the only ones the compiler knows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from zeroplan.schemas import ModelSpec, Plan
from zeroplan.schemas.parallel import parse_partition_method

from .partition import partition_layers
from .shards import Gather, collectives_per_rank, pack_buckets, publish_gathers

PIPELINE_LAYER_CLASSES = ("Embeddings", "Block", "Head")
"""Class names of the built-in GPT's pipeline layers (runtime/models/gpt.py, `pipeline_layers`):
the embeddings, every transformer block, the final norm with the LM head. A test holds the
runtime's model to them."""


def _split(n: int, tp: int) -> int:
    return -(-n // tp)


def block_tensors(model: ModelSpec, *, tp: int) -> list[int]:
    """Element counts of one transformer block's tensors on one tp rank, in the order the
    block's module registers its parameters (its modules in forward order): the order the
    runtime shards and buckets them in."""
    return [n for module in block_modules(model, tp=tp) for n in module]


def block_modules(model: ModelSpec, *, tp: int) -> list[list[int]]:
    """One block's tensors grouped by the module that owns them (on one tp rank), in forward order."""
    h, f = model.hidden, model.ffn
    if model.architecture == "gpt":  # ln1, qkv, proj, ln2, fc, out
        return [[h, h], [_split(3 * h * h, tp), _split(3 * h, tp)], [_split(h * h, tp), h], [h, h],
                [_split(h * f, tp), _split(f, tp)], [_split(f * h, tp), h]]
    kv = (model.kv_heads or model.heads) * model.head_dim
    return [[h], [_split(h * h, tp)], [_split(h * kv, tp)], [_split(h * kv, tp)], [_split(h * h, tp)], [h],
            [_split(h * f, tp)], [_split(h * f, tp)], [_split(f * h, tp)]]


def embedding_tensors(model: ModelSpec, *, tp: int) -> list[int]:
    """Token embedding (vocab-split) and, for gpt, learned positions (replicated)."""
    tensors = [_split(model.vocab * model.hidden, tp)]
    if model.architecture == "gpt":
        tensors.append(model.seq_len * model.hidden)
    return tensors


def head_tensors(model: ModelSpec, *, tp: int, pp: int) -> list[int]:
    """Final norm and LM head on the last stage (a copy of the tied embedding when pp > 1)."""
    h = model.hidden
    norm = [h, h] if model.architecture == "gpt" else [h]
    if not model.tied_embeddings or pp > 1:
        return norm + [_split(model.vocab * h, tp)]
    return norm


def tp_replicated_tensors(model: ModelSpec, shape: "StageShape") -> list[int]:
    """Element counts of the stage's tensors every tp rank holds whole, in parameter order: the
    first stage's learned positions (gpt), each block's norms and row-parallel biases, the final
    norm. Under sequence parallelism each tp rank's gradient of them covers its part of the
    sequence only, so they are summed over tp at the step (runtime/parallel/sequence_comm.py)."""
    h = model.hidden
    gpt = model.architecture == "gpt"
    first = [model.seq_len * h] if gpt and shape.index == 0 else []
    block = [h] * (6 if gpt else 2)  # gpt: ln1 weight and bias, proj bias, ln2 weight and bias, out bias
    last = [h] * (2 if gpt else 1) if shape.last else []
    return first + block * shape.layers + last


def pipeline_layers(model: ModelSpec, *, tp: int) -> tuple[list[str], list[int]]:
    """(class names, trainable parameters on one tp rank) of the layers the built-in GPT hands
    the pipeline, in order. The head layer holds the LM head matrix, tied or not (a tied one is
    the embedding's, counted in both layers, as the runtime's per-layer count does)."""
    embeddings, block, head = PIPELINE_LAYER_CLASSES
    norm = head_tensors(model, tp=tp, pp=1)[:2 if model.architecture == "gpt" else 1]
    names = [embeddings, *[block] * model.layers, head]
    params = [sum(embedding_tensors(model, tp=tp)), *[sum(block_tensors(model, tp=tp))] * model.layers,
              sum(norm) + _split(model.vocab * model.hidden, tp)]
    return names, params


def modelled_partition_method(method: str) -> str:
    """The method the compiler partitions with: `method`, except a `type:` regex that matches
    none of the built-in layer classes, read as naming the model's transformer block class
    (DeepSpeed's usual `type:transformer`); see `partition_notes`."""
    kind, regex = parse_partition_method(method)
    if kind == "type" and not any(regex.search(name) for name in PIPELINE_LAYER_CLASSES):
        return f"type:^{PIPELINE_LAYER_CLASSES[1]}$"
    return method


def partition_notes(method: str, *, pp: int) -> list[str]:
    """What the plan's stage estimates assume about a partition method the compiler cannot
    check: a class regex matching none of the built-in GPT's layers."""
    if pp == 1 or modelled_partition_method(method) == method:
        return []
    return [f"parallel.pipeline.partition_method {method!r} matches none of the built-in GPT's pipeline layer "
            f"classes ({', '.join(PIPELINE_LAYER_CLASSES)}), so zeroplan's GPT refuses it; the estimates assume "
            "it names your model's transformer block class"]


def stage_bounds(model: ModelSpec, *, tp: int, pp: int, method: str = "parameters") -> list[int]:
    """Boundaries [0, ..., layers + 2] of the stages over `pipeline_layers`: the runtime's partition."""
    names, params = pipeline_layers(model, tp=tp)
    return partition_layers(names=names, params=params, stages=pp, method=modelled_partition_method(method))


@dataclass(frozen=True)
class StageShape:
    """What one rank of a pipeline stage holds, before ZeRO sharding."""

    index: int
    last: bool
    """The stage holding the final norm and LM head (computes the loss)."""
    layers: int
    tensors: tuple[int, ...]
    """Element counts of every parameter tensor on the rank."""
    units: tuple[int, ...]
    """Elements per unit whose parameters are live together (embedding, each block, head)."""
    modules: tuple[tuple[int, ...], ...] = ()
    """Parameter tensors of each module that owns some, in forward order: ZeRO-3 gathers one
    module's own parameters at a time (a tied LM head gathers the embedding matrix again)."""
    embedding_modules: tuple[int, ...] = ()
    """Which of `modules` come first as embeddings (the first stage's token and position ones)."""
    layer_range: tuple[int, int] = (0, 0)
    """The pipeline layers [start, end) the stage runs (`pipeline_layers` indices)."""

    @property
    def params(self) -> int:
        return sum(self.tensors)



def stage_shapes(model: ModelSpec, *, tp: int, pp: int, method: str = "parameters") -> list[StageShape]:
    """One `StageShape` per pipeline stage, for one tp rank, partitioned by `method` (the plan's
    `pipeline_partition_method`)."""
    block = block_tensors(model, tp=tp)
    bounds = stage_bounds(model, tp=tp, pp=pp, method=method)
    shapes = []
    for i in range(pp):
        n_layers = min(bounds[i + 1], model.layers + 1) - max(bounds[i], 1)  # blocks are layers 1..L
        tensors, units, modules = [], [], []
        if i == 0:
            emb = embedding_tensors(model, tp=tp)
            tensors += emb
            units.append(sum(emb))
            modules += [[n] for n in emb]
        tensors += block * n_layers
        units += [sum(block)] * n_layers
        modules += block_modules(model, tp=tp) * n_layers
        if i == pp - 1:
            head = head_tensors(model, tp=tp, pp=pp)
            tensors += head
            units.append(sum(head))
            norm = head[:2] if model.architecture == "gpt" else head[:1]
            modules += [norm, [_split(model.vocab * model.hidden, tp)]]  # final norm, LM head (tied or not)
        shapes.append(StageShape(index=i, last=i == pp - 1, layers=n_layers, tensors=tuple(tensors),
                                 units=tuple(units), modules=tuple(tuple(m) for m in modules),
                                 embedding_modules=tuple(range(len(emb))) if i == 0 else (),
                                 layer_range=(bounds[i], bounds[i + 1])))
    return shapes


def rank_params(model: ModelSpec, *, tp: int, pp: int, method: str = "parameters") -> int:
    """Parameters of the fullest rank (the most loaded pipeline stage), before ZeRO sharding."""
    return max(s.params for s in stage_shapes(model, tp=tp, pp=pp, method=method))


def persistent_tensors(numels: Sequence[int], *, threshold: int, cap: int) -> list[bool]:
    """ZeRO-3: which tensors, in order, stay whole on every rank: those with fewer than
    `threshold` elements, as long as the elements kept in all stay within `cap` (DeepSpeed's
    stage3_param_persistence_threshold and stage3_model_persistence_threshold, applied in
    parameter order as its `mark_persistent_parameters` does). The runtime's rule too."""
    kept, out = 0, []
    for n in numels:
        keep = n < threshold and kept + n <= cap
        kept += n if keep else 0
        out.append(keep)
    return out


def persistent_elements(shape: StageShape, *, threshold: int, cap: int) -> int:
    """ZeRO-3: elements kept whole on every rank (`persistent_tensors` of the stage's tensors)."""
    flags = persistent_tensors(shape.tensors, threshold=threshold, cap=cap)
    return sum(n for n, keep in zip(shape.tensors, flags) if keep)


def publishing(plan: Plan, shape: StageShape) -> list[Gather]:
    """The all-gathers that publish the stage's tensors after the step, in order
    (shards.publish_gathers, which the runtime's `gather_into_model` runs): stages
    1-2 every tensor, by all-gather bucket; stage 3 the persistent ones, by runs of
    consecutive ones within a bucket."""
    z, n = plan.zero, plan.parallel.dp
    buckets = pack_buckets(shape.tensors, world=n, max_elements=z.allgather_bucket_size, reverse=False)
    if z.stage == 3:
        flags = persistent_tensors(shape.tensors, threshold=z.param_persistence_threshold,
                                   cap=z.model_persistence_threshold)
        buckets = [(max(s, a), min(e, b)) for s, e in _runs(flags) for a, b in buckets if max(s, a) < min(e, b)]
    return publish_gathers(shape.tensors, buckets, world=n, per_rank=collectives_per_rank(plan.world.backend))


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal index ranges [start, end) where `flags` holds."""
    out: list[tuple[int, int]] = []
    for i, flag in enumerate(flags):
        if flag and out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        elif flag:
            out.append((i, i + 1))
    return out
