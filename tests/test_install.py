"""The checkout shadows no installed package, whatever the working directory.

A process started from the repository root (`python -m radis.cli`, `torchrun -m ...`, the
launchers, pytest and the processes the tests start) has the root first on `sys.path`, and
a test subprocess often has it on PYTHONPATH: both come before site-packages. A top-level
folder there with an `__init__.py` (a regular package), or a top-level `.py` file, then wins
over an installed package of the same name. transformers 5.25 requires and imports Hugging
Face's `kernels` package; the checkout's `kernels/` folder (the Triton kernels, imported as
`radis.kernels`) was such a package, and every model load started from the root failed with
"cannot import name 'CUDAProperties' from 'kernels'" (issue 25).

The rule these tests hold: at the root only `radis` is a package. Every other folder is at
most a namespace portion, which Python uses only where no installed package has its name.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def importable_root_names() -> dict[str, Path]:
    """{module name: path} of every entry at the root that `import name` could reach from
    there: folders whose name is an identifier (with or without `__init__.py`: the ignored
    ones too, outputs/ or build/, which a run may have made) and `.py` files."""
    names = {}
    for entry in ROOT.iterdir():
        if entry.is_dir() and entry.name.isidentifier():
            names[entry.name] = entry
        elif entry.is_file() and entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = entry
    return names


def run_from_root(code: str, **env: str) -> subprocess.CompletedProcess:
    """`python -c code` with the root as working directory: `sys.path[0]` is the root, as
    for `python -m radis.cli` there. No PYTHONSAFEPATH: users do not set it."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True, check=False,
                          timeout=300)


def test_only_radis_is_a_package_at_the_root():
    """A regular package at the root beats an installed one of the same name; a namespace
    portion (a folder without `__init__.py`) does not. The Triton kernels' folder is the
    design card's top-level `kernels/`, importable only as `radis.kernels` (through the
    `radis/kernels` link)."""
    packages = sorted(name for name, path in importable_root_names().items()
                      if path.is_dir() and (path / "__init__.py").exists())
    assert packages == ["radis"], f"a top-level package other than radis would shadow an installed one: {packages}"
    assert (ROOT / "radis" / "kernels").resolve() == ROOT / "kernels"


def test_every_root_name_yields_to_an_installed_package_of_that_name(tmp_path):
    """For each name importable from the root (kernels, benchmarks, tests, launch, recipes,
    docs, ...), a package of that name "installed" on PYTHONPATH (after the root on
    sys.path, as site-packages is) is the one `import name` gives. Fails for any folder
    that is a regular package, as `kernels/` was."""
    own = {"radis", "setup"}  # radis is ours; setup.py: the next test
    names = sorted(set(importable_root_names()) - own)
    assert "kernels" in names and "tests" in names
    site = tmp_path / "site"
    for name in names:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("INSTALLED = True\n")
    code = ("import importlib, json, sys\n"
            f"names = {names!r}\n"
            "print(json.dumps({n: getattr(importlib.import_module(n), '__file__', None) for n in names}))\n")
    result = run_from_root(code, PYTHONPATH=str(site))
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    shadowed = {n: f for n, f in found.items() if f is None or Path(f).parent != site / n}
    assert not shadowed, f"the checkout shadows installed packages: {shadowed}"


def test_no_installed_distribution_has_a_top_level_module_named_like_a_root_file():
    """setup.py is importable from the root as `setup`: no installed distribution may ship
    a top-level `setup` (nor any other name of a root `.py` file)."""
    installed = importlib.metadata.packages_distributions()
    files = {name for name, path in importable_root_names().items() if path.is_file()}
    assert not {name: installed[name] for name in files if name in installed}


