"""Config + model + cluster -> Plan: batch, degrees, memory / comm / cost models, emitters.

Pure and torch-free, so `zeroplan compile` answers instantly.
"""

from .calibration import Calibration
from .comm import Collective, comm_volume
from .compile import compile, config_hash, resolve_autos
from .cost import step_time
from .memory import MemoryEstimate, estimate_memory

__all__ = ["Calibration", "Collective", "MemoryEstimate", "comm_volume", "compile", "config_hash",
           "estimate_memory", "resolve_autos", "step_time"]
