"""One command for the GPU day: every check that only a CUDA GPU can make, in one call.

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out DIR --assets .gpu_assets --budget-s 480
    python benchmarks/gpu_check.py --plan            # what would run, and what is missing (any machine)

Without CUDA it says that it needs a GPU and exits 0. On a GPU machine it runs these
steps, each in its own process with its own time limit (all limits together are the
budget, 8 minutes by default: sized for one H100 / H200; what a step leaves unused goes
to the steps after it; a step that runs out is killed with every process below it), its
output in DIR/<step>.log:

    install         the wheels in ASSETS/wheels (DeepSpeed, liger-kernel, cut-cross-entropy and
                    what they need) and this checkout, with pip and no index (no network
                    there), skipping what is already importable; then imports each, so
                    that a wheel whose own dependency was not packed is named here
    env             the card, driver, CUDA and package versions            -> env.json
    gpu_tests       pytest -m gpu: the kernel past 2^31 logit entries, no host sync, flex
                    and flash against sdpa on loss and gradients           -> gpu_tests.xml
    bench_loss      the fused loss at the 7B head size (d 4096, V 32000, bf16) against the
                    matmuls it cannot avoid, torch.compile, Liger-Kernel, cut-cross-entropy
    bench_generate  rationale generation, our engine against HF generate, GPU rows only
    bench_train     radis train against the HF Trainer, ~1B Llama, 4k-token packs, MFU

and writes DIR/summary.md (printed last): each step ok, failed (exit status), timed out,
or skipped with the reason (a missing asset or package is named, never hidden), the
table rows each benchmark printed (bench_loss and bench_train print each row as it ends, so
a step stopped at its limit keeps those that ran), and the last lines of the log of each
step that failed or timed out. A step that fails does not stop the next.

ASSETS is what `make gpu-assets` (benchmarks/gpu_assets.py) prepares on a machine with
a network: wheels, SmolLM2's config and tokenizer (no weights), an ALMA de-en slice,
a packed cache of real span layout. On the device tool's machine, whose $OUT brings back
at most 8 files:

    python3 benchmarks/gpu_check.py --out /tmp/gpu_check;
    tar czf $OUT/gpu_check.tgz --exclude='*.safetensors' --exclude=cache -C /tmp gpu_check;
    cp /tmp/gpu_check/summary.md /tmp/gpu_check/*.json $OUT/
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Step:
    """One check: a command, its time limit, and what it needs before it can run."""

    name: str
    limit_s: int
    what: str
    needs_modules: tuple[str, ...] = ()
    needs_paths: tuple[Path, ...] = ()
    command: list[str] = field(default_factory=list)
    status: str = "not run"
    seconds: float = 0.0
    note: str = ""

    def missing(self) -> str:
        """Why this step cannot run here ('' when it can)."""
        mods = unimportable(self.needs_modules)
        paths = [str(p) for p in self.needs_paths if not p.exists()]
        parts = ([f"module {', '.join(mods)} not importable"] if mods else []) + \
                ([f"{', '.join(paths)} not found (make gpu-assets)"] if paths else [])
        return "; ".join(parts)


def unimportable(modules: tuple[str, ...]) -> list[str]:
    """The modules a step's process (a script of benchmarks/, after the install step)
    cannot import. Asked in a fresh process (an install made by this run is invisible to
    this one) whose first sys.path entry is benchmarks/, as a script's is, not the root:
    from the root `radis` and `radis.kernels` import without any install (radis/kernels
    links to kernels/), so asking there left the checkout uninstalled and every benchmark
    script failed with "No module named 'radis'" (gpu-rehearsal, 2026-12-07)."""
    if not modules:
        return []
    # find_spec("a.b") imports `a`, and raises where there is none
    probe = ("import importlib.util as u, sys\n"
             "def found(m):\n"
             "    try:\n"
             "        return u.find_spec(m) is not None\n"
             "    except ModuleNotFoundError:\n"
             "        return False\n"
             "print(' '.join(m for m in sys.argv[1:] if not found(m)))\n")
    proc = subprocess.run([PY, "-c", probe, *modules], cwd=Path(__file__).resolve().parent, capture_output=True,
                          text=True, check=False)
    return proc.stdout.split() if proc.returncode == 0 else list(modules)


def gpu_test_files() -> list[str]:
    """The test modules that hold `gpu`-marked tests (only these are collected: the others
    import CPU-side extras, lm-eval for one, that a GPU image need not have)."""
    return sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text(encoding="utf-8"))


def plan(out: Path, assets: Path) -> list[Step]:
    smollm2, alma, spans = assets / "smollm2", assets / "alma-deen", assets / "spans"
    spans_args = ["--spans-from", str(spans)] if spans.is_dir() else []
    return [
        Step("install", 45, "wheels from ASSETS/wheels and this checkout (pip, no index)",
             command=[PY, str(Path(__file__)), "--install", "--assets", str(assets)]),
        Step("env", 15, "card, driver and package versions -> env.json",
             command=[PY, str(Path(__file__)), "--env", str(out / "env.json")]),
        Step("gpu_tests", 120, "pytest -m gpu (" + ", ".join(Path(f).name for f in gpu_test_files()) + ")",
             needs_modules=("pytest", "radis.kernels"),
             command=[PY, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-c", str(ROOT / "pytest.ini"),
                      "--rootdir", str(ROOT), "-v", "--durations=0",  # each test as it ends, then where the time went
                      f"--junitxml={out / 'gpu_tests.xml'}", *gpu_test_files()]),
        Step("bench_loss", 90, "fused loss at d 4096, V 32000, bf16, N 8192 / 16384" +
             (" (real span layout)" if spans_args else " (synthetic spans: no ASSETS/spans)"),
             needs_modules=("radis.kernels",),
             command=[PY, str(ROOT / "benchmarks" / "bench_loss.py"), "--device", "cuda", "--dtype", "bfloat16",
                      "--d", "4096", "--n", "8192", "16384", "--repeats", "5", *spans_args,
                      "--json", str(out / "bench_loss.json")]),
        # Random weights seldom stop a row, so every row decodes all its tokens, and HF's
        # one-at-a-time baseline is bound by kernel launches (~15 ms a token at batch 1):
        # 32 rows of 32 tokens keep it near 15 s, the batched methods a second or two each.
        Step("bench_generate", 45, "generation, GPU rows, SmolLM2 shape with random weights",
             needs_modules=("radis.kernels",), needs_paths=(smollm2, alma / "valid.de-en.json"),
             command=[PY, str(ROOT / "benchmarks" / "bench_generate.py"), "--devices", "cuda", "--random-weights",
                      "--model", str(smollm2), "--data", str(alma / "valid.de-en.json"), "--examples", "32",
                      "--max-new-tokens", "32", "--repeats", "2", "--gpu-batch-sizes", "16:16", "32:16", "32:32",
                      "--hf-batch-sizes", "16", "32", "--out", str(out / "bench_generate.json")]),
        # The longest step: two trainer start-ups (imports, ZeRO-3 load, flex attention's
        # compile) around a few cheap steps; the steps themselves take well under a second.
        Step("bench_train", 165, "radis train vs HF Trainer, ~1B Llama, 4k packs, ZeRO-3, bf16",
             needs_modules=("deepspeed", "radis.kernels"), needs_paths=(smollm2, alma / "train.de-en.de"),
             command=[PY, str(ROOT / "benchmarks" / "bench_train.py"), "--gpu", "--steps", "6", "--warmup", "2",
                      "--tokenizer", str(smollm2), "--data-dir", str(alma), "--out", str(out / "bench_train"),
                      # 2.2 GB of random weights: not in the folder that is archived and brought back
                      "--model-dir", str(Path(tempfile.gettempdir()) / "radis-gpu-check-model-1b")]),
    ]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its process group and every process below it. The group alone is
    not enough: torchrun starts each rank in a session of its own, so a rank outlives a
    killed group and would keep the GPU (and the step's files) busy into the next step.
    The descendants are listed before anything is killed: an orphan is no longer below."""
    try:
        import psutil

        below = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - no psutil, or the process is already gone: the group still goes
        below = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in below:
        with contextlib.suppress(Exception):
            child.kill()
    proc.wait()


