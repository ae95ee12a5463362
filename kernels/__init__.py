"""Triton kernels, installed as `radis.kernels` (never as a top-level `kernels`)."""
