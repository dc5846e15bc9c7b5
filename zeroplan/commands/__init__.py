"""CLI command functions, one module per concern; `zeroplan.cli` maps names to them."""
