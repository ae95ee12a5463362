"""The trainer end to end on 2 CPU ranks (gloo) with DeepSpeed ZeRO-3 and a tiny random Llama.

Launches share work: one run through launch/single_node.sh (the DeepSpeed launcher)
is the reference that the loss, validation, export and resume checks all read.

    run A   launch/single_node.sh, 2 ranks, 10 steps, save every 5      -> reference metrics
    run B   two bare processes, rank 1 SIGKILLed after step 5            -> rank 0 must exit soon
    run C   launch/torchrun.sh, resumes B from global_step5              -> metrics == A's
            1 rank resumes B, 2 ranks resume that (universal checkpoints)  -> metrics ~ A's
    runs D  1 rank x 4 micro-batches vs 2 ranks x 2, one step            -> same parameters
    run E   1 rank, ZeRO-2, vanilla, an example whose token embedding is NaN -> skipped, then stop
    run F   1 rank, token-level KD to recorded top-k of the model itself  -> kd == -log(top-k mass)
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from radis.runtime import cpu_supports_float16
from radis.train.metrics import read_metrics

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "goods", "cost", "less", "than", "twenty", "euros", "and", "fee", "would", "equal", "forty", "of", "value", "please", "note", "that", "translation", "keeps", "structure", "source", "sentence", "die", "ware", "hat", "unter", "euro", "gekostet", "ich", "hoffe", "wirklich", "dass", "sie", "eine", "finden", "werden", "you", "are", "helpful", "assistant"]
RATIONALE = "Please note that the translation keeps the structure of the source sentence."
# Fields of a metrics record that depend on wall-clock time or memory, not on the numerics.
TIMING = {"time", "tokens_per_s", "mfu", "step_time_s", "peak_mem_gb"}


# --------------------------------------------------------------------------- fixtures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: int = 180, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    proc.log = f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def make_tiny_llama(tokenizer, out: Path, *, tied: bool = True, nan_token: int | None = None) -> Path:
    """A random 2-layer Llama (hidden 32) with `tokenizer`, saved as an HF model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if nan_token is not None:
        with torch.no_grad():
            model.model.embed_tokens.weight[nan_token] = float("nan")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_rationales(path: Path, n: int, seed: int, prefix: str, special: dict[int, str] | None = None) -> None:
    """n rationale records (the `radis rationales` output format) of random German/English words."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            src = " ".join(rng.choices(WORDS, k=rng.randint(4, 9)))
            if special and i in special:
                src = f"{src} {special[i]}"
            rec = {"id": f"{prefix}{i}", "src_lang": "de", "tgt_lang": "en", "source": src,
                   "reference": " ".join(rng.choices(WORDS, k=rng.randint(4, 9))),
                   "rationale": f"{RATIONALE} {' '.join(rng.choices(WORDS, k=rng.randint(2, 6)))}"}
            f.write(json.dumps(rec) + "\n")


@pytest.fixture(scope="module")
def work(build_once, sp_tokenizer):
    """Tiny tied Llama + rationale data + a config YAML, built once for all xdist workers
    (conftest's build_once); a dict of paths, and the model's own tokenizer."""
    from transformers import LlamaTokenizer

    def build(root: Path) -> None:
        model = make_tiny_llama(sp_tokenizer, root / "model")
        write_rationales(root / "train.rationales.jsonl", 48, seed=1, prefix="tr")
        write_rationales(root / "valid.rationales.jsonl", 6, seed=2, prefix="va")
        (root / "ds.json").write_text(json.dumps({
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto", "reduce_bucket_size": "auto"}}))
        config = root / "tiny.yaml"
        config.write_text(f"""\
model:
  name_or_path: {model}
  chat_template: llama2
data:
  train:
    - path: {root / 'train.rationales.jsonl'}
  valid:
    - path: {root / 'valid.rationales.jsonl'}
  max_tokens: 256
  cache_dir: {root / 'cache'}
loss:
  method: radis
train:
  lr: 3.0e-3
  warmup_steps: 2
  max_steps: 10
  gradient_accumulation_steps: 2
  save_every: 5
  keep_last: 2
  eval_every: 5
  zero_stage: 3
  deepspeed_config: {root / 'ds.json'}
  dist_timeout_s: 30
""")

    root, _ = build_once("train", build)
    # the tokenizer the model was saved with (the worker that built it trained its own)
    return {"root": root, "model": root / "model", "config": root / "tiny.yaml",
            "tokenizer": LlamaTokenizer.from_pretrained(str(root / "model"))}


@pytest.fixture(scope="module")
def run_a(build_once, work):
    """Run A: 10 steps through launch/single_node.sh, once for all xdist workers; returns
    (its output dir, the launcher's stdout and stderr as `.stdout` / `.stderr`)."""
    def build(out: Path) -> dict:
        proc = _run(["bash", "launch/single_node.sh", str(work["config"]), f"train.output_dir={out}"],
                    RADIS_CPU="1", MASTER_PORT=str(_free_port()))
        assert proc.returncode == 0, proc.log
        return {"stdout": proc.stdout, "stderr": proc.stderr}

    out, result = build_once("run_a", build)
    return out, SimpleNamespace(**result)


def _numerics(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


# --------------------------------------------------------------------------- run A


def test_single_node_launcher_trains_validates_and_checkpoints(run_a):
    out, proc = run_a
    assert "+ deepspeed --num_gpus 2" in proc.stderr  # the script prints what it runs
    # Output a person can read: no flood of torch.distributed deprecation warnings (one per
    # collective DeepSpeed calls) nor DeepSpeed's CPU chatter on every rank.
    both = proc.stdout + proc.stderr
    assert "is deprecated. Please use" not in both and "Setting accelerator to CPU" not in both
    assert len(both.splitlines()) < 150, len(both.splitlines())
    assert "2 rank(s), 10 optimizer steps" in proc.stdout
    train = read_metrics(out / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == list(range(1, 11))
    losses = [r["loss"] for r in train]
    assert all(torch.isfinite(torch.tensor(losses)))
    # the loss falls: the last three steps are well below the first
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    first = train[0]
    assert first["loss_mt"] > 0 and first["loss_rd"] > 0 and first["grad_norm"] > 0
    # the rate each update used: warmup 1/2, 2/2, then cosine over the remaining 8 steps
    lrs = [r["lr"] for r in train]
    assert lrs[:4] == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3 * (1 + math.cos(math.pi / 8)) / 2])
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] < 2e-4
    assert first["tokens"] > 0 and first["tokens_per_s"] > 0 and 0 < first["mfu"] < 1
    valid = read_metrics(out / "metrics.jsonl", "valid")
    assert [r["step"] for r in valid] == [0, 5, 10]
    assert valid[-1]["loss"] < valid[0]["loss"] and valid[0]["tokens_rd"] > 0 and valid[0]["tokens_mt"] > 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step10"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["global_step10", "global_step5"]
    assert sorted(p.name for p in (ckpts / "global_step10").glob("trainer_state_rank*.pt")) == [
        "trainer_state_rank0.pt", "trainer_state_rank1.pt"]
    assert (ckpts / "global_step10" / "hf" / "config.json").is_file()
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3


def test_export_loads_and_generates(run_a, work, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from radis.cli import main
    from radis.train.export import consolidated_state_dict

    out, _ = run_a
    hf = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(out / "checkpoints"), "--out", str(hf)]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"):
        assert (hf / name).is_file(), name
    # how it was trained, for radis evaluate's cut at the separator
    info = json.loads((hf / "radis_training.json").read_text())
    assert info["method"] == "radis" and info["trained_with_rationales"] and info["rd_target_tokens"] > 0
    assert info["separator"] == "\n\n"
    model = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    trained = consolidated_state_dict(out / "checkpoints", "global_step10")
    sd = model.state_dict()
    for key, value in trained.items():
        assert torch.equal(sd[key.removeprefix("model.")], value), key
    start = AutoModelForCausalLM.from_pretrained(work["model"]).state_dict()
    assert not torch.equal(start["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.q_proj.weight"])
    ids = tok("die ware hat", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert gen.shape == (1, ids.shape[1] + 6)
    # an existing --out is refused; a tag directory works as --checkpoint too
    assert main(["export", "--checkpoint", str(out / "checkpoints" / "global_step5"), "--out", str(hf)]) == 2
    assert main(["export", "--checkpoint", str(out / "checkpoints" / "global_step5"), "--out", str(hf),
                 "--overwrite"]) == 0


# --------------------------------------------------------------------------- runs B + C


@pytest.fixture(scope="module")
def run_b(build_once, work):
    """Run B: two bare processes (no launcher that would kill the survivor for us); rank 1
    SIGKILLs itself after step 5 (after that step's checkpoint, in the middle of epoch 1:
    16 packs, 4 steps an epoch). Built once for all xdist workers. Returns (its output
    dir, return codes, seconds rank 0 took to exit after rank 1 died, rank 0's log);
    tests resume copies of it."""
    def build(root: Path) -> dict:
        out = root / "out"
        port = str(_free_port())
        cmd = [sys.executable, "-m", "radis.cli", "train", "--config", str(work["config"]), f"train.output_dir={out}"]
        procs, logs = [], [root / f"rank{r}.log" for r in (0, 1)]
        for rank in (0, 1):
            env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port, RADIS_FAULT_KILL_AT_STEP="5", RADIS_FAULT_KILL_RANK="1")
            with open(logs[rank], "w") as log:  # a file, not a pipe: nobody reads while they run
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        try:
            procs[1].wait(timeout=180)
            died = time.monotonic()
            procs[0].wait(timeout=30 + 30)  # dist_timeout_s is 30; gloo usually notices at once
            waited = time.monotonic() - died
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        return {"codes": [p.returncode for p in procs], "waited": waited, "log0": logs[0].read_text()}

    root, result = build_once("run_b", build)
    return root / "out", result["codes"], result["waited"], result["log0"]


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_dead_rank_stops_the_other_and_resume_is_exact(run_a, run_b, work, tmp_path):
    out_a, _ = run_a
    out_b, codes, waited, log0 = run_b
    assert codes[1] == -signal.SIGKILL
    assert codes[0] not in (0, None), log0[-3000:]
    assert waited < 60, waited
    # the checkpoint of step 5 is complete and named by `latest`
    ckpts = out_b / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step5"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]

    # Run C: resume a copy through launch/torchrun.sh.
    out = _copy_run(out_b, tmp_path / "run_c")
    proc = _run(["bash", "launch/torchrun.sh", str(work["config"]), f"train.output_dir={out}"],
                RADIS_CPU="1", MASTER_PORT=str(_free_port()))
    assert proc.returncode == 0, proc.log
    assert "+ torchrun" in proc.stderr and "resumed at step 5 from global_step5" in proc.stdout
    a = _numerics(read_metrics(out_a / "metrics.jsonl", kind=None))
    c = _numerics(read_metrics(out / "metrics.jsonl", kind=None))
    assert c == a  # every per-step loss, grad norm, lr and validation loss, bit for bit


def _epoch_record(work, ckpt: Path) -> tuple[int, list[int]]:
    """(epoch, how often each pack of it was trained) from the loader state saved in `ckpt`."""
    import numpy as np

    from radis.config import load_config
    from radis.data.build import load_or_build
    from radis.data.loader import PackedLoader
    from radis.train.checkpoint import load_weights_only

    state = load_weights_only(ckpt / "trainer_state_rank0.pt")["loader"]
    ds = load_or_build(load_config(work["config"]), "train", work["tokenizer"], progress=False, log=None)
    loader = PackedLoader(ds, world_size=state["world_size"], packs_per_micro_batch=state["packs_per_micro_batch"],
                          gradient_accumulation_steps=state["gradient_accumulation_steps"], seed=state["seed"])
    loader.load_state_dict(state)
    return loader.epoch, np.bincount(loader.trained_in_epoch(), minlength=ds.num_packs).tolist()


def _close_to(run: list[dict], reference: list[dict], steps: range) -> None:
    by_step = {(r.get("kind"), r["step"]): r for r in reference}
    for rec in run:
        if rec["step"] not in steps:
            continue
        ref = by_step[(rec.get("kind"), rec["step"])]
        for key in ("loss", "loss_mt", "loss_rd", "grad_norm", "lr"):
            if key in rec:
                assert math.isclose(rec[key], ref[key], rel_tol=1e-6, abs_tol=1e-9), (rec["step"], key, rec, ref)


def test_resume_on_another_world_size_mid_epoch(run_a, run_b, work, tmp_path):
    """2 ranks killed at step 5 (mid epoch 1) resume on 1 rank (4 micro-batches, the same
    packs per step), which saves at step 6 and is resumed on 2 ranks again. Through
    DeepSpeed's universal checkpoint both times: the losses continue run A's (same packs
    per step; sums in another order), and the loader's record of epoch 1 holds each of
    its 16 packs exactly once, over the three phases."""
    out_a, _ = run_a
    a = read_metrics(out_a / "metrics.jsonl", kind=None)
    one = _copy_run(run_b[0], tmp_path / "on_one_rank")
    proc = _run([sys.executable, "-m", "radis.cli", "train", "--config", str(work["config"]), f"train.output_dir={one}",
                 "train.gradient_accumulation_steps=4", "train.save_every=1", "train.keep_last=0"], timeout=300)
    assert proc.returncode == 0, proc.log
    assert "global_step5 was saved by 2 rank(s), this run has 1: resuming through a universal checkpoint"         in proc.stdout, proc.log
    assert (one / "checkpoints" / "universal" / "global_step5" / "zero").is_dir()
    _close_to(read_metrics(one / "metrics.jsonl", kind=None), a, range(6, 11))
    assert _epoch_record(work, one / "checkpoints" / "global_step8") == (1, [1] * 16)

    two = tmp_path / "on_two_ranks"
    _copy_run(one, two)
    for tag in (two / "checkpoints").glob("global_step*"):
        if int(tag.name.removeprefix("global_step")) > 6:
            import shutil

            shutil.rmtree(tag)
    (two / "checkpoints" / "latest").write_text("global_step6")
    proc = _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "radis.cli", "train",
                 "--config", str(work["config"]), f"train.output_dir={two}", "train.save_every=2"], timeout=300)
    assert proc.returncode == 0, proc.log
    assert "global_step6 was saved by 1 rank(s), this run has 2" in proc.stdout, proc.log
    assert "resumed at step 6 from global_step6" in proc.stdout
    _close_to(read_metrics(two / "metrics.jsonl", kind=None), a, range(7, 11))
    assert _epoch_record(work, two / "checkpoints" / "global_step8") == (1, [1] * 16)


