"""What MT-Bench and AlpacaEval add to `radis compare`, per model, with a real judge server.

    python benchmarks/bench_judged.py --config recipes/smollm2_cpu.yaml            # every arm of the recipe
    python benchmarks/bench_judged.py --config recipes/smollm2_cpu.yaml --arms vanilla,radis
    python benchmarks/bench_judged.py --table-only --out outputs/smollm2_cpu/compare   # the table of a finished run

Starts `transformers serve` (transformers' `serving` extra) with SmolLM2-135M-Instruct's
GGUF file on 127.0.0.1 as the judge (or uses --judge-url / --judge-model: a vLLM server, the
OpenAI API), runs `radis compare` with that judge, and prints one row per model:

    model | MT-Bench: answers s, judging s, judged, unparsed, score | AlpacaEval: answers s,
    judging s, judged, unparsed, win rate | the annotator

from <out>/eval/<model>/results.json. The subsets are the recipe's eval.mt_bench.limit and
eval.alpaca_eval.limit. The server is stopped however the run ends.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_judge(port: int, timeout: float = 300, env: dict[str, str] | None = None
                ) -> tuple[subprocess.Popen, str, float]:
    """`transformers serve` with SmolLM2's GGUF file on 127.0.0.1:port; (process, model
    name, seconds to healthy). RuntimeError, with the server's output, if it exits or is
    not healthy within `timeout` (the process is stopped then)."""
    sys.path.insert(0, str(ROOT))
    from radis.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    model = f"{gguf.parent}:{gguf.name}"  # how `transformers serve` names a GGUF file
    cmd = [os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--log-level", "warning", model]
    t0 = time.time()
    # its output to a file, not a pipe: its access log over a long run would fill a pipe
    # nobody reads and block the server
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- open as long as the server runs
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, model, time.time() - t0
        except OSError:
            pass
        if proc.poll() is not None or time.time() - t0 > timeout:
            stop(proc)
            log.seek(0)
            raise RuntimeError(f"transformers serve did not come up within {timeout:.0f} s (exit {proc.returncode}):\n"
                               f"{log.read().decode(errors='replace')[-3000:]}")
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(out: Path) -> str:
    summary = json.loads((out / "eval" / "summary.json").read_text(encoding="utf-8"))
    head = ("| model | MT-Bench answers s | judging s | judged | unparsed | score | AlpacaEval answers s | judging s "
            "| judged | unparsed | win rate | annotator |")
    lines = [head, "|" + "|".join("---" for _ in range(12)) + "|"]
    for row in summary["models"]:
        r = json.loads((out / "eval" / row["model"] / "results.json").read_text(encoding="utf-8"))
        mt, ae = r.get("mt_bench") or {}, r.get("alpaca_eval") or {}
        lines.append(f"| {row['model']} | {_f(mt.get('answer_s'))} | {_f(mt.get('judge_s'))} | {mt.get('judged', '-')} "
                     f"| {mt.get('unparsed', '-')} | {_f(mt.get('overall'), 2)} | {_f(ae.get('answer_s'))} "
                     f"| {_f(ae.get('judge_s'))} | {ae.get('judged', '-')} | {ae.get('unparsed', '-')} "
                     f"| {_f(ae.get('win_rate'))} | {(ae.get('annotator') or '-').split(' ')[0]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "recipes" / "smollm2_cpu.yaml"))
    ap.add_argument("--arms", default=None, help="comma-separated arms (default: the recipe's compare.arms)")
    ap.add_argument("--out", default=None, help="radis compare --out (default: the recipe's compare.output_dir)")
    ap.add_argument("--port", type=int, default=0, help="the judge server's port (default: a free one)")
    ap.add_argument("--judge-url", default=None, help="an already running judge (then no server is started)")
    ap.add_argument("--judge-model", default=None)
    ap.add_argument("--table-only", action="store_true", help="print the table of a finished run")
    args, overrides = ap.parse_known_args(argv)
    sys.path.insert(0, str(ROOT))
    from radis.config import load_config

    cfg = load_config(args.config, overrides)
    out = Path(os.path.expanduser(args.out or cfg.compare.output_dir))
    if args.table_only:
        print(table(out))
        return 0
    proc, url, model = None, args.judge_url, args.judge_model
    if url is None:
        port = args.port
        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        try:
            proc, model, startup = start_judge(port)
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
        url = f"http://127.0.0.1:{port}/v1"
        print(f"judge: transformers serve {model} healthy after {startup:.0f} s at {url}", flush=True)
    try:
        cmd = [sys.executable, "-m", "radis.cli", "compare", "--config", args.config, "--out", str(out),
               *(["--arms", args.arms] if args.arms else []), *overrides,
               f"eval.judge.base_url={url}", f"eval.judge.model={model}"]
        t0 = time.time()
        done = subprocess.run(cmd, check=False)
        print(f"radis compare: exit {done.returncode} after {time.time() - t0:.0f} s", flush=True)
        if done.returncode != 0:
            return done.returncode
    finally:
        if proc is not None:
            stop(proc)
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
