"""What the model is asked to write, and what becomes of it: one class per `rationale.strategy`.

Every strategy turns an Example into one prompt (a `Request`) and one generated answer
into the strategy's fields of a record (radis.data.records). Prompts, with `ref` the
human reference translation and `[...]` one chat turn of the model's template:

    continue   [user: instruction + source][assistant: ref + separator] -> rationale
               (stop tokens impossible for the first rationale.min_rationale_tokens)
    ask        [user: instruction + source][assistant: ref][eot]
               [user: rationale.ask_prompt][assistant:] -> rationale
    seqkd      [user: instruction + source][assistant:] -> translation
    sdft       [user: rationale.sdft_prompt with {request} and {reference}][assistant:] -> answer

`continue` and `ask` write RaDis rationales: training keeps the reference and learns the
rationale after it. `seqkd` and `sdft` write a target that replaces the reference:

- **Seq-KD** (sequence-level knowledge distillation, Kim & Rush 2016), with the model
  as its own teacher as the RaDis paper runs it: the model translates the source with
  the training prompt (greedy, or beam search with rationale.num_beams); its translation
  is the training target. Another teacher is `rationale.generator`.
- **SDFT** (Self-Distillation Fine-Tuning, Yang et al., ACL 2024): the model sees the
  request and the reference as a reference answer and gives its own answer, which is
  the training target, so that the target stays in the model's own distribution.

A generated target is rejected, and the human reference kept as the target (the record
says `target_from: "reference"` and why in `rejected`; the summary counts each reason),
by these rules, checked in this order:

    empty        the answer is empty after stripping whitespace        (seqkd, sdft)
    max_length   it was cut off at rationale.max_new_tokens            (seqkd, sdft)
    meta_talk    it contains a phrase that talks about the task instead of doing it
                 (META_PHRASES: "reference answer", "your response", "here is", ...),
                 compared in lower case, unless the reference contains the same phrase
                 (a sentence about a "reference answer" may be translated)        (sdft)
    low_chrf     its sentence chrF against the reference is below rationale.sdft_min_chrf
                 (an answer that is not a translation of the same sentence)      (sdft)

Seq-KD keeps what the model translates (the paper's baseline trains on the model's own
output, preambles included); only an empty or cut-off translation is not a target.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Any, ClassVar

from radis.config import RadisConfig
from radis.data.example import Example
from radis.errors import InputError
from radis.generation.decode import Generation, Request

# Phrases of an answer that discusses the reference or the request instead of answering
# (SDFT's meta_talk rule). Lower case; matched as substrings.
META_PHRASES = (
    "reference answer", "reference translation", "the reference", "your response", "your answer",
    "your translation", "my answer", "my response", "own words", "as a guide", "the answer above",
    "the translation above", "provided translation", "given translation", "here is", "here's",
)


class StrategyError(InputError):
    """A strategy's settings do not fit together (the message names the config field)."""


