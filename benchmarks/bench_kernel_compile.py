"""The fused loss kernel compiled for sm_80 and sm_90 on this machine, no GPU needed:
registers, spills, stack and shared memory of every variant the launcher can choose.

    python benchmarks/bench_kernel_compile.py [--archs 80 90]

Variants: radis.kernels.compile_check.launcher_variants (logits dtype x teacher or not
x gradient or not x the BLOCK_V / BLOCK_K / num_warps that launch_config picks for
V = 32000, 128256, 152064 and k from 1 to 64), plus the [4096, 32] teacher tile the
launcher's cap avoids, for comparison. Resources come from `ptxas -v` on the PTX
triton emits (the ptxas of the triton wheel).
"""
from __future__ import annotations

import argparse
import time

from radis.kernels.compile_check import (
    ARCHS,
    Variant,
    compile_variants,
    launcher_variants,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", type=int, nargs="+", default=list(ARCHS))
    args = ap.parse_args()
    import triton

    capped = Variant("bf16", True, True, 4096, 32, 8)  # not chosen by the launcher: what its cap avoids
    t0 = time.perf_counter()
    reports = compile_variants(launcher_variants() + [capped], args.archs)
    print(f"triton {triton.__version__}, {len(reports)} compiles in {time.perf_counter() - t0:.0f} s\n")
    head = (f"{'arch':>6} {'dtype':>5} {'teacher':>7} {'grad':>4} {'BLOCK_V':>7} {'BLOCK_K':>7} {'warps':>5} | "
            f"{'regs':>4} {'spill st':>8} {'spill ld':>8} {'stack':>6} {'shared':>6} {'compile s':>9}")
    print(head)
    print("-" * len(head))
    for r in sorted(reports, key=lambda r: (r.arch, r.variant.dtype, not r.variant.teacher, not r.variant.grad,
                                             -r.variant.block_v)):
        v = r.variant
        mark = "  (not chosen: the cap's reason)" if v == capped else ""
        print(f"sm_{r.arch:<3} {v.dtype:>5} {'yes' if v.teacher else 'no':>7} {'yes' if v.grad else 'no':>4} "
              f"{v.block_v:>7} {v.block_k:>7} {v.num_warps:>5} | {r.registers:>4} {r.spill_stores:>8} "
              f"{r.spill_loads:>8} {r.stack:>6} {r.shared:>6} {r.seconds:>9.1f}{mark}")
    chosen = [r for r in reports if r.variant != capped]
    print(f"\nlauncher variants with spills: {sum(1 for r in chosen if r.spill_stores or r.spill_loads)} of {len(chosen)}")


if __name__ == "__main__":
    main()
