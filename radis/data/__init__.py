"""The data path: sources -> records -> segments -> packing -> loader (see docs/design.md)."""
