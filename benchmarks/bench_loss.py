"""Benchmark of the fused RaDis loss: time and peak extra memory of one forward + backward.

One "step" starts from hidden states h [N, d] and the LM-head weight W [V, d] (both
requiring grad) and ends after backward (grads of h and W exist), so every variant
pays for the same outputs:

    naive                 logits = h @ W.T; logits.float(); F.cross_entropy for the MT
                          targets and for the RD targets (sum), pooled mean -- as an HF-style step
    radis_torch           logits = h @ W.T; radis_loss(logits, impl="torch", inplace=True)
    radis_linear_torch    radis_linear_loss(h, W, impl="torch", chunk_size=C): no [N, V] logits,
                          only the target rows go through the head (target_rows as the collator gives them)
    radis_linear_torch_all   the same with skip_ignored=False: every row, IGNORE rows computed and zeroed
  GPU only:
    radis_triton          logits = h @ W.T; radis_loss(logits, impl="triton", inplace=True)
    radis_linear_triton   radis_linear_loss(h, W, impl="triton", chunk_size=C), target rows only
    compiled_ce           the naive step under torch.compile
    liger_flce            Liger-Kernel's fused linear cross entropy (if importable; plain
                          CE over MT u RD = the pooled loss with w_mt = w_rd = 1)
    cce                   apple's cut-cross-entropy `linear_cross_entropy` (if importable), same loss
  the floor, both devices:
    matmuls               only the three matmuls a head must do on the target rows: logits =
                          h_t @ W.T, then logits @ W and logits.T @ h_t (the logits standing in
                          for their gradient): what no fused loss can go below

Targets: `--spans-from DIR` takes the span layout of real packed data (a cache entry
that `radis build-data` wrote, e.g. ALMA de-en with rationales): its packs are collated
as the trainer does and the first N rows' spans / target positions are used (tiled when
the data is shorter), with random target ids. Without it, a synthetic mix: 40% IGNORE
(prompt), 20% MT, 40% RD, 3% of span targets set to -100.

Memory method.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the
  memory allocated before the step (inputs), i.e. the allocator's exact peak.
- CPU: torch's CPU allocator keeps no statistics and tracemalloc does not see it, so
  each (variant, N) runs in a fresh subprocess and reports the process's peak resident
  set (getrusage ru_maxrss) minus its resident set just before the first step. The
  subprocess runs with MALLOC_MMAP_THRESHOLD_=131072 so that every large tensor is its own
  mmap and is returned to the OS when freed: RSS then tracks live tensors (the number
  includes allocator slack and the grads of h and W, the same for every variant).
  Inputs are created in place so set-up never peaks above the pre-step RSS.
- Both report the peak including the gradients of h and W, and "excl. grads": that peak
  minus their size -- the gradients are outputs every variant must produce (at d=4096
  grad W alone is 500 MiB), so the memory goal (fused-linear <= 1/4 of naive) is
  judged on what the loss itself costs.

Time: the first step is the memory measurement (and warm-up); the reported time is the
median of `--repeats` further steps (CUDA: synchronised).

Loss: the first step's value, for every variant on the same inputs. A variant whose loss
is not naive's (relative difference over LOSS_RTOL of the dtype) is named under the
table and the script exits 1: its time would be that of another computation. So is a
variant that fails; the others are still measured and tabled.

    python benchmarks/bench_loss.py                          # CPU, scaled down: d=512
    python benchmarks/bench_loss.py --d 4096                 # the full size (slow on CPU)
    python benchmarks/bench_loss.py --device cuda --dtype bfloat16 --d 4096
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from radis.models import DTYPES

CPU_VARIANTS = ["naive", "radis_torch", "radis_linear_torch_all", "radis_linear_torch", "matmuls"]
GPU_VARIANTS = CPU_VARIANTS + ["radis_triton", "radis_linear_triton", "compiled_ce", "liger_flce", "cce"]
# variants from other packages: the module each needs
OPTIONAL = {"liger_flce": "liger_kernel", "cce": "cut_cross_entropy"}


def real_spans(cache_entry: str, n: int) -> torch.Tensor:
    """[n] int8 spans of the target rows of real packed data (0 = no target), collated as
    the trainer collates (labels shifted, one pack per row of max_tokens), tiled to n."""
    from pathlib import Path

    from radis.data.packed_files import read_packed
    from radis.data.packing import collate_packs

    ds = read_packed(Path(cache_entry))
    rows, total = [], 0
    for p in range(ds.num_packs):
        batch = collate_packs([ds.pack(p)], pad_token_id=0, attn="flash_attention_2")  # no [T, T] mask needed
        rows.append(torch.where(batch["labels"][0] != -100, batch["spans"][0], 0).to(torch.int8))
        total += rows[-1].numel()
        if total >= n:
            break
    flat = torch.cat(rows)
    return flat.repeat((n + flat.numel() - 1) // flat.numel())[:n]


def span_mix(spans: torch.Tensor) -> str:
    n = max(spans.numel(), 1)
    return " / ".join(f"{name} {100 * int((spans == i).sum()) / n:.1f}%" for i, name in enumerate(("none", "MT", "RD")))


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype, device: str, seed: int = 0, spans_from: str | None = None):
    """h [n, d], W [v, d] (requires grad), targets [n] int64, spans [n] int8; no temporaries."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, generator=g, device=device, dtype=dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, device=device, dtype=dtype)
    w.mul_(d**-0.5)
    w.requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    if spans_from:
        spans = real_spans(spans_from, n).to(device)
        targets[spans == 0] = -100
    else:
        u = torch.rand(n, generator=g, device=device)
        spans = torch.where(u < 0.4, 0, torch.where(u < 0.6, 1, 2)).to(torch.int8)
        targets[(spans == 0) | (torch.rand(n, generator=g, device=device) < 0.03)] = -100
    return h, w, targets, spans


