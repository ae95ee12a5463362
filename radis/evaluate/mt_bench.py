"""MT-Bench (Zheng et al., 2023) as FastChat grades it: single-answer grading by an LLM judge.

Inputs (FastChat's files; radis ships no copy, eval.mt_bench points at them):

    question.jsonl            {"question_id", "category", "turns": [turn 1, turn 2]}   80 lines
    reference_answer/gpt-4.jsonl
                              {"question_id", "choices": [{"turns": [ref 1, ref 2]}]}
                              (the math, reasoning and coding questions)
    judge_prompts.jsonl       {"name", "system_prompt", "prompt_template", ...}; radis
                              uses FastChat's four single-answer prompts:
                                  single-v1, single-math-v1                    turn 1
                                  single-v1-multi-turn, single-math-v1-multi-turn  turn 2
                              ("-math-" ones, with the reference, for REFERENCE_CATEGORIES)

Answers: both turns in the model's chat template, the second conditioned on the model's
own first answer (its generated tokens, closed with the template's end of turn); sampled
at FastChat's per-category temperature (TEMPERATURE; 0 is greedy), seeded per question
and turn. Written as FastChat's model-answer JSONL, so FastChat's own scripts read it.

Scores: the judge's reply parsed as FastChat does ("[[n]]", else "[n]"); a reply with
neither scores -1, is counted as unparsed and left out of every mean. Reported: the mean
of turn 1, of turn 2, of both (MT-Bench's score), per category, and the counts.
"""
from __future__ import annotations

import ast
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radis.evaluate.judge import JudgeReply, JudgeRequest
from radis.evaluate.subsets import category_balanced
from radis.io import FileFormatError, iter_jsonl_objects

# FastChat's fastchat/llm_judge/common.py: sampling temperature per category, and the
# categories judged against a reference answer.
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
DEFAULT_TEMPERATURE = 0.7  # FastChat's for a category not in its table
REFERENCE_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")
JUDGE_PROMPTS = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")
SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


@dataclass
class Question:
    id: int
    category: str
    turns: list[str]  # two user turns
    reference: list[str] | None = None  # reference answers of both turns (REFERENCE_CATEGORIES)

    @property
    def needs_reference(self) -> bool:
        return self.category in REFERENCE_CATEGORIES


def _path(value: str | None, key: str) -> Path:
    if not value:
        raise FileFormatError(f"eval.mt_bench.{key}: not set (MT-Bench needs it; see ../shared/data/README.md "
                              "or FastChat's fastchat/llm_judge/data/mt_bench)")
    p = Path(os.path.expanduser(value))
    if not p.is_file():
        raise FileFormatError(f"eval.mt_bench.{key}: {p}: no such file")
    return p


def load_questions(questions: str | None, references: str | None, limit: int | None = None,
                   need_references: bool = True) -> list[Question]:
    """The questions (a category-balanced subset of `limit`), each with its reference
    answers where its category is judged against one."""
    qpath = _path(questions, "questions")
    out: list[Question] = []
    seen: set[int] = set()
    for lineno, rec in iter_jsonl_objects(qpath, 'a JSON object with "question_id", "category" and "turns"'):
        where = f"{qpath}:{lineno}"
        qid, cat, turns = rec.get("question_id"), rec.get("category"), rec.get("turns")
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise FileFormatError(f"{where}: question_id: expected an integer, got {qid!r}")
        if not isinstance(cat, str) or not cat:
            raise FileFormatError(f"{where}: category: expected a non-empty string, got {cat!r}")
        if not (isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) and t.strip() for t in turns)):
            raise FileFormatError(f"{where}: turns: expected a list of two non-empty strings, got {str(turns)[:80]}")
        if qid in seen:
            raise FileFormatError(f"{where}: question_id {qid} appears twice")
        seen.add(qid)
        out.append(Question(qid, cat, list(turns)))
    if not out:
        raise FileFormatError(f"eval.mt_bench.questions: {qpath}: no questions")
    out = category_balanced(out, limit, "MT-Bench question")
    if need_references and any(q.needs_reference for q in out):
        refs = load_reference_answers(_path(references, "reference_answers"))
        missing = [q.id for q in out if q.needs_reference and q.id not in refs]
        if missing:
            raise FileFormatError(f"eval.mt_bench.reference_answers: {references}: no reference answer for question(s) "
                                  f"{missing[:10]} ({', '.join(REFERENCE_CATEGORIES)} are judged against one)")
        for q in out:
            if q.needs_reference:
                q.reference = refs[q.id]
    return out


def load_reference_answers(path: Path) -> dict[int, list[str]]:
    refs: dict[int, list[str]] = {}
    for lineno, rec in iter_jsonl_objects(path, 'a JSON object with "question_id" and "choices"'):
        where = f"{path}:{lineno}"
        qid, choices = rec.get("question_id"), rec.get("choices")
        try:
            turns = choices[0]["turns"]
        except (TypeError, KeyError, IndexError):
            turns = None
        if not isinstance(qid, int) or not (isinstance(turns, list) and len(turns) >= 2
                                            and all(isinstance(t, str) for t in turns[:2])):
            raise FileFormatError(f'{where}: expected {{"question_id": int, "choices": [{{"turns": [two strings]}}]}}')
        refs[qid] = list(turns[:2])
    return refs


