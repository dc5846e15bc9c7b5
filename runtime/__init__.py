"""The training runtime: Engine, ZeRO stages 0-3, buckets, precision, offload, checkpoints."""