def run_step(step: Step, out: Path, limit_s: float) -> None:
    why = step.missing()
    if why:
        step.status, step.note = "skipped", why
        return
    limit = max(1, int(limit_s))
    log = out / f"{step.name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)  # the real compiler, on the real GPU
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8") as f:
        f.write("+ " + " ".join(step.command) + "\n")
        f.flush()
        # its own session, so that a timeout can end the whole tree (kill_tree)
        proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            step.status = "ok" if rc == 0 else "failed"
            step.note = "" if rc == 0 else f"exit status {rc}; see {log.name}"
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            step.status, step.note = "timed out", f"after its {limit} s; see {log.name}"
    step.seconds = time.monotonic() - t0


def step_limit(steps: list[Step], i: int, elapsed_s: float, budget_s: float) -> float:
    """The time limit of steps[i], started `elapsed_s` into the run: its own `limit_s`,
    or more where the steps before it left time unused (an install with nothing to
    install, a skipped step): all the time up to the end that the plan gave it. So time
    saved early goes to the benchmarks at the end instead of being lost. The plan's
    limits are scaled to `budget_s` (they add up to the default budget)."""
    scale = budget_s / max(sum(s.limit_s for s in steps), 1)
    planned_end = scale * sum(s.limit_s for s in steps[: i + 1])
    return min(budget_s - elapsed_s, max(scale * steps[i].limit_s, planned_end - elapsed_s))


