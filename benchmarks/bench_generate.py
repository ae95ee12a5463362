"""Rationale generation throughput: our batched, length-sorted KV-cache loop against
Hugging Face `generate`, one example at a time and on left-padded batches, on the same prompts.

    python benchmarks/bench_generate.py                      # 64 de-en pairs, SmolLM2, CPU
    python benchmarks/bench_generate.py --examples 8 --max-new-tokens 8    # smoke run

Both sides decode greedily from the same `continue`-strategy prompts (instruction +
source, reference + separator as the start of the answer) with end-of-turn impossible
for the first `--min-rationale-tokens` tokens (HF: `min_new_tokens` with every stop id
as `eos_token_id`, the same rule), and count generated tokens without the stop token.
Our side runs with a decode batch ("batch": rows decoded together) and a prefill
batch ("prefill": prompts prefilled together, their KV caches merged into the decode
batch). The batched HF baseline is what a user would write instead: `generate` on
left-padded batches of `--hf-batch-sizes` prompts, in file order and length-sorted like
ours (less padding: the stronger baseline), finished rows padded until the batch's last
row stops. The ratio printed at the end is against the best HF row of either order. tokens/s = generated tokens / wall time of the generation calls (prompts are built
beforehand, the model is loaded once). "agree" is the share of examples whose greedy
tokens are identical on both sides: batching must not change the output (in fp32; in
bf16 a batch's other rows change the rounding, and a near tie can flip: not an error
there; with `--random-weights` every logit is a near tie, so it says n/a).

On a CUDA machine the same comparison runs again in bf16 on the GPU with larger
batches (`--gpu-batch-sizes`); `--devices cuda` runs only that part. `--random-weights`
builds the model from the directory's config.json with random weights (a machine that
has the config and tokenizer but not the weights, e.g. the GPU check's assets): the
throughput is the shape's, and rows rarely stop early, so every row decodes about
--max-new-tokens tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alma" / "deen" / "valid.de-en.json"


def build(args):
    from radis.config import SourceConfig, load_config
    from radis.data.prompts import ChatFormat
    from radis.data.sources import read_source
    from radis.generation.command import build_requests
    from radis.models import load_tokenizer

    cfg = load_config(None, [f"model.name_or_path={args.model}", f"rationale.min_rationale_tokens={args.min_rationale_tokens}"])
    examples = read_source(SourceConfig(path=str(args.data), limit=args.examples))
    tok = load_tokenizer(args.model)
    fmt = ChatFormat(tok, cfg.data, cfg.model.chat_template)
    return tok, fmt, build_requests(fmt, examples, cfg)


def run_ours(model, requests, fmt, pad_id, max_new, batch_size, prefill_batch_size):
    from radis.generation.decode import (
        DecodingSettings,
        generate,
        length_sorted_batches,
    )

    settings = DecodingSettings(max_new_tokens=max_new)
    out = {}
    sync()
    t0 = time.perf_counter()
    for batch in length_sorted_batches(requests, batch_size):
        for g in generate(model, batch, settings, stop_token_ids=fmt.stop_token_ids, pad_token_id=pad_id,
                          prefill_batch_size=prefill_batch_size):
            out[g.key] = g.token_ids
    sync()
    return out, time.perf_counter() - t0


def run_hf_one_at_a_time(model, requests, fmt, pad_id, max_new, min_new):
    device = next(model.parameters()).device
    stops = set(fmt.stop_token_ids)
    out = {}
    sync()
    t0 = time.perf_counter()
    for r in requests:
        ids = torch.tensor([r.prompt_ids], device=device)
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, min_new_tokens=min_new,
            do_sample=False, eos_token_id=list(fmt.stop_token_ids), pad_token_id=pad_id,
        )
        new = gen[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        out[r.key] = new[:cut]
    sync()
    return out, time.perf_counter() - t0


def run_hf_batched(model, requests, fmt, pad_id, max_new, min_new, batch_size, sort):
    from radis.generation.decode import length_sorted_batches

    device = next(model.parameters()).device
    stops = set(fmt.stop_token_ids)
    out = {}
    if sort:
        batches = length_sorted_batches(requests, batch_size)
    else:
        batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    sync()
    t0 = time.perf_counter()
    for batch in batches:
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new, min_new_tokens=min_new,
            do_sample=False, eos_token_id=list(fmt.stop_token_ids), pad_token_id=pad_id,
        )
        for r, row in zip(batch, gen[:, width:].tolist()):
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out[r.key] = row[:cut]
    sync()
    return out, time.perf_counter() - t0


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(label, model, requests, fmt, pad_id, args, batch_sizes, hf_batch_sizes):
    """Every method once per repeat, interleaved (a slow spell of a shared machine hits all
    methods alike), then the median time of each; the one-at-a-time baseline runs once."""
    # untimed warm-up of both sides (CUDA context, cuBLAS handles, allocator), so that the
    # first timed method does not pay for it
    run_hf_one_at_a_time(model, requests[:2], fmt, pad_id, 4, 0)
    run_ours(model, requests[:4], fmt, pad_id, 4, *batch_sizes[0])
    base, base_s = run_hf_one_at_a_time(model, requests, fmt, pad_id, args.max_new_tokens, args.min_rationale_tokens)
    base_tok = sum(len(v) for v in base.values())
    methods = [(f"HF generate, left-padded batches, {'length-sorted' if sort else 'file order'}", bs, bs,
                lambda bs=bs, sort=sort: run_hf_batched(model, requests, fmt, pad_id, args.max_new_tokens,
                                                        args.min_rationale_tokens, bs, sort))
               for sort in (False, True) for bs in hf_batch_sizes]
    methods += [("radis batched, length-sorted", bs, pbs,
                 lambda bs=bs, pbs=pbs: run_ours(model, requests, fmt, pad_id, args.max_new_tokens, bs, pbs))
                for bs, pbs in batch_sizes]
    times: list[list[float]] = [[] for _ in methods]
    outs: list[dict] = [{} for _ in methods]
    for rep in range(args.repeats):
        for i, (_, _, _, run) in enumerate(methods):
            outs[i], seconds = run()
            times[i].append(seconds)
        print(f"{label}: repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    def row(method, bs, pbs, out, seconds):
        tok = sum(len(v) for v in out.values())
        return {"device": label, "method": method, "batch": bs, "prefill": pbs, "examples": len(requests),
                "tokens": tok, "seconds": round(seconds, 2), "tokens_per_s": round(tok / seconds, 1),
                "speedup": round((tok / seconds) / (base_tok / base_s), 2),
                # random weights: near-uniform logits, whose top two a rounding flips (n/a)
                "agree": None if args.random_weights else round(sum(out[k] == base[k] for k in base) / len(base), 3)}

    rows = [row("HF generate, one at a time", 1, 1, base, base_s)]
    for (method, bs, pbs, _), out, t in zip(methods, outs, times):
        rows.append(row(method, bs, pbs, out, statistics.median(t)) | {"all_seconds": [round(x, 2) for x in t]})
    for order in ("file order", "length-sorted"):
        hf = [r for r in rows if r["method"].startswith("HF generate, left") and r["method"].endswith(order)]
        ours = [r for r in rows if r["method"].startswith("radis")]
        if hf and ours:
            best_hf, best_ours = max(hf, key=lambda r: r["tokens_per_s"]), max(ours, key=lambda r: r["tokens_per_s"])
            print(f"{label}: best radis ({best_ours['batch']}:{best_ours['prefill']}) {best_ours['tokens_per_s']} "
                  f"tokens/s = {best_ours['tokens_per_s'] / best_hf['tokens_per_s']:.2f}x the best HF batched, {order} "
                  f"(batch {best_hf['batch']}) {best_hf['tokens_per_s']} tokens/s", file=sys.stderr)
    return rows


def batch_pair(text: str) -> tuple[int, int]:
    """'64:16' -> (64, 16); a single number N means N:N."""
    try:
        decode, _, prefill = text.partition(":")
        pair = (int(decode), int(prefill or decode))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DECODE:PREFILL batch sizes like 64:16, got {text!r}") from None
    if min(pair) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return pair


def _model(args, dtype: str):
    from radis.models import DTYPES, load_model, resolve_model_path

    if not args.random_weights:
        return load_model(args.model, dtype=dtype, attn_implementation="sdpa")
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], attn_implementation="sdpa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-rationale-tokens", type=int, default=16)
    p.add_argument("--batch-sizes", type=batch_pair, nargs="+", default=[(64, 16), (64, 8)],
                   metavar="DECODE:PREFILL", help="decode batch : prefill batch (default: 64:16 64:8)")
    p.add_argument("--gpu-batch-sizes", type=batch_pair, nargs="+", default=[(16, 16), (64, 16), (64, 64)],
                   metavar="DECODE:PREFILL")
    p.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[16, 32],
                   help="batch sizes of the left-padded HF generate baseline (default 16 32; 8 and 64 measured slower)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of every batched method, interleaved; the table has the median (default 3)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=["cpu", "cuda"],
                   help="where to run (cuda only where available; default both)")
    p.add_argument("--random-weights", action="store_true",
                   help="the model from its config.json with random weights (seed 0) instead of its weights")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.data.is_file():
        print(f"data file {args.data} not found (../shared/data beside the checkout); pass --data", file=sys.stderr)
        return 2

    from radis.generation.decode import pad_token_id

    tok, fmt, requests = build(args)
    pad_id = pad_token_id(tok)
    rows = []
    if "cpu" in args.devices:
        model = _model(args, "float32").eval()
        rows += compare(f"CPU fp32, {torch.get_num_threads()} threads", model, requests, fmt, pad_id, args,
                        args.batch_sizes, args.hf_batch_sizes)
    if "cuda" in args.devices and torch.cuda.is_available():
        model = _model(args, "bfloat16").to("cuda").eval()
        rows += compare(f"{torch.cuda.get_device_name()} bf16", model, requests, fmt, pad_id, args, args.gpu_batch_sizes,
                        args.hf_batch_sizes)

    print(f"{len(requests)} prompts from {args.data.name}, model {args.model}, greedy, "
          f"max_new_tokens={args.max_new_tokens}, min_rationale_tokens={args.min_rationale_tokens}\n")
    print(f"median of {args.repeats} interleaved runs per batched method (all runs in --out)\n")
    print("| device | method | batch | prefill | tokens | seconds | tokens/s | speed-up | agree |")
    print("|--------|--------|-------|---------|--------|---------|----------|----------|-------|")
    for r in rows:
        print(f"| {r['device']} | {r['method']} | {r['batch']} | {r['prefill']} | {r['tokens']} | {r['seconds']} | "
              f"{r['tokens_per_s']} | {r['speedup']}x | {'n/a (random weights)' if r['agree'] is None else r['agree']} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