def sentence_chrf(hypothesis: str, reference: str) -> float:
    """sacreBLEU's sentence-level chrF (0-100) of one answer against one reference."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(hypothesis, [reference]).score)


def meta_talk(answer: str, reference: str) -> str | None:
    """The first META_PHRASES entry in `answer` that `reference` does not contain, else None."""
    low, ref = answer.lower(), reference.lower()
    return next((p for p in META_PHRASES if p in low and p not in ref), None)


@dataclass(frozen=True)
class Strategy:
    """One value of `rationale.strategy` (see the module docstring)."""

    name: ClassVar[str]
    # "rationale": writes a rationale after the reference; "target": replaces the reference
    kind: ClassVar[str]

    def check(self, cfg: RadisConfig) -> None:
        """Raise StrategyError when the config cannot run this strategy."""

    def describe(self, cfg: RadisConfig) -> dict[str, Any]:
        """The strategy's own settings that change what it writes (hashed into the manifest)."""
        return {}

    def requests(self, fmt: Any, examples: Sequence[Example], cfg: RadisConfig) -> list[Request]:
        raise NotImplementedError

    def fields(self, ex: Example, gen: Generation, fmt: Any, cfg: RadisConfig) -> dict[str, Any]:
        """The strategy's fields of the record for `ex` and what the model generated."""
        raise NotImplementedError

    def summarize(self, records: Sequence[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
        raise NotImplementedError


class _Rationale(Strategy):
    kind = "rationale"

    def fields(self, ex: Example, gen: Generation, fmt: Any, cfg: RadisConfig) -> dict[str, Any]:
        return {
            "rationale": fmt.decode_answer(gen.token_ids),
            "rationale_token_ids": gen.token_ids,
            "rationale_tokens": len(gen.token_ids),
            "separator": cfg.data.separator,
        }

    def summarize(self, records: Sequence[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
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


class ContinueRationale(_Rationale):
    name = "continue"

    def describe(self, cfg: RadisConfig) -> dict[str, Any]:
        return {"min_rationale_tokens": cfg.rationale.min_rationale_tokens}

    def requests(self, fmt: Any, examples: Sequence[Example], cfg: RadisConfig) -> list[Request]:
        """The prompt ends with answer_ids(separator, continuation=True), exactly where
        radis.data.segments puts the recorded rationale ids back at training time."""
        prompts = fmt.prompt_ids_batch(examples)
        refs = fmt.answer_ids_batch([ex.reference for ex in examples], continuation=False)
        tail = fmt.answer_ids(cfg.data.separator, continuation=True) if cfg.data.separator else []
        return [Request(ex.id, p + ref + tail, min_new_tokens=cfg.rationale.min_rationale_tokens)
                for ex, p, ref in zip(examples, prompts, refs)]


class AskRationale(_Rationale):
    name = "ask"

    def describe(self, cfg: RadisConfig) -> dict[str, Any]:
        return {"ask_prompt": cfg.rationale.ask_prompt}

    def requests(self, fmt: Any, examples: Sequence[Example], cfg: RadisConfig) -> list[Request]:
        prompts = fmt.prompt_ids_batch(examples)
        refs = fmt.answer_ids_batch([ex.reference for ex in examples], continuation=False)
        tail = fmt.end_of_turn_ids() + fmt.followup_ids(cfg.rationale.ask_prompt)
        return [Request(ex.id, p + ref + tail) for ex, p, ref in zip(examples, prompts, refs)]


class _Target(Strategy):
    kind = "target"

    def check(self, cfg: RadisConfig) -> None:
        if cfg.rationale.topk > 0:
            raise StrategyError(
                f"rationale.topk={cfg.rationale.topk} with rationale.strategy={self.name}: the recorded top-k is the "
                "teacher of the rationale tokens (loss.kd_weight), and a generated target trains as the translation, "
                "which has none; set rationale.topk=0")

    def rejection(self, answer: str, ex: Example, gen: Generation, cfg: RadisConfig, chrf: float) -> str | None:
        """Why `answer` cannot be the target (None: it can); rules in the module docstring."""
        if not answer.strip():
            return "empty"
        if gen.stop_reason == "max_length":
            return "max_length"
        return None

    def fields(self, ex: Example, gen: Generation, fmt: Any, cfg: RadisConfig) -> dict[str, Any]:
        answer = fmt.decode_answer(gen.token_ids)
        chrf = sentence_chrf(answer, ex.reference) if answer.strip() else 0.0
        rejected = self.rejection(answer, ex, gen, cfg, chrf)
        return {
            "target": ex.reference if rejected else answer,
            "target_from": "reference" if rejected else "generated",
            "rejected": rejected,
            "generated": answer,
            "generated_token_ids": gen.token_ids,
            "generated_tokens": len(gen.token_ids),
            "chrf": round(chrf, 2),
        }

    def summarize(self, records: Sequence[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
        """count, generated length, how many targets are generated and why the others are not."""
        n = len(records)
        kept = [rec for rec in records if rec["target_from"] == "generated"]
        reasons: dict[str, int] = {}
        for rec in records:
            if rec["rejected"]:
                reasons[rec["rejected"]] = reasons.get(rec["rejected"], 0) + 1
        lengths = [rec["generated_tokens"] for rec in records]
        return {
            "count": n,
            "generated_targets": len(kept),
            "reference_kept": sum(reasons.values()),
            "share_reference_kept": sum(reasons.values()) / n if n else 0.0,
            "rejected": reasons,
            "mean_generated_tokens": sum(lengths) / n if n else 0.0,
            "max_generated_tokens": max(lengths, default=0),
            "share_max_length": sum(rec["stop_reason"] == "max_length" for rec in records) / n if n else 0.0,
            # sentence chrF of every non-empty answer against its reference (rejected ones too)
            "mean_chrf": round(mean(rec["chrf"] for rec in records if rec["generated"].strip()), 2)
            if any(rec["generated"].strip() for rec in records) else None,
            "max_new_tokens": max_new_tokens,
        }


class SeqKD(_Target):
    name = "seqkd"

    def requests(self, fmt: Any, examples: Sequence[Example], cfg: RadisConfig) -> list[Request]:
        return [Request(ex.id, p) for ex, p in zip(examples, fmt.prompt_ids_batch(examples))]


class SDFT(_Target):
    name = "sdft"

    def check(self, cfg: RadisConfig) -> None:
        super().check(cfg)
        check_sdft_prompt(cfg.rationale.sdft_prompt)
        if not 0.0 <= cfg.rationale.sdft_min_chrf <= 100.0:
            raise StrategyError(f"rationale.sdft_min_chrf: expected a chrF in [0, 100], got {cfg.rationale.sdft_min_chrf}")

    def describe(self, cfg: RadisConfig) -> dict[str, Any]:
        return {"sdft_prompt": cfg.rationale.sdft_prompt, "sdft_min_chrf": cfg.rationale.sdft_min_chrf,
                "meta_phrases": list(META_PHRASES)}

    def requests(self, fmt: Any, examples: Sequence[Example], cfg: RadisConfig) -> list[Request]:
        texts = [cfg.rationale.sdft_prompt.format(request=fmt.user_text(ex), reference=ex.reference) for ex in examples]
        return [Request(ex.id, p) for ex, p in zip(examples, fmt.user_prompt_ids_batch(texts))]

    def rejection(self, answer: str, ex: Example, gen: Generation, cfg: RadisConfig, chrf: float) -> str | None:
        reason = super().rejection(answer, ex, gen, cfg, chrf)
        if reason is None and meta_talk(answer, ex.reference):
            reason = "meta_talk"
        if reason is None and chrf < cfg.rationale.sdft_min_chrf:
            reason = "low_chrf"
        return reason


def check_sdft_prompt(prompt: str) -> None:
    """The SDFT prompt must place {request} and {reference} (and nothing else in braces)."""
    try:
        prompt.format(request="R", reference="F")
    except (KeyError, IndexError, ValueError) as err:
        raise StrategyError(f"rationale.sdft_prompt {prompt!r}: {err!r}; the placeholders are {{request}} and "
                            "{reference} (write literal braces as {{ and }})") from None
    for name in ("{request}", "{reference}"):
        if name not in prompt:
            raise StrategyError(f"rationale.sdft_prompt {prompt!r} must contain {name}")


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (ContinueRationale(), AskRationale(), SeqKD(), SDFT())}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise StrategyError(f"rationale.strategy: expected one of {list(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name]
