"""Peak host memory of `radis build-data` against the number of rationale examples.

    python benchmarks/bench_build_memory.py [--sizes 2000 8000 32000] [--dir /tmp/radis-bench-build]

The loader's memory is flat in the data set (benchmarks/bench_memory.py); this measures
the one-off build on rank 0 that writes the cache it reads. The records are the real
SmolLM2 `continue` rationales of the CPU comparison (160 ALMA de-en pairs with their
top-k 20, `outputs/smollm2_cpu/compare/generate/rationales`, or `--records`), repeated
under new ids up to each size, so every example takes the recorded-ids-and-teacher path
of radis.data.segments. Each size is built in a fresh `radis build-data` process (cache
off: a fresh cache directory) and its peak resident set read from the kernel
(its VmHWM at exit; see HWM_WRAPPER). Printed: examples, tokens, teacher rows, peak RSS, and the
growth per example between the smallest and largest size, extrapolated to the paper's
115k examples.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "outputs" / "smollm2_cpu" / "compare" / "generate" / "rationales"


def replicate(src: Path, out: Path, n: int) -> None:
    """`n` records (and their top-k) from the records in `src`, cycled under new ids."""
    from radis.data.records import load_topk, save_topk_atomic

    records = [json.loads(ln) for ln in (src / "rationales.jsonl").read_text(encoding="utf-8").splitlines()]
    topk = load_topk(src / "rationales.topk.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    lines, new_topk = [], {}
    for i in range(n):
        rec = dict(records[i % len(records)])
        old = rec["id"]
        rec["id"] = f"{old}#{i}"
        lines.append(json.dumps(rec, ensure_ascii=False))
        if old in topk:
            new_topk[rec["id"]] = topk[old]
    (out / "rationales.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    save_topk_atomic(out / "rationales.topk.safetensors", new_topk)


# The build's own peak: VmHWM of its process, read at its exit. Not getrusage(RUSAGE_CHILDREN):
# the child is forked (vfork) from this process, which holds the replicated records, and
# Linux keeps the larger peak across exec, so that counted this benchmark's memory, not
# the build's (it inflated the growth per example; see RESULTS.md).
HWM_WRAPPER = """
import atexit, runpy, sys
def _report():
    with open("/proc/self/status") as f:
        kib = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM"))
    sys.stderr.write(f"\\nbench-build-memory VmHWM {kib}\\n")
atexit.register(_report)
sys.argv = ["radis", *sys.argv[1:]]
runpy.run_module("radis.cli", run_name="__main__")
"""


def build(records: Path, cache: Path) -> dict:
    cmd = [sys.executable, "-c", HWM_WRAPPER, "build-data", "--config", str(ROOT / "recipes" / "smollm2_cpu.yaml"),
           f"data.train=[{{path: {records / 'rationales.jsonl'}}}]", "data.valid=[]", "data.max_tokens=2048",
           f"data.cache_dir={cache}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"build-data failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    peak = int(proc.stderr.rsplit("bench-build-memory VmHWM ", 1)[1].split()[0])  # KiB
    stats = json.loads(next(cache.glob("train-*/stats.json")).read_text())
    return {"peak_kib": peak, "seconds": seconds, "tokens": stats["packing"]["tokens"],
            "teacher_rows": stats["segments"]["tokens"]["rd"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    p.add_argument("--records", type=Path, default=RECORDS, help="a `radis generate` output dir with top-k")
    p.add_argument("--dir", type=Path, default=Path("/tmp/radis-bench-build"))
    args = p.parse_args(argv)
    if not (args.records / "rationales.topk.safetensors").is_file():
        sys.exit(f"bench_build_memory: no records with top-k at {args.records} (run `radis compare` or pass --records)")
    sizes = sorted(args.sizes)
    rows = []
    for n in sizes:
        work = args.dir / str(n)
        shutil.rmtree(work, ignore_errors=True)
        replicate(args.records, work / "records", n)
        row = build(work / "records", work / "cache")
        rows.append({"examples": n, **row})
        print(f"  {n:7d} examples: peak {row['peak_kib'] / 2**10:.0f} MiB in {row['seconds']:.0f} s", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    print("| examples | tokens | rationale tokens (teacher rows) | peak RSS (MiB) | seconds |")
    print("|----------|--------|---------------------------------|----------------|---------|")
    for r in rows:
        print(f"| {r['examples']} | {r['tokens']} | {r['teacher_rows']} | {r['peak_kib'] / 2**10:.0f} | "
              f"{r['seconds']:.0f} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        per = (b["peak_kib"] - a["peak_kib"]) / (b["examples"] - a["examples"])  # KiB per example
        print(f"\ngrowth {per:.1f} KiB per example; at the paper's 115k examples about "
              f"{(a['peak_kib'] + per * (115_000 - a['examples'])) / 2**20:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