def summary(steps: list[Step], out: Path, started: float, title: str = "gpu-check") -> str:
    lines = [f"# {title}, {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
             "| step | status | seconds | what | note |", "|------|--------|---------|------|------|"]
    for s in steps:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.what} | {s.note} |")
    lines += ["", f"total {time.monotonic() - started:.0f} s; logs and tables in {out}", ""]
    # The Markdown tables each benchmark printed, of a failed or timed-out one too: a
    # benchmark with one failed variant or side still printed the rows that ran.
    tables = [(s, out / f"{s.name}.log") for s in steps if s.name.startswith("bench") and s.status != "skipped"]
    for step, log in tables:
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        # each row once: bench_loss and bench_train print each row as it ends, then the whole table
        rows = list(dict.fromkeys(ln for ln in text.splitlines() if ln.startswith("|")))
        if rows:
            lines += [f"## {step.name}" + ("" if step.status == "ok" else f" ({step.status}: the rows it printed)"),
                      "", *rows, ""]
    # The end of each failed or timed-out step's log (pytest's FAILED lines, an install's
    # import error, a traceback): summary.md is what surely comes back from the device
    # call, the logs only if their archive does.
    for step in steps:
        log = out / f"{step.name}.log"
        if step.status in ("failed", "timed out") and log.is_file():
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
            lines += [f"## {step.name}: the last {len(tail)} lines of {log.name}", "", "```", *tail, "```", ""]
    return "\n".join(lines)


LOG_TAIL_LINES = 30


# --------------------------------------------------------------------------- sub-steps


