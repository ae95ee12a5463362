"""Training throughput: tokens/s and MFU of `radis train` against the HF Trainer.

Both train the same randomly initialised Llama on the same packed micro-batches (the
radis data path: ALMA de-en pairs, vanilla targets, packs of --max-tokens tokens, the
same loader plan per rank) with the same DeepSpeed ZeRO stage and AdamW:

- ours: `radis train` (custom loop, fused linear loss, loss normalised per optimizer step);
- HF:   `transformers.Trainer` with `deepspeed=` the same JSON, the model's own loss (full
        [B, T, V] logits, cross-entropy), fed the identical collated packs.

    python benchmarks/bench_train.py                       # CPU: 2 ranks, tiny Llama, ZeRO-3
    python benchmarks/bench_train.py --zero 2 --steps 20
    python benchmarks/bench_train.py --gpu                 # CUDA: ~1B Llama, 4096-token packs, bf16

tokens/s counts real (non-padding) tokens of all ranks per second of step time, over
the steps after --warmup. MFU uses radis.train.metrics (6·N·tokens + 12·L·d·Σℓ² per
packed example; peak from RADIS_PEAK_TFLOPS, the GPU table, or on CPU a matmul measured once
here and given to both sides).
Prints a Markdown table and writes <out>/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALMA = ROOT.parent / "shared" / "data" / "alma" / "deen"

# name -> (hidden, layers, heads, kv heads, intermediate)
MODELS = {
    "tiny": (256, 4, 4, 4, 688),  # CPU
    "1b": (2048, 16, 16, 8, 5632),  # GPU: ~1.1B with a 32k vocabulary (TinyLlama shape)
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="GPU section: ~1B Llama, 4096-token packs, bf16")
    p.add_argument("--ranks", type=int, default=None, help="ranks (default: 2 on CPU, all GPUs with --gpu)")
    p.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out of the averages")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per pack (CPU 512, GPU 4096)")
    p.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--pairs", type=int, default=2000, help="ALMA de-en pairs to pack")
    p.add_argument("--data-dir", type=Path, default=ALMA, help="folder with train.de-en.de / .en (default ALMA de-en)")
    p.add_argument("--tokenizer", default="smollm2", help="tokenizer of the random model (default SmolLM2's)")
    p.add_argument("--out", default="outputs/bench_train")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where the random model is saved and reused (default OUT/<cpu|gpu>/model-<size>); "
                        "the 1B model is 2.2 GB, so gpu_check keeps it out of the folder it brings back")
    p.add_argument("--only", choices=["ours", "hf"], default=None)
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- set-up


def prepare(args: argparse.Namespace, out: Path) -> Path:
    """Model directory (random Llama + SmolLM2 tokenizer) and a config YAML; returns the YAML."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from radis.models import resolve_model_path

    data = args.data_dir
    if not (data / "train.de-en.de").is_file():
        sys.exit(f"bench_train: needs the ALMA de-en data at {data} (--data-dir)")
    model_dir = args.model_dir or out / f"model-{'1b' if args.gpu else 'tiny'}"
    if not (model_dir / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(resolve_model_path(args.tokenizer))
        hidden, layers, heads, kv, inter = MODELS["1b" if args.gpu else "tiny"]
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                          max_position_embeddings=max(4096, args.max_tokens),
                          # tied like SmolLM2: radis.loss_head's ZeRO-3 head does not yet
                          # support an untied lm_head (see the trainer report)
                          tie_word_embeddings=True,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        # On the GPU: built there in bf16 (the dtype both trainers load), so that a 1.1B
        # model is initialised in seconds and saved at 2.2 GB rather than 4.4 GB of fp32.
        with torch.device("cuda" if args.gpu else "cpu"):
            model = LlamaForCausalLM(cfg)
        if args.gpu:
            model = model.to(torch.bfloat16)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        if args.gpu:  # the allocator would keep the 6.6 GB (fp32 build, bf16 copy) reserved through both runs
            torch.cuda.empty_cache()
    config = out / "bench.yaml"
    config.write_text(f"""\
model:
  name_or_path: {model_dir}
  chat_template: chatml
data:
  train:
    - path: {data / 'train.de-en.de'}
      target_path: {data / 'train.de-en.en'}
      src_lang: de
      tgt_lang: en
      limit: {args.pairs}
  max_tokens: {args.max_tokens}
  cache_dir: {out / 'cache'}
loss:
  method: vanilla
train:
  lr: 1.0e-4
  max_steps: {args.steps}
  gradient_accumulation_steps: {args.accum}
  zero_stage: {args.zero}
  eval_every: 0
  save_every: 0
  save_final: false  # as the HF side (save_strategy no): a 1.1B ZeRO-3 checkpoint is ~15 GB to write
  log_every: 1
""")
    return config


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of every rank of both sides.

    On CPU the MFU peak is measured here, once, with one thread (a rank's, see
    OMP_NUM_THREADS), and handed to both sides as RADIS_PEAK_TFLOPS: left to each rank,
    each process timed its own matmul, and the two MFU columns disagreed with their own
    tokens/s (a rehearsal run: 894 tokens/s at 45% against 718 at 58%). On a GPU the
    peak is the card's datasheet value (radis.train.metrics), the same for both sides.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not args.gpu:
        env["OMP_NUM_THREADS"] = "1"
        if "RADIS_PEAK_TFLOPS" not in env:
            import torch

            from radis.train.metrics import measured_cpu_matmul_flops

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                env["RADIS_PEAK_TFLOPS"] = repr(measured_cpu_matmul_flops() / 1e12)
            finally:
                torch.set_num_threads(threads)
    return env


def _launch(args: argparse.Namespace, cmd: list[str]) -> None:
    env = rank_env(args)
    full = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
            "--master_port", str(_port()), *cmd]
    print("+", " ".join(full), flush=True)
    subprocess.run(full, cwd=ROOT, env=env, check=True)