def _two_nodes(work, out: Path, port: str, logs: list[Path], node1_env: dict[str, str] | None = None):
    """launch/torchrun.sh as node ranks 0 and 1 of a 2-node job (one rank each) on this
    machine, a static rendezvous on 127.0.0.1; returns the two Popen objects."""
    procs = []
    for node in (0, 1):
        env = _env(RADIS_CPU="1", NNODES="2", NODE_RANK=str(node), NPROC="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, **(node1_env if node == 1 and node1_env else {}))
        with open(logs[node], "w") as log:
            procs.append(subprocess.Popen(["bash", "launch/torchrun.sh", str(work["config"]),
                                           f"train.output_dir={out}"], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is gone already
        pass


def test_two_nodes_train_lose_a_node_and_resume(run_a, work, tmp_path):
    """The multi-node path for real on one machine: node 1's rank dies after step 5 (its
    checkpoint written) and its whole node (the torchrun agent) is killed; node 0 stops
    within train.dist_timeout_s naming rank 1 and the checkpoint; both nodes started
    again resume it, and every metric equals run A's (2 ranks on one node)."""
    out, logs = tmp_path / "two_nodes", [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = _two_nodes(work, out, str(_free_port()), logs,
                       {"RADIS_FAULT_KILL_AT_STEP": "5", "RADIS_FAULT_KILL_RANK": "1"})
    try:
        deadline = time.monotonic() + 240
        while procs[1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        died = time.monotonic()
        _kill_group(procs[1])  # what is left of node 1, if anything
        procs[0].wait(timeout=30 + 30)
        waited = time.monotonic() - died
    finally:
        for p in procs:
            _kill_group(p)
    log0 = logs[0].read_text()
    assert procs[0].returncode not in (0, None), log0[-3000:]
    assert waited < 30, waited  # train.dist_timeout_s is 30
    assert "radis train: error: rank 0: a collective failed at step 5" in log0, log0[-3000:]
    assert "lost rank 1 (last heard" in log0 and "after step 5)" in log0, log0[-3000:]
    assert f"the last complete checkpoint is {out / 'checkpoints' / 'global_step5'}" in log0, log0[-3000:]
    assert "radis/train/recipe.py" not in log0  # no traceback of ours (torchrun prints its own report)

    procs = _two_nodes(work, out, str(_free_port()), logs)
    for p in procs:
        p.wait(timeout=240)
    assert [p.returncode for p in procs] == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    assert "resumed at step 5 from global_step5" in logs[0].read_text()
    a = _numerics(read_metrics(run_a[0] / "metrics.jsonl", kind=None))
    assert _numerics(read_metrics(out / "metrics.jsonl", kind=None)) == a


def test_latest_naming_a_lost_checkpoint_resumes_from_the_newest_complete_one(run_a, work, tmp_path):
    """`latest` names a tag that is gone: the run says so, resumes from the newest complete
    checkpoint (here the last step: nothing left to train) and deletes nothing. Rank 1
    comes late (RADIS_FAULT_DELAY_RANK), after rank 0 has repaired `latest`: when each
    rank read the directory itself, rank 1 then saw nothing to repair and the two hung
    in different collectives (seen once under two pytest workers)."""
    import shutil

    out_a, _ = run_a
    out = tmp_path / "lost_latest"
    shutil.copytree(out_a / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "latest").write_text("global_step99")
    proc = _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "radis.cli", "train",
                 "--config", str(work["config"]), f"train.output_dir={out}"], RADIS_FAULT_DELAY_RANK="1:3")
    assert proc.returncode == 0, proc.log
    assert "'global_step99', which does not exist; resuming from the newest complete checkpoint global_step10" \
        in proc.stdout, proc.log
    assert "resumed at step 10 from global_step10" in proc.stdout
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["global_step10", "global_step5"]
    assert (ckpts / "latest").read_text() == "global_step10"


def test_resume_refuses_data_that_changed_since_the_checkpoint(run_a, work, tmp_path):
    """One reference changed, same number of examples and packs: resuming would silently
    continue another data set; it is refused naming both data hashes."""
    import shutil

    out_a, _ = run_a
    out = tmp_path / "changed_data"
    shutil.copytree(out_a / "checkpoints", out / "checkpoints")
    records = (work["root"] / "train.rationales.jsonl").read_text().splitlines()
    first = json.loads(records[0])
    first["reference"] = first["reference"] + " indeed"
    data = tmp_path / "train.rationales.jsonl"
    data.write_text("\n".join([json.dumps(first), *records[1:]]) + "\n")
    proc = _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "radis.cli", "train",
                 "--config", str(work["config"]), f"train.output_dir={out}", f"data.train=[{{path: {data}}}]",
                 f"data.cache_dir={tmp_path / 'cache'}"])
    assert proc.returncode != 0, proc.log  # each rank exits 2; torchrun reports the failure with 1
    assert "radis train: config error: train.output_dir: checkpoint" in proc.stderr, proc.log
    assert "was trained on packed data" in proc.stderr and "and the config now gives" in proc.stderr, proc.log
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["global_step10", "global_step5"]


def test_ranks_that_read_other_data_are_refused(work, tmp_path):
    """Two ranks whose `~` differs (like nodes with local data and caches) read other
    training files: both stop at once naming the ranks, instead of planning other steps."""
    import yaml

    cfg = yaml.safe_load(work["config"].read_text())
    cfg["data"]["train"] = [{"path": "~/train.rationales.jsonl"}]
    cfg["data"]["valid"] = []
    cfg["data"]["cache_dir"] = "~/cache"
    cfg["train"]["output_dir"] = str(tmp_path / "out")
    config = tmp_path / "two_homes.yaml"
    config.write_text(yaml.safe_dump(cfg))
    port, procs, logs = str(_free_port()), [], [tmp_path / f"rank{r}.log" for r in (0, 1)]
    for rank in (0, 1):
        home = tmp_path / f"home{rank}"
        home.mkdir()
        write_rationales(home / "train.rationales.jsonl", 48, seed=10 + rank, prefix="tr")
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   HOME=str(home))
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "radis.cli", "train", "--config", str(config)],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, log in enumerate(logs):
        text = log.read_text()
        assert codes[rank] == 2, (rank, text[-3000:])
        assert "data: rank 1 read other packed data than rank 0" in text, (rank, text[-3000:])


