"""AlpacaEval (Li et al., 2023; Dubois et al., 2024): pairwise win rate against a reference model.

The `alpaca_eval` package (the code behind the leaderboard; `pip install radis-train[judge]`)
provides the judge template, the parsers and the metrics; radis sends the requests
through its own judge client (radis.evaluate.judge: any OpenAI-compatible endpoint, a
cache, retries), so that a killed run pays for no judgment twice.

    reference outputs JSON  [{"instruction", "output", "generator", "dataset"}, ...]   805
        (AlpacaEval 2.0's is gpt4_1106_preview's; eval.alpaca_eval.reference_outputs)
    -> the model's answer to each instruction (greedy, radis's decoder), written as
       AlpacaEval's outputs JSON, which the `alpaca_eval` command reads too
    -> per instruction, the judge sees the two outputs as "m" (shown first) and "M";
       which of the two is the model's is drawn once per run from eval.alpaca_eval.seed,
       half of the instructions each way (so a judge that always picks the first output
       gives exactly 50% on an even number of instructions)
    -> preference in AlpacaEval's convention: 1 the reference wins, 2 the model wins
         weighted annotator (endpoint with log-probabilities): 2 - P(first), from the
             top log-probs of the judge's one token (alpaca_eval's logprob_parser), as
             AlpacaEval 2.0's weighted_alpaca_eval_gpt4_turbo
         text-parsed annotator (no log-probabilities, e.g. `transformers serve`): the
             reply's first word, "m" or "M"; anything else is unparsed (NaN)
    -> win rate and its standard error (alpaca_eval.metrics.get_winrate), unparsed
       replies left out and counted; the length-controlled win rate
       (get_length_controlled_winrate) only with eval.alpaca_eval.df_gamed, the file
       its GLM is fitted with; without it, LC is reported as not computed.

alpaca_eval 0.6.6 imports `pkg_resources`, which setuptools 81 and later no longer ship
(the lock pins setuptools 84): it is given a stand-in of the two functions it calls
for the length of its import, rather than holding every install's setuptools back.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import math
import os
import random
import re
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radis.evaluate.judge import JudgeReply, JudgeRequest
from radis.evaluate.subsets import category_balanced
from radis.io import FileFormatError, json_type_name, read_user_text

TEMPLATE = "evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
FIRST, SECOND = "m", "M"  # the template's identifiers of the output shown first and second


@dataclass
class Instruction:
    index: int  # position in the reference file (AlpacaEval's instruction index; LC uses it)
    instruction: str
    reference: str  # the reference model's output
    generator: str  # the reference model's name
    dataset: str

    @property
    def category(self) -> str:  # for category_balanced
        return self.dataset


def alpaca_eval_package() -> types.ModuleType:
    """`alpaca_eval`, imported with a `pkg_resources` stand-in where setuptools lacks it."""
    try:
        with _pkg_resources_stand_in():
            import alpaca_eval
            import alpaca_eval.completion_parsers
            import alpaca_eval.metrics
            import alpaca_eval.metrics.glm_winrate
            import alpaca_eval.utils
    except ImportError as err:
        raise FileFormatError(f"eval.alpaca_eval needs the alpaca_eval package (pip install 'radis-train[judge]', "
                              f"or `make install`): {err}") from None
    return alpaca_eval


@contextlib.contextmanager
def _pkg_resources_stand_in() -> Iterator[None]:
    try:
        importlib.import_module("pkg_resources")
        present = True
    except ImportError:
        present = False
    if present:
        yield
        return
    from packaging.version import parse as parse_version

    stand_in = types.ModuleType("pkg_resources")
    stand_in.parse_version = parse_version  # type: ignore[attr-defined]
    stand_in.get_distribution = lambda name: types.SimpleNamespace(  # type: ignore[attr-defined]
        version=importlib.metadata.version(name))
    sys.modules["pkg_resources"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]


def load_instructions(path: str | None, limit: int | None = None) -> list[Instruction]:
    """The reference outputs file's instructions (a subset of `limit`, balanced over `dataset`)."""
    import json

    if not path:
        raise FileFormatError("eval.alpaca_eval.reference_outputs: not set")
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise FileFormatError(f"eval.alpaca_eval.reference_outputs: {p}: no such file")
    try:
        records = json.loads(read_user_text(p, "AlpacaEval outputs file"))
    except ValueError as err:
        raise FileFormatError(f"eval.alpaca_eval.reference_outputs: {p}: not JSON ({err})") from None
    if not isinstance(records, list) or not records:
        raise FileFormatError(f"{p}: expected a non-empty JSON list of {{\"instruction\", \"output\", \"generator\"}}, "
                              f"got {json_type_name(records)}")
    out = []
    for i, rec in enumerate(records):
        where = f"{p}: record {i + 1}"
        if not isinstance(rec, dict):
            raise FileFormatError(f"{where}: expected an object, got {json_type_name(rec)}")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise FileFormatError(f"{where}: {key}: expected a string, got {json_type_name(rec.get(key))}")
        out.append(Instruction(i, rec["instruction"], rec["output"], str(rec.get("generator") or p.parent.name),
                               str(rec.get("dataset") or "alpaca_eval")))
    return category_balanced(out, limit, "AlpacaEval instruction")


