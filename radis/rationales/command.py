"""radis rationales: the model writes its own rationales (distributed, resumable).

    radis rationales --config X.yaml [key=value ...]
    torchrun --standalone --nproc_per_node N -m radis.cli rationales --config X.yaml   (N ranks)

Every pair of `data.train` becomes one prompt. The user turn is the translation
instruction with the source; the assistant turn starts with the reference translation
and the model goes on writing: that continuation is the rationale.

    strategy "continue":  [user: instruction + source][assistant: reference + separator] -> rationale
                          (stop tokens are impossible for the first min_rationale_tokens)
    strategy "ask":       [user: instruction + source][assistant: reference][eot]
                          [user: ask_prompt][assistant:] -> rationale

Ranks (RANK / WORLD_SIZE / LOCAL_RANK from torchrun or deepspeed) take disjoint shards:
example i of the list belongs to rank i % WORLD_SIZE. Each rank commits its batches as
part files (see store.py); a killed run restarted with the same command skips every
committed id. When all ranks are done, rank 0 merges the parts into
`rationales.jsonl` (+ `rationales.topk.safetensors`) in example order and writes
`skipped.jsonl` and `summary.json` (count, mean / max rationale tokens, share that hit
max_new_tokens, share empty, skips by reason, this run's tokens/s).

The generator (`rationale.generator`, default `model.name_or_path`) runs in bf16 on
cuda:LOCAL_RANK where CUDA exists, fp32 on CPU (`model.dtype`). An output directory
whose manifest.json holds another generation config (model, tokenizer, template,
prompt, strategy, decoding) is refused; `rationale.overwrite=true` deletes it first.
A directory of the *same* config is always resumed, whatever `overwrite` says.

One merged record (one JSON line):

    id, src_lang, tgt_lang, direction, source, reference,
    rationale               decoded continuation, template leftovers stripped
    rationale_token_ids     the generated ids (stop token excluded): training can reuse
                            them when its tokenizer has the same `tokenizer_fingerprint`
    separator, strategy     how reference and rationale were joined in the prompt
    generator, decoding     model reference and decoding settings
    stop_reason             "eot" or "max_length"
    prompt_tokens, rationale_tokens, tokenizer_fingerprint, topk (k; 0 = none), config_hash
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from radis.config import RadisConfig
from radis.data.example import Example
from radis.io import write_json_atomic, write_jsonl_atomic
from radis.rationales.generate import (
    DecodingSettings,
    Generation,
    Request,
    generate,
    length_sorted_batches,
)
from radis.rationales.store import (
    SKIPPED,
    SUMMARY,
    OutputMismatchError,
    RationaleStore,
    config_hash,
)

# Joining the group must happen within minutes (a wrong address should fail, not hang);
# the final barrier waits for the slowest rank, which may be hours behind on an
# unbalanced shard, so it runs in a second group with a long timeout. Both use gloo,
# also on GPU machines: no GPU tensor is ever exchanged.
JOIN_TIMEOUT = datetime.timedelta(minutes=10)
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


class RationaleInputError(ValueError):
    """Bad input for rationale generation (data, model or template)."""


# --------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        def read(name: str, default: int) -> int:
            text = os.environ.get(name)
            if text is None:
                return default
            try:
                return int(text)
            except ValueError:
                raise RationaleInputError(f"environment variable {name}={text!r}: expected an integer") from None

        r = cls(read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0))
        if not 0 <= r.rank < r.world_size:
            raise RationaleInputError(f"RANK={r.rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={r.world_size})")
        return r

    def barrier(self, group=None) -> None:
        if self.world_size > 1:
            torch.distributed.barrier(group=group)


def _init_process_group(ranks: Ranks):
    """Join the gloo group (only barriers and the final statistics use it).

    Returns (whether this call created the default group, the long-timeout group).
    """
    if ranks.world_size == 1:
        return False, None
    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=JOIN_TIMEOUT)
    return created, torch.distributed.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)


# --------------------------------------------------------------------------- prompts


def generator_reference(cfg: RadisConfig) -> str:
    return cfg.rationale.generator or cfg.model.name_or_path


def decoding_settings(cfg: RadisConfig) -> DecodingSettings:
    r = cfg.rationale
    for name in ("batch_size", "prefill_batch_size"):
        if getattr(r, name) < 1:
            raise RationaleInputError(f"rationale.{name} must be >= 1, got {getattr(r, name)}")
    try:
        return DecodingSettings(
            max_new_tokens=r.max_new_tokens, do_sample=r.do_sample, temperature=r.temperature,
            top_p=r.top_p, seed=r.seed, topk=r.topk,
        )
    except ValueError as err:
        raise RationaleInputError(f"rationale: {err}") from None


def describe(cfg: RadisConfig, fingerprint: str, template: str) -> dict[str, Any]:
    """Everything that changes what a rationale is: hashed into the output manifest.

    Not included: data sources (records are keyed by example id, so a run over more
    data extends the same directory), batch size and the number of ranks.
    """
    r = cfg.rationale
    return {
        "generator": generator_reference(cfg),
        "tokenizer_fingerprint": fingerprint,
        "chat_template": template,
        "instruction": cfg.data.instruction,
        "system_prompt": cfg.data.system_prompt,
        "separator": cfg.data.separator,
        "strategy": r.strategy,
        "min_rationale_tokens": r.min_rationale_tokens if r.strategy == "continue" else None,
        "ask_prompt": r.ask_prompt if r.strategy == "ask" else None,
        "max_source_tokens": r.max_source_tokens,
        "decoding": decoding_settings(cfg).as_dict(),
        "dtype": cfg.model.dtype,
    }


def build_requests(fmt, examples: Sequence[Example], cfg: RadisConfig) -> list[Request]:
    """The prompts of many examples for the configured strategy (see the module docstring).

    `continue` ends the prompt with answer_ids(separator, continuation=True), exactly
    where radis.data.segments puts the recorded rationale ids back at training time.
    """
    r = cfg.rationale
    prompts = fmt.prompt_ids_batch(examples)
    refs = fmt.answer_ids_batch([ex.reference for ex in examples], continuation=False)
    if r.strategy == "continue":
        tail = fmt.answer_ids(cfg.data.separator, continuation=True) if cfg.data.separator else []
        min_new = r.min_rationale_tokens
    else:
        tail = fmt.end_of_turn_ids() + fmt.followup_ids(r.ask_prompt)
        min_new = 0
    return [Request(ex.id, p + ref + tail, min_new_tokens=min_new) for ex, p, ref in zip(examples, prompts, refs)]


def skip_reasons(examples: Sequence[Example], tokenizer, cfg: RadisConfig) -> list[str | None]:
    """Why each example cannot be used (None: it can). Empty sides are an error under
    data.on_empty=error."""
    out: list[str | None] = [None] * len(examples)
    for i, ex in enumerate(examples):
        for side in ("source", "reference"):
            if not getattr(ex, side).strip():
                if cfg.data.on_empty == "error":
                    raise RationaleInputError(f"example {ex.id!r}: empty {side} (data.on_empty=error; set it to skip to drop such pairs)")
                out[i] = out[i] or f"empty_{side}"
    todo = [i for i, reason in enumerate(out) if reason is None]
    if todo:
        lengths = tokenizer([examples[i].source for i in todo], add_special_tokens=False)["input_ids"]
        for i, ids in zip(todo, lengths):
            if len(ids) > cfg.rationale.max_source_tokens:
                out[i] = "source_too_long"
    return out


def max_positions(name_or_path: str, cache_dir: str) -> int | None:
    """The generator's context length from its config (None when it does not say)."""
    from transformers import AutoConfig

    from radis.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path, cache_dir))
    return getattr(config, "max_position_embeddings", None)