def test_a_full_disk_on_one_rank_stops_both_at_once_naming_it(work, tmp_path):
    """Rank 1 cannot write its part of the final checkpoint (ENOSPC): both ranks stop at
    once naming rank 1 and the checkpoint that is kept, not rank 0 after
    train.dist_timeout_s reporting a lost rank. `latest` still names the last complete
    checkpoint; the partial one stays under its temporary name, which the next start
    removes (a resume over such a directory: the kill campaign's `checkpoint` phase)."""
    out = tmp_path / "disk_full"
    proc = _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "radis.cli", "train",
                 "--config", str(work["config"]), f"train.output_dir={out}", "train.max_steps=4", "train.save_every=2",
                 "train.gradient_accumulation_steps=1", "train.eval_every=0"], RADIS_FAULT_DISK_FULL="1:4")
    assert proc.returncode != 0, proc.log
    kept = f"The last complete checkpoint is {out / 'checkpoints' / 'global_step2'}, which the same command resumes"
    assert "radis train: rank 1: saving the checkpoint of step 4 failed: [Errno 28] No space left on device" \
        in proc.stderr, proc.log
    assert ("radis train: rank 0: saving the checkpoint of step 4 failed: rank 1 failed writing its part of "
            "checkpoint") in proc.stderr and "(OSError: [Errno 28] No space left on device" in proc.stderr, proc.log
    assert proc.stderr.count(kept) == 2, proc.log
    assert "a collective failed" not in proc.stderr, proc.log
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step2"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [".tmp-global_step4", "global_step2"]


