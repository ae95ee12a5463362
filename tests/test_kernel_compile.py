"""The fused loss kernel compiled for sm_80 and sm_90 on this CPU machine (no GPU): every
variant the launcher can choose must compile, and must not spill registers.

The default run compiles a representative subset (the largest teacher tile, no
teacher, fp32 / fp16 / bf16, with and without the gradient) for both targets; the whole
grid of launcher choices (42 variants x 2 targets, about 4 minutes) runs with
RADIS_COMPILE_GRID=1, and benchmarks/bench_kernel_compile.py prints it as a table.
"""
from __future__ import annotations

import os

import pytest

from radis.kernels.radis_loss import launch_config

try:
    import triton.backends.nvidia.compiler  # noqa: F401  (the CUDA backend compiles without a GPU)

    from radis.kernels.compile_check import (
        ARCHS,
        TOP_KS,
        VOCABS,
        Variant,
        compile_variants,
        launcher_variants,
    )

    HAVE_BACKEND = True
except ImportError:
    HAVE_BACKEND = False

needs_backend = pytest.mark.skipif(not HAVE_BACKEND, reason="triton with its NVIDIA backend is not installed")


def test_launch_config_keeps_the_teacher_tile_in_registers():
    for v in (32000, 128256, 152064, 50, 4096):
        plain = launch_config(v, None)
        assert plain.block_v == min(1 << (v - 1).bit_length(), 4096)
        for k in (1, 2, 3, 4, 5, 8, 10, 16, 20, 32, 50, 64):
            cfg = launch_config(v, k)
            assert cfg.block_k >= k and cfg.block_k & (cfg.block_k - 1) == 0
            assert cfg.block_v * cfg.block_k <= 16384 or cfg.block_v == 64
            assert cfg.num_warps == (8 if cfg.block_v >= 2048 or cfg.block_k >= 64 else 4)
    assert launch_config(32000, 20, block_v=128).block_v == 128  # a test's explicit choice


@needs_backend
def test_the_variants_are_every_choice_of_the_launcher():
    variants = launcher_variants()
    assert len(variants) == len(set(variants)) == 42  # 3 dtypes x 2 (grad) x (no teacher + 6 tiles)
    assert {(v.block_v, v.block_k) for v in variants if v.teacher} == {
        (4096, 2), (4096, 4), (2048, 8), (1024, 16), (512, 32), (256, 64)}


SUBSET = [
    Variant("bf16", True, True, 512, 32, 4),  # k = 20, the default top-k: the launcher's capped tile
    Variant("fp32", True, True, 256, 64, 8),  # the largest k it supports (spilled at 4 warps on triton 3.6)
    Variant("bf16", False, True, 4096, 2, 8),  # vanilla fine-tuning
    Variant("fp16", True, False, 4096, 4, 8),  # no gradient (validation), the widest teacher tile
] if HAVE_BACKEND else []


@needs_backend
def test_representative_variants_compile_without_spills_and_a_too_large_tile_is_caught():
    """The subset for sm_80 and sm_90; and what the launcher's cap avoids, which the
    check must see: a [4096, 32] teacher tile spills."""
    too_large = Variant("bf16", True, True, 4096, 32, 8)
    # the spilling tile for sm_90 only: ptxas takes 19 s over it for sm_80 (2.5 s for sm_90)
    reports = compile_variants(SUBSET, ARCHS) + compile_variants([too_large], (90,))
    assert len(reports) == 2 * len(SUBSET) + 1
    for r in reports:
        if r.variant == too_large:
            assert r.spill_stores > 0, r
        else:
            assert (r.spill_stores, r.spill_loads) == (0, 0), r
            assert 0 < r.registers <= 255 and r.shared > 0


@needs_backend
@pytest.mark.skipif(os.environ.get("RADIS_COMPILE_GRID") != "1", reason="the full grid: set RADIS_COMPILE_GRID=1")
def test_every_launcher_variant_compiles_without_spills():
    spilled = [r for r in compile_variants(launcher_variants(VOCABS, TOP_KS), ARCHS) if r.spill_stores or r.spill_loads]
    assert not spilled, spilled
