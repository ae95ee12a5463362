"""Host memory of one rank's loader over a full epoch, against the size of the data set.

    python benchmarks/bench_memory.py [--sizes 10000 50000 115000] [--k 20] [--world-size 8]
                                      [--dir /tmp/radis-bench-memory] [--keep]

For each size a synthetic packed data set is written as a cache entry
(radis.data.packed_files.write_packed): per example a prompt of 30-60 tokens, a
reference of 15-60, a rationale of 50-200 with a top-k of k teacher rows per rationale
token, and 2 end-of-turn tokens (about 200 tokens and 125 teacher rows per example on
average, the order of the paper's ALMA data with self-generated rationales), packed
into 2048-token packs.

Then, in a fresh process per size and mode, rank 0 of `--world-size` ranks iterates one
whole epoch of a PackedLoader (2 packs per micro-batch, flash-attention layout, so
no 4D mask; every batch is collated with its teacher arrays), sampling the resident
memory of the process (/proc/self/status) every 20 micro-batches:

- mapped: `read_packed` as the trainer opens it (memory maps, pages released after
  each read);
- loaded: the same entry with every array copied into memory first, which is what the
  cache's format 1 did (npz shards, concatenated whole; its top-k was moreover dense,
  one row for every token, the "dense top-k" column).

Printed: the size on disk, the baseline RSS (after imports, before opening the data),
the peak RSS during the epoch and its growth over the baseline, for both modes, and
peak(size) / peak(smallest size). Linux only (it reads /proc).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 2048


def synthetic_dataset(n_examples: int, k: int, seed: int = 0):
    """A PackedDataset of `n_examples` synthetic examples (lengths in the module docstring)."""
    from radis.data.example import IGNORE, MT, RD
    from radis.data.packing import PackedDataset, pack_segments

    rng = np.random.default_rng(seed)
    prompt, ref, rat = rng.integers(30, 61, n_examples), rng.integers(15, 61, n_examples), rng.integers(50, 201, n_examples)
    eot = 2
    lengths = prompt + ref + rat + eot
    packs = pack_segments(lengths, MAX_TOKENS, window=1024, seed=seed)
    order = np.array([i for p in packs for i in p], dtype=np.int64)
    lens = lengths[order]
    seq_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    n = int(seq_offsets[-1])
    # spans: IGNORE for the prompt, MT for the reference, RD for rationale + end-of-turn
    starts = seq_offsets[:-1]
    spans = np.full(n, RD, dtype=np.int8)
    marks = np.zeros(n + 1, dtype=np.int64)
    np.add.at(marks, starts, 1)
    np.add.at(marks, starts + prompt[order], -1)
    spans[np.cumsum(marks[:-1]) > 0] = IGNORE
    marks[:] = 0
    np.add.at(marks, starts + prompt[order], 1)
    np.add.at(marks, starts + prompt[order] + ref[order], -1)
    spans[np.cumsum(marks[:-1]) > 0] = MT
    rows = rat[order].astype(np.int64)
    teacher_ids = rng.integers(0, 32000, (int(rows.sum()), k), dtype=np.int32)
    teacher_logprobs = np.sort(rng.standard_normal((int(rows.sum()), k), dtype=np.float32), axis=1)[:, ::-1] - 3
    return PackedDataset(
        tokens=rng.integers(0, 32000, n, dtype=np.int32), spans=spans, seq_offsets=seq_offsets,
        pack_offsets=np.concatenate([[0], np.cumsum([len(p) for p in packs])]).astype(np.int64),
        example_ids=[f"synthetic-{i}" for i in order.tolist()], max_tokens=MAX_TOKENS,
        teacher_ids=teacher_ids, teacher_logprobs=np.ascontiguousarray(teacher_logprobs),
        teacher_offsets=np.concatenate([[0], np.cumsum(rows)]).astype(np.int64),
        teacher_start=(prompt[order] + ref[order]).astype(np.int32), meta={"pad_token_id": 0},
    )


def memory() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def epoch(entry: str, mode: str, world_size: int) -> dict[str, float]:
    """One epoch of rank 0's loader over `entry` (run in a fresh process)."""
    import dataclasses

    from radis.data.loader import PackedLoader
    from radis.data.packed_files import read_packed

    base = memory()["VmRSS"]
    ds = read_packed(Path(entry))
    if mode == "loaded":
        arrays = {f.name: np.array(getattr(ds, f.name)) for f in dataclasses.fields(ds)
                  if isinstance(getattr(ds, f.name), np.ndarray)}
        ds = dataclasses.replace(ds, example_ids=list(ds.example_ids), stored_pack_stats=ds.pack_stats().copy(),
                                 release_pages=lambda: None, **{k: v for k, v in arrays.items()
                                                                if k != "stored_pack_stats"})
    loader = PackedLoader(ds, rank=0, world_size=world_size, packs_per_micro_batch=2, attn="flash_attention_2",
                          pad_token_id=0)
    peak, t0, n = memory()["VmRSS"], time.perf_counter(), 0
    for i, batch in enumerate(loader):
        n += batch["num_tokens"]
        assert "teacher_ids" in batch
        if i % 20 == 0:
            peak = max(peak, memory()["VmRSS"])
    end = memory()
    peak = max(peak, end["VmRSS"])
    return {"base": base, "peak": peak, "rss_anon_end": end["RssAnon"], "rss_file_end": end["RssFile"],
            "batches": len(loader), "tokens": n, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 115_000])
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/radis-bench-memory")
    ap.add_argument("--keep", action="store_true", help="keep the written entries")
    ap.add_argument("--epoch", nargs=2, metavar=("ENTRY", "MODE"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.epoch:
        print(json.dumps(epoch(args.epoch[0], args.epoch[1], args.world_size)))
        return

    from radis.data.packed_files import write_packed

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        entry = root / f"train-{size}-k{args.k}"
        if not (entry / "meta.json").is_file():
            t0 = time.perf_counter()
            ds = synthetic_dataset(size, args.k)
            write_packed(ds, entry)
            print(f"wrote {entry} ({ds.num_tokens:,} tokens, {ds.num_teacher_rows:,} teacher rows) "
                  f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            del ds
        meta = json.loads((entry / "meta.json").read_text())
        disk = sum(f.stat().st_size for f in entry.iterdir())
        dense = meta["tokens"] * args.k * 8  # format 1: int32 id + float32 log-prob for every token
        result = {"size": size, "tokens": meta["tokens"], "disk": disk, "dense_topk": dense}
        for mode in ("mapped", "loaded"):
            out = subprocess.run([sys.executable, __file__, "--world-size", str(args.world_size), "--epoch", str(entry),
                                  mode], check=True, capture_output=True, text=True, cwd=ROOT)
            result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(result)
        if not args.keep:
            shutil.rmtree(entry)

    mib = 2 ** 20
    first = rows[0]
    print(f"\nrank 0 of {args.world_size}, one epoch, k = {args.k}, {MAX_TOKENS}-token packs, 2 packs per micro-batch")
    head = (f"{'examples':>9} {'tokens':>11} {'on disk':>9} {'dense top-k':>11} | {'mapped peak':>11} {'growth':>7} "
            f"{'x first':>7} {'epoch s':>7} | {'loaded peak':>11} {'growth':>7} {'x first':>7} {'epoch s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        m, l_ = r["mapped"], r["loaded"]
        print(f"{r['size']:>9,} {r['tokens']:>11,} {r['disk'] / mib:>7.0f} M {r['dense_topk'] / mib:>9.0f} M | "
              f"{m['peak'] / mib:>9.0f} M {(m['peak'] - m['base']) / mib:>5.0f} M "
              f"{m['peak'] / first['mapped']['peak']:>7.2f} {m['seconds']:>7.2f} | "
              f"{l_['peak'] / mib:>9.0f} M {(l_['peak'] - l_['base']) / mib:>5.0f} M "
              f"{l_['peak'] / first['loaded']['peak']:>7.2f} {l_['seconds']:>7.2f}")
    print("(growth = peak RSS during the epoch - RSS after imports; x first = peak / peak of the smallest size)")


if __name__ == "__main__":
    main()