def test_resume_applies_changed_optimizer_settings_and_refuses_another_schedule(work, tmp_path):
    """1 rank saves at step 3 and is resumed with a lower train.lr, another weight decay,
    beta1 and min_lr_ratio, and twice the steps: the updates after the resume use them
    (the logged rate is the new peak along the new schedule; the checkpoint's parameter
    groups hold the new settings) and one line names each change. Another train.schedule
    is refused naming the key, and config.yaml still describes the checkpoints."""
    from radis.train.checkpoint import load_weights_only
    from radis.train.schedule import LRFactor

    out = tmp_path / "changed"
    base = [sys.executable, "-m", "radis.cli", "train", "--config", str(work["config"]), f"train.output_dir={out}",
            "train.gradient_accumulation_steps=1", "train.eval_every=0", "train.save_every=3", "train.keep_last=0"]
    proc = _run([*base, "train.max_steps=3"])
    assert proc.returncode == 0, proc.log
    proc = _run([*base, "train.max_steps=6", "train.lr=1e-3", "train.weight_decay=0.1", "train.adam_beta1=0.8",
                 "train.min_lr_ratio=0.5"])
    assert proc.returncode == 0, proc.log
    (note,) = [line for line in proc.stdout.splitlines() if "with changed settings" in line]
    assert "note: resuming global_step3 with changed settings, applied from step 4 on: " in note, note
    for change in ("train.lr 0.003 -> 0.001", "train.min_lr_ratio 0.0 -> 0.5",
                   "optimizer steps 3 -> 6 (train.max_steps 3 -> 6)", "train.adam_beta1 0.9 -> 0.8",
                   "train.weight_decay 0.01 -> 0.1"):
        assert change in note, note
    assert "adam_beta2" not in note and "warmup" not in note  # only what changed
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl")]
    old, new = LRFactor("cosine", 3, 2, 0.0), LRFactor("cosine", 6, 2, 0.5)
    assert lrs == pytest.approx([3e-3 * old(s) for s in range(3)] + [1e-3 * new(s) for s in range(3, 6)], rel=1e-12)
    (states,) = (out / "checkpoints" / "global_step6").glob("*model_states.pt")
    groups = load_weights_only(states)["optimizer_groups"]
    assert [(g["weight_decay"], tuple(g["betas"]), g["initial_lr"]) for g in groups] == [
        (0.1, (0.8, 0.999), 1e-3), (0.0, (0.8, 0.999), 1e-3)]  # norms and biases keep no decay

    saved_config = (out / "config.yaml").read_text()
    from radis.train.checkpoint import saved_trainer_state

    # recorded per rank, so that the refusal comes before the engine loads the model
    assert saved_trainer_state(out / "checkpoints", "global_step6")["schedule"] == "cosine"
    proc = _run([*base, "train.max_steps=9", "train.schedule=linear"])
    assert proc.returncode == 2, proc.log
    assert "config error: train.schedule: checkpoint" in proc.stderr and "trained with 'cosine', the config gives " \
        "'linear'" in proc.stderr, proc.log
    assert (out / "config.yaml").read_text() == saved_config
    assert (out / "checkpoints" / "latest").read_text() == "global_step6"


