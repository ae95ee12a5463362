"""Packing benchmark: efficiency beside a padded loader, and tokenise + pack throughput.

    python benchmarks/bench_packing.py [--data ../shared/data/alma/deen] [--directions de-en en-de]

Data: the 14,211 ALMA de-en training pairs (line-aligned train.de-en.de / .en), by
default in both directions (28,422 examples), formatted with SmolLM2-135M-Instruct's
chat template and tokenizer exactly as `radis build-data` does (vanilla targets: prompt
| reference | end-of-turn; there are no rationales in this data).

For max_tokens 2048 and 4096 it compares
- packed: radis.data.packing (best-fit-decreasing in windows of data.pack_window,
  seeded), every micro-batch one pack of max_tokens slots;
- padded: the usual per-batch padded loader at the same tokens per batch: examples in
  random order, a batch takes examples while (batch size x its longest example) stays
  within max_tokens, every example padded to the batch's longest.
efficiency = real tokens / slots computed (batches x slots per batch).

Throughput is measured on one core (CPU affinity 1 core, torch and tokenizers
single-threaded): tokenise = ChatFormat + build_segments tokens/s, pack =
PackedDataset.from_segments tokens/s, collate = collate_packs (sdpa 4D mask, fp32)
tokens/s at each max_tokens.
"""
from __future__ import annotations

import os

# One core, set before tokenizers / torch start their thread pools.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from radis.config import SourceConfig, load_config
from radis.data.packing import PackedDataset, collate_packs

ROOT = Path(__file__).resolve().parents[1]


def padded_batches(lengths: np.ndarray, budget: int, seed: int) -> tuple[int, int]:
    """(batches, slots) of a per-batch padded loader with `budget` tokens per batch."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    batches = slots = 0
    longest = count = 0
    for i in order.tolist():
        n = int(lengths[i])
        if count and max(longest, n) * (count + 1) > budget:
            batches += 1
            slots += longest * count
            longest = count = 0
        longest, count = max(longest, n), count + 1
    if count:
        batches += 1
        slots += longest * count
    return batches, slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "alma" / "deen"))
    parser.add_argument("--directions", nargs="+", default=["de-en", "en-de"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sizes", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)

    from radis.data.prompts import ChatFormat
    from radis.data.segments import build_segments
    from radis.data.sources import read_sources
    from radis.models import load_tokenizer

    cfg = load_config(None)
    d = Path(args.data)
    src = SourceConfig(path=str(d / "train.de-en.de"), target_path=str(d / "train.de-en.en"),
                       directions=list(args.directions))
    examples, _ = read_sources([src])
    tokenizer = load_tokenizer(args.model)
    fmt = ChatFormat(tokenizer, cfg.data, cfg.model.chat_template)

    t0 = time.perf_counter()
    segments, _ = build_segments(fmt, examples, separator=cfg.data.separator, max_tokens=max(args.sizes),
                                 with_rationale=False)
    t_tok = time.perf_counter() - t0
    lengths = np.array([len(s) for s in segments])
    total = int(lengths.sum())

    print(f"data: {d} ({len(examples)} examples, directions {' '.join(args.directions)}), tokenizer {args.model}, "
          f"template {fmt.template}")
    print(f"segments: {len(segments)}, tokens {total}, length mean {lengths.mean():.1f} / max {lengths.max()}")
    print()
    rows = [("max_tokens", "loader", "batches", "real tokens", "slots", "efficiency")]
    speed = [("step", "max_tokens", "tokens/s (1 core)")]
    speed.append(("tokenise (ChatFormat + segments)", "-", f"{total / t_tok:,.0f}"))
    for size in args.sizes:
        fits = [s for s in segments if len(s) <= size]
        real = sum(len(s) for s in fits)
        t0 = time.perf_counter()
        ds = PackedDataset.from_segments(fits, max_tokens=size, window=cfg.data.pack_window, seed=args.seed)
        t_pack = time.perf_counter() - t0
        rows.append((str(size), "packed", str(ds.num_packs), str(real), str(ds.num_packs * size),
                     f"{real / (ds.num_packs * size):.2%}"))
        nb, slots = padded_batches(np.array([len(s) for s in fits]), size, args.seed)
        rows.append((str(size), "padded", str(nb), str(real), str(slots), f"{real / slots:.2%}"))
        speed.append(("pack (from_segments)", str(size), f"{real / t_pack:,.0f}"))
        n = min(ds.num_packs, 20)
        t0 = time.perf_counter()
        for p in range(n):
            collate_packs([ds.pack(p)], pad_token_id=0, attn="sdpa", dtype=torch.float32, pad_to=size)
        t_col = time.perf_counter() - t0
        tok = int(sum(len(ds.pack(p)) for p in range(n)))
        speed.append(("collate (sdpa 4D mask, fp32)", str(size), f"{tok / t_col:,.0f}"))
    print(table(rows))
    print()
    print(table(speed))


def table(rows: list[tuple[str, ...]]) -> str:
    """A Markdown table, columns padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows[1:]])


if __name__ == "__main__":
    main()