def load_judge_prompts(path: str | None) -> dict[str, dict[str, str]]:
    """FastChat's four single-answer prompts by name: {"system_prompt", "prompt_template"}."""
    p = _path(path, "judge_prompts")
    prompts: dict[str, dict[str, str]] = {}
    for lineno, rec in iter_jsonl_objects(p, 'a JSON object with "name", "system_prompt" and "prompt_template"'):
        name = rec.get("name")
        if name in JUDGE_PROMPTS:
            for key in ("system_prompt", "prompt_template"):
                if not isinstance(rec.get(key), str):
                    raise FileFormatError(f"{p}:{lineno}: {name}: {key}: expected a string")
            prompts[name] = {"system_prompt": rec["system_prompt"], "prompt_template": rec["prompt_template"]}
    missing = [n for n in JUDGE_PROMPTS if n not in prompts]
    if missing:
        raise FileFormatError(f"eval.mt_bench.judge_prompts: {p}: no prompt named {', '.join(missing)} "
                              "(FastChat's judge_prompts.jsonl has them)")
    return prompts


def temperature(category: str) -> float:
    return TEMPERATURE.get(category, DEFAULT_TEMPERATURE)


# --------------------------------------------------------------------------- answers


def answer_key(question: Question, turn: int) -> str:
    """Names an answer in the answer store and seeds its sampling."""
    return f"mt_bench:{question.id}:turn{turn}"


def model_answer_records(name: str, questions: Sequence[Question], answers: dict[int, list[str]]) -> list[dict]:
    """FastChat's model-answer JSONL records (fastchat/llm_judge/gen_model_answer.py)."""
    now = time.time()
    return [{"question_id": q.id, "answer_id": f"radis-{name}-{q.id}", "model_id": name,
             "choices": [{"index": 0, "turns": answers[q.id]}], "tstamp": now} for q in questions]


# --------------------------------------------------------------------------- judging


def judge_requests(questions: Sequence[Question], answers: dict[int, list[str]],
                   prompts: dict[str, dict[str, str]], max_tokens: int) -> list[tuple[Question, int, str, JudgeRequest]]:
    """(question, turn, prompt name, request) per question and turn, as FastChat builds
    them: the judge prompt's system message, its template filled with the question(s),
    the answer(s) and, for REFERENCE_CATEGORIES, the reference answer(s); temperature 0."""
    out = []
    for q in questions:
        a = answers[q.id]
        for turn in (1, 2):
            name = ("single-math-v1" if q.needs_reference else "single-v1") + ("-multi-turn" if turn == 2 else "")
            if turn == 1:
                fields = {"question": q.turns[0], "answer": a[0]}
            else:
                fields = {"question_1": q.turns[0], "question_2": q.turns[1], "answer_1": a[0], "answer_2": a[1]}
            if q.needs_reference:
                fields.update({"ref_answer_1": q.reference[0], "ref_answer_2": q.reference[1]})
            prompt = prompts[name]
            messages = [{"role": "system", "content": prompt["system_prompt"]},
                        {"role": "user", "content": prompt["prompt_template"].format(**fields)}]
            out.append((q, turn, name, JudgeRequest(key=f"mt_bench:{q.id}:turn{turn}", messages=messages,
                                                    params={"temperature": 0, "max_tokens": max_tokens})))
    return out


def parse_score(judgment: str) -> float:
    """FastChat's parse: the number in "[[n]]", else in "[n]"; -1 when neither is there."""
    match = SCORE.search(judgment) or SCORE_BACKUP.search(judgment)
    if not match:
        return -1.0
    try:
        return float(ast.literal_eval(match.group(1)))
    except (ValueError, SyntaxError):
        return -1.0


def judgment_records(name: str, judge_model: str, judged: Sequence[tuple[Question, int, str, JudgeRequest]],
                     replies: Sequence[JudgeReply]) -> list[dict[str, Any]]:
    """FastChat's single-judgment JSONL records (model_judgment/<judge>_single.jsonl)."""
    now = time.time()
    return [{"question_id": q.id, "category": q.category, "model": name, "judge": [judge_model, prompt_name],
             "user_prompt": req.messages[-1]["content"], "judgment": reply.content,
             "score": parse_score(reply.content), "turn": turn, "tstamp": now, "error": reply.error}
            for (q, turn, prompt_name, req), reply in zip(judged, replies)]


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over the parsed scores (-1 left out): turn 1, turn 2, overall, per category."""
    def mean(scores: list[float]) -> float | None:
        return round(sum(scores) / len(scores), 3) if scores else None

    valid = [r for r in records if r["score"] != -1]
    cats = list(dict.fromkeys(r["category"] for r in records))
    return {
        "overall": mean([r["score"] for r in valid]),
        "turn1": mean([r["score"] for r in valid if r["turn"] == 1]),
        "turn2": mean([r["score"] for r in valid if r["turn"] == 2]),
        "categories": {c: mean([r["score"] for r in valid if r["category"] == c]) for c in cats},
        "questions": len({r["question_id"] for r in records}),
        "judged": len(records),
        "unparsed": len(records) - len(valid),  # judge errors included
        "judge_errors": sum(1 for r in records if r.get("error")),
    }