def test_a_restart_before_the_first_checkpoint_starts_clean_metrics(work, tmp_path):
    """Killed after step 2 with no checkpoint yet, the run starts again at step 0: its
    metrics (JSONL and TensorBoard) hold each step once, none of the crashed run's."""
    out = tmp_path / "restart"
    cmd = [sys.executable, "-m", "radis.cli", "train", "--config", str(work["config"]), f"train.output_dir={out}",
           "train.max_steps=3", "train.gradient_accumulation_steps=1", "train.eval_every=1", "train.save_every=0"]
    proc = _run(cmd, RADIS_FAULT_KILL_AT_STEP="2")
    assert proc.returncode == -signal.SIGKILL, proc.log
    assert ("valid", 0) in [(r["kind"], r["step"]) for r in read_metrics(out / "metrics.jsonl", kind=None)]
    assert not list((out / "checkpoints").glob("global_step*"))
    # the restart also says train.save_final=false (benchmarks): it finishes without a checkpoint
    proc = _run([*cmd, "train.save_final=false"])
    assert proc.returncode == 0 and "resumed at step" not in proc.stdout, proc.log
    records = sorted((r["kind"], r["step"]) for r in read_metrics(out / "metrics.jsonl", kind=None))
    assert records == [("train", s) for s in (1, 2, 3)] + [("valid", s) for s in (0, 1, 2, 3)]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # the crashed run's are gone
    assert not list((out / "checkpoints").glob("global_step*"))