def install(assets: Path) -> int:
    """pip-install what is missing from ASSETS/wheels and this checkout, without an index."""
    wheels = sorted((assets / "wheels").glob("*.whl"))
    pip = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir", "--disable-pip-version-check"]
    # a wheel's name starts with its distribution's name, "-" spelled "_": here also the module's
    module = {w: w.name.split("-")[0].lower() for w in wheels}
    absent = set(unimportable(tuple(module.values())))
    # typing_extensions is always there, maybe older than pydantic's floor: the wheel replaces it
    missing = [w for w in wheels if module[w] in absent or (module[w] == "typing_extensions" and "pydantic" in absent)]
    if wheels and missing:
        print("installing", ", ".join(w.name for w in missing), flush=True)
        if subprocess.run([*pip, *(str(w) for w in missing)], check=False).returncode != 0:
            return 1
    elif not wheels:
        print(f"no wheels in {assets / 'wheels'} (make gpu-assets): DeepSpeed, liger-kernel and cut-cross-entropy "
              "stay as they are here", flush=True)
    if unimportable(("radis.kernels",)):
        print("installing this checkout (editable, no index)", flush=True)
        rc = subprocess.run([*pip, "--no-build-isolation", "-e", str(ROOT)], check=False).returncode
        if rc != 0:
            return rc
    # --no-deps: a wheel whose own dependency was not packed installs, then fails at import
    # (DeepSpeed without hjson). Import each now, in a fresh process that sees the installs,
    # so that install.log names it, not a traceback deep in the step that needs it.
    modules = sorted(set(module.values()) - {"typing_extensions"}) + ["radis.kernels"]
    return subprocess.run([PY, str(Path(__file__)), "--import-check", *modules], cwd=ROOT, check=False).returncode


def import_errors(modules: Iterable[str]) -> dict[str, str]:
    """Each of `modules` that fails to import in this process, with its traceback's last lines."""
    errors = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any failure is the finding
            errors[name] = traceback.format_exc(limit=-3).strip()
    return errors


def import_check(modules: list[str]) -> int:
    errors = import_errors(modules)
    for name, why in errors.items():
        print(f"FAILED to import {name}\n{why}", flush=True)
    print(f"{len(modules) - len(errors)} of {len(modules)} import: {', '.join(modules)}", flush=True)
    return 1 if errors else 0


def write_env(path: Path) -> int:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None}
    for name in ("triton", "transformers", "deepspeed", "liger_kernel", "cut_cross_entropy", "flash_attn"):
        try:
            info[name] = getattr(__import__(name), "__version__", "?")
        except Exception as err:  # noqa: BLE001 - any import failure is just "absent" here
            info[name] = f"absent ({type(err).__name__})"
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True, check=False)
        info["nvidia_smi"] = q.stdout.strip()
    path.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(info, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default outputs/gpu_check/<time>)")
    p.add_argument("--assets", type=Path, default=ROOT / ".gpu_assets", help="what make gpu-assets prepared")
    p.add_argument("--budget-s", type=int, default=480, help="time for all steps together (default 480 = 8 min)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps")
    p.add_argument("--plan", action="store_true", help="print the steps and what each is missing, run nothing")
    p.add_argument("--install", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--env", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--import-check", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.assets = args.assets.resolve()  # the steps run in ROOT: relative paths would move
    if args.out is not None:
        args.out = args.out.resolve()
    if args.install:
        return install(args.assets)
    if args.env:
        return write_env(args.env)
    if args.import_check:
        return import_check(args.import_check)

    import torch

    out = args.out or ROOT / "outputs" / "gpu_check" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    steps = [s for s in plan(out, args.assets) if not args.only or s.name in args.only]
    if args.plan:
        for s in steps:
            why = s.missing()
            print(f"{s.name:15s} {s.limit_s:4d} s  {s.what}" + (f"\n{'':22s}not yet runnable: {why}" if why else ""))
        return 0
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is False): "
              "nothing was run. The CPU checks are `make test` and `make bench`.")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for i, step in enumerate(steps):
        elapsed = time.monotonic() - started
        if args.budget_s - elapsed < 5:
            step.status, step.note = "skipped", f"the {args.budget_s} s budget is spent"
            continue
        print(f"[gpu-check] {step.name}: {step.what}", flush=True)
        run_step(step, out, step_limit(steps, i, elapsed, args.budget_s))
        print(f"[gpu-check] {step.name}: {step.status} ({step.seconds:.0f} s) {step.note}", flush=True)
    text = summary(steps, out, started)
    (out / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
