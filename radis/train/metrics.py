"""Training metrics: FLOPs / MFU accounting and the two sinks (JSONL + TensorBoard).

FLOPs of one optimizer step (forward + backward, PaLM appendix B convention, the
causal mask's halving not taken):

    flops = 6 * N * tokens  +  12 * n_layers * hidden * sum_over_examples(len**2)

N counts the parameters that take part in matrix multiplies (all parameters minus the
input embedding table; a tied lm_head counts once, as the output projection). The
attention term sums len**2 over the *examples* of every pack, not over packs: a pack of
four 512-token examples attends 4 * 512**2 pairs, not 2048**2 (the block-diagonal mask /
varlen attention never computes the rest).

    pack:  [ ex0 (l=3) | ex1 (l=2) | ex2 (l=3) ]       sum len**2 = 9 + 4 + 9 = 22
    cu_seqlens = [0, 3, 5, 8]                           (not 8**2 = 64)

MFU = achieved FLOP/s per rank / peak FLOP/s per rank. The peak comes from
`RADIS_PEAK_TFLOPS` when set, else a table of known GPUs (dense bf16/fp16 tensor-core
peak), else, on CPU, a measured fp32 matmul throughput of this process (so CPU "MFU" is
relative to what a large matmul reaches on these cores, not to a datasheet).
"""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from radis.io import write_text_atomic

# Dense (non-sparse) tensor-core peaks in TFLOP/s for bf16/fp16, per GPU.
_GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; PCIe is lower (756) and matched first below
    "H100 PCIE": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "V100": 125.0,
    "RTX 4090": 165.0,
}


def count_matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in matrix multiplies: all minus the input embedding table.

    Works under ZeRO-3 (partitioned parameters report their full size in `ds_numel`).
    A tied output projection shares the embedding's storage and is counted once, as a
    matmul weight.
    """
    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    total = sum(numel(p) for p in model.parameters())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None:
        tied = out is not None and out.weight is emb.weight
        if not tied:
            total -= numel(emb.weight)
    return total


def sum_sq_lengths(cu_seqlens: torch.Tensor) -> int:
    """sum(len**2) over the examples delimited by `cu_seqlens` ([n+1] cumulative offsets)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return int((lengths * lengths).sum())


def step_flops(matmul_params: int, n_layers: int, hidden: int, tokens: int, sum_sq: int) -> float:
    """Forward + backward FLOPs for `tokens` tokens whose examples have sum(len**2) = `sum_sq`."""
    return 6.0 * matmul_params * tokens + 12.0 * n_layers * hidden * sum_sq


def peak_flops_per_rank(device: torch.device) -> float:
    """Peak FLOP/s of one rank (see module docstring for the sources, in order)."""
    env = os.environ.get("RADIS_PEAK_TFLOPS")
    if env:
        try:
            return float(env) * 1e12
        except ValueError:
            raise ValueError(f"RADIS_PEAK_TFLOPS: expected a number of TFLOP/s, got {env!r}") from None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).upper()
        for key in sorted(_GPU_PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return _GPU_PEAK_TFLOPS[key] * 1e12
        return float("nan")  # unknown GPU: MFU is reported as NaN rather than guessed
    return measured_cpu_matmul_flops()


_cpu_peak_cache: float | None = None


def measured_cpu_matmul_flops(n: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 FLOP/s of an n x n matmul in this process (cached)."""
    global _cpu_peak_cache
    if _cpu_peak_cache is None:
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        _cpu_peak_cache = 2.0 * n**3 / max(best, 1e-9)
    return _cpu_peak_cache


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or the process's peak resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class MetricsWriter:
    """Writes scalars to `<dir>/metrics.jsonl` (one JSON object per record) and TensorBoard.

    Only rank 0 writes (the others get an inactive writer). A resumed run passes the step
    of the checkpoint it restored: `truncate_after` drops records of later steps (a
    crashed run may have logged them) and TensorBoard hides them (purge_step), so the
    curves continue without duplicates and the earlier records stay. A fresh run
    (resume_step None) starts both empty: records already there come from a run that
    crashed before its first checkpoint, and every one of their steps is trained again.
    """

    def __init__(self, out_dir: str | os.PathLike, active: bool, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.active = active
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tb_dir = Path(out_dir) / "tensorboard"
        if resume_step is None:
            if self.path.is_file():
                write_text_atomic(self.path, "")
            for events in tb_dir.glob("events.out.tfevents.*"):
                events.unlink()
        else:
            self.truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events of steps > resume_step written by a crashed run.
            self._tb = SummaryWriter(str(tb_dir), purge_step=None if resume_step is None else resume_step + 1)

    def truncate_after(self, step: int) -> None:
        """Keep only records with record["step"] <= step (atomic rewrite)."""
        if not self.active or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def write(self, step: int, scalars: dict[str, Any], kind: str = "train") -> None:
        """One record {"kind", "step", "time", **scalars}; TensorBoard tag `<kind>/<name>`."""
        if not self.active:
            return
        rec = {"kind": kind, "step": step, "time": time.time(), **scalars}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike, kind: str | None = "train") -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (optionally only one kind), in file order."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out