# --------------------------------------------------------------------------- runs D


def test_one_step_is_independent_of_the_micro_batch_and_rank_split(work):
    """1 rank x 4 micro-batches and 2 ranks x 2 give the same step (loss, grad norm, weights),
    and the grad norm is that of the pooled loss over the step's 4 packs in plain PyTorch."""
    from radis.train.export import consolidated_state_dict

    runs = {}
    # The two sides also differ in ways that must not change the step: the 1-rank run
    # offloads optimizer state and parameters to CPU (ZeRO-Offload, DeepSpeedCPUAdam), the
    # 2-rank run recomputes activations (gradient checkpointing).
    extra = {1: ["train.offload=true", "train.deepspeed_config=null"], 2: ["model.gradient_checkpointing=true"]}
    for world, accum in ((1, 4), (2, 2)):
        out = work["root"] / f"split_{world}x{accum}"
        proc = _run(["torchrun", "--nproc_per_node", str(world), "--master_port", str(_free_port()),
                     "-m", "radis.cli", "train", "--config", str(work["config"]), f"train.output_dir={out}",
                     "train.max_steps=1", f"train.gradient_accumulation_steps={accum}", "train.max_grad_norm=0",
                     "train.eval_every=0", "train.warmup_steps=0", *extra[world]])
        assert proc.returncode == 0, proc.log
        (rec,) = read_metrics(out / "metrics.jsonl")
        runs[world] = rec, consolidated_state_dict(out / "checkpoints", "global_step1")
        zero = json.loads((out / "ds_config.json").read_text())["zero_optimization"]
        assert ("offload_optimizer" in zero) == (world == 1)
    (r1, w1), (r2, w2) = runs[1], runs[2]
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-6)
    assert r1["tokens"] == r2["tokens"]
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=0, atol=1e-6)
    assert r1["grad_norm"] == pytest.approx(_reference_grad_norm(work, work["tokenizer"]), rel=1e-4)


