"""The fused loss kernel compiled for real GPU targets, on a machine without a GPU.

Triton compiles for a CUDA target it is told about: `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))` goes through ttir, ttgir, llir and PTX to a cubin
with the ptxas inside the triton wheel, no driver needed. `ptxas -v` on the PTX then
reports what the GPU would run: registers per thread, spill stores and loads (local
memory traffic, which makes a memory-bound kernel slower), the stack frame; the
kernel's metadata gives its shared memory.

    from radis.kernels.compile_check import launcher_variants, compile_variants
    for report in compile_variants(launcher_variants(), archs=(80, 90)):   # every launch it can choose
        assert report.spill_stores == 0

`compile_variants` compiles in a child process: the CPU test suite imports triton with
TRITON_INTERPRET=1, and an interpreted kernel cannot be compiled.

A variant is what makes a different binary: the logits dtype (fp32 / bf16 / fp16),
teacher or not, gradient or not, and the BLOCK_V / BLOCK_K / num_warps that
`radis_loss.launch_config` picks; V and k themselves are runtime arguments.
benchmarks/bench_loss.py --compile prints the whole table (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from radis.kernels.radis_loss import launch_config

DTYPES = ("fp32", "bf16", "fp16")
ARCHS = (80, 90)
# The vocabularies of the models radis is for: LLaMA-2 / Mistral, LLaMA-3, Qwen2.
VOCABS = (32000, 128256, 152064)
TOP_KS = (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64)


@dataclass(frozen=True)
class Variant:
    """One binary of the kernel."""

    dtype: str  # of the logits (and of the gradient written over them)
    teacher: bool
    grad: bool
    block_v: int
    block_k: int
    num_warps: int

    def __str__(self) -> str:
        return (f"{self.dtype} {'teacher' if self.teacher else 'no-teacher'} {'grad' if self.grad else 'no-grad'} "
                f"BLOCK_V={self.block_v} BLOCK_K={self.block_k} warps={self.num_warps}")


@dataclass(frozen=True)
class CompileReport:
    variant: Variant
    arch: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame
    shared: int  # bytes of shared memory
    seconds: float


def launcher_variants(vocabs: Iterable[int] = VOCABS, top_ks: Iterable[int] = TOP_KS,
                      dtypes: Iterable[str] = DTYPES) -> list[Variant]:
    """Every distinct variant `launch_config` picks for these vocabularies and top-k sizes
    (without a teacher and with each k), each with and without the gradient pass."""
    out: dict[Variant, None] = {}
    for dtype in dtypes:
        for grad in (True, False):
            for v in vocabs:
                for k in (None, *top_ks):
                    cfg = launch_config(v, k)
                    out[Variant(dtype, k is not None, grad, cfg.block_v, cfg.block_k, cfg.num_warps)] = None
    return list(out)


def _signature(variant: Variant) -> tuple[dict[str, str], dict[str, object]]:
    """The kernel's argument types as the launcher passes them, and its constexprs."""
    logits = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}[variant.dtype]
    sig = {"x_ptr": logits, "x_stride": "i32", "targets_ptr": "*i64", "spans_ptr": "*i64", "scale_ptr": "*fp32",
           "tids_ptr": "*i64", "tids_stride": "i32", "tlp_ptr": "*fp32", "tlp_stride": "i32",
           "loss_ptr": "*fp32", "nll_ptr": "*fp32", "kl_ptr": "*fp32", "kd_weight": "fp32", "V": "i32", "K": "i32",
           "BLOCK_V": "constexpr", "BLOCK_K": "constexpr", "HAS_TEACHER": "constexpr", "COMPUTE_GRAD": "constexpr",
           "OUT_BF16": "constexpr"}
    constexprs = {"BLOCK_V": variant.block_v, "BLOCK_K": variant.block_k, "HAS_TEACHER": variant.teacher,
                  "COMPUTE_GRAD": variant.grad, "OUT_BF16": variant.dtype == "bf16"}
    return sig, constexprs


def ptxas_path(arch: int) -> str:
    """The ptxas of the triton wheel that assembles PTX for `arch` (as triton picks it)."""
    from triton.backends.nvidia import compiler

    get = getattr(compiler, "get_ptxas", None)
    if get is not None:
        try:
            return get(arch).path
        except TypeError:  # older triton: get_ptxas() without the architecture
            return get().path
    return compiler._path_to_binary("ptxas")[0]  # triton < 3.2


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                    r"Used (\d+) registers", re.DOTALL)


def compile_variant(variant: Variant, arch: int) -> CompileReport:
    """Compile `variant` for sm_`arch` and read its resources from `ptxas -v`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from radis.kernels.radis_loss import _radis_loss_kernel

    sig, constexprs = _signature(variant)
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=_radis_loss_kernel, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": variant.num_warps})
    seconds = time.perf_counter() - t0
    ptx = kernel.asm["ptx"]
    target = re.search(r"^\s*\.target\s+(\S+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={target}", "-o", os.path.join(tmp, "k.o"), src],
                             capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed on {variant} for sm_{arch}: {out.stderr[-2000:]}")
    m = _PTXAS.search(out.stderr + out.stdout)
    if m is None:
        raise RuntimeError(f"ptxas -v printed no resource line for {variant}: {out.stderr[-2000:]}")
    stack, stores, loads, regs = (int(x) for x in m.groups())
    return CompileReport(variant, arch, regs, stores, loads, stack, int(getattr(kernel.metadata, "shared", 0)), seconds)


def compile_variants(variants: Iterable[Variant], archs: Iterable[int] = ARCHS,
                     timeout: float = 1800) -> list[CompileReport]:
    """`compile_variant` for every (variant, arch), in one child process that imports
    triton for compiling (TRITON_INTERPRET unset)."""
    jobs = [{"variant": asdict(v), "arch": a} for v in variants for a in archs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "radis.kernels.compile_check"], input=json.dumps(jobs), text=True,
                         capture_output=True, env=env, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"compiling the kernel variants failed:\n{out.stderr[-4000:]}")
    return [CompileReport(Variant(**r.pop("variant")), **r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


def _main() -> None:
    """The child of `compile_variants`: jobs as JSON on stdin, reports as one JSON line."""
    jobs = json.loads(sys.stdin.read())
    reports = [compile_variant(Variant(**job["variant"]), job["arch"]) for job in jobs]
    print(json.dumps([asdict(r) for r in reports]))


if __name__ == "__main__":
    _main()
