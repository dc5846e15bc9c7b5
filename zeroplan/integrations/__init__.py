"""Adapters for the training loops of other libraries (`zeroplan.integrations.transformers`)."""