def _reference_grad_norm(work, tokenizer) -> float:
    """Gradient norm of Σ_step-tokens nll / N_step on the first step's packs, no DeepSpeed."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from radis.config import load_config
    from radis.data.build import load_or_build
    from radis.data.loader import PackedLoader
    from radis.data.packing import collate_packs

    cfg = load_config(work["config"])
    ds = load_or_build(cfg, "train", tokenizer, progress=False, log=None)
    loader = PackedLoader(ds, world_size=1, gradient_accumulation_steps=4, seed=cfg.data.seed)
    model = AutoModelForCausalLM.from_pretrained(work["model"], attn_implementation="sdpa")
    total = loader.step_token_counts(0)["total"]
    loss = 0.0
    for g in range(4):
        b = collate_packs(loader.packs_of(0, g), 0, "sdpa", pad_to=ds.max_tokens)
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                       use_cache=False).logits
        loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1),
                                      reduction="sum") / total
    loss.backward()
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))


# --------------------------------------------------------------------------- run E


def nan_model_and_data(tokenizer, tmp_path: Path) -> tuple[Path, Path, int]:
    """A tiny untied Llama whose input embedding of one token is NaN, and 8 rationale
    records of which only "nan5" contains that token: (model dir, records, token id).

    "§" is the only non-ASCII character of the data: its UTF-8 bytes are byte-fallback
    pieces that no other example uses.
    """
    (nan_id,) = [i for i in tokenizer("§", add_special_tokens=False).input_ids
                 if tokenizer.convert_ids_to_tokens(i) == "<0xA7>"]
    model = make_tiny_llama(tokenizer, tmp_path / "nan_model", tied=False, nan_token=nan_id)
    data = tmp_path / "nan.rationales.jsonl"
    write_rationales(data, 8, seed=3, prefix="nan", special={5: "§"})
    return model, data, nan_id


def _run_nan_training(work, model: Path, data: Path, tmp_path: Path, out: Path, *extra: str):
    """One rank, ZeRO-2, 20 steps of one micro-batch, one bad batch allowed."""
    return _run([sys.executable, "-m", "radis.cli", "train", "--config", str(work["config"]),
                 f"model.name_or_path={model}", f"data.train=[{{path: {data}}}]", "data.valid=[]",
                 f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={out}", "train.zero_stage=2",
                 "train.deepspeed_config=null", "train.gradient_accumulation_steps=1", "train.max_steps=20",
                 "train.save_every=0", "train.eval_every=0", "train.max_bad_batches=1", *extra])


def test_nan_loss_is_skipped_then_stops_naming_step_and_examples(work, sp_tokenizer, tmp_path):
    model, data, nan_id = nan_model_and_data(sp_tokenizer, tmp_path)
    hits = [json.loads(line)["id"] for line in data.read_text().splitlines()
            if nan_id in sp_tokenizer(json.loads(line)["source"]).input_ids]
    assert hits == ["nan5"]
    out = tmp_path / "run_e"
    proc = _run_nan_training(work, model, data, tmp_path, out, "loss.method=vanilla")
    assert proc.returncode == 1, proc.log
    # vanilla: the same records are built without their rationales (MT targets only)
    assert "loss vanilla (MT only)" in proc.stdout, proc.log
    # the first occurrence (epoch 0) was skipped, training went on; the second stopped it
    assert "non-finite loss at step" in proc.stdout and "skipped (1/1)" in proc.stdout, proc.log
    # both ranks write to the shared stderr pipe: find the error line, not the last line
    err = next((line for line in proc.stderr.splitlines() if "radis train: non-finite loss at step " in line),
               proc.stderr[-3000:])
    assert "radis train: non-finite loss at step " in err and "'nan5'" in err and "epoch 1" in err, err
    train = read_metrics(out / "metrics.jsonl")
    assert sum(r["skipped_micro_batches"] for r in train) == 1
    assert all(math.isnan(r["loss_rd"]) and r["loss_mt"] > 0 for r in train if r["tokens"])
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in train])))


# --------------------------------------------------------------------------- run F


def with_recorded_topk(records: list[dict], model_dir: Path, tokenizer, out: Path, k: int = 4) -> list[float]:
    """Write `records` as generation records carrying the top-k of the model at `model_dir`
    over their rationale tokens (teacher-forced, as `radis generate` with rationale.topk
    records them), to `out` (+ its .topk.safetensors). Returns per rationale token the
    KL(q || p) a student equal to that model has: -log(top-k mass)."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from radis.config import load_config
    from radis.data.example import Example
    from radis.data.prompts import ChatFormat
    from radis.data.records import save_topk_atomic

    cfg = load_config(None, [])
    fmt = ChatFormat(tokenizer, cfg.data, "llama2")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    topk, want_kl, recs = {}, [], []
    for rec in records:
        rec = dict(rec)
        ex = Example(id=rec["id"], src_lang="de", tgt_lang="en", source=rec["source"], reference=rec["reference"])
        rd_ids = tokenizer(rec["rationale"], add_special_tokens=False).input_ids
        prefix = fmt.prompt_ids(ex) + fmt.answer_ids(rec["reference"], continuation=False) + \
            fmt.answer_ids(cfg.data.separator, continuation=True)
        with torch.no_grad():
            logits = model(torch.tensor([prefix + rd_ids])).logits[0].double()
        logp = torch.log_softmax(logits[len(prefix) - 1:len(prefix) + len(rd_ids) - 1], dim=-1)  # predicts rd_ids
        top = logp.topk(k, dim=-1)
        topk[rec["id"]] = (top.indices.numpy().astype(np.int32), top.values.float().numpy())
        want_kl += (-torch.logsumexp(top.values, dim=-1)).tolist()  # KL(q || p) = -log Σ_topk p
        rec.update(rationale_token_ids=rd_ids, tokenizer_fingerprint=fmt.fingerprint, separator=cfg.data.separator,
                   topk=k, strategy="continue")
        recs.append(rec)
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    save_topk_atomic(out.with_name(out.name[: -len(".jsonl")] + ".topk.safetensors"), topk)
    return want_kl


def test_kd_term_against_recorded_topk_of_the_model_itself(work, tmp_path):
    """Rationale records carry the generator's top-k log-probs (here: the tiny model itself).
    Before any update the student is the teacher, so KL(q || p) of the renormalised top-k q
    is exactly -log(top-k mass): the trainer's logged `kd` of step 1 must equal that,
    computed here in plain PyTorch."""
    records = [json.loads(line) for line in (work["root"] / "train.rationales.jsonl").read_text().splitlines()[:6]]
    data = tmp_path / "kd.rationales.jsonl"
    want_kl = with_recorded_topk(records, work["model"], work["tokenizer"], data)
    out = tmp_path / "run_f"
    proc = _run([sys.executable, "-m", "radis.cli", "train", "--config", str(work["config"]),
                 f"data.train=[{{path: {data}}}]", "data.valid=[]", f"data.cache_dir={tmp_path / 'cache'}",
                 f"train.output_dir={out}", "train.max_steps=1", "train.gradient_accumulation_steps=1",
                 "data.packs_per_micro_batch=4", "data.max_tokens=512", "train.eval_every=0", "loss.kd_weight=0.5"])
    assert proc.returncode == 0, proc.log
    (rec,) = read_metrics(out / "metrics.jsonl")
    # every example is in the one step (4 packs of 512 tokens hold all six)
    assert rec["kd"] == pytest.approx(sum(want_kl) / len(want_kl), rel=1e-4)
    assert 0 < rec["kd"] < rec["loss_rd"]


