"""Offline proxies for how much general ability a fine-tuned model kept.

The original (instruction-tuned) model answers a fixed set of general instructions
greedily, once; the answers are cached. A tuned model is then compared with the
original on those answers and on its own new greedy answers:

    prompt_i  = chat turn of retention prompt i                     (ids, length P_i)
    answer_i  = original model's greedy answer to prompt_i          (ids, length A_i)

    teacher-forced pass of both models over [prompt_i | answer_i]:
        p_t = original's next-token distribution at answer token t   [A_i, V]
        q_t = tuned model's                                          [A_i, V]

    kl            = sum_i,t KL(p_t || q_t)      / sum_i A_i    (0 for the original itself)
    nll_tuned     = sum_i,t -log q_t(answer_t)  / sum_i A_i
    nll_original  = sum_i,t -log p_t(answer_t)  / sum_i A_i    (the same for every model)
    changed       = share of prompts whose new greedy answer differs from the original's
    chrf_to_original = corpus chrF of the new answers against the original answers

Measured (docs/design.md), these disagree (RaDis sharpens the distribution: lower NLL,
higher KL), so all of them are reported, never one alone. The answer's stop token is
not scored: only the answer's own tokens are. Both models must share a tokenizer.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sacrebleu.metrics import CHRF

from radis.evaluate.subsets import category_balanced
from radis.evaluate.translate import decode_batch, model_device
from radis.generation.decode import Request, length_sorted_batches
from radis.io import (
    FileFormatError,
    iter_jsonl_objects,
    read_json_object,
    text_field,
    write_json_atomic,
)
from radis.runtime import dist_info, gather_objects

FIELDS = ("id", "category", "prompt")
REQUIRED_FIELDS = ("prompt",)  # a missing id or category gets a default


@dataclass
class RetentionPrompt:
    id: str
    category: str
    prompt: str


def shipped_prompts_path() -> Path:
    """The ~100 general instructions shipped with radis (radis/resources/retention_prompts.jsonl)."""
    return Path(str(importlib.resources.files("radis") / "resources" / "retention_prompts.jsonl"))


def load_retention_prompts(path: str | os.PathLike | None = None, limit: int | None = None) -> list[RetentionPrompt]:
    """Read a JSONL of {"prompt", "id", "category"}; `limit` keeps a category-balanced subset.

    `prompt` is required; `id` and `category` are optional, as in a safety-prompts file
    (radis.evaluate.safety): a missing id becomes "<file stem>-<line number>", a
    missing category "user". The subset takes prompts round-robin over categories (in
    file order), so a small `limit` still mixes knowledge, reasoning, math, ... and refusals.
    """
    p = Path(path) if path is not None else shipped_prompts_path()
    if not p.is_file():
        raise FileFormatError(f"retention prompts {p}: no such file")
    prompts: list[RetentionPrompt] = []
    seen: set[str] = set()
    for lineno, rec in iter_jsonl_objects(p, "a JSON object with a 'prompt'"):
        where = f"{p}:{lineno}"
        text = {key: text_field(where, key, rec.get(key), required=key in REQUIRED_FIELDS) for key in FIELDS}
        pid = text["id"] or f"{p.stem}-{lineno}"
        if pid in seen:
            raise FileFormatError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        prompts.append(RetentionPrompt(pid, text["category"] or "user", text["prompt"]))
    if not prompts:
        raise FileFormatError(f"retention prompts {p}: no prompts in the file")
    return category_balanced(prompts, limit, "retention prompt")


@dataclass
class Answers:
    """Greedy answers to retention prompts, in prompt order (cached as JSON)."""

    ids: list[str]
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    texts: list[str]
    stop_reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    prompts: Sequence[RetentionPrompt],
    prompt_ids: Callable[[str], list[int]],
    decode: Callable[[Sequence[int]], str],
    *,
    stop_token_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    batch_size: int,
) -> Answers:
    """Greedy answers of `model`, sharded over ranks, gathered in prompt order on all ranks."""
    rank, world = dist_info()
    model.eval()
    encoded = [prompt_ids(p.prompt) for p in prompts]
    requests = [Request(key=str(i), prompt_ids=encoded[i]) for i in range(rank, len(prompts), world)]
    local = []
    for batch in length_sorted_batches(requests, batch_size):
        outs = decode_batch(model, [r.prompt_ids for r in batch], [r.key for r in batch],
                            stop_token_ids=stop_token_ids, pad_id=pad_id, max_new_tokens=max_new_tokens)
        local += [(int(r.key), ids, reason) for r, (ids, reason) in zip(batch, outs)]
    merged = {i: (ids, reason) for part in gather_objects(local) for i, ids, reason in part}
    answers = [merged[i][0] for i in range(len(prompts))]
    return Answers(
        ids=[p.id for p in prompts],
        prompt_ids=encoded,
        answer_ids=answers,
        texts=[decode(a).strip() for a in answers],
        stop_reasons=[merged[i][1] for i in range(len(prompts))],
    )


def _answer_logprobs(model: torch.nn.Module, rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> list[torch.Tensor]:
    """Per row, log-softmax of the next-token logits at each answer token: [A_i, V] fp32.

    Rows are right-padded ([prompt | answer | pad]); causal attention means padding
    after a row's last token changes nothing before it.
    """
    device = model_device(model)
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, a) in enumerate(rows):
        ids[r, : len(p) + len(a)] = torch.tensor(p + a, dtype=torch.long)
        mask[r, : len(p) + len(a)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    for r, (p, a) in enumerate(rows):
        # Token at position j is predicted from position j - 1.
        out.append(torch.log_softmax(logits[r, len(p) - 1 : len(p) + len(a) - 1].float(), dim=-1))
    return out


@torch.no_grad()
def teacher_forced_sums(
    original: torch.nn.Module,
    tuned: torch.nn.Module,
    answers: Answers,
    *,
    pad_id: int,
    batch_size: int = 4,
) -> dict[str, float]:
    """Sums over all answer tokens (all ranks): kl, nll_tuned, nll_original, tokens."""
    rank, world = dist_info()
    original.eval()
    tuned.eval()
    rows = [i for i in range(rank, len(answers.ids), world) if answers.answer_ids[i]]
    sums = {"kl": 0.0, "nll_tuned": 0.0, "nll_original": 0.0, "tokens": 0.0}
    for start in range(0, len(rows), batch_size):
        chunk = [(answers.prompt_ids[i], answers.answer_ids[i]) for i in rows[start : start + batch_size]]
        lp_o = _answer_logprobs(original, chunk, pad_id)
        lp_t = _answer_logprobs(tuned, chunk, pad_id) if tuned is not original else lp_o
        for (_, a), o, t in zip(chunk, lp_o, lp_t):
            if o.shape[-1] != t.shape[-1]:
                raise ValueError(f"original and tuned model have different vocabularies ({o.shape[-1]} vs {t.shape[-1]})")
            target = torch.tensor(a, dtype=torch.long, device=o.device).unsqueeze(1)
            t = t.to(o.device)
            sums["kl"] += float((o.exp() * (o - t)).sum())
            sums["nll_tuned"] += float(-t.gather(1, target).sum())
            sums["nll_original"] += float(-o.gather(1, target).sum())
            sums["tokens"] += len(a)
    total = {k: 0.0 for k in sums}
    for part in gather_objects([sums]):
        for k in total:
            total[k] += part[0][k]
    return total


def compare_answers(original: Answers, new: Answers) -> dict[str, float]:
    """Share of greedy answers that changed and chrF of the new answers to the old ones."""
    if original.ids != new.ids:
        raise ValueError("compare_answers: the two answer sets are for different prompts")
    changed = sum(a != b for a, b in zip(original.answer_ids, new.answer_ids))
    chrf = CHRF().corpus_score(new.texts, [original.texts]).score
    return {"changed": changed / len(original.ids), "chrf_to_original": float(chrf)}


def retention_proxies(sums: dict[str, float], comparison: dict[str, float]) -> dict[str, float]:
    """The reported proxies from the token sums and the answer comparison (module doc)."""
    n = max(sums["tokens"], 1.0)
    return {
        "kl": sums["kl"] / n,
        "nll_tuned": sums["nll_tuned"] / n,
        "nll_original": sums["nll_original"] / n,
        "answer_tokens": int(sums["tokens"]),
        **comparison,
    }


def answers_cache_key(model_ref: str, prompts: Sequence[RetentionPrompt], settings: dict[str, Any]) -> str:
    """Hash of everything the original's cached answers depend on.

    `model_ref` should identify the weights (a resolved directory plus its config.json
    mtime, see `model_fingerprint`), `settings` the prompt format and decoding.
    """
    blob = json.dumps({"model": model_ref, "prompts": [asdict(p) for p in prompts], "settings": settings},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def model_fingerprint(model_dir: str) -> str:
    """A directory plus the size/mtime of its files: changes when the weights change."""
    p = Path(model_dir)
    if not p.is_dir():
        return model_dir
    parts = [str(p.resolve())]
    for f in sorted(p.iterdir()):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def load_cached_answers(path: Path) -> Answers | None:
    """The answers `save_cached_answers` wrote to `path` (None: no such file); a file
    that is not whole is a ValueError naming it, not json's line and column alone."""
    hint = "delete it to generate the answers again"
    data = read_json_object(path, hint)
    if data is None:
        return None
    try:
        return Answers(**data["answers"])
    except (KeyError, TypeError):
        raise ValueError(f"{path}: expected the cached answers {{\"answers\": {{...}}}} of radis evaluate; {hint}") from None


def save_cached_answers(path: Path, answers: Answers, meta: dict[str, Any]) -> None:
    write_json_atomic(path, {"meta": meta, "answers": answers.to_dict()})
