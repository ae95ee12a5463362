"""Rehearse the GPU day on a CPU: gpu-check's install, with the same wheels and no index,
in a venv that holds only what the GPU image holds, then every step's imports and a
CPU-sized run of every benchmark step.

    make gpu-rehearsal      # builds .venv-gpuday, then runs this in it
    .venv-gpuday/bin/python benchmarks/gpu_rehearsal.py --out DIR --assets .gpu_assets

The device call is a few minutes on a machine without network. A wheel that
`make gpu-assets` did not pack, a module that imports a package the image lacks, or a
command that only the image's versions reject would each cost that call, and none of
them needs a GPU to show. `.venv-gpuday` is Python 3.12 with the image's packages at its
versions (torch 2.11, transformers 5.17, triton 3.6, ...; the list is in the Makefile,
read off /work/.library/device/KINDS.md) and none of what the image lacks (DeepSpeed,
hjson, pydantic, liger-kernel, cut-cross-entropy, datasets, gguf). Checks, each in its
own process with a time limit (gpu_check's machinery), output in DIR/<check>.log:

    reset           uninstall what gpu-check's install adds (each wheel's distribution and
                    radis-train), so that the install starts where the GPU machine does
    install         gpu_check.py --install, exactly as on the GPU day
    plan            every gpu-check step finds its modules and assets
    imports         every module of radis and every benchmark script imports
    gpu_tests       the gpu_tests step's own command (here its tests are collected and skip)
    bench_loss      bench_loss.py, CPU-sized, on the assets' span layout
    bench_generate  bench_generate.py, CPU-sized, on the assets' tokenizer and data
    bench_train     bench_train.py, CPU-sized (2 ranks, ZeRO-3), DeepSpeed from the wheel

and writes DIR/summary.md. Exit status 1 when a check did not pass. What this cannot
show is what needs CUDA: the kernels compiled and run on the card, NCCL, the timings.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import pkgutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import gpu_assets  # beside this file: what the GPU day installs
import gpu_check  # the same steps, runner and summary as the GPU day
from gpu_check import PY, ROOT, Step, run_step, step_limit, summary

IMAGE = {"python": "3.12", "torch": "2.11", "transformers": "5.17", "triton": "3.6"}
# The image has typing_extensions (an older one, maybe): the install replaces it, never removes it.
KEPT = {"typing-extensions"}
# bench_loss imports these on CUDA only: here they are imported by the imports check
PEERS = ("liger_kernel.transformers.functional", "cut_cross_entropy")


def distribution(wheel: Path) -> str:
    """A wheel's distribution name as pip knows it: the file name's first field."""
    return wheel.name.split("-")[0]


def not_like_the_image() -> list[str]:
    """How this interpreter differs from the GPU image's (Python, torch, transformers, triton)."""
    import torch
    import transformers
    import triton

    have = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "torch": torch.__version__,
            "transformers": transformers.__version__, "triton": triton.__version__}
    return [f"{k} {have[k]} (the image has {v})" for k, v in IMAGE.items() if not have[k].startswith(v)]


def reset(assets: Path) -> int:
    """Uninstall what gpu-check's install step adds, so that it runs as on a bare GPU machine:
    what gpu-assets packs (its list, and the wheels in ASSETS, which may be older) and this checkout."""
    packed = {name.split("=")[0] for name in (*gpu_assets.WHEELS, gpu_assets.DEEPSPEED)}
    in_assets = {distribution(w) for w in (assets / "wheels").glob("*.whl")}
    names = sorted({n.replace("_", "-").lower() for n in packed | in_assets} - KEPT) + ["radis-train"]
    print("uninstalling (where installed):", ", ".join(names), flush=True)
    return subprocess.run([PY, "-m", "pip", "uninstall", "-y", "-q", *names], check=False).returncode


def check_plan(out: Path, assets: Path) -> int:
    """Every gpu-check step finds what it needs (what `gpu_check.py --plan` prints)."""
    missing = [(s.name, s.missing()) for s in gpu_check.plan(out, assets)]
    for name, why in missing:
        print(f"{name:15s} {why or 'ready'}")
    return 1 if any(why for _, why in missing) else 0


def check_imports() -> int:
    """Import every module of radis, every module a gpu-check step needs (DeepSpeed, the
    peers of bench_loss: `--plan` only finds them, and a package found may still lack what
    it imports) and every benchmark script; print each that fails, and why."""
    import radis

    names = [m.name for m in pkgutil.walk_packages(radis.__path__, "radis.")]
    names += sorted({m for s in gpu_check.plan(ROOT, ROOT) for m in s.needs_modules} | set(PEERS))
    errors = gpu_check.import_errors(names)
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    for path in scripts:
        spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # a dataclass looks its module up there while it is made
        try:
            spec.loader.exec_module(module)
        except Exception:  # noqa: BLE001 - any failure is the finding
            errors[f"benchmarks/{path.name}"] = traceback.format_exc(limit=-3).strip()
    for name, why in errors.items():
        print(f"FAILED {name}\n{why}")
    total = len(names) + len(scripts)
    print(f"{total - len(errors)} of {total} import ({len(names)} modules, {len(scripts)} benchmark scripts)")
    return 1 if errors else 0


