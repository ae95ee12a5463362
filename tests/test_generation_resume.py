"""`radis rationales` as a real process: SIGKILL mid-run + restart, and 2 ranks.

The generator is the tiny random Llama behind the SmolLM2 tokenizer (test_rationales);
the data is a JSON Lines file of German-English pairs written in-test.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_generation import make_tiny_generator

from radis.config import load_config
from radis.data.records import MERGED, MERGED_TOPK, load_topk
from radis.generation.store import PARTS, SUMMARY

ROOT = Path(__file__).resolve().parents[1]
N = 24  # pairs in the data file

WORDS = ["Haus", "Auto", "Baum", "Stadt", "Fluss", "Buch", "Hund", "Katze", "Zug", "Tisch"]
ENGLISH = ["house", "car", "tree", "city", "river", "book", "dog", "cat", "train", "table"]


def write_pairs(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            k = 1 + i % 7  # sentences of different lengths: batches need left padding
            de = " ".join(f"das {WORDS[(i + j) % 10]}" for j in range(k)) + "."
            en = " ".join(f"the {ENGLISH[(i + j) % 10]}" for j in range(k)) + "."
            f.write(json.dumps({"translation": {"de": de, "en": en}}, ensure_ascii=False) + "\n")


def write_config(tmp: Path, gen: Path, data: Path, out: Path, **rationale) -> Path:
    cfg = {
        "model": {"name_or_path": str(gen), "dtype": "float32"},  # also on GPU: runs are compared exactly
        "data": {"train": [{"path": str(data), "src_lang": "de", "tgt_lang": "en"}]},
        "rationale": {"output_dir": str(out), **rationale},
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _command(config: Path) -> list[str]:
    return [sys.executable, "-m", "radis.cli", "rationales", "--config", str(config), "--no-progress"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rationale_runs")
    gen = make_tiny_generator(tmp / "gen")
    data = tmp / "pairs.jsonl"
    write_pairs(data, N)
    return tmp, gen, data


def _reference_run(tmp: Path, gen: Path, data: Path, name: str, **rationale) -> list[dict]:
    """The same generation, uninterrupted, in this process (batch size differs: greedy
    output must not depend on it)."""
    from radis.generation.command import generate_records

    config = write_config(tmp, gen, data, tmp / name, **{**rationale, "batch_size": 8})
    generate_records(load_config(config), progress=False)
    return _records(tmp / name / MERGED)


def test_sigkill_mid_run_then_restart_finishes_exactly_once(setup):
    tmp, gen, data = setup
    out = tmp / "killed"
    settings = {"max_new_tokens": 24, "min_rationale_tokens": 24, "batch_size": 1, "topk": 3}
    config = write_config(tmp, gen, data, out, **settings)

    proc = subprocess.Popen(_command(config), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    parts = out / PARTS
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("r*.jsonl"))) >= 3:
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"the run ended before it could be killed (rc={proc.returncode}):\n{proc.stdout.read().decode()[-3000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MERGED).exists()
    committed = [rec["id"] for p in sorted(parts.glob("r*.jsonl")) for rec in _records(p)]  # every line whole
    assert 3 <= len(committed) < N and len(set(committed)) == len(committed)

    done = subprocess.run(_command(config), check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["this_run"]["generated"] == N - len(committed)  # committed ids were not redone
    assert (summary["count"], summary["missing"], summary["duplicate_records"]) == (N, 0, 0)
    assert json.loads(done.stdout)["count"] == N  # the summary is printed too

    recs = _records(out / MERGED)
    ids = [r["id"] for r in recs]
    assert ids == [f"{data.parent.name}/pairs:{i}:de-en" for i in range(N)]
    assert not list(parts.glob(".tmp-*"))
    topk = load_topk(out / MERGED_TOPK)
    assert sorted(topk) == sorted(ids)
    assert all(topk[r["id"]][0].shape == (r["rationale_tokens"], 3) for r in recs)
    # Identical to an uninterrupted run.
    assert recs == _reference_run(tmp, gen, data, "uninterrupted", **settings)


@pytest.mark.distributed
def test_a_rank_that_sees_another_output_directory_stops_every_rank(setup):
    """rationale.output_dir "~/out" under two homes (like node-local paths): rank 1 does not
    see rank 0's manifest, and both stop at once naming it (and "~" is expanded: no
    directory named "~" appears)."""
    tmp, gen, data = setup
    config = write_config(tmp, gen, data, tmp / "two_homes", max_new_tokens=4, min_rationale_tokens=2)
    cfg = yaml.safe_load(config.read_text())
    cfg["rationale"]["output_dir"] = "~/out"
    config.write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in (0, 1):
        home = tmp / f"two_homes_{rank}"
        home.mkdir()
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, HOME=str(home))
        procs.append(subprocess.Popen(_command(config), cwd=tmp, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (proc, text) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 2, (rank, text[-3000:])
        assert "does not match rank 1's config" in text, (rank, text[-3000:])
    assert (tmp / "two_homes_0" / "out").is_dir() and not (tmp / "~").exists()


def test_two_ranks_split_the_work_and_merge(setup):
    tmp, gen, data = setup
    out = tmp / "two_ranks"
    settings = {"max_new_tokens": 8, "min_rationale_tokens": 4, "batch_size": 4}
    config = write_config(tmp, gen, data, out, **settings)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "radis.cli", "rationales", "--config", str(config), "--no-progress"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    per_rank = {0: [], 1: []}
    for p in (out / PARTS).glob("r*.jsonl"):
        per_rank[int(p.name[1:6])] += [r["id"] for r in _records(p)]
    assert len(per_rank[0]) == len(per_rank[1]) == N // 2 and not set(per_rank[0]) & set(per_rank[1])
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["this_run"]["world_size"] == 2 and summary["count"] == N
    assert _records(out / MERGED) == _reference_run(tmp, gen, data, "one_rank", **settings)
    # another config into the same directory: rank 0's refusal is every rank's error, at once
    write_config(tmp, gen, data, out, **{**settings, "max_new_tokens": 9})
    t0 = time.monotonic()
    refused = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and time.monotonic() - t0 < 120, refused.stderr[-3000:]
    assert refused.stderr.count("holds records from a different generation config") == 2, refused.stderr[-3000:]
