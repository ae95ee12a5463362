"""radis.models: a GGUF checkpoint is converted once, however many processes ask for it at once."""
from __future__ import annotations

import builtins
import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from radis import models


@pytest.fixture
def counted_conversions(monkeypatch) -> list[Path]:
    """Replace the dequantisation (20 s of SmolLM2 on a CPU) by a slow fake that writes a
    config.json; returns the list of directories it was asked to write."""
    calls: list[Path] = []

    def slow_dequantise(gguf: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)  # long enough for the other askers to arrive while it converts
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_dequantise", slow_dequantise)
    return calls


def _convert_at_once(gguf: Path, cache_dir: Path, askers: int = 3) -> list[Path]:
    # Threads stand in for processes: flock locks belong to an open file description, so
    # two open() calls of the lock file exclude each other within one process too.
    with ThreadPoolExecutor(askers) as pool:
        return list(pool.map(lambda _: models.convert_gguf(gguf, str(cache_dir)), range(askers)))


def test_askers_at_once_wait_for_one_conversion(tmp_path, counted_conversions, capsys):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little"))  # the header convert_gguf checks
    outs = _convert_at_once(gguf, tmp_path / "cache")
    assert len(counted_conversions) == 1
    assert len(set(outs)) == 1 and (outs[0] / "config.json").is_file()
    assert sorted(p.name for p in outs[0].parent.iterdir()) == [f".{outs[0].name}.lock", outs[0].name]
    assert capsys.readouterr().err.count("converting tiny.gguf") == 1
    assert models.convert_gguf(gguf, str(tmp_path / "cache")) == outs[0]  # done: no lock, no conversion
    assert len(counted_conversions) == 1


def test_without_a_lock_each_converts_and_one_copy_is_kept(tmp_path, counted_conversions, monkeypatch):
    """Where the lock file cannot be opened (another user's, a read-only file system) the
    conversion still succeeds: each asker converts, the first rename wins, the others'
    copies are removed."""

    def refusing_open(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(models, "open", refusing_open, raising=False)  # shadows the builtin in that module only
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little"))  # the header convert_gguf checks
    outs = _convert_at_once(gguf, tmp_path / "cache")
    assert len(counted_conversions) == 3
    assert len(set(outs)) == 1 and (outs[0] / "config.json").is_file()
    assert [p.name for p in outs[0].parent.iterdir()] == [outs[0].name]  # no copy left behind
