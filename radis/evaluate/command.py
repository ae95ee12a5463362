"""`radis evaluate`: translation quality and general ability of one or more models.

    radis evaluate --config recipes/demo_smollm2.yaml
    radis evaluate --config X.yaml 'eval.models=[original=smollm2, radis=outputs/radis/hf]'
    torchrun --nproc_per_node 2 -m radis.cli evaluate --config X.yaml      (sharded over ranks)

For every model in `eval.models` ("name=path" or a path; empty: `model.name_or_path`):
an HF model directory is used as is, a DeepSpeed checkpoint directory is first exported
with `radis export`. Per model, up to six parts:

    translation  every test set of `eval.test`, greedy (or beam search with eval.num_beams
                 > 1), scored with sacreBLEU BLEU and chrF (+ COMET where installed) on the
                 raw output and on the output cut at the separator. Which of the two is
                 the model's scored number is `cut_decision`: only models trained with
                 rationales are cut (a preamble model would lose its translation).
    retention    the offline proxies against the original model (eval.retention)
    safety       the refusal rate on harmful requests and its drop from the original's
                 (eval.safety; radis.evaluate.safety)
    general      lm-evaluation-harness tasks (eval.general_tasks; radis.evaluate.general)
    mt_bench     MT-Bench: both turns answered, graded 1-10 by an LLM judge as FastChat
                 does (eval.mt_bench, eval.judge; radis.evaluate.mt_bench)
    alpaca_eval  AlpacaEval: win rate against a reference's outputs, judged pairwise
                 (eval.alpaca_eval, eval.judge; radis.evaluate.alpaca)

MT-Bench and AlpacaEval as the RaDis paper reports them, with an open judge model served
by vLLM on a GPU of its own (or the OpenAI API: base_url https://api.openai.com/v1,
model gpt-4-1106-preview, the key in $OPENAI_API_KEY):

    vllm serve meta-llama/Meta-Llama-3.1-70B-Instruct --port 8000 --tensor-parallel-size 4 &
    radis evaluate --config recipes/llama2_7b_chat.yaml \\
        eval.judge.base_url=http://judge-host:8000/v1 eval.judge.model=meta-llama/Meta-Llama-3.1-70B-Instruct \\
        eval.mt_bench.questions=data/mt_bench/question.jsonl \\
        eval.mt_bench.reference_answers=data/mt_bench/reference_answer/gpt-4.jsonl \\
        eval.mt_bench.judge_prompts=data/mt_bench/judge_prompts.jsonl \\
        eval.alpaca_eval.reference_outputs=data/alpaca_eval/results/gpt4_1106_preview/model_outputs.json \\
        eval.alpaca_eval.df_gamed=data/alpaca_eval/df_gamed.csv

The judge is asked once before any answer is generated (a wrong URL, key or model stops
the run at once); every judgment is cached in eval.output_dir/judge_cache.jsonl, and
answers in <name>/*_store.*.jsonl as they finish, so a killed run resumes. Without
eval.judge.base_url the answers are written and not judged.

Each part has its own key in results.json: a re-run redoes only the parts whose inputs
changed (adding a general task does not translate again). Everything that can fail
without a model (test sets, model paths, lm-eval tasks and their offline data, prompt
files) is checked before the first model loads.

Writes under eval.output_dir (atomically):

    <name>/translations.json    every hypothesis (raw, cut, scored) with source and reference
    <name>/results.json         every part: scores per direction and averaged, the cut
                                decision, retention proxies, safety, lm-eval results
    <name>/retention_answers.json, <name>/safety_answers.json   the answers behind them
    retention/original.<key>.json, safety/original.<key>.json   the original's cached answers
    <name>/mt_bench_answers.jsonl, <name>/mt_bench_judgments.jsonl   FastChat's formats
    <name>/alpaca_eval_outputs.json, <name>/alpaca_eval_annotations.json   AlpacaEval's formats
    judge_cache.jsonl           every judgment: request, raw reply (never the API key)
    summary.json                one row per model (radis.evaluate.report)
    quality_vs_retention.png    scored chrF against each measure of general ability
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radis.config import ConfigError, RadisConfig, SourceConfig, load_config
from radis.data.example import Example
from radis.data.sources import json_records, text_lines
from radis.errors import InputError
from radis.evaluate import metrics, report, retention
from radis.evaluate.general import GeneralSuite
from radis.evaluate.judged import PARTS as JUDGED_PARTS
from radis.evaluate.judged import JudgedBenchmarks
from radis.evaluate.translate import Translation, translate
from radis.generation.decode import pad_token_id
from radis.io import json_type_name, read_json_object, write_json_atomic
from radis.runtime import (
    RANK0_WORK_TIMEOUT,
    add_config_arguments,
    default_device,
    dist_info,
    join_process_group,
    leave_process_group,
    new_group,
    on_rank0,
    use_cuda,
)

MODEL_SPEC = re.compile(r"^([A-Za-z0-9_.+-]+)=(.+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--progress", action="store_true", help="print a line per translated batch")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        evaluate(cfg, progress=args.progress)
    except ConfigError:
        raise  # radis.cli says `config error:`
    except (FileNotFoundError, ValueError) as err:
        print(f"radis evaluate: {err}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- inputs


def parse_model_specs(cfg: RadisConfig) -> list[tuple[str, str]]:
    """(name, reference) per entry of eval.models; names must be unique."""
    specs = cfg.eval.models or [cfg.model.name_or_path]
    out: list[tuple[str, str]] = []
    for i, spec in enumerate(specs):
        m = MODEL_SPEC.match(spec)
        if m:
            name, ref = m.group(1), m.group(2).strip()
        else:
            ref = spec.strip()
            p = Path(ref.rstrip("/"))
            # "outputs/radis/hf" -> "radis-hf": the last two parts tell runs apart.
            name = p.name if len(p.parts) < 2 else f"{p.parent.name}-{p.name}"
        if not ref:
            raise ValueError(f"eval.models[{i}]: empty model reference in {spec!r}")
        if name in {n for n, _ in out}:
            raise ValueError(f"eval.models[{i}]: duplicate model name {name!r}; write it as name=path")
        out.append((name, ref))
    # a name that is no model's would be ignored, and its model scored by the other rules
    unknown = [name for name in cfg.eval.cut_models if name not in {n for n, _ in out}]
    if unknown:
        raise ConfigError(f"eval.cut_models: no model of eval.models is named {', '.join(map(repr, unknown))}; "
                          f"expected names among {[n for n, _ in out]}")
    return out


def deepspeed_checkpoint(path: Path) -> Path | None:
    """The checkpoint `radis export` takes, when `path` is a training output, not an HF model.

    Accepted: a training output_dir (holding `checkpoints/`), the checkpoints root (a
    `latest` file or `global_step*` folders), or one tag directory (model-state files).
    """
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    if (path / "checkpoints" / "latest").is_file():
        return path / "checkpoints"
    if (path / "latest").is_file() or any(path.glob("global_step*")) or any(path.glob("mp_rank_*_model_states.pt")):
        return path
    return None


def eval_output_dir(cfg: RadisConfig) -> Path:
    """eval.output_dir, with "~" expanded (as train.output_dir is)."""
    return Path(os.path.expanduser(cfg.eval.output_dir))


def export_checkpoint(name: str, checkpoint: Path, out_root: Path, wait_group: Any = None) -> Path:
    """Export a DeepSpeed checkpoint with `radis export` (once; rank 0, the others wait
    in `wait_group`: an export at 7B takes longer than the default group's timeout)
    into out_root/exports/name."""
    out = out_root / "exports" / name

    def export() -> None:
        if (out / "config.json").is_file():
            return
        cmd = [sys.executable, "-m", "radis.cli", "export", "--checkpoint", str(checkpoint), "--out", str(out)]
        print(f"[evaluate] {name}: exporting DeepSpeed checkpoint {checkpoint} -> {out}", flush=True)
        # A fresh process: the export may start its own (single-rank) DeepSpeed state.
        done = subprocess.run(cmd, check=False, env={**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
        if done.returncode != 0:
            # an InputError: every rank then prints this message and exits 2, as rank 0 does
            raise InputError(f"eval.models: {name}: `radis export` of {checkpoint} failed (exit {done.returncode})")

    on_rank0(f"exporting {checkpoint}", export, wait_group)
    return out


def _looks_sources_only(src: SourceConfig, path: Path) -> bool:
    """Line-aligned text without a target file, or JSON(L) records without the target side."""
    if src.target_path is None and (src.format == "text" or (src.format == "auto" and path.suffix == ".txt")):
        return True
    if src.format in ("json", "jsonl", "auto") and path.suffix in (".json", ".jsonl") and src.tgt_lang:
        records = json_records(path)
        pairs = [r.get("translation", r) for r in records if isinstance(r, dict)]
        return bool(pairs) and all(isinstance(p, dict) and src.tgt_lang not in p for p in pairs)
    return False


def read_test_set(src: SourceConfig, on_empty: str, index: int) -> tuple[list[Example], dict[str, Any]]:
    """Examples of one `eval.test` entry and what happened while reading it.

    With references: radis.data.sources.read_sources. Without (a text file with no
    target_path, or JSON(L) records without the target language): the sources only,
    marked `meta["has_reference"] = False`, so they are translated but not scored.
    """
    where = f"eval.test[{index}]"
    path = Path(src.path)
    if not src.path or not path.exists():
        raise FileNotFoundError(f"{where}: test set {src.path!r}: no such file or directory")
    if _looks_sources_only(src, path):
        if not (src.src_lang and src.tgt_lang):
            raise ValueError(f"{where}: {path}: a test set without references needs src_lang and tgt_lang")
        if path.suffix in (".json", ".jsonl"):
            texts = []
            for i, r in enumerate(json_records(path)):
                pair = r.get("translation", r) if isinstance(r, dict) else None
                if not isinstance(pair, dict):  # bad input, reported like the rest: ValueError
                    raise ValueError(  # noqa: TRY004
                        f'{where}: {path}: record {i + 1}: expected {{"translation": {{"<lang>": text}}}} or '
                        f'{{"<lang>": text}}, got {json_type_name(pair if isinstance(r, dict) else r)}')
                texts.append((i + 1, pair.get(src.src_lang)))
            unit = "record"
        else:
            texts = list(enumerate(text_lines(path), 1))
            unit = "line"
        examples, skipped = [], 0
        for n, text in texts:
            if text is not None and not isinstance(text, str):  # not "empty": a number is there, of the wrong type
                raise ValueError(f"{where}: {path}: {unit} {n}: {src.src_lang!r}: expected a string, "
                                 f"got {json_type_name(text)} ({text!r:.60})")
            if text is None or not text.strip():
                if on_empty == "error":
                    raise ValueError(f"{where}: {path}: {unit} {n}: empty or missing {src.src_lang!r} source text")
                skipped += 1
                continue
            examples.append(Example(id=f"{path.name}:{n}", src_lang=src.src_lang, tgt_lang=src.tgt_lang,
                                    source=text.strip(), reference="", meta={"has_reference": False}))
        if src.limit is not None:
            examples = examples[: src.limit]
        return examples, {"path": str(path), "has_references": False, "skipped_empty": skipped}
    from radis.data.sources import read_sources

    examples, stats = read_sources([src], on_empty)
    return examples, {"path": str(path), "has_references": True, "stats": _plain(stats)}


def _plain(obj: Any) -> Any:
    """SourceStats (or anything else) as JSON-ready data."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return obj if isinstance(obj, (dict, list, str, int, float, type(None))) else str(obj)


# --------------------------------------------------------------------------- scoring


def score_direction(items: list[Translation], tgt_lang: str, comet: metrics.CometScorer | None) -> dict[str, Any]:
    """Raw and cut scores of one direction's translations (None when it has no references)."""
    scored = [t for t in items if t.reference is not None]
    out: dict[str, Any] = {"n": len(items), "scored": len(scored), "bleu_tokenizer": metrics.bleu_tokenizer(tgt_lang)}
    if not scored:
        out.update(raw=None, cut=None, note="no references: translated only, not scored")
        return out
    refs = [t.reference for t in scored]
    for kind, hyps in (("raw", [t.raw for t in scored]), ("cut", [t.cut for t in scored])):
        s = metrics.score_corpus(hyps, refs, tgt_lang)
        if comet is not None:
            s.comet, s.comet_model = comet.score([t.source for t in scored], hyps, refs), comet.name
        out[kind] = s
    return out


def average(per_direction: dict[str, dict[str, Any]], kind: str) -> dict[str, Any]:
    return metrics.average_scores({d: r[kind] for d, r in per_direction.items() if r.get(kind) is not None})


def cut_decision(cfg: RadisConfig, name: str, path: str) -> tuple[bool, str, str]:
    """(cut?, why, separator) for one model: is its output scored cut at the separator?

    Cutting is right only for a model that writes a rationale after its translation,
    i.e. one trained with rationales; any other model may answer "Here is the
    translation:\n\n<translation>" and would be cut down to its preamble. Rules, first
    match wins: eval.cut_models[name]; eval.cut_at_separator always / never (true /
    false); "auto": the model directory's radis_training.json (radis.training_info) says
    whether it was trained with rationales, and a model without one (the original, any
    model not trained by radis) is not cut. The separator is the one the model was
    trained with, else data.separator.
    """
    from radis.training_info import read_training_info

    info = read_training_info(path)
    separator = info.get("separator", cfg.data.separator) if info else cfg.data.separator
    if name in cfg.eval.cut_models:
        return bool(cfg.eval.cut_models[name]), f"eval.cut_models.{name}", separator
    rule = cfg.eval.cut_at_separator
    rule = {True: "always", False: "never"}.get(rule, rule) if isinstance(rule, bool) else rule
    if rule in ("always", "never"):
        return rule == "always", f"eval.cut_at_separator={rule}", separator
    if info is None:
        return False, "no radis_training.json: not trained with rationales", separator
    if info.get("trained_with_rationales"):
        return True, f"trained with rationales ({info.get('rd_target_tokens', 0)} rationale tokens)", separator
    return False, f"trained without rationales (loss.method={info.get('method')})", separator


# --------------------------------------------------------------------------- main


def _key(**parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prompt_settings(cfg: RadisConfig) -> dict[str, Any]:
    """What changes the prompts a model is given and how it decodes them."""
    d = cfg.data
    prompt = {"instruction": d.instruction, "system": d.system_prompt, "template": cfg.model.chat_template,
              "dtype": cfg.model.dtype}
    # only when set: results from before these keys existed keep their keys
    if d.language_names:
        prompt["language_names"] = dict(d.language_names)
    if cfg.model.attn_implementation != "auto":  # another kernel changes greedy answers too
        prompt["attn_implementation"] = cfg.model.attn_implementation
    return prompt


def part_keys(cfg: RadisConfig, model_fp: str, test_sets: list[dict[str, Any]], cut: tuple[bool, str, str],
              suite: GeneralSuite | None, safety_fp: str | None,
              judged: JudgedBenchmarks | None = None) -> dict[str, str | None]:
    """A key per part of a model's results: a part whose inputs did not change since the
    last run (same key in results.json) is reused, so adding a general task does not
    translate again. None: the part is off."""
    e, d = cfg.eval, cfg.data
    prompt = prompt_settings(cfg)
    keys: dict[str, str | None] = {
        "translation": _key(model=model_fp, tests=test_sets, max_new_tokens=e.max_new_tokens, num_beams=e.num_beams,
                            comet=e.comet_model, cut=cut, **prompt) if e.test else None,
        "retention": _key(model=model_fp, original=cfg.model.name_or_path, prompts=e.retention_prompts,
                          limit=e.retention_limit, max_new_tokens=e.retention_max_new_tokens, **prompt)
        if e.retention else None,
        "safety": _key(model=model_fp, original=cfg.model.name_or_path, prompts=safety_fp,
                       max_new_tokens=e.safety_max_new_tokens, **prompt) if safety_fp else None,
        "general": None,
        **(judged.keys(model_fp, prompt) if judged is not None else dict.fromkeys(JUDGED_PARTS)),
    }
    if suite is not None:
        import lm_eval

        keys["general"] = _key(model=model_fp, tasks=suite.tasks, limit=suite.limit, fewshot=suite.num_fewshot,
                               chat=suite.chat_template, system=d.system_prompt, skipped=suite.skipped,
                               lm_eval=getattr(lm_eval, "__version__", "?"), dtype=cfg.model.dtype)
    return keys


def evaluate(cfg: RadisConfig, progress: bool = False) -> dict[str, Any]:
    """Evaluate every model of cfg.eval.models; returns the summary (also on disk).

    Under torchrun (WORLD_SIZE > 1) the ranks share the work; the process group is
    created here when needed and destroyed again at the end.
    """
    created = join_process_group("auto")
    rank, world = dist_info()
    try:
        return _evaluate(cfg, rank, world, progress)
    finally:
        leave_process_group(created)


def _evaluate(cfg: RadisConfig, rank: int, world: int, progress: bool) -> dict[str, Any]:
    from radis.models import ModelNotFoundError, resolve_model_path

    specs = parse_model_specs(cfg)  # its config errors before any test set is read
    out_root = eval_output_dir(cfg)
    log = (lambda *a: print("[evaluate]", *a, flush=True)) if rank == 0 else (lambda *a: None)

    # Test sets, grouped by direction.
    by_direction: dict[str, list[Example]] = {}
    test_info = []
    for i, src in enumerate(cfg.eval.test):
        examples, info = read_test_set(src, cfg.data.on_empty, i)
        if not examples:
            raise ValueError(f"eval.test[{i}]: {src.path}: no usable test sentences")
        test_info.append(info)
        for ex in examples:
            by_direction.setdefault(ex.direction, []).append(ex)
        if not info["has_references"]:
            log(f"{src.path}: no references: translating only, no scores for it")
    examples = [ex for exs in by_direction.values() for ex in exs]
    if not examples and not (cfg.eval.retention or cfg.eval.safety or cfg.eval.general_tasks
                             or cfg.eval.mt_bench.questions or cfg.eval.alpaca_eval.reference_outputs):
        raise ValueError("eval.test is empty and retention, safety, general tasks, MT-Bench and AlpacaEval are off: "
                         "nothing to evaluate")

    models = []
    wait_group = new_group(RANK0_WORK_TIMEOUT) if world > 1 else None  # for rank 0's lone work
    for name, ref in specs:
        p = Path(ref).expanduser()
        checkpoint = deepspeed_checkpoint(p)
        if checkpoint is not None:
            ref = str(export_checkpoint(name, checkpoint, out_root, wait_group))
        try:
            models.append((name, resolve_model_path(ref, cfg.model.cache_dir)))
        except ModelNotFoundError as err:
            raise ValueError(f"eval.models: {name}: {err}") from None

    # Everything that can fail without a model fails here, before the first model loads.
    suite = GeneralSuite.from_config(cfg)
    for task, why in (suite.skipped if suite else {}).items():
        log(f"general task {task} skipped: {why}")
    safety_prompts = _safety_prompts(cfg) if cfg.eval.safety else None
    comet = None
    reason = metrics.comet_unavailable_reason(cfg.eval.comet_model)
    if reason is None and examples:  # only rank 0 scores; a model that cannot load stops every rank
        comet = on_rank0(f"loading {cfg.eval.comet_model}",
                         lambda: metrics.CometScorer(cfg.eval.comet_model, batch_size=cfg.eval.batch_size), wait_group)
    elif reason:
        log(reason)

    # MT-Bench and AlpacaEval: their files read, the judge asked once, before any answer
    judged = JudgedBenchmarks(cfg, out_root, log, wait_group)
    ctx = _Context(cfg=cfg, out_root=out_root, log=log, rank=rank, world=world, progress=progress,
                   judged=judged if judged.enabled else None,
                   by_direction=by_direction, examples=examples, test_info=test_info, comet=comet, suite=suite,
                   safety_prompts=safety_prompts,
                   original=_Original(cfg, safety_prompts) if (cfg.eval.retention or safety_prompts) else None)
    rows = [_evaluate_model(ctx, name, path) for name, path in models]

    summary = {"models": rows, "signatures": report.signatures(out_root, [n for n, _ in models]) if rank == 0 else {}}
    if rank == 0:
        write_json_atomic(out_root / "summary.json", summary)
        print(report.format_table(rows), flush=True)
        for sig in summary["signatures"].values():
            print(f"  {sig}")
        if any(r.get("chrf") is not None for r in rows):
            from radis.evaluate.plot import plot_quality_vs_general

            png = plot_quality_vs_general(rows, out_root / "quality_vs_retention.png",
                                          title="translation quality vs general ability")
            if png is not None:
                print(f"plot: {png}")
        print(f"results: {out_root / 'summary.json'}")
    return summary


@dataclass
class _Context:
    """What every model's evaluation shares (read once in _evaluate)."""

    cfg: RadisConfig
    out_root: Path
    log: Any
    rank: int
    world: int
    progress: bool
    by_direction: dict[str, list[Example]]
    examples: list[Example]
    test_info: list[dict[str, Any]]
    comet: Any
    suite: GeneralSuite | None
    safety_prompts: list[Any] | None
    original: _Original | None
    judged: JudgedBenchmarks | None = None


def _safety_prompts(cfg: RadisConfig) -> list[Any]:
    """The shipped harmful requests (eval.safety_limit of them) plus eval.safety_prompts."""
    from radis.evaluate import safety

    prompts = safety.load_harmful_prompts(None, cfg.eval.safety_limit)
    if cfg.eval.safety_prompts:
        prompts += safety.load_harmful_prompts(os.path.expanduser(cfg.eval.safety_prompts))
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"eval.safety_prompts: {cfg.eval.safety_prompts}: ids that the shipped prompts use already")
    return prompts


def _evaluate_model(ctx: _Context, name: str, path: str) -> dict[str, Any]:
    """One model: the parts whose key changed (translation, retention, safety, general),
    results.json rewritten after each, the others taken from the previous run."""
    import torch

    cfg, log = ctx.cfg, ctx.log
    model_fp = retention.model_fingerprint(path)
    cut = cut_decision(cfg, name, path)
    safety_fp = None if ctx.safety_prompts is None else _key(prompts=[(p.id, p.prompt) for p in ctx.safety_prompts])
    keys = part_keys(cfg, model_fp, ctx.test_info, cut, ctx.suite, safety_fp, ctx.judged)
    results_path = ctx.out_root / name / "results.json"
    previous = read_json_object(results_path, "delete it to evaluate this model again") or {}
    done = {part for part, key in keys.items() if key is None or previous.get("parts", {}).get(part) == key}
    result: dict[str, Any] = {
        "model": name, "path": path, "parts": {}, "test_sets": ctx.test_info, "directions": {},
        "average": {"raw": {}, "cut": {}}, "cut": {"applied": cut[0], "reason": cut[1], "separator": cut[2]},
        "retention": None, "safety": None, "general": None, "mt_bench": None, "alpaca_eval": None,
    }
    for part in done:  # reused as they were
        if keys[part] is not None:
            result["parts"][part] = keys[part]
            result.update(_PART_FIELDS[part](previous))

    def save() -> None:
        if ctx.rank == 0:
            result["summary"] = report.summary_row(name, result)
            write_json_atomic(results_path, result)

    if done == set(keys):
        log(f"{name}: up to date ({results_path}), skipped")
        return result.get("summary") or report.summary_row(name, result)
    log(f"{name}: " + ", ".join(f"{p} {'reused' if p in done else 'to run'}" for p, k in keys.items() if k))
    t0 = time.time()
    if {"translation", "retention", "safety", *JUDGED_PARTS} - done:
        try:
            tokenizer, fmt, model = _load(cfg, path)
        except (OSError, ValueError) as err:  # e.g. config.json without weights, unknown template
            raise ValueError(f"eval.models: {name}: cannot load {path}: {err}") from None
        if "translation" not in done:
            _translation_part(ctx, result, name, model, fmt, tokenizer, cut)
            result["parts"]["translation"] = keys["translation"]
            save()
        for part in ("retention", "safety"):  # both against the original model
            if part not in done:
                t1 = time.time()
                run = ctx.original.proxies if part == "retention" else ctx.original.safety
                result[part] = run(name, path, model, fmt, tokenizer, log)
                result[f"{part}_s"] = round(time.time() - t1, 1)
                result["parts"][part] = keys[part]
                save()
        for part in JUDGED_PARTS:  # answers on every rank, judged on rank 0
            if part not in done:
                t1 = time.time()
                result[part] = ctx.judged.run(part, name, model_fp, prompt_settings(cfg), model, fmt, tokenizer)
                result[f"{part}_s"] = round(time.time() - t1, 1)
                result["parts"][part] = keys[part]
                save()
        del model
        if use_cuda():
            torch.cuda.empty_cache()
    if "general" not in done:
        t1 = time.time()
        result["general"] = ctx.suite.evaluate(path, dtype=cfg.model.dtype, log=lambda m: log(f"{name}: {m}"))
        result["general_s"] = round(time.time() - t1, 1)
        result["parts"]["general"] = keys["general"]
        save()
    log(f"{name}: done in {time.time() - t0:.0f} s")
    return report.summary_row(name, result)


# Fields of results.json that belong to each part (copied when the part is reused).
_PART_FIELDS = {
    "translation": lambda r: {k: r[k] for k in ("directions", "average", "translate_s") if k in r},
    "retention": lambda r: {k: r[k] for k in ("retention", "retention_s") if k in r},
    "safety": lambda r: {k: r[k] for k in ("safety", "safety_s") if k in r},
    "general": lambda r: {k: r[k] for k in ("general", "general_s") if k in r},
    "mt_bench": lambda r: {k: r[k] for k in ("mt_bench", "mt_bench_s") if k in r},
    "alpaca_eval": lambda r: {k: r[k] for k in ("alpaca_eval", "alpaca_eval_s") if k in r},
}


def _translation_part(ctx: _Context, result: dict[str, Any], name: str, model, fmt, tokenizer,
                      cut: tuple[bool, str, str]) -> None:
    t0 = time.time()
    translations: list[Translation] = []
    if ctx.examples:
        ctx.log(f"{name}: translating {len(ctx.examples)} sentences ({', '.join(ctx.by_direction)}) on {ctx.world} "
                f"rank(s); scored {'cut' if cut[0] else 'raw'} ({cut[1]})")
        translations = translate(
            model, fmt, ctx.examples, pad_id=pad_token_id(tokenizer), batch_size=ctx.cfg.eval.batch_size,
            max_new_tokens=ctx.cfg.eval.max_new_tokens, num_beams=ctx.cfg.eval.num_beams,
            separator=cut[2], cut=cut[0], progress=ctx.progress,
        )
    result["translate_s"] = round(time.time() - t0, 1)
    if ctx.rank == 0 and ctx.examples:
        directions = {}
        for direction, exs in ctx.by_direction.items():
            items = [t for t in translations if t.direction == direction]
            # The examples' own tgt_lang: the direction string cannot be split back when a
            # code holds a hyphen ("pt-BR-zh").
            directions[direction] = score_direction(items, exs[0].tgt_lang, ctx.comet)
        result["average"] = {"raw": average(directions, "raw"), "cut": average(directions, "cut")}
        result["directions"] = {d: {k: (v.to_dict() if isinstance(v, metrics.Scores) else v) for k, v in r.items()}
                                for d, r in directions.items()}
        write_json_atomic(ctx.out_root / name / "translations.json", [t.to_dict() for t in translations])


def _load(cfg: RadisConfig, path: str):
    """Tokenizer (the model directory's own, else model.tokenizer), prompt format, model on its device."""
    from radis.data.prompts import ChatFormat
    from radis.models import load_model, load_tokenizer

    try:
        tokenizer = load_tokenizer(path, cfg.model.cache_dir)
    except (OSError, ValueError) as err:
        fallback = cfg.model.tokenizer or cfg.model.name_or_path
        print(f"[evaluate] {path}: no usable tokenizer ({err}); using {fallback}'s", flush=True)
        tokenizer = load_tokenizer(fallback, cfg.model.cache_dir)
    fmt = ChatFormat(tokenizer, cfg.data, cfg.model.chat_template)
    model = load_model(path, cfg.model.cache_dir, cfg.model.dtype, cfg.model.attn_implementation)
    return tokenizer, fmt, model.to(default_device()).eval()


class _Original:
    """The original model (model.name_or_path): its cached greedy answers to the retention
    prompts and its refusal rate, against which every model is compared."""

    def __init__(self, cfg: RadisConfig, safety_prompts: list[Any] | None = None):
        from radis.models import resolve_model_path

        self.cfg = cfg
        self.path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir)
        self.prompts = retention.load_retention_prompts(cfg.eval.retention_prompts, cfg.eval.retention_limit) \
            if cfg.eval.retention else []
        self.safety_prompts = safety_prompts or []
        self.model = None
        self.answers: retention.Answers | None = None
        self.safety_score: Any = None
        self.safety_texts: list[str] = []

    def _same(self, path: str) -> bool:
        return Path(path).resolve() == Path(self.path).resolve()

    def _model(self, path: str, tuned):
        """The original's weights: the tuned model itself when it is the original."""
        if self._same(path):
            self.model = tuned  # keep the already loaded weights for the other models
        elif self.model is None:
            self.model = _load(self.cfg, self.path)[2]
        return self.model

    def _greedy(self, model, prompts, fmt, tokenizer, max_new_tokens: int) -> retention.Answers:
        return retention.greedy_answers(
            model, prompts, lambda text: fmt.user_prompt_ids_batch([text])[0], fmt.decode_answer,
            stop_token_ids=fmt.stop_token_ids, pad_id=pad_token_id(tokenizer), max_new_tokens=max_new_tokens,
            batch_size=self.cfg.eval.batch_size)

    def _cached_answers(self, kind: str, prompts, fmt, tokenizer, max_new_tokens: int, original, log) -> retention.Answers:
        """The original's greedy answers to `prompts`, cached in eval.output_dir/<kind>/."""
        cfg = self.cfg
        # dtype and attention kernel change the greedy answers too (a bf16 run must not be
        # compared with answers the original gave in fp32).
        settings = {"template": cfg.model.chat_template, "system": cfg.data.system_prompt,
                    "max_new_tokens": max_new_tokens, "dtype": cfg.model.dtype,
                    "attn_implementation": cfg.model.attn_implementation}
        key = retention.answers_cache_key(retention.model_fingerprint(self.path), prompts, settings)
        cache = eval_output_dir(cfg) / kind / f"original.{key}.json"
        answers = retention.load_cached_answers(cache)
        if answers is None:
            log(f"original model: greedy answers to {len(prompts)} {kind} prompts (cached in {cache})")
            answers = self._greedy(original, prompts, fmt, tokenizer, max_new_tokens)
            if dist_info()[0] == 0:
                retention.save_cached_answers(cache, answers, {"model": self.path, **settings})
        return answers

    def proxies(self, name: str, path: str, tuned, fmt, tokenizer, log) -> dict[str, Any]:
        cfg = self.cfg
        original = self._model(path, tuned)
        if self.answers is None:
            self.answers = self._cached_answers("retention", self.prompts, fmt, tokenizer,
                                                cfg.eval.retention_max_new_tokens, original, log)
        log(f"{name}: retention proxies on {len(self.prompts)} prompts")
        new = self.answers if self._same(path) else self._greedy(tuned, self.prompts, fmt, tokenizer,
                                                                 cfg.eval.retention_max_new_tokens)
        sums = retention.teacher_forced_sums(original, tuned, self.answers, pad_id=pad_token_id(tokenizer))
        if dist_info()[0] == 0:
            write_json_atomic(eval_output_dir(cfg) / name / "retention_answers.json", [
                {"id": i, "original": o, "new": n} for i, o, n in zip(self.answers.ids, self.answers.texts, new.texts)])
        return retention.retention_proxies(sums, retention.compare_answers(self.answers, new))

    def safety(self, name: str, path: str, tuned, fmt, tokenizer, log) -> dict[str, Any]:
        """Refusal rate of `tuned` on the harmful requests, and its drop from the original's."""
        from radis.evaluate import safety

        cfg = self.cfg
        if self.safety_score is None:
            # Once per evaluation, kept in memory: reading the cache file again later would
            # race with rank 0 writing it, and the ranks would take different paths.
            original = self._model(path, tuned)
            self.safety_texts = self._cached_answers("safety", self.safety_prompts, fmt, tokenizer,
                                                     cfg.eval.safety_max_new_tokens, original, log).texts
            self.safety_score = safety.score_answers(self.safety_prompts, self.safety_texts)
        log(f"{name}: refusals on {len(self.safety_prompts)} harmful requests")
        if self._same(path):
            score, texts = self.safety_score, self.safety_texts
        else:
            texts = self._greedy(tuned, self.safety_prompts, fmt, tokenizer, cfg.eval.safety_max_new_tokens).texts
            score = safety.score_answers(self.safety_prompts, texts)
        if dist_info()[0] == 0:
            write_json_atomic(eval_output_dir(cfg) / name / "safety_answers.json", [
                {"id": p.id, "category": p.category, "prompt": p.prompt, "answer": a, "refusal": safety.is_refusal(a),
                 "phrase": safety.refusal_phrase(a)} for p, a in zip(self.safety_prompts, texts)])
        return {**score.to_dict(), "original_refusal_rate": self.safety_score.refusal_rate,
                "refusal_drop": safety.refusal_drop(self.safety_score.refusal_rate, score.refusal_rate)}