def test_kd_with_validation_that_leaves_a_rank_only_padding(work, tmp_path):
    """2 ranks, KD on: the validation set is one plain pair (no teacher), one pack, so rank 1
    validates only the all-padding micro-batch that evens out the ranks; at step 0 and after
    every step, without a teacher in any validation batch."""
    records = [json.loads(line) for line in (work["root"] / "train.rationales.jsonl").read_text().splitlines()[:16]]
    data = tmp_path / "kd.rationales.jsonl"
    with_recorded_topk(records, work["model"], work["tokenizer"], data)
    valid = tmp_path / "valid.de-en.jsonl"
    valid.write_text(json.dumps({"translation": {"de": "die ware hat", "en": "the goods cost"}}) + "\n")
    out = tmp_path / "run_kd_valid"
    proc = _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "radis.cli", "train",
                 "--config", str(work["config"]), f"data.train=[{{path: {data}}}]", f"data.valid=[{{path: {valid}}}]",
                 f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={out}", "train.max_steps=2",
                 "train.eval_every=1", "train.save_every=0", "loss.kd_weight=0.5"])
    assert proc.returncode == 0, proc.log
    valid_recs = read_metrics(out / "metrics.jsonl", "valid")
    assert [r["step"] for r in valid_recs] == [0, 1, 2]
    assert all(r["tokens_mt"] > 0 and r["tokens_rd"] == 0 for r in valid_recs)
    assert all(r["kd"] > 0 for r in read_metrics(out / "metrics.jsonl", "train"))


def test_kd_run_skips_a_nan_batch(work, sp_tokenizer, tmp_path):
    """KD on and a NaN batch: the skip runs an all-padding micro-batch (no teacher) and
    training goes on; the second occurrence stops the run as without KD."""
    model, raw, _ = nan_model_and_data(sp_tokenizer, tmp_path)
    data = tmp_path / "nan_kd.rationales.jsonl"
    with_recorded_topk([json.loads(line) for line in raw.read_text().splitlines()], work["model"], work["tokenizer"], data)
    out = tmp_path / "run_kd_nan"
    proc = _run_nan_training(work, model, data, tmp_path, out, "loss.kd_weight=0.5")
    assert proc.returncode == 1, proc.log
    assert "skipped (1/1)" in proc.stdout, proc.log
    err = next((line for line in proc.stderr.splitlines() if "radis train: non-finite loss at step " in line),
               proc.stderr[-3000:])
    assert "'nan5'" in err and "epoch 1" in err, err
    train = read_metrics(out / "metrics.jsonl")
    assert sum(r["skipped_micro_batches"] for r in train) == 1
    assert any(r["kd"] > 0 for r in train)


# --------------------------------------------------------------------------- ZeRO-3 head


def test_untied_head_with_validation_under_default_zero3(work, sp_tokenizer, tmp_path):
    """LLaMA-2 / Mistral have an untied head: the fused loss must gather it for the
    backward too, and survive ZeRO-3's prefetch after validation forwards."""
    model = make_tiny_llama(sp_tokenizer, tmp_path / "untied", tied=False)
    proc = _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                 "-m", "radis.cli", "train", "--config", str(work["config"]), f"model.name_or_path={model}",
                 f"train.output_dir={tmp_path / 'out'}", "train.deepspeed_config=null", "train.max_steps=3",
                 "train.eval_every=1", "train.save_every=0"])
    assert proc.returncode == 0, proc.log


@pytest.mark.skipif(not cpu_supports_float16(), reason="this CPU has no oneDNN fp16 kernels (AVX512-FP16 / "
                    "AMX-FP16), so DeepSpeed's CPU accelerator refuses fp16 (radis refuses it in preflight: test_train)")
def test_fp16_step_keeps_the_gradient_with_the_loss_scale_folded_in(work):
    """model.dtype=float16 under DeepSpeed's dynamic loss scale (2^16 at first): the fused
    loss writes S x the gradient in the forward (S = loss scale x world size, read from
    the engine each micro-batch), so the step's gradient norm is the fp32 one within fp16
    rounding (without the fold it was zero or inf: tests/test_loss.py, fp16)."""
    out = work["root"] / "fp16"
    proc = _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                 "-m", "radis.cli", "train", "--config", str(work["config"]), f"train.output_dir={out}",
                 "model.dtype=float16", "train.deepspeed_config=null", "train.max_steps=1",
                 "train.gradient_accumulation_steps=2", "train.max_grad_norm=0", "train.eval_every=0",
                 "train.warmup_steps=0"])
    assert proc.returncode == 0, proc.log
    assert json.loads((out / "ds_config.json").read_text())["fp16"]["enabled"] is True
    (rec,) = read_metrics(out / "metrics.jsonl")
    assert rec["grad_norm"] == pytest.approx(_reference_grad_norm(work, work["tokenizer"]), rel=2e-2), rec