def plan(out: Path, assets: Path) -> list[Step]:
    smollm2, alma, spans = assets / "smollm2", assets / "alma-deen", assets / "spans"
    me = str(Path(__file__))
    gpu_tests = next(s for s in gpu_check.plan(out, assets) if s.name == "gpu_tests")
    bench = ROOT / "benchmarks"
    return [
        Step("reset", 60, "uninstall what the install adds", command=[PY, me, "--reset", "--assets", str(assets)]),
        Step("install", 120, "gpu_check.py --install (no index)",
             command=[PY, str(bench / "gpu_check.py"), "--install", "--assets", str(assets)]),
        Step("plan", 60, "every gpu-check step finds its modules and assets",
             command=[PY, me, "--check-plan", "--assets", str(assets), "--out", str(out)]),
        Step("imports", 180, "every radis module and benchmark script imports", command=[PY, me, "--imports"]),
        Step("gpu_tests", 180, "the gpu_tests step's command (collected; they skip without CUDA)",
             command=gpu_tests.command),
        Step("bench_loss", 180, "CPU-sized: N 512, V 4096, d 64" +
             (", the assets' span layout" if spans.is_dir() else ", synthetic spans (no ASSETS/spans)"),
             command=[PY, str(bench / "bench_loss.py"), "--device", "cpu", "--n", "512", "--v", "4096", "--d", "64",
                      "--repeats", "1", *(["--spans-from", str(spans)] if spans.is_dir() else []),
                      "--json", str(out / "bench_loss.json")]),
        Step("bench_generate", 300, "CPU-sized: SmolLM2's shape, random weights, 4 examples",
             needs_paths=(smollm2, alma / "valid.de-en.json"),
             command=[PY, str(bench / "bench_generate.py"), "--devices", "cpu", "--random-weights",
                      "--model", str(smollm2), "--data", str(alma / "valid.de-en.json"), "--examples", "4",
                      "--max-new-tokens", "8", "--repeats", "1", "--batch-sizes", "4:4", "--hf-batch-sizes", "4",
                      "--out", str(out / "bench_generate.json")]),
        Step("bench_train", 600, "CPU-sized: 2 ranks, ZeRO-3, DeepSpeed from the wheel",
             needs_paths=(smollm2, alma / "train.de-en.de"),
             command=[PY, str(bench / "bench_train.py"), "--steps", "3", "--warmup", "1", "--pairs", "200",
                      "--tokenizer", str(smollm2), "--data-dir", str(alma), "--out", str(out / "bench_train")]),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default outputs/gpu_rehearsal/<time>)")
    p.add_argument("--assets", type=Path, default=ROOT / ".gpu_assets", help="what make gpu-assets prepared")
    p.add_argument("--venv", type=Path, default=ROOT / ".venv-gpuday",
                   help="the only environment this may uninstall from (default .venv-gpuday)")
    p.add_argument("--only", nargs="+", default=None, help="run only these checks")
    p.add_argument("--reset", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-plan", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--imports", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.assets = args.assets.resolve()
    if Path(sys.prefix).resolve() != args.venv.resolve():
        # it uninstalls packages: never from the dev venv, whose DeepSpeed the suite needs
        print(f"gpu_rehearsal: run it with {args.venv}/bin/python (make gpu-rehearsal builds it), "
              f"not {sys.executable}: it uninstalls what gpu-check installs", file=sys.stderr)
        return 2
    differs = not_like_the_image()
    if differs:
        print(f"gpu_rehearsal: {args.venv} is not like the GPU image: " + "; ".join(differs), file=sys.stderr)
        return 2
    if not (args.assets / "wheels").is_dir():
        print(f"gpu_rehearsal: no {args.assets / 'wheels'}: run make gpu-assets first", file=sys.stderr)
        return 2
    out = (args.out or ROOT / "outputs" / "gpu_rehearsal" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}").resolve()
    if args.reset:
        return reset(args.assets)
    if args.check_plan:
        return check_plan(out, args.assets)
    if args.imports:
        return check_imports()

    out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in plan(out, args.assets) if not args.only or s.name in args.only]
    budget = sum(s.limit_s for s in steps)
    started = time.monotonic()
    for i, step in enumerate(steps):
        print(f"[gpu-rehearsal] {step.name}: {step.what}", flush=True)
        run_step(step, out, step_limit(steps, i, time.monotonic() - started, budget))
        print(f"[gpu-rehearsal] {step.name}: {step.status} ({step.seconds:.0f} s) {step.note}", flush=True)
    text = summary(steps, out, started, title="gpu-rehearsal (CPU, the GPU image's packages)")
    (out / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