def _summary(records: list[dict], warmup: int) -> dict:
    rows = [r for r in records if r["step"] > warmup] or records
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["step_time_s"] for r in rows)
    return {"steps": len(rows), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "mfu": sum(r["mfu"] for r in rows) / len(rows), "peak_mem_gb": max(r["peak_mem_gb"] for r in rows)}


def run_ours(args: argparse.Namespace, config: Path, out: Path) -> dict:
    from radis.train.metrics import read_metrics

    run_dir = out / "ours"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    _launch(args, ["-m", "radis.cli", "train", "--config", str(config), f"train.output_dir={run_dir}"])
    return _summary(read_metrics(run_dir / "metrics.jsonl"), args.warmup)


def run_hf(args: argparse.Namespace, config: Path, out: Path) -> dict:
    _launch(args, [str(Path(__file__).resolve()), "--hf-worker", "--out", str(out), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)] + (["--gpu"] if args.gpu else []))
    return _summary([json.loads(x) for x in (out / "hf" / "metrics.jsonl").read_text().splitlines()], args.warmup)


# --------------------------------------------------------------------------- the HF Trainer side


def hf_ds_config(cfg, world: int, dtype, cuda: bool) -> dict:
    """The HF side's DeepSpeed JSON: radis train's own (radis/ds_config.py, as the recipe
    derives it), ZeRO bucket sizes from the model's hidden size included. Without the
    hidden size the HF side ran on DeepSpeed's defaults (a 5e8 reduce bucket, 5e7 prefetch
    bucket, 1e5 persistence threshold, against h*h, 0.9*h*h and 10*h on ours), not the
    same JSON. Less train_batch_size: DeepSpeed derives the global batch itself, and the
    HF integration on CPU computes it with a world size of 1 (its device state is not the
    process group's)."""
    from transformers import AutoConfig

    from radis.ds_config import RunShape, derive_ds_config
    from radis.models import dtype_name, resolve_model_path

    model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir))
    shape = RunShape(world_size=world, precision=dtype_name(dtype), hidden_size=getattr(model_config, "hidden_size", None),
                     cuda=cuda)
    ds_json = derive_ds_config(cfg, shape)
    del ds_json["train_batch_size"]
    return ds_json


