"""radis generate: the model writes its own training data (distributed, resumable).

    radis generate --config X.yaml [key=value ...]                 (alias: radis rationales)
    radis generate --config X.yaml rationale.strategy=seqkd rationale.output_dir=outputs/seqkd
    torchrun --standalone --nproc_per_node N -m radis.cli generate --config X.yaml   (N ranks)

Every pair of `data.train` becomes one prompt, built by `rationale.strategy`
(radis.generation.strategies):

    continue, ask   a RaDis rationale after the reference translation
    seqkd           the model's own translation of the source (Seq-KD), replacing the reference
    sdft            the model's own answer with the reference shown to it (SDFT), replacing it

Ranks (RANK / WORLD_SIZE / LOCAL_RANK from torchrun or deepspeed) take disjoint shards:
example i of the list belongs to rank i % WORLD_SIZE. Each rank commits its batches as
part files (radis.generation.store); a killed run restarted with the same command skips
every committed id. When all ranks are done, rank 0 merges the parts into
`rationales.jsonl` (+ `rationales.topk.safetensors`) in example order and writes
`skipped.jsonl` and `summary.json` (count and lengths, for seqkd / sdft how many
targets were rejected and why, skips by reason, this run's tokens/s).

The generator (`rationale.generator`, default `model.name_or_path`) runs in bf16 on
cuda:LOCAL_RANK where CUDA exists, fp32 on CPU (`model.dtype`). An output directory
whose manifest.json holds another generation config (model, tokenizer, template,
prompt, strategy, decoding) is refused; `rationale.overwrite=true` deletes it first.
A directory of the *same* config is always resumed, whatever `overwrite` says.

The records (one JSON line each) are described field by field in radis.data.records.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radis.config import RadisConfig
from radis.data.example import Example
from radis.data.records import MERGED, base_record
from radis.data.segments import prompt_provenance
from radis.errors import InputError
from radis.generation.decode import (
    DecodingSettings,
    Generation,
    Request,
    decode,
    length_sorted_batches,
    pad_token_id,
)
from radis.generation.store import (
    SKIPPED,
    SUMMARY,
    GenerationStore,
    OutputMismatchError,
    config_hash,
)
from radis.generation.strategies import Strategy, StrategyError, get_strategy
from radis.io import iter_jsonl_objects, write_json_atomic, write_jsonl_atomic
from radis.runtime import (
    RankEnvironmentError,
    Ranks,
    add_config_arguments,
    barrier,
    default_device,
    gather_objects,
    join_process_group,
    leave_process_group,
    new_group,
    on_rank0,
)

# Joining the group must happen within minutes (a wrong address should fail, not hang);
# the final barrier waits for the slowest rank, which may be hours behind on an
# unbalanced shard, so it runs in a second group with a long timeout. Both use gloo,
# also on GPU machines: no GPU tensor is ever exchanged.
JOIN_TIMEOUT = datetime.timedelta(minutes=10)
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


class GenerationInputError(InputError):
    """Bad input for generation (data, model, template or strategy settings)."""


# --------------------------------------------------------------------------- settings


def generator_reference(cfg: RadisConfig) -> str:
    return cfg.rationale.generator or cfg.model.name_or_path


def generator_chat_template(cfg: RadisConfig) -> str:
    """The prompt format of the generator: its own template when it is another model."""
    if cfg.rationale.generator_chat_template is not None:
        return cfg.rationale.generator_chat_template
    return "auto" if cfg.rationale.generator else cfg.model.chat_template


def strategy_of(cfg: RadisConfig) -> Strategy:
    try:
        strategy = get_strategy(cfg.rationale.strategy)
        strategy.check(cfg)
    except StrategyError as err:
        raise GenerationInputError(str(err)) from None
    return strategy


def decoding_settings(cfg: RadisConfig) -> DecodingSettings:
    r = cfg.rationale
    for name in ("batch_size", "prefill_batch_size"):
        if getattr(r, name) < 1:
            raise GenerationInputError(f"rationale.{name} must be >= 1, got {getattr(r, name)}")
    try:
        return DecodingSettings(
            max_new_tokens=r.max_new_tokens, do_sample=r.do_sample, temperature=r.temperature,
            top_p=r.top_p, seed=r.seed, topk=r.topk, num_beams=r.num_beams,
        )
    except ValueError as err:
        raise GenerationInputError(f"rationale: {err}") from None


def describe(cfg: RadisConfig, fingerprint: str, template: str) -> dict[str, Any]:
    """Everything that changes what is generated: hashed into the output manifest.

    Not included: data sources (records are keyed by example id, so a run over more
    data extends the same directory), batch sizes and the number of ranks.
    """
    strategy = strategy_of(cfg)
    return {
        "generator": generator_reference(cfg),
        "tokenizer_fingerprint": fingerprint,
        "chat_template": template,
        "instruction": cfg.data.instruction,
        "system_prompt": cfg.data.system_prompt,
        # What {src_lang}/{tgt_lang} become in the instruction, so part of every prompt;
        # only when set, so that outputs made before the key existed still resume.
        **({"language_names": dict(cfg.data.language_names)} if cfg.data.language_names else {}),
        "separator": cfg.data.separator,
        "strategy": strategy.name,
        "strategy_settings": strategy.describe(cfg),
        "max_source_tokens": cfg.rationale.max_source_tokens,
        "decoding": decoding_settings(cfg).as_dict(),
        "dtype": cfg.model.dtype,
    }


def build_requests(fmt, examples: Sequence[Example], cfg: RadisConfig) -> list[Request]:
    """The prompts of many examples for the configured strategy (radis.generation.strategies)."""
    return strategy_of(cfg).requests(fmt, examples, cfg)


def skip_reasons(examples: Sequence[Example], tokenizer, cfg: RadisConfig) -> list[str | None]:
    """Why each example cannot be used (None: it can). Empty sides are an error under
    data.on_empty=error."""
    out: list[str | None] = [None] * len(examples)
    for i, ex in enumerate(examples):
        for side in ("source", "reference"):
            if not getattr(ex, side).strip():
                if cfg.data.on_empty == "error":
                    raise GenerationInputError(f"example {ex.id!r}: empty {side} (data.on_empty=error; set it to skip to drop such pairs)")
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


def make_record(strategy: Strategy, ex: Example, req: Request, gen: Generation, fmt, cfg: RadisConfig,
                settings: DecodingSettings, chash: str) -> dict[str, Any]:
    """One record (radis.data.records): the common fields, then the strategy's own."""
    rec = base_record(
        ex, strategy=strategy.name, generator=generator_reference(cfg),
        decoding={**settings.as_dict(), "min_new_tokens": req.min_new_tokens}, stop_reason=gen.stop_reason,
        prompt_tokens=gen.prompt_tokens, fingerprint=fmt.fingerprint, topk=settings.topk, config_hash=chash,
        prompt=prompt_provenance(fmt, cfg.data.separator),
    )
    rec.update(strategy.fields(ex, gen, fmt, cfg))
    return rec


