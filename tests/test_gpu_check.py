"""`make gpu-check` (benchmarks/gpu_check.py): what it does on a machine without a GPU,
how it plans and reports, and that every step's bookkeeping holds (ok, failed, timed
out, skipped with its reason); and its rehearsal on a CPU (benchmarks/gpu_rehearsal.py)."""
from __future__ import annotations

import contextlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, check=False, timeout=120)
    assert proc.returncode == 0
    assert "gpu-check needs a CUDA GPU" in proc.stdout and "nothing was run" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_the_plan_names_what_is_missing(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--plan", "--assets", str(tmp_path / "none")],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    names = [ln.split()[0] for ln in lines if not ln.startswith(" ")]
    assert names == ["install", "env", "gpu_tests", "bench_loss", "bench_generate", "bench_train"]
    assert "test_loss.py" in proc.stdout and "test_packing.py" in proc.stdout  # the modules with gpu tests
    assert proc.stdout.count("not found (make gpu-assets)") == 2  # generate and train need the assets
    assert sum(gc.limit_s for gc in _module().plan(tmp_path, tmp_path)) <= 480  # the 8-minute budget


def test_steps_report_ok_failed_timed_out_and_skipped(tmp_path):
    gc = _module()
    py = sys.executable
    steps = [
        gc.Step("bench_ok", 30, "prints a table", command=[py, "-c", "print('| a | b |'); print('|---|---|')"]),
        gc.Step("failing", 30, "exits 3", command=[py, "-c", "import sys; sys.exit(3)"]),
        gc.Step("slow", 1, "sleeps", command=[py, "-c", "import time; time.sleep(30)"]),
        gc.Step("needs", 30, "needs what is absent", needs_modules=("no_such_module_xyz",),
                needs_paths=(tmp_path / "absent",), command=[py, "-c", "pass"]),
    ]
    for s in steps:
        gc.run_step(s, tmp_path, s.limit_s)
    assert [s.status for s in steps] == ["ok", "failed", "timed out", "skipped"]
    assert steps[1].note == "exit status 3; see failing.log"
    assert "no_such_module_xyz not importable" in steps[3].note and "absent not found" in steps[3].note
    text = gc.summary(steps, tmp_path, started=0.0)
    assert "| failing | failed |" in text and "| slow | timed out |" in text
    assert "## bench_ok" in text and "| a | b |" in text  # the benchmark's own table is carried over
    # the end of a failed step's log comes back in the summary itself, an ok step's does not
    (tmp_path / "failing.log").write_text("".join(f"line {i}\n" for i in range(100)) + "FAILED tests/x.py::t - boom\n")
    text = gc.summary(steps, tmp_path, started=0.0)
    assert "## failing: the last 30 lines of failing.log" in text and "FAILED tests/x.py::t - boom" in text
    assert "line 70\n" not in text and "line 71\n" in text and "of bench_ok.log" not in text
    assert (tmp_path / "bench_ok.log").read_text().startswith("+ ")


def test_a_timed_out_step_leaves_no_process_behind_and_its_rows_are_kept(tmp_path):
    """torchrun starts each rank in a session of its own: killing the step's process group
    alone left such a rank running (on the GPU day: on the GPU, into the next step). And a
    benchmark that printed some rows before it ran out of time keeps them in the summary."""
    import psutil

    gc = _module()
    pid_file = tmp_path / "grandchild.pid"
    body = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('| variant | time |', flush=True); time.sleep(60)")
    step = gc.Step("bench_slow", 3, "starts a rank in its own session, then hangs", command=[sys.executable, "-c", body])
    gc.run_step(step, tmp_path, 3)
    assert step.status == "timed out"
    grandchild = int(pid_file.read_text())
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(grandchild).wait(timeout=5)  # reaped by init once killed
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    text = gc.summary([step], tmp_path, started=0.0)
    assert "## bench_slow (timed out: the rows it printed)" in text and "| variant | time |" in text


def test_summary_carries_each_table_row_once(tmp_path):
    """bench_train prints each side's row as that side ends, then the whole table: the
    summary carries each row once, in the order first printed."""
    gc = _module()
    step = gc.Step("bench_train", 10, "two sides")
    step.status = "ok"
    head = "| trainer | tokens/s |\n|---|---|\n"
    (tmp_path / "bench_train.log").write_text(head + "| radis train | 900 |\nrank log\n" + head + "| HF Trainer | 700 |\n"
                                              + head + "| radis train | 900 |\n| HF Trainer | 700 |\n")
    text = gc.summary([step], tmp_path, started=0.0)
    table = text.split("## bench_train", 1)[1].split()
    assert " ".join(table) == "| trainer | tokens/s | |---|---| | radis train | 900 | | HF Trainer | 700 |"


def test_time_a_step_leaves_unused_goes_to_the_steps_after_it():
    gc = _module()
    steps = [gc.Step(name, limit, name) for name, limit in [("install", 40), ("tests", 100), ("bench", 100)]]
    assert gc.step_limit(steps, 0, 0, 240) == 40
    assert gc.step_limit(steps, 1, 5, 240) == 135  # install took 5 s of its 40
    assert gc.step_limit(steps, 2, 140, 240) == 100  # on plan
    assert gc.step_limit(steps, 2, 200, 240) == 40  # late: never past the budget
    assert gc.step_limit(steps, 0, 0, 120) == 20  # a smaller budget scales the plan


def _load(script: Path):
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{script.stem}", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_benchmark_step_is_a_command_line_its_script_accepts(tmp_path):
    # The GPU day has minutes: a flag a script does not know would cost the whole step there.
    gc = _module()
    assets = tmp_path / "assets"
    (assets / "spans").mkdir(parents=True)  # present: the loss step then reads the real span layout
    steps = {s.name: s for s in gc.plan(tmp_path / "out", assets)}
    parsed = {}
    for name in ("bench_loss", "bench_generate", "bench_train"):
        script = Path(steps[name].command[1])
        assert script == ROOT / "benchmarks" / f"{name}.py"
        parsed[name] = _load(script).parse_args(steps[name].command[2:])  # argparse exits on a bad flag
    loss, gen, train = parsed["bench_loss"], parsed["bench_generate"], parsed["bench_train"]
    assert (loss.device, loss.dtype, loss.d, loss.spans_from) == ("cuda", "bfloat16", 4096, str(assets / "spans"))
    assert gen.devices == ["cuda"] and gen.random_weights and gen.model == str(assets / "smollm2")
    assert train.gpu and train.data_dir == assets / "alma-deen" and train.tokenizer == str(assets / "smollm2")


def test_the_gpu_tests_step_collects_every_gpu_test(tmp_path):
    gc = _module()
    step = next(s for s in gc.plan(tmp_path / "out", tmp_path / "assets") if s.name == "gpu_tests")
    # the step runs -v; -qq brings collect-only back to one node id per line
    proc = subprocess.run([*step.command, "--collect-only", "-qq"], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {ln.split("::")[1].split("[")[0] for ln in proc.stdout.splitlines() if "::" in ln}
    marked = set()  # every test function under a gpu mark, read from the sources
    for path in ROOT.glob("tests/test_*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("def test_") and any("mark.gpu" in ln for ln in lines[max(0, i - 4):i]):
                marked.add(line[4:].split("(")[0])
    assert len(marked) >= 6 and collected == marked


# ---------------------------------------------------------------- the rehearsal on a CPU

REHEARSAL = ROOT / "benchmarks" / "gpu_rehearsal.py"


def test_the_rehearsal_uninstalls_nothing_outside_its_own_venv(tmp_path):
    # It uninstalls DeepSpeed and this checkout: run from the dev venv it must refuse first.
    proc = subprocess.run([sys.executable, str(REHEARSAL), "--out", str(tmp_path / "out"), "--venv", str(tmp_path / "v")],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2
    assert "it uninstalls what gpu-check installs" in proc.stderr and str(tmp_path / "v") in proc.stderr
    assert not (tmp_path / "out").exists()
    assert importlib.util.find_spec("deepspeed") is not None


def test_the_rehearsal_runs_its_checks_as_command_lines_their_scripts_accept(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        _module()  # the rehearsal imports gpu_check by name
        spec = importlib.util.spec_from_file_location("gpu_rehearsal", REHEARSAL)
        rehearsal = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rehearsal)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    steps = {s.name: s for s in rehearsal.plan(tmp_path / "out", tmp_path / "assets")}
    assert list(steps) == ["reset", "install", "plan", "imports", "gpu_tests", "bench_loss", "bench_generate",
                           "bench_train"]
    gpu_tests = next(s for s in _module().plan(tmp_path / "out", tmp_path / "assets") if s.name == "gpu_tests")
    assert steps["gpu_tests"].command == gpu_tests.command  # the GPU day's own command line
    for name in ("bench_loss", "bench_generate", "bench_train"):
        args = _load(Path(steps[name].command[1])).parse_args(steps[name].command[2:])  # exits on a bad flag
        assert getattr(args, "device", "cpu") == "cpu" and getattr(args, "devices", ["cpu"]) == ["cpu"]
        assert not getattr(args, "gpu", False)


def test_every_module_and_benchmark_script_imports():
    # The rehearsal's import check, here in the dev venv: a module that cannot be imported
    # (a top-level import of an absent package, a syntax error) fails the suite too.
    code = "import sys; sys.path.insert(0, 'benchmarks'); import gpu_rehearsal; sys.exit(gpu_rehearsal.check_imports())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    imported, total = (int(x) for x in re.search(r"(\d+) of (\d+) import \(", proc.stdout).groups())
    assert imported == total > 50  # radis's modules, DeepSpeed, the peers, the benchmark scripts


def test_the_install_step_names_a_package_that_does_not_import():
    # pip --no-deps installs a wheel whose dependency was not packed; its import fails later.
    # The install's last act names it (rc 1), so install.log says which and why.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--import-check", "json", "no_such_module_xyz"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 1
    assert "FAILED to import no_such_module_xyz" in proc.stdout and "ModuleNotFoundError" in proc.stdout
    assert "1 of 2 import" in proc.stdout
    ok = subprocess.run([sys.executable, str(SCRIPT), "--import-check", "json"], capture_output=True, text=True,
                        check=False, timeout=120)
    assert ok.returncode == 0 and "1 of 1 import" in ok.stdout


def test_a_module_importable_only_from_the_root_counts_as_not_importable():
    """The steps are scripts of benchmarks/: the root is not on their sys.path. From the
    root, `radis.kernels` imports without an install (radis/kernels links to kernels/), so
    a probe run there skipped installing the checkout on the GPU machine and every
    benchmark failed on `import radis`. tools/lock.py stands for such a module: importable
    from the root (a namespace folder), not from benchmarks/."""
    gpu_check = _module()
    assert gpu_check.unimportable(("json", "tools.lock")) == ["tools.lock"]