def hf_worker(args: argparse.Namespace) -> None:
    """One rank of the HF Trainer run (started by torchrun from `run_hf`)."""
    import torch
    import torch.distributed as dist
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from radis.config import load_config
    from radis.data.build import load_or_build
    from radis.data.loader import PackedLoader
    from radis.models import (
        default_attn_implementation,
        default_dtype,
        load_tokenizer,
    )
    from radis.train.metrics import (
        count_matmul_params,
        peak_flops_per_rank,
        peak_memory_gb,
        step_flops,
        sum_sq_lengths,
    )

    out = Path(args.out)
    cfg = load_config(out / "bench.yaml")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    # The process group first (gloo on CPU), so that accelerate / the Trainer see all ranks.
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    from radis.data.packing import model_forward_kwargs

    dtype = default_dtype("auto")
    attn = default_attn_implementation("auto")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    tok = load_tokenizer(cfg.model.name_or_path)
    ds = load_or_build(cfg, "train", tok, progress=False, log=None)
    loader = PackedLoader(ds, rank=rank, world_size=world, packs_per_micro_batch=cfg.data.packs_per_micro_batch,
                          gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, seed=cfg.data.seed,
                          attn=attn, dtype=dtype)
    # This rank's micro-batches in loader order; HF's own sampler is bypassed (see below).
    micro = []
    for b in loader:
        labels = torch.full_like(b["labels"], -100)
        labels[:, 1:] = b["labels"][:, :-1]  # HF shifts labels inside the model's loss
        # the attention inputs radis train gives its model (4D mask, flex block mask or flash
        # varlen boundaries), built where the model runs
        item = {**model_forward_kwargs(b, device), "labels": labels.to(device)}
        micro.append((item, b["num_tokens"], b["cu_seqlens"], b["example_ids"]))
        if len(micro) >= args.steps * cfg.train.gradient_accumulation_steps:
            break

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(micro)

        def __getitem__(self, i):
            return micro[i][0]

    ds_json = hf_ds_config(cfg, world, dtype, cuda)
    targs = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=1, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        max_steps=args.steps, learning_rate=cfg.train.lr, weight_decay=cfg.train.weight_decay, lr_scheduler_type="cosine",
        max_grad_norm=cfg.train.max_grad_norm, logging_steps=1, save_strategy="no", report_to=[], bf16=dtype == torch.bfloat16,
        deepspeed=ds_json, dataloader_num_workers=0, remove_unused_columns=False, seed=cfg.train.seed,
    )
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=dtype, attn_implementation=attn)
    n_mm, layers, hidden = count_matmul_params(model), model.config.num_hidden_layers, model.config.hidden_size
    peak = peak_flops_per_rank(torch.device("cuda") if cuda else torch.device("cpu"))
    G = cfg.train.gradient_accumulation_steps

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - self.t0
            s = state.global_step - 1
            mine = micro[s * G:(s + 1) * G]
            # on the rank's device: NCCL has no CPU tensors (gloo, on CPU, has both)
            stats = torch.tensor([float(sum(m[1] for m in mine)), float(sum(_sum_sq(m) for m in mine))],
                                 dtype=torch.float64, device=device)
            dist.all_reduce(stats)
            tokens, sq = stats.tolist()
            if rank == 0:
                flops = step_flops(n_mm, layers, hidden, int(tokens), int(sq))
                rec = {"step": state.global_step, "tokens": int(tokens), "step_time_s": dt, "tokens_per_s": tokens / dt,
                       "mfu": flops / dt / (world * peak), "peak_mem_gb": peak_memory_gb(torch.device("cuda") if cuda
                                                                                      else torch.device("cpu"))}
                with open(out / "hf" / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")

    def _sum_sq(m):
        from radis.train.recipe import _cumsum0, _example_lengths

        return sum_sq_lengths(_cumsum0(_example_lengths({"input_ids": m[0]["input_ids"], "cu_seqlens": m[2],
                                                          "example_ids": m[3]})))

    class SameOrderTrainer(Trainer):
        # Every rank already holds its own micro-batches (the radis loader plan), so the
        # data must not be sharded again: a plain in-order loader of batch size 1.
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(Batches(), batch_size=None, shuffle=False)

    if rank == 0:
        (out / "hf").mkdir(parents=True, exist_ok=True)
        (out / "hf" / "metrics.jsonl").write_text("")
    trainer = SameOrderTrainer(model=model, args=targs, train_dataset=Batches(), callbacks=[Timer()])
    trainer.train()
    dist.barrier()
    dist.destroy_process_group()  # a clean exit (else gloo threads may abort at teardown)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_tokens is None:
        args.max_tokens = 4096 if args.gpu else 512
    if args.hf_worker:
        hf_worker(args)
        return 0
    import torch

    if args.gpu and not torch.cuda.is_available():
        sys.exit("bench_train: --gpu needs CUDA")
    if args.ranks is None:
        args.ranks = torch.cuda.device_count() if args.gpu else 2
    out = Path(args.out).resolve() / ("gpu" if args.gpu else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    config = prepare(args, out)
    from radis.io import write_json_atomic

    sides = [("radis train", run_ours, "ours"), ("HF Trainer", run_hf, "hf")]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for name, run, key in sides:
        if args.only not in (None, key):
            continue
        # one side failing must not lose the other's numbers: each is recorded as it ends
        try:
            results[name] = run(args, config, out)
        except subprocess.CalledProcessError as err:
            failed[name] = f"exit status {err.returncode}"
        write_json_atomic(out / "results.json", {"args": settings, "results": results, "failed": failed})
        # each side's row as it ends: a run killed during the second side (gpu-check's time
        # limit) still leaves the first side's numbers in its log
        print("\n" + "\n".join(_table(results, failed, only=name)), flush=True)
    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU, {os.cpu_count()} cores"
    print(f"\n{device}, {args.ranks} ranks, ZeRO-{args.zero}, {args.max_tokens}-token packs, "
          f"accumulation {args.accum}, {args.steps} steps (first {args.warmup} left out)\n")
    print("\n".join(_table(results, failed)))
    return 1 if failed else 0


def _table(results: dict[str, dict], failed: dict[str, str], only: str | None = None) -> list[str]:
    """The Markdown table of the sides that ran (or only the side `only`)."""
    lines = ["| trainer | tokens/s | MFU | peak memory (GB) |", "|---|---|---|---|"]
    for name, r in results.items():
        if only in (None, name):
            lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.2f}% | {r['peak_mem_gb']:.2f} |")
    for name, why in failed.items():
        if only in (None, name):
            lines.append(f"| {name} | failed ({why}) | | |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
