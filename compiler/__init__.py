"""Config + model + cluster -> Plan: batch, degrees, memory / comm / cost models, emitters.

Pure and torch-free, so `zeroplan compile` answers instantly.
"""