def naive_loss(h, w, targets, spans):
    logits = (h @ w.t()).float()
    s_mt = F.cross_entropy(logits, torch.where(spans == 1, targets, -100), reduction="sum")
    s_rd = F.cross_entropy(logits, torch.where(spans == 2, targets, -100), reduction="sum")
    n_tok = ((spans > 0) & (targets != -100)).sum().clamp(min=1)
    return (s_mt + s_rd) / n_tok


_COMPILED = None


class MatmulsOnly(torch.autograd.Function):
    """logits = h @ W.T forward; grad_h = logits @ W, grad_W = logits.T @ h backward: the
    three matmuls of a head, with the logits as a stand-in gradient, and nothing else."""

    @staticmethod
    def forward(ctx, h, w):
        logits = h @ w.t()
        ctx.save_for_backward(h, w, logits)
        return logits.float().sum()  # the sum is O(M x V) reads, a small share of the matmuls' time

    @staticmethod
    def backward(ctx, _grad):
        h, w, logits = ctx.saved_tensors
        return logits @ w, logits.t() @ h


def step_fn(variant: str, chunk: int, rows: torch.Tensor | None = None):
    """The function (h, w, targets, spans) -> scalar loss for one variant. `rows`: the target
    rows of those targets, found beforehand as the trainer's collator does (else per call)."""
    from radis.loss import radis_linear_loss, radis_loss, target_rows_of

    def rows_of(t, s):
        return rows if rows is not None else target_rows_of(t, s)

    if variant == "naive":
        return naive_loss
    if variant in ("radis_torch", "radis_triton"):
        impl = variant.split("_")[1]

        def fn(h, w, t, s):
            # inplace: the matmul output is needed by nobody else (its backward reads h, W)
            return radis_loss(h @ w.t(), t, s, impl=impl, inplace=True, validate=False, chunk_size=chunk).loss

        return fn
    if variant == "matmuls":
        def floor(h, w, t, s):
            # gathering the rows is outside the autograd graph's matmuls but inside the time,
            # as it is for radis_linear_*: their floor
            return MatmulsOnly.apply(h.index_select(0, rows_of(t, s)), w)

        return floor
    if variant == "radis_linear_torch_all":
        return lambda h, w, t, s: radis_linear_loss(h, w, t, s, impl="torch", validate=False, chunk_size=chunk,
                                                    skip_ignored=False).loss
    if variant in ("radis_linear_torch", "radis_linear_triton"):
        impl = variant.split("_")[2]

        def linear(h, w, t, s):
            # the trainer's collator finds the target rows on the host; the step gets them ready
            return radis_linear_loss(h, w, t, s, impl=impl, validate=False, chunk_size=chunk,
                                     target_rows=rows_of(t, s)).loss

        return linear
    if variant == "compiled_ce":
        global _COMPILED
        # static shapes: each N gets its own specialised kernels, as a fixed-size trainer's
        # would (the default would recompile the second N as dynamic, slower code)
        _COMPILED = _COMPILED or torch.compile(naive_loss, dynamic=False)
        return _COMPILED
    if variant == "liger_flce":
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy,
        )

        return lambda h, w, t, s: liger_fused_linear_cross_entropy(h, w, torch.where(s > 0, t, -100))
    if variant == "cce":
        from cut_cross_entropy import linear_cross_entropy

        # its own Triton kernel on CUDA; on a CPU (the suite's check of this call) its
        # torch.compile path, the kernel having none
        return lambda h, w, t, s: linear_cross_entropy(h, w, torch.where(s > 0, t, -100), ignore_index=-100,
                                                       reduction="mean", impl="cce" if h.is_cuda else "torch_compile")
    raise ValueError(f"--variant: unknown {variant!r}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(variant: str, n: int, v: int, d: int, dtype: torch.dtype, device: str, chunk: int, repeats: int,
            spans_from: str | None = None) -> dict:
    """Peak extra memory (first step) and median time (next `repeats` steps) of one variant."""
    from radis.loss import target_rows_of

    h, w, t, s = make_inputs(n, v, d, dtype, device, spans_from=spans_from)
    fn = step_fn(variant, chunk, rows=target_rows_of(t, s))  # the collator's job, outside the measurement
    cuda = device.startswith("cuda")

    def one_step() -> torch.Tensor:
        h.grad = w.grad = None
        loss = fn(h, w, t, s)
        loss.backward()
        return loss

    if cuda:
        if variant == "compiled_ce":  # compile outside the measurement
            one_step()
        torch.cuda.synchronize()
        h.grad = w.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = one_step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        loss = one_step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    loss = loss.item()  # outside the time: every variant's value, to check that they agree (loss_check)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        one_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "n": n, "v": v, "d": d, "dtype": str(dtype).replace("torch.", ""),
            "device": device, "chunk": chunk, "spans": span_mix(s), "loss": loss, "time_s": statistics.median(times),
            "peak_extra_mib": peak / 2**20,
            # the grads of h and W: outputs every variant must produce (the optimizer needs them)
            "grads_mib": (h.numel() * h.element_size() + w.numel() * w.element_size()) / 2**20}