# --------------------------------------------------------------------------- the run


def _record(ex: Example, gen: Generation, fmt, cfg: RadisConfig, fingerprint: str, chash: str) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": ex.id,
        "src_lang": ex.src_lang,
        "tgt_lang": ex.tgt_lang,
        "direction": ex.direction,
        "source": ex.source,
        "reference": ex.reference,
        "rationale": fmt.decode_answer(gen.token_ids),
        "rationale_token_ids": gen.token_ids,
        "separator": cfg.data.separator,
        "strategy": cfg.rationale.strategy,
        "generator": generator_reference(cfg),
        "decoding": {**decoding_settings(cfg).as_dict(), "min_rationale_tokens": cfg.rationale.min_rationale_tokens},
        "stop_reason": gen.stop_reason,
        "prompt_tokens": gen.prompt_tokens,
        "rationale_tokens": len(gen.token_ids),
        "tokenizer_fingerprint": fingerprint,
        "topk": cfg.rationale.topk,
        "config_hash": chash,
    }
    if ex.meta:
        try:
            json.dumps(ex.meta)
            rec["meta"] = ex.meta
        except TypeError:
            pass  # meta that is not JSON (e.g. arrays) stays out of the record
    return rec


def summarize(records: list[dict], max_new_tokens: int) -> dict[str, Any]:
    """count, mean / max rationale length (tokens), share that hit max length, share empty."""
    n = len(records)
    lengths = [rec["rationale_tokens"] for rec in records]
    return {
        "count": n,
        "mean_rationale_tokens": sum(lengths) / n if n else 0.0,
        "max_rationale_tokens": max(lengths, default=0),
        "share_max_length": sum(rec["stop_reason"] == "max_length" for rec in records) / n if n else 0.0,
        "share_empty": sum(not rec["rationale"].strip() for rec in records) / n if n else 0.0,
        "max_new_tokens": max_new_tokens,
    }


