"""The data path: sources -> segments -> packing -> loader (see DESIGN.md)."""
