"""The tested lock: `constraints.txt`, every package of a venv the whole suite passed in,
pinned with `==`, which `make install` (and so `make test`, `make demo`, CI) passes to pip
as `-c`, so that a fresh machine gets what the suite last passed with, whatever was released
since. `setup.py` keeps ranges for people who install radis into their own environment.

    python tools/lock.py diff  VENV_PYTHON   # which packages of that venv differ from the lock
    python tools/lock.py write VENV_PYTHON   # rewrite the lock from that venv (make lock: only
                                             # after the suite passed there)

A venv is read with its own `pip freeze --all` (pip, setuptools and wheel included: the
editable install's layout depends on setuptools). The editable radis-train itself is left
out, and a local version label is dropped (torch `2.13.0+cpu` -> `2.13.0`, which pip's `==`
still matches), so that the lock also serves a machine whose torch comes from PyPI.
Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
OWN = "radis-train"


def canonical(name: str) -> str:
    """PEP 503 name: `Typing_Extensions` and `typing-extensions` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(lines: list[str], where: str) -> dict[str, tuple[str, str]]:
    """{canonical name: (name as written, version)} of `name==version` lines; comments and
    blank lines skipped; any other line is an error naming `where` and the line."""
    pins = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;+]+)(\+\S+)?", line)
        if match is None:
            raise SystemExit(f"{where}:{number}: expected `name==version`, got {line!r}")
        pins[canonical(match.group(1))] = (match.group(1), match.group(2))
    return pins


def freeze(python: str) -> dict[str, tuple[str, str]]:
    """The packages installed in `python`'s environment, radis-train left out."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{python} -m pip freeze failed:\n{out.stderr}")
    pins = parse_pins(out.stdout.splitlines(), f"pip freeze of {python}")
    pins.pop(OWN, None)
    return pins


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    if not path.is_file():
        raise SystemExit(f"{path}: no lock file (make lock writes it)")
    return parse_pins(path.read_text().splitlines(), str(path))


def differences(lock: dict[str, tuple[str, str]], venv: dict[str, tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(package, version in the lock or '-', version in the venv or '-') of every package
    whose version differs, sorted by name."""
    rows = []
    for key in sorted(set(lock) | set(venv)):
        locked, installed = lock.get(key, ("", "-"))[1], venv.get(key, ("", "-"))[1]
        if locked != installed:
            rows.append(((venv.get(key) or lock[key])[0], locked, installed))
    return rows


def diff(python: str, path: Path) -> int:
    rows = differences(read_lock(path), freeze(python))
    if not rows:
        print(f"every package of {python}'s venv is at the version of {path.name}")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{len(rows)} packages differ from {path.name} (- : not there):")
    print(f"  {'package'.ljust(width)}  {'lock':>12}  {'this venv':>12}")
    for name, locked, installed in rows:
        print(f"  {name.ljust(width)}  {locked:>12}  {installed:>12}")
    return 0


def write(python: str, path: Path) -> int:
    pins = freeze(python)
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                             text=True, check=True).stdout.strip()
    header = [
        "# The tested lock (tools/lock.py): every package of the venv in which the whole suite last",
        "# passed, pinned. `make install` passes it to pip as -c; `make lock` rewrites it, and only",
        "# after the suite passed on the newest releases that setup.py allows; `make test-latest`",
        "# shows what moved since. `make install LOCKED=0` installs without it.",
        f"# Written {datetime.date.today().isoformat()} from Python {version} on {platform.system()} {platform.machine()}.",
    ]
    text = "\n".join(header + [f"{name}=={ver}" for name, ver in sorted(pins.values(), key=lambda p: canonical(p[0]))])
    # a half-written lock would break every install: write aside, then rename over it
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    print(f"wrote {path} ({len(pins)} packages)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("diff", "write"))
    parser.add_argument("python", help="the python of the venv to read (e.g. .venv-latest/bin/python)")
    parser.add_argument("--lock", type=Path, default=LOCK, help=f"the lock file (default {LOCK.name})")
    args = parser.parse_args(argv)
    return diff(args.python, args.lock) if args.action == "diff" else write(args.python, args.lock)


if __name__ == "__main__":
    sys.exit(main())