def _read_examples(cfg: RadisConfig) -> tuple[list[Example], Any]:
    from radis.data.sources import read_sources

    if not cfg.data.train:
        raise RationaleInputError("data.train: no sources configured; rationales are generated for the training pairs")
    return read_sources(cfg.data.train, cfg.data.on_empty)


def _jsonable(obj: Any) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return obj
    return repr(obj)


def generate_rationales(
    cfg: RadisConfig, *, examples: Sequence[Example] | None = None, model: Any = None, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) rationale generation on this rank; returns the summary on rank 0
    ({} on the other ranks).

    API use: `examples` replaces reading `data.train`; `model` is an already loaded
    generator (on its device, its tokenizer being the configured one).
    """
    from radis.data.prompts import ChatFormat
    from radis.models import load_model, load_tokenizer

    ranks = Ranks.from_env()
    started = time.perf_counter()
    own_group, slow_group = _init_process_group(ranks)
    try:
        settings = decoding_settings(cfg)
        gen_ref = generator_reference(cfg)
        # model.tokenizer belongs to model.name_or_path; a separate generator brings its own.
        tok_ref = gen_ref if cfg.rationale.generator else (cfg.model.tokenizer or gen_ref)
        tokenizer = load_tokenizer(tok_ref, cfg.model.cache_dir)
        fmt = ChatFormat(tokenizer, cfg.data, cfg.model.chat_template)
        fingerprint = fmt.fingerprint
        description = describe(cfg, fingerprint, fmt.template)
        chash = config_hash(description)

        if examples is None:
            examples, source_stats = _read_examples(cfg)
        else:
            examples, source_stats = list(examples), None
        seen: set[str] = set()
        for ex in examples:
            if ex.id in seen:  # records are keyed by id: resume and merge need them unique
                raise RationaleInputError(f"example id {ex.id!r} occurs twice; ids must be unique")
            seen.add(ex.id)
        # Skipped examples are decided identically on every rank (same data, same rules).
        limit = max_positions(gen_ref, cfg.model.cache_dir)
        reasons = skip_reasons(examples, tokenizer, cfg)
        candidates = [ex for ex, reason in zip(examples, reasons) if reason is None]
        usable: list[Example] = []
        requests: list[Request] = []
        skipped = [{"id": ex.id, "reason": reason} for ex, reason in zip(examples, reasons) if reason is not None]
        for ex, req in zip(candidates, build_requests(fmt, candidates, cfg)):
            if limit is not None and len(req.prompt_ids) + settings.max_new_tokens > limit:
                # prompt + rationale would not fit the model's positions
                skipped.append({"id": ex.id, "reason": "prompt_too_long"})
            else:
                usable.append(ex)
                requests.append(req)

        store = RationaleStore(cfg.rationale.output_dir, ranks.rank)
        if ranks.rank == 0:
            store.prepare(description, cfg.rationale.overwrite)
        ranks.barrier()
        if ranks.rank != 0:
            store.verify(description)
        done = store.completed_ids()
        by_id = {ex.id: ex for ex in usable}
        mine = [req for i, req in enumerate(requests) if i % ranks.world_size == ranks.rank and req.key not in done]

        generated = tokens = 0
        gen_time = 0.0
        if mine and model is None:
            model = load_model(gen_ref, cfg.model.cache_dir, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
            if torch.cuda.is_available():
                model = model.to(f"cuda:{ranks.local_rank}")
        if mine:
            model.eval()
            stop_ids = list(fmt.stop_token_ids)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
            bar = None
            if progress and ranks.rank == 0:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(mine), unit="ex", desc=f"rationales (rank 0 of {ranks.world_size})", file=sys.stderr)
            for batch in length_sorted_batches(mine, cfg.rationale.batch_size):
                t0 = time.perf_counter()
                results = generate(model, batch, settings, stop_token_ids=stop_ids, pad_token_id=pad_id,
                                   prefill_batch_size=cfg.rationale.prefill_batch_size)
                gen_time += time.perf_counter() - t0
                records = [_record(by_id[g.key], g, fmt, cfg, fingerprint, chash) for g in results]
                topk = {g.key: (g.topk_ids, g.topk_logprobs) for g in results} if settings.topk > 0 else None
                store.commit(records, topk)
                generated += len(results)
                tokens += sum(len(g.token_ids) for g in results)
                if bar is not None:
                    bar.update(len(results))
                    bar.set_postfix(tok_s=f"{tokens / max(gen_time, 1e-9):.1f}")
            if bar is not None:
                bar.close()

        run_stats = {"rank": ranks.rank, "generated": generated, "tokens": tokens, "generation_seconds": gen_time,
                     "seconds": time.perf_counter() - started}
        ranks.barrier(slow_group)  # every rank's parts are committed
        all_stats = [run_stats]
        if ranks.world_size > 1:
            all_stats = [None] * ranks.world_size
            torch.distributed.all_gather_object(all_stats, run_stats, group=slow_group)
        if ranks.rank != 0:
            return {}

        merge = store.merge([ex.id for ex in usable], with_topk=settings.topk > 0)
        records = [json.loads(line) for line in (store.root / "rationales.jsonl").read_text(encoding="utf-8").splitlines()]
        seconds = max(s["seconds"] for s in all_stats)
        gen_seconds = max(s["generation_seconds"] for s in all_stats)
        gen_tokens = sum(s["tokens"] for s in all_stats)
        skip_counts: dict[str, int] = {}
        for s in skipped:
            skip_counts[s["reason"]] = skip_counts.get(s["reason"], 0) + 1
        summary = {
            **summarize(records, settings.max_new_tokens),
            "examples": len(examples),
            "skipped": skip_counts,
            "stale_records": merge.stale,
            "duplicate_records": merge.duplicates,
            "missing": len(merge.missing),
            "this_run": {
                "generated": sum(s["generated"] for s in all_stats),
                "tokens": gen_tokens,
                "seconds": round(seconds, 3),  # wall time of the slowest rank, loading included
                # generated tokens of all ranks / generation time of the slowest rank
                "tokens_per_s": round(gen_tokens / gen_seconds, 2) if gen_seconds > 0 else 0.0,
                "world_size": ranks.world_size,
            },
            "sources": _jsonable(source_stats),
            "config_hash": chash,
            "output": str(store.root / "rationales.jsonl"),
        }
        write_jsonl_atomic(store.root / SKIPPED, skipped)
        write_json_atomic(store.root / SUMMARY, summary)
        return summary
    finally:
        if own_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from radis.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")


def run(args: argparse.Namespace) -> int:
    from radis.config import load_config
    from radis.data.prompts import ChatFormatError
    from radis.data.sources import DataError
    from radis.models import ModelNotFoundError

    cfg = load_config(args.config, args.overrides)
    try:
        summary = generate_rationales(cfg, progress=not args.no_progress)
    except (RationaleInputError, OutputMismatchError, ModelNotFoundError, ChatFormatError, DataError) as err:
        print(f"radis rationales: error: {err}", file=sys.stderr)
        return 2
    if summary:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        if summary["missing"]:
            print(f"radis rationales: {summary['missing']} examples have no rationale (see {Path(summary['output']).parent})", file=sys.stderr)
            return 1
    return 0
