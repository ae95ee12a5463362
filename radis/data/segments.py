"""Examples -> token ids with a span label per token (IGNORE / MT / RD).

One segment is one chat exchange, assembled from ChatFormat pieces so that every
token's span is known by construction (no re-tokenising and searching):

    ids   = prompt_ids(ex) + answer_ids(reference) + answer_ids(separator + rationale,
                                                             continuation=True) + end_of_turn_ids()
    spans =   IGNORE ...        MT ...                 RD ...                      last span present

    e.g. chatml:  <|im_start|>user\\n ... <|im_start|>assistant\\n | The goods ... | \\n\\n The word ... | <|im_end|> \\n
                  0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 | 1 1 1 1 1 1 1 | 2 2 2 2 2 2 2 2 2 | 2 2

Vanilla fine-tuning (`with_rationale=False`) or an example without a rationale gives
prompt | reference | end-of-turn, with end-of-turn labelled MT.

Length limit (`max_tokens`, the pack size): the rationale is cut first (the end-of-turn
tokens stay, so the model still learns to close its turn); an example whose prompt +
reference + end-of-turn alone exceeds `max_tokens` is dropped and counted. The
reference is never cut.

Recorded rationale tokens and teacher top-k
-------------------------------------------
The rationale generator may store, in `example.meta` (the top-k either as arrays or, read
from a records file, as "teacher_topk": a function that reads them, radis.data.records):

    "tokenizer_fingerprint": prompts.tokenizer_fingerprint(tokenizer) of the generator
    "separator":             the separator it placed after the reference (optional)
    "rationale_token_ids":   [n]     ids it generated right after
                                     answer_ids(separator, continuation=True)
    "teacher_topk_ids":      [n, k]  its top-k token ids at each of those positions
    "teacher_topk_logprobs": [n, k]  and their log-probabilities

When the fingerprint equals this tokenizer's (and the separator, if recorded, equals
`separator`), the RD tokens are `answer_ids(separator, continuation=True) +
rationale_token_ids`: exactly what the generator produced, not a re-tokenisation of
its decoded text. The teacher arrays are then attached to the Segment as
`teacher_ids` [n, k] int32 / `teacher_logprobs` [n, k] float32 with `teacher_start`,
row j belonging to token teacher_start + j (the token *predicted* at position
teacher_start + j - 1, like `spans`): only the rationale tokens carry rows. A
truncated rationale keeps its first rows. Otherwise (no
ids, another tokenizer or separator) the rationale text is tokenised and no teacher
arrays are attached.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radis.data.example import IGNORE, MT, RD, SPAN_NAMES, Example, Segment
from radis.data.prompts import ChatFormat
from radis.data.records import RecordError, example_teacher, has_teacher


@dataclass
class SegmentStats:
    kept: int = 0
    dropped_too_long: int = 0  # prompt + reference + end-of-turn > max_tokens
    rationale_truncated: int = 0  # rationale cut (possibly to nothing) to fit max_tokens
    without_rationale: int = 0  # vanilla, or no / empty rationale
    rationale_from_ids: int = 0  # recorded generator ids used as they are
    with_teacher: int = 0  # teacher top-k attached
    # rationales tokenised afresh although ids were recorded, by why (another tokenizer,
    # separator, chat template, system prompt, instruction, or the `ask` strategy)
    retokenised: dict[str, int] = field(default_factory=dict)
    teacher_dropped: int = 0  # recorded top-k not used for that reason
    tokens: dict[str, int] = field(default_factory=lambda: {name: 0 for name in SPAN_NAMES.values()})

    def merge(self, other: SegmentStats) -> None:
        for name in ("kept", "dropped_too_long", "rationale_truncated", "without_rationale",
                     "rationale_from_ids", "with_teacher", "teacher_dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for d_self, d_other in ((self.tokens, other.tokens), (self.retokenised, other.retokenised)):
            for k, v in d_other.items():
                d_self[k] = d_self.get(k, 0) + v


def build_segment(
    fmt: ChatFormat, example: Example, *, separator: str, max_tokens: int, with_rationale: bool = True
) -> Segment | None:
    """One example as a Segment, or None when it cannot fit `max_tokens` (see module doc)."""
    segments, _ = build_segments(fmt, [example], separator=separator, max_tokens=max_tokens,
                                 with_rationale=with_rationale)
    return segments[0] if segments else None


def build_segments(
    fmt: ChatFormat,
    examples: Sequence[Example],
    *,
    separator: str,
    max_tokens: int,
    with_rationale: bool = True,
) -> tuple[list[Segment], SegmentStats]:
    """Segments of many examples, in order, dropped ones left out (counted in the stats).

    Tokenisation is batched: one tokenizer call per kind of piece for the whole list.
    """
    stats = SegmentStats()
    if not examples:
        return [], stats
    prompts = fmt.prompt_ids_batch(examples)
    references = fmt.answer_ids_batch([ex.reference for ex in examples], continuation=False)
    eot = fmt.end_of_turn_ids()
    sep_ids = fmt.answer_ids(separator, continuation=True) if separator else []

    # Rationale ids: recorded ones where usable, the rest tokenised in one batch.
    rationales: list[list[int] | None] = [None] * len(examples)
    teachers: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(examples)
    to_tokenise: list[int] = []
    for i, ex in enumerate(examples):
        if not with_rationale or not ex.rationale:
            continue
        recorded = _recorded_rationale(ex, fmt, separator)
        if isinstance(recorded, str):  # ids were recorded, but for another context: why
            stats.retokenised[recorded] = stats.retokenised.get(recorded, 0) + 1
            stats.teacher_dropped += has_teacher(ex.meta)
            to_tokenise.append(i)
        elif recorded is None:
            to_tokenise.append(i)
        else:
            rationales[i] = sep_ids + recorded[0]
            teachers[i] = recorded[1]
            stats.rationale_from_ids += 1
    if to_tokenise:
        texts = [separator + examples[i].rationale for i in to_tokenise]
        for i, ids in zip(to_tokenise, fmt.answer_ids_batch(texts, continuation=True)):
            rationales[i] = ids

    segments = []
    for i, ex in enumerate(examples):
        prompt, mt, rd = prompts[i], references[i], rationales[i] or []
        fixed = len(prompt) + len(mt) + len(eot)
        if fixed > max_tokens:
            stats.dropped_too_long += 1
            continue
        if fixed + len(rd) > max_tokens:
            rd = rd[: max_tokens - fixed]
            stats.rationale_truncated += 1
        last = RD if rd else MT
        if not rd:
            stats.without_rationale += rationales[i] is None
        ids = prompt + mt + rd + eot
        spans = [IGNORE] * len(prompt) + [MT] * len(mt) + [RD] * len(rd) + [last] * len(eot)
        seg = Segment(example_id=ex.id, input_ids=ids, spans=spans)
        if teachers[i] is not None and rd:
            n_kept = len(rd) - len(sep_ids)  # truncation may leave only (part of) the separator
            if n_kept > 0:
                seg.teacher_ids = np.ascontiguousarray(teachers[i][0][:n_kept], dtype=np.int32)
                seg.teacher_logprobs = np.ascontiguousarray(teachers[i][1][:n_kept], dtype=np.float32)
                seg.teacher_start = len(prompt) + len(mt) + len(sep_ids)
                stats.with_teacher += 1
        stats.kept += 1
        stats.tokens["ignore"] += len(prompt)
        stats.tokens["mt"] += len(mt) + (len(eot) if last == MT else 0)
        stats.tokens["rd"] += len(rd) + (len(eot) if last == RD else 0)
        segments.append(seg)
    return segments, stats


def _recorded_rationale(
    ex: Example, fmt: ChatFormat, separator: str
) -> tuple[list[int], tuple[np.ndarray, np.ndarray] | None] | str | None:
    """(rationale ids, teacher arrays or None) from example.meta when they are usable here;
    None when nothing was recorded; else why not (a short reason, counted in the stats).

    Recorded ids and top-k belong to the context they were generated in: reused only under
    the same tokenizer, separator and prompt (chat template, system prompt, instruction,
    recorded by radis generate as the record's "prompt"), for `continue` rationales.
    Recorded data is checked, not trusted: ids outside the tokenizer's vocabulary, a
    ragged or mis-shaped top-k, NaN or +inf log-probs (-inf is padding) are a RecordError
    naming the example, not an index error at training step 1.
    """
    meta: dict[str, Any] = ex.meta or {}
    ids = meta.get("rationale_token_ids")
    if ids is None:
        return None
    if meta.get("tokenizer_fingerprint") != fmt.fingerprint:
        return "another tokenizer"
    if meta.get("separator") is not None and meta["separator"] != separator:
        return "another separator"
    # Only `continue` rationales were generated right after reference + separator, the
    # context training puts them in. `ask` ones began a new assistant turn after a
    # follow-up question: their ids (a leading "▁" for sentencepiece) and their top-k
    # were conditioned on another context, so the text is tokenised afresh, no teacher.
    if meta.get("strategy", "continue") != "continue":
        return "the ask strategy"
    prompt = meta.get("prompt") or {}
    current = prompt_provenance(fmt, separator)
    # A key a record lacks (written before the key was recorded) is not held against it.
    for key, why in (("chat_template", "another chat template"), ("chat_template_id", "another chat template"),
                     ("system_prompt", "another system prompt"), ("instruction", "another instruction"),
                     ("language_names", "other language names")):
        if key in prompt and prompt[key] != current[key]:
            return why
    vocab = len(fmt.tokenizer)
    if isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu":  # from a records file
        ids = ids.tolist()
    elif not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RecordError(f"example {ex.id}: rationale_token_ids: expected a list of integers")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise RecordError(f"example {ex.id}: rationale_token_ids has ids outside the tokenizer's vocabulary "
                          f"[0, {vocab}): {bad[:5]}")
    teacher = None
    recorded = example_teacher(meta)  # reads a lazy top-k from its file now
    if recorded is not None:
        try:
            tids = np.asarray(recorded[0], dtype=np.int32)
            tlp = np.asarray(recorded[1], dtype=np.float32)
        except (ValueError, TypeError) as err:  # ragged lists, strings
            raise RecordError(f"example {ex.id}: teacher top-k is not a rectangular numeric array ({err})") from None
        if tids.ndim != 2 or tids.shape != tlp.shape or tids.shape[0] != len(ids):
            raise RecordError(
                f"example {ex.id}: teacher_topk_ids {tids.shape} / teacher_topk_logprobs {tlp.shape} "
                f"must both be [n_rationale_tokens={len(ids)}, k]"
            )
        if np.isnan(tlp).any() or np.isposinf(tlp).any():
            raise RecordError(f"example {ex.id}: teacher_topk_logprobs has NaN or +inf (only -inf, for padding, is allowed)")
        if ((tids < 0) | (tids >= vocab)).any():
            raise RecordError(f"example {ex.id}: teacher_topk_ids has ids outside the vocabulary [0, {vocab})")
        teacher = (tids, tlp)
    return [int(t) for t in ids], teacher


def prompt_provenance(fmt: ChatFormat, separator: str) -> dict[str, Any]:
    """What a prompt is built from, as generation records it and training checks it."""
    return {"chat_template": fmt.template, "chat_template_id": fmt.template_id,
            "system_prompt": fmt.data_cfg.system_prompt, "instruction": fmt.data_cfg.instruction,
            "language_names": dict(fmt.data_cfg.language_names), "separator": separator}
