"""Model parallelism: the dp x tp x pp topology and its process groups."""

from .topology import Topology, build_mesh_groups

__all__ = ["Topology", "build_mesh_groups"]
