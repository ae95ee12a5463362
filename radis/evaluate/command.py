"""`radis evaluate`: translation quality and general-ability retention of one or more models.

    radis evaluate --config recipes/demo_smollm2.yaml
    radis evaluate --config X.yaml 'eval.models=[original=smollm2, radis=outputs/radis/hf]'
    torchrun --nproc_per_node 2 -m radis.cli evaluate --config X.yaml      (sharded over ranks)

For every model in `eval.models` ("name=path" or a path; empty: `model.name_or_path`):
an HF model directory is used as is, a DeepSpeed checkpoint directory is first exported
with `radis export`. Every test set of `eval.test` is translated (greedy, or beam search
with eval.num_beams > 1) and scored with sacreBLEU BLEU and chrF on the raw output and
on the output cut at `data.separator`, plus COMET where available. Then, unless
eval.retention=false, the retention proxies against `model.name_or_path`.

Writes under eval.output_dir (atomically):

    <name>/translations.json   every hypothesis (raw and cut) with source and reference
    <name>/results.json        scores per direction and averaged, retention proxies
    retention/original.<key>.json   the original model's cached greedy answers
    summary.json               one row per model
    quality_vs_retention.png   chrF (cut) against each retention proxy
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from radis.config import RadisConfig, SourceConfig, load_config
from radis.data.example import Example
from radis.evaluate import metrics, retention
from radis.evaluate.translate import Translation, pad_token_id, translate
from radis.io import write_json_atomic
from radis.runtime import (
    add_config_arguments,
    barrier,
    default_device,
    dist_info,
    join_process_group,
    leave_process_group,
)

MODEL_SPEC = re.compile(r"^([A-Za-z0-9_.+-]+)=(.+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--progress", action="store_true", help="print a line per translated batch")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        evaluate(cfg, progress=args.progress)
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


def export_checkpoint(name: str, checkpoint: Path, out_root: Path) -> Path:
    """Export a DeepSpeed checkpoint with `radis export` (once; rank 0) into out_root/exports/name."""
    out = out_root / "exports" / name
    rank, _ = dist_info()
    if rank == 0 and not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "radis.cli", "export", "--checkpoint", str(checkpoint), "--out", str(out)]
        print(f"[evaluate] {name}: exporting DeepSpeed checkpoint {checkpoint} -> {out}", flush=True)
        # A fresh process: the export may start its own (single-rank) DeepSpeed state.
        done = subprocess.run(cmd, check=False, env={**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
        if done.returncode != 0:
            raise ValueError(f"eval.models: {name}: `radis export` of {checkpoint} failed (exit {done.returncode})")
    barrier()
    return out


def _looks_sources_only(src: SourceConfig, path: Path) -> bool:
    """Line-aligned text without a target file, or JSON(L) records without the target side."""
    if src.target_path is None and (src.format == "text" or (src.format == "auto" and path.suffix == ".txt")):
        return True
    if src.format in ("json", "jsonl", "auto") and path.suffix in (".json", ".jsonl") and src.tgt_lang:
        records = _json_records(path)
        pairs = [r.get("translation", r) for r in records if isinstance(r, dict)]
        return bool(pairs) and all(isinstance(p, dict) and src.tgt_lang not in p for p in pairs)
    return False


def _json_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
            texts = [(i + 1, (r.get("translation", r) or {}).get(src.src_lang)) for i, r in enumerate(_json_records(path))]
            unit = "record"
        else:
            texts = list(enumerate(path.read_text(encoding="utf-8").splitlines(), 1))
            unit = "line"
        examples, skipped = [], 0
        for n, text in texts:
            if not isinstance(text, str) or not text.strip():
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
    for kind, hyps in (("raw", [t.raw for t in scored]), ("cut", [t.hypothesis for t in scored])):
        s = metrics.score_corpus(hyps, refs, tgt_lang)
        if comet is not None:
            s.comet, s.comet_model = comet.score([t.source for t in scored], hyps, refs), comet.name
        out[kind] = s
    return out


def average(per_direction: dict[str, dict[str, Any]], kind: str) -> dict[str, Any]:
    return metrics.average_scores({d: r[kind] for d, r in per_direction.items() if r.get(kind) is not None})


# --------------------------------------------------------------------------- main


def _run_key(cfg: RadisConfig, ref_fingerprint: str, test_sets: list[dict[str, Any]]) -> str:
    blob = json.dumps({"model": ref_fingerprint, "tests": test_sets, "eval": asdict(cfg.eval),
                       "data": {"separator": cfg.data.separator, "instruction": cfg.data.instruction,
                                "system_prompt": cfg.data.system_prompt},
                       "original": cfg.model.name_or_path, "template": cfg.model.chat_template},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


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
    import torch

    from radis.models import ModelNotFoundError, resolve_model_path

    out_root = Path(cfg.eval.output_dir)
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
    if not examples and not cfg.eval.retention:
        raise ValueError("eval.test is empty and eval.retention is false: nothing to evaluate")

    models = []
    for name, ref in parse_model_specs(cfg):
        p = Path(ref).expanduser()
        checkpoint = deepspeed_checkpoint(p)
        if checkpoint is not None:
            ref = str(export_checkpoint(name, checkpoint, out_root))
        try:
            models.append((name, resolve_model_path(ref, cfg.model.cache_dir)))
        except ModelNotFoundError as err:
            raise ValueError(f"eval.models: {name}: {err}") from None

    comet = None
    reason = metrics.comet_unavailable_reason(cfg.eval.comet_model)
    if reason is None and examples and rank == 0:  # only rank 0 scores
        comet = metrics.CometScorer(cfg.eval.comet_model, batch_size=cfg.eval.batch_size)
    elif reason:
        log(reason)

    original = _Original(cfg) if cfg.eval.retention else None
    summary_rows = []
    for name, path in models:
        key = _run_key(cfg, retention.model_fingerprint(path), test_info)
        results_path = out_root / name / "results.json"
        if results_path.is_file():
            previous = json.loads(results_path.read_text(encoding="utf-8"))
            if previous.get("key") == key:
                log(f"{name}: up to date ({results_path}), skipped")
                summary_rows.append(previous["summary"])
                continue
        t0 = time.time()
        try:
            tokenizer, fmt, model = _load(cfg, path)
        except (OSError, ValueError) as err:  # e.g. config.json without weights, unknown template
            raise ValueError(f"eval.models: {name}: cannot load {path}: {err}") from None
        pad = pad_token_id(tokenizer)
        result: dict[str, Any] = {"model": name, "path": path, "key": key, "test_sets": test_info, "directions": {}}
        translations: list[Translation] = []
        if examples:
            log(f"{name}: translating {len(examples)} sentences ({', '.join(by_direction)}) on {world} rank(s)")
            translations = translate(
                model, fmt, examples, pad_id=pad, batch_size=cfg.eval.batch_size,
                max_new_tokens=cfg.eval.max_new_tokens, num_beams=cfg.eval.num_beams,
                separator=cfg.data.separator, cut=cfg.eval.cut_at_separator, progress=progress,
            )
        result["translate_s"] = round(time.time() - t0, 1)
        if rank == 0 and examples:
            for direction in by_direction:
                items = [t for t in translations if t.direction == direction]
                result["directions"][direction] = score_direction(items, direction.split("-", 1)[1], comet)
            write_json_atomic(out_root / name / "translations.json", [t.to_dict() for t in translations])
        t1 = time.time()
        result["retention"] = original.proxies(name, path, model, fmt, tokenizer, log) if original else None
        result["retention_s"] = round(time.time() - t1, 1)
        if rank == 0:
            result["average"] = {"raw": average(result["directions"], "raw"), "cut": average(result["directions"], "cut")}
            result["summary"] = _summary_row(name, result)
            result["directions"] = {d: {k: (v.to_dict() if isinstance(v, metrics.Scores) else v) for k, v in r.items()}
                                    for d, r in result["directions"].items()}
            write_json_atomic(results_path, result)
            summary_rows.append(result["summary"])
            log(f"{name}: done in {time.time() - t0:.0f} s")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    summary = {"models": summary_rows, "signatures": _signatures(out_root, [n for n, _ in models]) if rank == 0 else {}}
    if rank == 0:
        write_json_atomic(out_root / "summary.json", summary)
        print(format_table(summary_rows), flush=True)
        for sig in summary["signatures"].values():
            print(f"  {sig}")
        points = [{"name": r["model"], "chrf": r.get("chrf_cut"), "retention": r.get("retention")} for r in summary_rows]
        if any(p["chrf"] is not None and p["retention"] for p in points):
            from radis.evaluate.plot import plot_quality_vs_retention

            png = plot_quality_vs_retention(points, out_root / "quality_vs_retention.png",
                                            title="translation quality vs retention of general ability")
            print(f"plot: {png}")
        print(f"results: {out_root / 'summary.json'}")
    return summary


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
    """The original model (model.name_or_path), its cached greedy answers, and the comparison."""

    def __init__(self, cfg: RadisConfig):
        from radis.models import resolve_model_path

        self.cfg = cfg
        self.path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir)
        self.prompts = retention.load_retention_prompts(cfg.eval.retention_prompts, cfg.eval.retention_limit)
        self.model = None
        self.answers: retention.Answers | None = None

    def proxies(self, name: str, path: str, tuned, fmt, tokenizer, log) -> dict[str, Any]:
        cfg = self.cfg
        same = Path(path).resolve() == Path(self.path).resolve()
        encode = lambda text: fmt.user_prompt_ids_batch([text])[0]
        decode_kw = {"stop_token_ids": fmt.stop_token_ids, "pad_id": pad_token_id(tokenizer),
                         "max_new_tokens": cfg.eval.retention_max_new_tokens, "batch_size": cfg.eval.batch_size}
        if self.model is None:
            self.model = tuned if same else _load(cfg, self.path)[2]
        original = tuned if same else self.model
        if self.answers is None:
            settings = {"template": cfg.model.chat_template, "system": cfg.data.system_prompt,
                        "max_new_tokens": cfg.eval.retention_max_new_tokens}
            key = retention.answers_cache_key(retention.model_fingerprint(self.path), self.prompts, settings)
            cache = Path(cfg.eval.output_dir) / "retention" / f"original.{key}.json"
            self.answers = retention.load_cached_answers(cache)
            if self.answers is None:
                log(f"original model: greedy answers to {len(self.prompts)} retention prompts (cached in {cache})")
                self.answers = retention.greedy_answers(original, self.prompts, encode, fmt.decode_answer, **decode_kw)
                if dist_info()[0] == 0:
                    retention.save_cached_answers(cache, self.answers, {"model": self.path, **settings})
        log(f"{name}: retention proxies on {len(self.prompts)} prompts")
        new = self.answers if same else retention.greedy_answers(tuned, self.prompts, encode, fmt.decode_answer, **decode_kw)
        sums = retention.teacher_forced_sums(original, tuned, self.answers, pad_id=pad_token_id(tokenizer))
        if dist_info()[0] == 0:
            write_json_atomic(Path(cfg.eval.output_dir) / name / "retention_answers.json", [
                {"id": i, "original": o, "new": n} for i, o, n in zip(self.answers.ids, self.answers.texts, new.texts)])
        out = retention.retention_proxies(sums, retention.compare_answers(self.answers, new))
        if same:
            self.model = tuned  # keep the already loaded weights for the other models
        return out


def _summary_row(name: str, result: dict[str, Any]) -> dict[str, Any]:
    raw, cut = result["average"]["raw"], result["average"]["cut"]
    return {
        "model": name,
        "bleu_raw": raw.get("bleu"), "bleu_cut": cut.get("bleu"),
        "chrf_raw": raw.get("chrf"), "chrf_cut": cut.get("chrf"),
        "comet_cut": cut.get("comet"),
        "directions": {d: {"n": r["n"], "bleu_raw": _get(r, "raw", "bleu"), "bleu_cut": _get(r, "cut", "bleu"),
                           "chrf_raw": _get(r, "raw", "chrf"), "chrf_cut": _get(r, "cut", "chrf"),
                           "comet_cut": _get(r, "cut", "comet")}
                       for d, r in result["directions"].items()},
        "retention": result.get("retention"),
    }


def _get(r: dict[str, Any], kind: str, metric: str) -> float | None:
    s = r.get(kind)
    return None if s is None else getattr(s, metric)


def _signatures(out_root: Path, names: list[str]) -> dict[str, str]:
    sigs: dict[str, str] = {}
    for name in names:
        p = out_root / name / "results.json"
        if not p.is_file():
            continue
        for r in json.loads(p.read_text(encoding="utf-8"))["directions"].values():
            for kind in ("cut", "raw"):
                if r.get(kind):
                    sigs[f"BLEU {r['bleu_tokenizer']}"] = "BLEU " + r[kind]["bleu_signature"]
                    sigs["chrF"] = "chrF " + r[kind]["chrf_signature"]
    return sigs


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Translation scores per model and direction, then the retention proxies."""
    lines = [f"{'model':<14}{'direction':<10}{'n':>5}{'BLEU raw':>10}{'BLEU cut':>10}{'chrF raw':>10}{'chrF cut':>10}{'COMET':>8}"]
    for r in rows:
        for d, s in r["directions"].items():
            lines.append(f"{r['model']:<14}{d:<10}{s['n']:>5}{_fmt(s['bleu_raw']):>10}{_fmt(s['bleu_cut']):>10}"
                         f"{_fmt(s['chrf_raw']):>10}{_fmt(s['chrf_cut']):>10}{_fmt(s['comet_cut']):>8}")
        if len(r["directions"]) > 1:
            lines.append(f"{r['model']:<14}{'average':<10}{'':>5}{_fmt(r['bleu_raw']):>10}{_fmt(r['bleu_cut']):>10}"
                         f"{_fmt(r['chrf_raw']):>10}{_fmt(r['chrf_cut']):>10}{_fmt(r['comet_cut']):>8}")
    if any(r.get("retention") for r in rows):
        lines.append("")
        lines.append(f"{'model':<14}{'KL(orig||m)':>12}{'NLL m':>8}{'NLL orig':>10}{'changed':>9}{'chrF->orig':>12}")
        for r in rows:
            k = r.get("retention")
            if k:
                lines.append(f"{r['model']:<14}{_fmt(k['kl'], 3):>12}{_fmt(k['nll_tuned'], 3):>8}"
                             f"{_fmt(k['nll_original'], 3):>10}{k['changed'] * 100:>8.0f}%{_fmt(k['chrf_to_original'], 1):>12}")
    return "\n".join(lines)
