"""radis.models: a GGUF checkpoint is converted once, however many processes ask for it at once."""
from __future__ import annotations

import builtins
import errno
import json
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


def test_a_conversion_on_rank_1_of_a_process_group_writes_the_whole_model(tmp_path):
    """Whichever rank takes the lock converts. From transformers 5.25, save_pretrained
    writes weights only on rank 0 of an initialised process group, so a conversion made by
    rank 1 of a first 2-rank run kept the tokenizer files alone (and every later run failed
    on that directory). save_model_directory writes the whole model on any rank; the model
    it wrote loads back with the same logits and its tied head still tied."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    code = (
        "import os, sys, torch, torch.distributed as dist\n"
        "from pathlib import Path\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "from radis.models import save_model_directory\n"
        "dist.init_process_group('gloo')\n"
        "torch.manual_seed(0)\n"
        "config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)\n"
        "model = AutoModelForCausalLM.from_config(config)\n"
        "if dist.get_rank() == 1:\n"
        "    out = Path(sys.argv[1]); out.mkdir()\n"
        "    save_model_directory(model, out)\n"
        "    torch.save(model(torch.tensor([[1, 2, 3]])).logits, out.parent / 'logits.pt')\n"
        "dist.barrier(); dist.destroy_process_group()\n")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "model")], env={**env, "RANK": str(r)})
             for r in range(2)]
    assert [p.wait(timeout=240) for p in ranks] == [0, 0]

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "model"
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert torch.equal(loaded(torch.tensor([[1, 2, 3]])).logits, torch.load(tmp_path / "logits.pt"))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_a_directory_left_by_a_broken_conversion_is_replaced(tmp_path, counted_conversions):
    """A cache directory without config.json (what the rank-1 save above used to leave)
    is converted again and replaced, not a 'Directory not empty' error on every run."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little"))
    first = models.convert_gguf(gguf, str(tmp_path / "cache"))
    (first / "config.json").unlink()
    (first / "tokenizer.json").write_text("{}")
    assert models.convert_gguf(gguf, str(tmp_path / "cache")) == first
    assert (first / "config.json").is_file() and not (first / "tokenizer.json").exists()
    assert len(counted_conversions) == 2
