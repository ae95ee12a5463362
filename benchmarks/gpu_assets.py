"""Prepare what `make gpu-check` needs on a GPU machine that has no network: one folder.

    make gpu-assets                      # = python benchmarks/gpu_assets.py
    python benchmarks/gpu_assets.py --out .gpu_assets --spans-from .cache/radis/data/train-<key>

Run it where pip reaches a package index. It writes (the folder is git-ignored, and
stays under the device tool's 64 MiB):

    .gpu_assets/
      wheels/      cp312 manylinux wheels, one version each, of what the GPU image
                   (Python 3.12, torch 2.11, transformers 5.17, triton 3.6) lacks:
                   DeepSpeed (built here with DS_BUILD_OPS=0: pure Python, its ops JIT-built
                   on first use; radis needs none of them on a GPU), hjson, pydantic and
                   its parts, liger-kernel and cut-cross-entropy (bench_loss's peers)
      smollm2/     SmolLM2-135M-Instruct's config, generation config and tokenizer, no
                   weights (bench_generate --random-weights; bench_train's tokenizer)
      alma-deen/   the first --pairs pairs of ALMA de-en train and 64 of valid, from
                   ../shared/data (bench_train, bench_generate)
      spans/       a packed cache entry of data with rationales: bench_loss's real span
                   layout. Built here unless --spans-from names one: SmolLM2-135M-Instruct
                   writes its own `continue` rationales for the 160 ALMA de-en pairs of
                   recipes/smollm2_cpu.yaml (about 2 minutes on 2 cores the first time;
                   resumed from .cache/radis/gpu_assets after that), and `radis build-data`
                   packs them at 2048 tokens

Then carry the folder to the GPU machine with the checkout (the device tool: carry
".gpu_assets") and run `make gpu-check` there.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALMA = ROOT.parent / "shared" / "data" / "alma" / "deen"
DEEPSPEED = "deepspeed==0.19.8"
# What DeepSpeed, liger-kernel and cut-cross-entropy need that the GPU image lacks (its
# package list: /work/.library/device/KINDS.md), pinned so that the wheels agree; the
# two peers at the versions of setup.py's `bench` extra (BENCH_PEERS), which the suite tests.
WHEELS = ["hjson==3.1.0", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.7.0",
          "typing-inspection==0.4.4", "typing-extensions==4.16.0", "liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja", "special_tokens_map.json", "tokenizer.model")
LIMIT_MIB = 60  # the device tool carries 64 MiB with the checkout
RECIPE = ROOT / "recipes" / "smollm2_cpu.yaml"
SPANS_WORK = ROOT / ".cache" / "radis" / "gpu_assets"  # git-ignored; the rationales resume from here


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def wheels(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        *platforms, "-d", str(out), *WHEELS)
    if not list(out.glob("deepspeed-*.whl")):  # a source package: build it here, without ops
        env = dict(os.environ, DS_BUILD_OPS="0")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                        DEEPSPEED], check=True, env=env)


def tokenizer(out: Path) -> None:
    from radis.models import resolve_model_path

    src = Path(resolve_model_path("smollm2"))
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def alma(out: Path, pairs: int) -> None:
    if not (ALMA / "train.de-en.de").is_file():
        sys.exit(f"gpu_assets: the ALMA data is not at {ALMA} (../shared/data beside the checkout)")
    out.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en"):
        lines = (ALMA / f"train.de-en.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)[:pairs]
        (out / f"train.de-en.{lang}").write_text("".join(lines), encoding="utf-8")
    valid = json.loads((ALMA / "valid.de-en.json").read_text(encoding="utf-8"))[:64]
    (out / "valid.de-en.json").write_text(json.dumps(valid, ensure_ascii=False), encoding="utf-8")


def radis_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-c", "import sys; from radis.cli import main; sys.exit(main())", *args],
                   check=True, cwd=ROOT)  # the recipe's data paths are relative to the checkout


def spans(out: Path, work: Path = SPANS_WORK, max_tokens: int = 2048) -> None:
    """A `radis build-data` cache entry of real data with rationales, copied to `out`: SmolLM2's
    own rationales of the recipe's pairs (resumable in `work`), packed at `max_tokens`."""
    rationales = work / "rationales"
    radis_cli("generate", "--config", str(RECIPE), f"rationale.output_dir={rationales}")
    cache = work / f"cache-{max_tokens}"
    shutil.rmtree(cache, ignore_errors=True)  # so that the one train entry in it is this build's
    radis_cli("build-data", "--config", str(RECIPE), f"data.train=[{{path: {rationales / 'rationales.jsonl'}}}]",
              f"data.cache_dir={cache}", f"data.max_tokens={max_tokens}")
    (entry,) = cache.glob("train-*")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(entry, out)


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / ".gpu_assets")
    p.add_argument("--pairs", type=int, default=2000, help="ALMA de-en training pairs (bench_train packs these)")
    p.add_argument("--spans-from", type=Path, default=None, metavar="CACHE_DIR",
                   help="a `radis build-data` cache entry of data with rationales (bench_loss's span layout; "
                        "default: built here from SmolLM2's rationales of recipes/smollm2_cpu.yaml's pairs)")
    p.add_argument("--no-spans", action="store_true", help="no span layout: bench_loss then uses synthetic spans")
    args = p.parse_args(argv)
    out = args.out
    wheels(out / "wheels")
    tokenizer(out / "smollm2")
    alma(out / "alma-deen", args.pairs)
    if args.spans_from:
        if not (args.spans_from / "meta.json").is_file():
            sys.exit(f"gpu_assets: --spans-from {args.spans_from}: not a cache entry (no meta.json)")
        shutil.rmtree(out / "spans", ignore_errors=True)
        shutil.copytree(args.spans_from, out / "spans")
    elif args.no_spans:
        shutil.rmtree(out / "spans", ignore_errors=True)
    else:
        spans(out / "spans")
    total = size_mib(out)
    for part in sorted(out.iterdir()):
        print(f"{part.name:12s} {size_mib(part):6.1f} MiB")
    print(f"{'total':12s} {total:6.1f} MiB in {out}")
    if total > LIMIT_MIB:
        print(f"gpu_assets: {total:.0f} MiB is more than the {LIMIT_MIB} MiB that travel with the checkout; "
              "use fewer --pairs or no --spans-from", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