def run_cpu_worker(args, variant: str, n: int) -> dict:
    """One measurement in a fresh process (see the memory method in the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--worker", variant, "--n", str(n), "--v", str(args.v), "--d", str(args.d),
           "--dtype", args.dtype, "--chunk", str(args.chunk), "--repeats", str(args.repeats), "--device", "cpu"]
    if args.spans_from:
        cmd += ["--spans-from", args.spans_from]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {variant} N={n} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _excl(row: dict) -> float:
    """Peak extra memory beyond the gradient outputs (what the loss itself costs)."""
    return row["peak_extra_mib"] - row["grads_mib"]


# Variants whose value is not the loss (the floor returns a sum of its logits).
NOT_A_LOSS = ("matmuls",)
# How far a variant's loss may be from naive's on the same inputs: fp32 reorders sums
# only; half-precision logits differ by where each variant rounds them.
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}


def table(rows: list[dict]) -> str:
    lines = [("| N | V | d | dtype | device | variant | loss | time (s) | peak extra (MiB) | excl. grads (MiB) "
             "| mem / naive (excl. grads) | time / naive |"),
             ("|---|---|---|-------|--------|---------|------|----------|------------------|-------------------"
             "|---------------------------|--------------|")]
    naive = {(r["n"], r["device"]): r for r in rows if r["variant"] == "naive"}
    for r in rows:
        ref = naive.get((r["n"], r["device"]))
        mem = f"{_excl(r) / _excl(ref):.2f}" if ref and _excl(ref) > 0 else "-"
        tim = f"{r['time_s'] / ref['time_s']:.2f}" if ref else "-"
        loss = "-" if r["variant"] in NOT_A_LOSS else f"{r['loss']:.5f}"
        lines.append(f"| {r['n']} | {r['v']} | {r['d']} | {r['dtype']} | {r['device']} | {r['variant']} | {loss} | "
                     f"{r['time_s']:.3f} | {r['peak_extra_mib']:.0f} | {_excl(r):.0f} | {mem} | {tim} |")
    return "\n".join(lines)


def loss_check(rows: list[dict]) -> list[str]:
    """One line per variant whose loss is not naive's on the same inputs (within
    LOSS_RTOL): its times would compare another computation, so the table says so."""
    naive = {(r["n"], r["device"]): r for r in rows if r["variant"] == "naive"}
    out = []
    for r in rows:
        ref = naive.get((r["n"], r["device"]))
        if ref is None or r["variant"] in NOT_A_LOSS:
            continue
        rel = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
        if not rel <= LOSS_RTOL[r["dtype"]]:  # a NaN fails too
            out.append(f"N={r['n']}: {r['variant']} loss {r['loss']:.6f} is not naive's {ref['loss']:.6f} "
                       f"(relative difference {rel:.1e} > {LOSS_RTOL[r['dtype']]:.0e}): not the same loss")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[2048, 8192], help="tokens per step")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size")
    p.add_argument("--d", type=int, default=512, help="hidden size (4096 = 7B; default scaled down for CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--chunk", type=int, default=1024, help="rows per chunk of the fused paths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=None, choices=GPU_VARIANTS, metavar="VARIANT",
                   help=f"subset to run, of: {' '.join(GPU_VARIANTS)}")
    p.add_argument("--spans-from", default=None, metavar="CACHE_DIR",
                   help="span layout of real packed data: a cache entry of `radis build-data` (default: synthetic)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = DTYPES[args.dtype]

    if args.worker:  # child process of a CPU run: one measurement, one JSON line
        torch.manual_seed(0)
        print(json.dumps(measure(args.worker, args.n[0], args.v, args.d, dtype, "cpu", args.chunk, args.repeats,
                                 args.spans_from)))
        return 0

    variants = args.variants or (GPU_VARIANTS if device.startswith("cuda") else CPU_VARIANTS)
    rows, failed = [], []
    # The table's head now and each row as it is measured (the whole table again at the
    # end): a run stopped at gpu-check's time limit still leaves the rows that ran.
    print("\n".join(table([]).splitlines()[:2]), flush=True)
    for n in args.n:
        for variant in variants:
            if variant in OPTIONAL and importlib.util.find_spec(OPTIONAL[variant]) is None:
                print(f"skip {variant}: {OPTIONAL[variant]} not installed", file=sys.stderr)
                continue
            # One variant that fails (a peer library at odds with this torch / triton, an
            # out-of-memory) is named and the others still measured: on a GPU lent for
            # minutes, the rows that did run are what the run is for.
            try:
                if device == "cpu":
                    row = run_cpu_worker(args, variant, n)
                else:
                    row = measure(variant, n, args.v, args.d, dtype, device, args.chunk, args.repeats,
                                  args.spans_from)
            except Exception as err:  # noqa: BLE001 - reported below, and the exit status says so
                failed.append(f"N={n}: {variant} failed: {type(err).__name__}: {str(err).strip()[-1500:]}")
                print(failed[-1], file=sys.stderr)
                continue
            finally:
                if device != "cpu":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(table(rows).splitlines()[-1], flush=True)
    origin = f"span layout of {args.spans_from}" if args.spans_from else "synthetic"
    for n in args.n:
        mix = next((r["spans"] for r in rows if r["n"] == n), None)
        if mix:
            print(f"N={n}: targets {mix} of the rows ({origin})")
    print("\n" + table(rows))
    mismatches = loss_check(rows)
    for line in mismatches + failed:
        print(line)
    for n in args.n:
        by = {r["variant"]: r for r in rows if r["n"] == n}
        for fused in ("radis_linear_torch", "radis_linear_triton"):
            if fused in by and "matmuls" in by:
                print(f"N={n}: {fused} time {by[fused]['time_s'] / by['matmuls']['time_s']:.2f} x the head's own "
                      "matmuls (GPU goal <= 1.10)")
        for peer in ("cce", "liger_flce"):
            if peer in by and "radis_linear_triton" in by:
                print(f"N={n}: radis_linear_triton time {by['radis_linear_triton']['time_s'] / by[peer]['time_s']:.2f} x "
                      f"{peer}, peak memory {by['radis_linear_triton']['peak_extra_mib'] / max(by[peer]['peak_extra_mib'], 1e-9):.2f} x")
        if "naive" in by and "radis_linear_torch" in by:
            mem = _excl(by["radis_linear_torch"]) / _excl(by["naive"])
            tim = by["radis_linear_torch"]["time_s"] / by["naive"]["time_s"]
            print(f"\nN={n}: fused-linear (torch) peak extra memory beyond the grads {mem:.2f} x naive (goal <= 0.25), "
                  f"time {tim:.2f} x naive (goal <= 0.50)")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)
    return 1 if mismatches or failed else 0


if __name__ == "__main__":
    sys.exit(main())