def model_output_records(name: str, instructions: Sequence[Instruction], outputs: Sequence[str]) -> list[dict]:
    """AlpacaEval's outputs JSON (what `alpaca_eval --model_outputs` reads)."""
    return [{"instruction": ins.instruction, "output": out, "generator": name, "dataset": ins.dataset}
            for ins, out in zip(instructions, outputs)]


def model_shown_first(n: int, seed: int) -> list[bool]:
    """Per instruction, whether the model's output is shown first: a seeded draw of
    exactly n // 2 of them (randomised, and balanced so position bias cancels)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    first = set(order[: n // 2])
    return [i in first for i in range(n)]


def judge_requests(instructions: Sequence[Instruction], outputs: Sequence[str], seed: int,
                   weighted: bool) -> tuple[list[JudgeRequest | None], list[bool]]:
    """The judge request per instruction (alpaca_eval's template), and which are swapped.
    None where the two outputs are identical: a draw, not asked (as alpaca_eval does)."""
    pkg = alpaca_eval_package()
    import pandas as pd

    template = (Path(pkg.__file__).parent / TEMPLATE).read_text(encoding="utf-8")
    swapped = model_shown_first(len(instructions), seed)
    rows = [{"instruction": ins.instruction,
             "output_1": out if swap else ins.reference,
             "output_2": ins.reference if swap else out}
            for ins, out, swap in zip(instructions, outputs, swapped)]
    prompts, _ = pkg.utils.make_prompts(pd.DataFrame(rows), template)
    # weighted: one token and its top log-probs (AlpacaEval 2.0's settings); text: room
    # for a few words, since a judge may write "M." or "Model M"
    params = ({"max_tokens": 1, "temperature": 1, "logprobs": True, "top_logprobs": 5} if weighted
              else {"max_tokens": 8, "temperature": 0})
    requests = [None if out == ins.reference else
                JudgeRequest(key=f"alpaca_eval:{ins.index}", messages=pkg.utils.prompt_to_chatml(prompt), params=params)
                for ins, out, prompt in zip(instructions, outputs, prompts)]
    return requests, swapped


# A text judge's answer: "m" / "M", maybe quoted or led by "Model" / "Best model identifier:".
TEXT_ANSWER = re.compile(r"^\W*(?:(?i:the\s+)?(?i:best\s+)?(?i:model|output)(?:\s+(?i:identifier))?\s*(?:is)?\s*[:=-]?\s*)?"
                         r"[\"'`*(\[]*([mM])(?![A-Za-z0-9])")


def parse_preference(reply: JudgeReply, weighted: bool) -> float:
    """Preference of the output shown first (1) or second (2), in [1, 2]; NaN if unparsed."""
    pkg = alpaca_eval_package()
    if reply.error is not None:
        return math.nan
    if weighted:
        try:
            return float(pkg.completion_parsers.logprob_parser(
                {"logprobs": reply.logprobs or {}}, numerator_token=FIRST, denominator_tokens=[FIRST, SECOND], is_binarize=False)[0])
        except (AssertionError, ValueError, KeyError, IndexError, TypeError):
            return math.nan
    match = TEXT_ANSWER.match(reply.content.strip())
    try:
        value = pkg.completion_parsers.replace_parser(match.group(1) if match else " ", replacer={FIRST: 1, SECOND: 2},
                                                      default_replacer=math.nan)[0]
    except ValueError:
        return math.nan
    return float(value)


def annotation_records(name: str, judge_model: str, annotator: str, instructions: Sequence[Instruction],
                       outputs: Sequence[str], swapped: Sequence[bool], replies: Sequence[JudgeReply | None],
                       weighted: bool) -> list[dict[str, Any]]:
    """One record per instruction in AlpacaEval's annotation layout: output_1 is the
    reference's, output_2 the model's, preference 2 = the model wins (un-swapped); 1.5
    where the outputs are identical (reply None: not asked)."""
    out = []
    for ins, output, swap, reply in zip(instructions, outputs, swapped, replies):
        shown = 1.5 if reply is None else parse_preference(reply, weighted)
        pref = (3.0 - shown) if swap and not math.isnan(shown) else shown
        out.append({"index": ins.index, "instruction": ins.instruction, "dataset": ins.dataset,
                    "output_1": ins.reference, "generator_1": ins.generator, "output_2": output, "generator_2": name,
                    "annotator": f"{annotator}:{judge_model}", "model_shown_first": swap,
                    "raw_completion": None if reply is None else reply.content,
                    "judge_error": None if reply is None else reply.error,
                    "preference": None if math.isnan(pref) else pref})
    return out


def win_rates(annotations: Sequence[dict[str, Any]], df_gamed: str | None, reference_size: int | None = None,
              reference: str = "", judge: str = "") -> dict[str, Any]:
    """Win rate (and LC win rate with df_gamed) over the parsed preferences.

    LC's GLM looks each instruction up in df_gamed.csv by its index in AlpacaEval's set
    and is regularised towards baselines annotated by GPT-4-turbo against
    gpt4_1106_preview: it is computed only when the reference file has as many
    instructions as df_gamed indexes (`reference_size`), and flagged when the reference
    or the judge is another."""
    pkg = alpaca_eval_package()
    import pandas as pd

    parsed = [a for a in annotations if a["preference"] is not None]
    out: dict[str, Any] = {"instructions": len(annotations), "judged": len(annotations),
                           "unparsed": len(annotations) - len(parsed),
                           "judge_errors": sum(1 for a in annotations if a.get("judge_error")), "win_rate": None, "standard_error": None,
                           "length_controlled_winrate": None, "lc_standard_error": None}
    if not parsed:
        out["lc_note"] = out["note"] = "no judge reply could be parsed: no win rate"
        return out
    df = pd.DataFrame(parsed)
    metrics = pkg.metrics.get_winrate(df)
    out.update({k: _plain(metrics.get(k)) for k in ("win_rate", "standard_error", "n_wins", "n_wins_base",
                                                      "n_draws", "n_total", "discrete_win_rate", "avg_length")})
    if not df_gamed:
        out["lc_note"] = "length-controlled win rate not computed: set eval.alpaca_eval.df_gamed to AlpacaEval's df_gamed.csv"
        return out
    gamed = Path(os.path.expanduser(df_gamed))
    if not gamed.is_file():
        raise FileFormatError(f"eval.alpaca_eval.df_gamed: {gamed}: no such file")
    indexes = pd.read_csv(gamed, usecols=["index"])["index"].nunique()
    if reference_size is not None and reference_size != indexes:
        out["lc_note"] = (f"length-controlled win rate not computed: {gamed} indexes {indexes} instructions, the "
                          f"reference file has {reference_size} (LC needs AlpacaEval's own set, in its order)")
        return out
    if len(parsed) < 10:
        out["lc_note"] = f"length-controlled win rate not computed: {len(parsed)} parsed preferences (its GLM needs >= 10)"
        return out
    glm = pkg.metrics.glm_winrate
    # the GLM reads df_gamed.csv through hf_hub_download: point that one call at the given file
    real = glm.hf_hub_download
    glm.hf_hub_download = lambda **kw: str(gamed) if kw.get("filename") == "df_gamed.csv" else real(**kw)
    try:
        lc = glm.get_length_controlled_winrate(df, save_weights_dir=None, is_warn_extreme_changes=False)
    except Exception as err:  # noqa: BLE001 -- a GLM fit that fails costs the LC number, not the run
        out["lc_note"] = f"length-controlled win rate failed: {type(err).__name__}: {err}"
        return out
    finally:
        glm.hf_hub_download = real
    out["length_controlled_winrate"] = _plain(lc["length_controlled_winrate"])
    out["lc_standard_error"] = _plain(lc["lc_standard_error"])
    if reference != "gpt4_1106_preview" or not judge.startswith("gpt-4"):
        out["lc_note"] = (f"LC's GLM is calibrated on GPT-4-turbo's judgments against gpt4_1106_preview; with "
                          f"{judge or 'this judge'} against {reference or 'this reference'} it is indicative only")
    return out


def _plain(v: Any) -> Any:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return None if math.isnan(f) else round(f, 4)
