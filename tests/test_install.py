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
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
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