def _read_examples(cfg: RadisConfig) -> tuple[list[Example], Any]:
    from radis.data.sources import read_sources

    if not cfg.data.train:
        raise GenerationInputError("data.train: no sources configured; generation runs over the training pairs")
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


def generate_records(
    cfg: RadisConfig, *, examples: Sequence[Example] | None = None, model: Any = None, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) generation on this rank; returns the summary on rank 0 ({} on the others).

    API use: `examples` replaces reading `data.train`; `model` is an already loaded
    generator (on its device, its tokenizer being the configured one).
    """
    from radis.data.prompts import ChatFormat
    from radis.models import load_model, load_tokenizer

    ranks = Ranks.from_env()
    started = time.perf_counter()
    strategy = strategy_of(cfg)
    settings = decoding_settings(cfg)
    created = join_process_group("gloo", JOIN_TIMEOUT)
    slow_group = new_group(BARRIER_TIMEOUT)
    try:
        gen_ref = generator_reference(cfg)
        # model.tokenizer belongs to model.name_or_path; a separate generator brings its own.
        tok_ref = gen_ref if cfg.rationale.generator else (cfg.model.tokenizer or gen_ref)
        tokenizer = load_tokenizer(tok_ref, cfg.model.cache_dir)
        fmt = ChatFormat(tokenizer, cfg.data, generator_chat_template(cfg))
        description = describe(cfg, fmt.fingerprint, fmt.template)
        chash = config_hash(description)

        if examples is None:
            examples, source_stats = _read_examples(cfg)
        else:
            examples, source_stats = list(examples), None
        seen: set[str] = set()
        for ex in examples:
            if ex.id in seen:  # records are keyed by id: resume and merge need them unique
                raise GenerationInputError(f"example id {ex.id!r} occurs twice; ids must be unique")
            seen.add(ex.id)
        # Skipped examples are decided identically on every rank (same data, same rules).
        limit = max_positions(gen_ref, cfg.model.cache_dir)
        reasons = skip_reasons(examples, tokenizer, cfg)
        candidates = [ex for ex, reason in zip(examples, reasons) if reason is None]
        usable: list[Example] = []
        requests: list[Request] = []
        skipped = [{"id": ex.id, "reason": reason} for ex, reason in zip(examples, reasons) if reason is not None]
        for ex, req in zip(candidates, strategy.requests(fmt, candidates, cfg)):
            if limit is not None and len(req.prompt_ids) + settings.max_new_tokens > limit:
                # prompt + generated text would not fit the model's positions
                skipped.append({"id": ex.id, "reason": "prompt_too_long"})
            else:
                usable.append(ex)
                requests.append(req)

        store = GenerationStore(cfg.rationale.output_dir, ranks.rank)
        # rank 0 prepares the directory; its refusal (another config's output) stops every rank
        on_rank0("preparing the output directory", lambda: store.prepare(description, cfg.rationale.overwrite),
                 slow_group)
        # the others check that they see rank 0's directory; one that does not (another
        # config, or a node-local path) stops every rank now, not after its share
        problem = None
        if not ranks.is_main:
            try:
                store.verify(description)
            except OutputMismatchError as err:
                problem = str(err)
        problems = [p for p in gather_objects(problem, group=slow_group) if p is not None]
        if problems:
            raise OutputMismatchError(problems[0])
        done = store.completed_ids()
        by_id = {ex.id: ex for ex in usable}
        mine = [req for i, req in enumerate(requests) if i % ranks.world_size == ranks.rank and req.key not in done]

        generated = tokens = 0
        gen_time = 0.0
        if mine and model is None:
            model = load_model(gen_ref, cfg.model.cache_dir, dtype=cfg.model.dtype,
                               attn_implementation=cfg.model.attn_implementation).to(default_device())
        if mine:
            model.eval()
            stop_ids = list(fmt.stop_token_ids)
            pad_id = pad_token_id(tokenizer)
            bar = None
            if progress and ranks.is_main:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(mine), unit="ex", desc=f"{strategy.name} (rank 0 of {ranks.world_size})",
                           file=sys.stderr)
            for batch in length_sorted_batches(mine, cfg.rationale.batch_size):
                t0 = time.perf_counter()
                results = decode(model, batch, settings, stop_token_ids=stop_ids, pad_token_id=pad_id,
                                 prefill_batch_size=cfg.rationale.prefill_batch_size)
                gen_time += time.perf_counter() - t0
                records = [make_record(strategy, by_id[req.key], req, g, fmt, cfg, settings, chash)
                           for req, g in zip(batch, results)]
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
        barrier(slow_group)  # every rank's parts are committed
        all_stats = gather_objects(run_stats, group=slow_group)
        if not ranks.is_main:
            return {}

        merge = store.merge([ex.id for ex in usable], with_topk=settings.topk > 0)
        records = [rec for _, rec in iter_jsonl_objects(store.root / MERGED, "a generation record")]
        seconds = max(s["seconds"] for s in all_stats)
        gen_seconds = max(s["generation_seconds"] for s in all_stats)
        gen_tokens = sum(s["tokens"] for s in all_stats)
        skip_counts: dict[str, int] = {}
        for s in skipped:
            skip_counts[s["reason"]] = skip_counts.get(s["reason"], 0) + 1
        summary = {
            "strategy": strategy.name,
            "generator": gen_ref,
            **strategy.summarize(records, settings.max_new_tokens),
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
            "output": str(store.root / MERGED),
        }
        write_jsonl_atomic(store.root / SKIPPED, skipped)
        write_json_atomic(store.root / SUMMARY, summary)
        return summary
    finally:
        leave_process_group(created)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")


def run(args: argparse.Namespace) -> int:
    from radis.config import load_config
    from radis.data.prompts import ChatFormatError
    from radis.data.sources import DataError
    from radis.models import ModelNotFoundError

    name = f"radis {getattr(args, 'command_name', 'generate')}"
    cfg = load_config(args.config, args.overrides)
    try:
        summary = generate_records(cfg, progress=not args.no_progress)
    except (GenerationInputError, OutputMismatchError, ModelNotFoundError, ChatFormatError, DataError,
            RankEnvironmentError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    if summary:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        if summary["missing"]:
            print(f"{name}: {summary['missing']} examples have no record (see {Path(summary['output']).parent})",
                  file=sys.stderr)
            return 1
    return 0
