"""The launchers on the two-host local cluster: what the cluster tests measure, as tables.

    sudo .venv/bin/python benchmarks/bench_cluster.py          # runs `pytest -m cluster` (about 15 min on 2 cores)
    python benchmarks/bench_cluster.py --report rows.jsonl     # the tables of rows already measured

Runs the cluster tests (tests/test_cluster.py, on tests/local_cluster.py: network
namespaces, sshd, pdsh, munge, Slurm; root and the Debian packages of `make cluster-deps`),
which append one JSON row per measured run to RADIS_CLUSTER_REPORT, then prints one table
per launcher:

    test | set-up s | first step s | after step | survivor exit s | launcher exit s (status)
         | cut-off rank exit s | this job's ranks gone s | other job | resume s | bit-exact

Times: `first step` from the launch command to the first optimizer step's record;
`survivor exit` and `launcher exit` from the moment the host was killed or cut off (for
SIGTERM: from the signal); `resume` is the whole second run (for Slurm: from the node's
return, so it includes Slurm's hold of a requeued job). The model is the tests' tiny
Llama, one CPU rank per host, train.dist_timeout_s 30.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [("test", "test"), ("set-up s", "setup_s"), ("first step s", "first_step_s"), ("after step", "after_step"),
           ("survivor exit s", "survivor_exit_s"), ("launcher exit s (status)", None),
           ("cut-off rank exit s", "cut_off_rank_exit_s"), ("this job's ranks gone s", "ranks_gone_s"),
           ("other job", "other_job"), ("resume s", "resume_s"), ("bit-exact", "bit_exact")]


def _cell(row: dict, key: str | None) -> str:
    if key is None:  # the launcher's exit and its status together
        if row.get("launcher_exit_s") is None:
            return "-"
        return f"{row['launcher_exit_s']} ({row.get('launcher_rc', '?')})"
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def tables(rows: list[dict]) -> str:
    out = []
    for launcher in dict.fromkeys(r["launcher"] for r in rows):
        out.append(f"\n{launcher}\n")
        out.append("| " + " | ".join(name for name, _ in COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        for row in (r for r in rows if r["launcher"] == launcher):
            out.append("| " + " | ".join(_cell(row, key) for _, key in COLUMNS) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", help="print the tables of this JSON Lines file instead of running the tests")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (e.g. -k slurm)")
    args = ap.parse_args(argv)
    if args.report:
        rows = [json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]
        print(tables(rows))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rows.jsonl"
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cluster", "-q", "-p", "no:cacheprovider",
                               "tests/test_cluster.py", *args.pytest_args], cwd=ROOT,
                              env={**os.environ, "RADIS_CLUSTER_REPORT": str(report)}, check=False)
        suite_s = time.monotonic() - t0
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    print(tables(rows))
    print(f"\nthe cluster tests: exit {done.returncode}, {suite_s / 60:.1f} min")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
