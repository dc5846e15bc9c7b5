"""Model parallelism: the dp x tp x pp topology and its process groups; pipeline stages."""

from .pipeline import PipelineModule
from .topology import Topology, build_mesh_groups

__all__ = ["PipelineModule", "Topology", "build_mesh_groups"]
