"""The end-to-end demo behind `make demo`: RaDis against vanilla fine-tuning, small and real.

    python -m radis.demo [--out outputs/demo] [--config recipes/demo_smollm2.yaml] [--nproc N]

SmolLM2-135M-Instruct and the shipped de-en sample (radis/resources/demo) go through
the whole pipeline, each stage a `radis` command in its own process:

    rationales      radis rationales      the original model explains the reference translations
    train-radis     radis train           loss.method=radis on reference + rationale   (N ranks, ZeRO-3)
    train-vanilla   radis train           loss.method=vanilla on the references         (N ranks, ZeRO-3)
    export-radis    radis export          DeepSpeed checkpoint -> HF directory
    export-vanilla  radis export
    evaluate        radis evaluate        original, vanilla, radis: BLEU/chrF raw and cut,
                                          retention proxies, quality_vs_retention.png

N is the number of GPUs, or 2 CPU ranks over gloo without one. Resumable: a finished
stage is recorded in <out>/stages.json (atomically) and skipped by the next run; a
stage that fails stops the demo with its exit status, and re-running continues there
(training itself resumes from its last checkpoint). `--redo STAGE` runs a stage again.
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from radis.io import write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "recipes" / "demo_smollm2.yaml"


@dataclass
class Stage:
    name: str
    argv: list[str]  # `radis` subcommand and its arguments
    distributed: bool  # launched with torchrun on N ranks
    output: Path  # exists when the stage has finished


def demo_data() -> tuple[Path, Path]:
    """(train, test) JSONL files of the shipped demo sample."""
    root = Path(str(importlib.resources.files("radis") / "resources" / "demo"))
    train, test = root / "train.de-en.jsonl", root / "test.de-en.jsonl"
    for p in (train, test):
        if not p.is_file():
            raise FileNotFoundError(f"demo sample {p} is missing from the installed package")
    return train, test


def default_nproc() -> int:
    """GPUs when there are any, else 2 CPU ranks (ZeRO-3 over gloo)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 2


def build_stages(config: Path, out: Path) -> list[Stage]:
    from radis.config import load_config

    train, test = demo_data()
    # The shipped files replace the recipe's relative paths (the demo runs from any
    # directory); the recipe's `limit` on its first train source is kept.
    sources = load_config(config).data.train
    limit = sources[0].limit if sources else None
    langs = "src_lang: de, tgt_lang: en"
    pair = langs + (f", limit: {limit}" if limit is not None else "")
    rationales = out / "rationales"
    common = ["--config", str(config)]
    stages = [
        Stage("rationales", ["rationales", *common, "--no-progress", f"rationale.output_dir={rationales}",
                             f"data.train=[{{path: {json.dumps(str(train))}, {pair}}}]"], True, rationales / "rationales.jsonl"),
    ]
    for method in ("radis", "vanilla"):
        data = rationales / "rationales.jsonl" if method == "radis" else train
        source = f"{{path: {json.dumps(str(data))}}}" if method == "radis" else f"{{path: {json.dumps(str(data))}, {pair}}}"
        stages.append(Stage(f"train-{method}", ["train", *common, f"loss.method={method}",
                                                f"train.output_dir={out / method}", f"data.train=[{source}]"],
                            True, out / method / "checkpoints" / "latest"))
    for method in ("radis", "vanilla"):
        stages.append(Stage(f"export-{method}", ["export", "--checkpoint", str(out / method / "checkpoints"),
                                                 "--out", str(out / method / "hf"), "--overwrite"],
                            False, out / method / "hf" / "config.json"))
    models = f"[original=smollm2, vanilla={out / 'vanilla' / 'hf'}, radis={out / 'radis' / 'hf'}]"
    stages.append(Stage("evaluate", ["evaluate", *common, f"eval.models={models}", f"eval.output_dir={out / 'eval'}",
                                     f"eval.test=[{{path: {json.dumps(str(test))}, {langs}}}]"], True, out / "eval" / "summary.json"))
    return stages


def command_line(stage: Stage, nproc: int) -> list[str]:
    if stage.distributed and nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "--module", "radis.cli", *stage.argv]
    return [sys.executable, "-m", "radis.cli", *stage.argv]


def stage_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo needs is on disk
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # N ranks on the CPU cores: one rank per core share, or they oversubscribe.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(nproc, 1))))
    return env


def _load_state(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _save_state(path: Path, state: dict[str, dict]) -> None:
    write_json_atomic(path, state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m radis.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="output directory of all stages (default outputs/demo)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo recipe (default recipes/demo_smollm2.yaml)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks for rationales/train/evaluate (default: GPUs or 2)")
    parser.add_argument("--redo", action="append", default=[], metavar="STAGE", help="run STAGE again (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the stage commands, run nothing")
    args = parser.parse_args(argv)

    config = Path(args.config)
    if not config.is_file():
        print(f"radis demo: --config {config}: no such file (the recipe lives in the repository's recipes/)",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    nproc = args.nproc or default_nproc()
    stages = build_stages(config.resolve(), out)
    unknown = set(args.redo) - {s.name for s in stages}
    if unknown:
        print(f"radis demo: --redo {sorted(unknown)}: unknown stage; stages: {[s.name for s in stages]}", file=sys.stderr)
        return 2
    if args.dry_run:
        for s in stages:
            print(f"[{s.name}] {shlex.join(command_line(s, nproc))}")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "stages.json"
    state = _load_state(state_path)
    env = stage_env(nproc)
    print(f"radis demo: {len(stages)} stages into {out} on {nproc} rank(s)", flush=True)
    for s in stages:
        if s.name in args.redo:
            state.pop(s.name, None)
            if s.name.startswith("export-"):
                shutil.rmtree(s.output.parent, ignore_errors=True)
        if state.get(s.name, {}).get("done") and s.output.exists():
            print(f"[{s.name}] done earlier ({state[s.name]['seconds']:.0f} s), skipped", flush=True)
            continue
        cmd = command_line(s, nproc)
        print(f"[{s.name}] {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.run(cmd, env=env, check=False).returncode
        seconds = time.time() - t0
        if rc != 0 or not s.output.exists():
            why = f"exit status {rc}" if rc != 0 else f"finished without writing {s.output}"
            print(f"radis demo: stage {s.name} failed ({why}) after {seconds:.0f} s; re-run to resume here",
                  file=sys.stderr)
            return rc or 1
        state[s.name] = {"done": True, "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        _save_state(state_path, state)
        print(f"[{s.name}] finished in {seconds:.0f} s", flush=True)

    print_report(out, state)
    return 0


def print_report(out: Path, state: dict[str, dict]) -> None:
    """The evaluation table again (also after a fully skipped re-run) and the stage times."""
    from radis.evaluate.command import format_table

    summary = json.loads((out / "eval" / "summary.json").read_text(encoding="utf-8"))
    print("\n" + format_table(summary["models"]))
    for sig in summary.get("signatures", {}).values():
        print(f"  {sig}")
    total = sum(v.get("seconds", 0.0) for v in state.values())
    print("\nstage times: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in state.items()) + f"; total {total:.0f} s")
    png = out / "eval" / "quality_vs_retention.png"
    if png.is_file():
        print(f"plot: {png}")


if __name__ == "__main__":
    sys.exit(main())
