"""Optuna search over short profiled runs of the real runtime, one subprocess per trial."""
