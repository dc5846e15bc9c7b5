"""Model parallelism: the dp x tp x pp topology and its process groups; tensor and sequence parallelism; pipeline stages."""

from .pipeline import PipelineModule
from .sequence import SequenceParallelPositions
from .tensor import (ColumnParallelLinear, RowParallelLinear, TpSplit, VocabParallelCrossEntropy,
                     VocabParallelEmbedding, tp_split_of)
from .tensor_comm import tp_collectives
from .hf_plan import GPT2_BASE_PLAN, GPT2_HEAD_PLAN
from .tensor_plan import (GPT_PLAN, GPT_SEQUENCE_PARALLEL_PLAN, Colwise, Positions, Replicate, Rowwise, Vocab,
                          apply_tensor_parallel, default_plan, sync_tp_replicas)
from .topology import Topology, build_mesh_groups

__all__ = ["GPT2_BASE_PLAN", "GPT2_HEAD_PLAN", "GPT_PLAN", "GPT_SEQUENCE_PARALLEL_PLAN", "Colwise",
           "ColumnParallelLinear", "PipelineModule", "Positions", "Replicate", "RowParallelLinear", "Rowwise",
           "SequenceParallelPositions", "Topology", "TpSplit", "Vocab", "VocabParallelCrossEntropy",
           "VocabParallelEmbedding", "apply_tensor_parallel", "build_mesh_groups", "default_plan", "sync_tp_replicas",
           "tp_collectives", "tp_split_of"]
