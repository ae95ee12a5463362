"""The end-to-end demo behind `make demo`: RaDis against vanilla fine-tuning, small and real.

    python -m radis.demo [--out outputs/demo] [--arms vanilla,radis] [--nproc N] [--dry-run]

SmolLM2-135M-Instruct and the shipped de-en sample (radis/resources/demo) go through the
whole pipeline with `radis compare` (radis.compare): generate the rationales, train every
arm (N ranks, ZeRO-3), export, evaluate the original model and the arms (BLEU / chrF raw
and cut, retention proxies, quality_vs_retention.png), one table at the end.

The default arms are vanilla and radis (about 15 minutes on 2 CPU cores); `--arms
vanilla,radis,radis_kd,seqkd,sdft` runs the paper's whole comparison on the same sample.
N is the number of GPUs, or 2 CPU ranks over gloo without one. Resumable stage by stage
(<out>/stages.json); `--redo STAGE` runs a stage again.
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
from pathlib import Path

from radis.compare import compare

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "recipes" / "demo_smollm2.yaml"


def demo_data() -> tuple[Path, Path]:
    """(train, test) JSONL files of the shipped demo sample."""
    root = Path(str(importlib.resources.files("radis") / "resources" / "demo"))
    train, test = root / "train.de-en.jsonl", root / "test.de-en.jsonl"
    for p in (train, test):
        if not p.is_file():
            raise FileNotFoundError(f"demo sample {p} is missing from the installed package")
    return train, test


def demo_overrides(config: Path) -> list[str]:
    """The shipped files in place of the recipe's relative paths (the demo runs from any
    directory); the recipe's `limit` on its first train source is kept."""
    from radis.config import load_config

    train, test = demo_data()
    sources = load_config(config).data.train
    limit = sources[0].limit if sources else None
    pair = {"src_lang": "de", "tgt_lang": "en"}
    return [f"data.train={json.dumps([{'path': str(train), **pair, **({'limit': limit} if limit is not None else {})}])}",
            f"eval.test={json.dumps([{'path': str(test), **pair}])}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m radis.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="output directory of all stages (default outputs/demo)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo recipe (default recipes/demo_smollm2.yaml)")
    parser.add_argument("--arms", default=None, help="comma-separated arms (default: the recipe's compare.arms)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks for generate/train/evaluate (default: GPUs or 2)")
    parser.add_argument("--redo", action="append", default=[], metavar="STAGE", help="run STAGE again (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the stage commands, run nothing")
    args = parser.parse_args(argv)

    config = Path(args.config)
    if not config.is_file():
        print(f"radis demo: --config {config}: no such file (the recipe lives in the repository's recipes/)",
              file=sys.stderr)
        return 2
    from radis.config import load_config

    arms = args.arms or load_config(config).compare.arms
    return compare(config, Path(args.out), arms, nproc=args.nproc, redo=args.redo, dry_run=args.dry_run,
                   overrides=demo_overrides(config))


if __name__ == "__main__":
    sys.exit(main())
