"""Model parallelism: the dp x tp x pp topology and its process groups; tensor parallelism; pipeline stages."""

from .pipeline import PipelineModule
from .tensor import (ColumnParallelLinear, RowParallelLinear, TpSplit, VocabParallelCrossEntropy,
                     VocabParallelEmbedding, tp_split_of)
from .tensor_comm import tp_collectives
from .tensor_plan import GPT_PLAN, Colwise, Rowwise, Vocab, apply_tensor_parallel, default_plan, sync_tp_replicas
from .topology import Topology, build_mesh_groups

__all__ = ["GPT_PLAN", "Colwise", "ColumnParallelLinear", "PipelineModule", "RowParallelLinear", "Rowwise", "Topology", "TpSplit",
           "Vocab", "VocabParallelCrossEntropy", "VocabParallelEmbedding", "apply_tensor_parallel",
           "build_mesh_groups", "default_plan", "sync_tp_replicas", "tp_collectives", "tp_split_of"]