def test_hugging_faces_kernels_and_a_transformers_model_from_the_root():
    """The break of issue 25 itself: from the root, `import kernels` is Hugging Face's
    (installed by `dev`; transformers 5.25 requires it), a transformers model imports, builds
    and runs a forward pass, and the Triton kernels import as `radis.kernels` from the
    checkout's `kernels/` folder."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (pip install -e '.[dev]')")
    code = (
        "import json, kernels, torch, transformers\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "import radis.kernels.radis_loss as radis_loss\n"
        "config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                     num_attention_heads=2, num_key_value_heads=1)\n"
        "logits = AutoModelForCausalLM.from_config(config)(torch.tensor([[1, 2, 3]])).logits\n"
        "print(json.dumps({'kernels': kernels.__file__, 'radis_loss': radis_loss.__file__,\n"
        "                  'logits': list(logits.shape)}))\n")
    result = run_from_root(code)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found["kernels"]).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve()
    assert Path(found["radis_loss"]).resolve() == ROOT / "kernels" / "radis_loss.py"
    assert found["logits"] == [1, 3, 64]


# --------------------------------------------------------------------------- the lock


def load_lock_tool():
    spec = importlib.util.spec_from_file_location("radis_lock_tool", ROOT / "tools" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup_py_requirements(monkeypatch) -> tuple[list[str], dict[str, list[str]]]:
    """(install_requires, extras_require) as setup.py passes them to setuptools."""
    import runpy

    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    return captured["install_requires"], captured["extras_require"]


def test_the_lock_pins_what_make_install_installs_within_setup_py_ranges(monkeypatch):
    """Every requirement of `make install` (the core and the `dev` extra) is pinned in
    constraints.txt at a version that setup.py's range admits: a dependency added to
    setup.py and not to the lock, or a range moved past the lock, fails here."""
    from packaging.requirements import Requirement

    lock = load_lock_tool()
    pins = lock.read_lock(ROOT / "constraints.txt")
    core, extras = setup_py_requirements(monkeypatch)
    problems = []
    for text in core + extras["dev"]:
        requirement = Requirement(text)
        pin = pins.get(lock.canonical(requirement.name))
        if pin is None:
            problems.append(f"{text}: not in constraints.txt")
        elif not requirement.specifier.contains(pin[1], prereleases=True):
            problems.append(f"{text}: the lock has {pin[1]}")
    assert not problems, problems


def test_lock_tool_reads_pins_and_names_a_bad_line(tmp_path):
    lock = load_lock_tool()
    pins = lock.parse_pins(["# a comment", "", "torch==2.13.0+cpu", "Typing_Extensions==4.16.0  # why"], "f")
    assert pins == {"torch": ("torch", "2.13.0"), "typing-extensions": ("Typing_Extensions", "4.16.0")}
    with pytest.raises(SystemExit, match=r"constraints.txt:2: expected `name==version`, got 'torch>=2'"):
        lock.parse_pins(["numpy==2.3.5", "torch>=2"], "constraints.txt")
    rows = lock.differences({"torch": ("torch", "2.13.0"), "numpy": ("numpy", "2.3.5"), "gone": ("gone", "1")},
                            {"torch": ("torch", "2.13.0"), "numpy": ("numpy", "2.4.0"), "new": ("new", "2")})
    assert rows == [("gone", "1", "-"), ("new", "-", "2"), ("numpy", "2.3.5", "2.4.0")]


def test_lock_tool_writes_and_diffs_this_venv(tmp_path, capsys):
    """`write` from the running venv gives a lock that `diff` finds equal, and radis-train
    itself (the editable install) is not in it."""
    lock = load_lock_tool()
    path = tmp_path / "constraints.txt"
    assert lock.main(["write", sys.executable, "--lock", str(path)]) == 0
    pins = lock.read_lock(path)
    assert "radis-train" not in pins and "torch" in pins and "pip" in pins
    assert "+" not in path.read_text()
    capsys.readouterr()
    assert lock.main(["diff", sys.executable, "--lock", str(path)]) == 0
    assert "every package" in capsys.readouterr().out
