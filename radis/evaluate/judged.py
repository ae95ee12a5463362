"""The two judged parts of `radis evaluate`: MT-Bench and AlpacaEval, per model.

    before the first model loads (every rank reads the files; rank 0 asks the judge):
        questions, judge prompts, reference outputs read and checked
        Judge.check(): one request; the AlpacaEval annotator (weighted / text-parsed)
    per model, per part:
        answers   every rank decodes its share, rank 0 appends them to
                  <name>/<part>_store.<settings key>.jsonl as rounds finish (resumable),
                  then writes <name>/mt_bench_answers.jsonl (FastChat's model-answer
                  format) / <name>/alpaca_eval_outputs.json (AlpacaEval's outputs format)
        judging   rank 0 (the others wait in the long-timeout group): the judge client,
                  its cache <eval.output_dir>/judge_cache.jsonl, then
                  <name>/mt_bench_judgments.jsonl / <name>/alpaca_eval_annotations.json
    results.json gets "mt_bench" / "alpaca_eval" (radis.evaluate.mt_bench.summarize,
    radis.evaluate.alpaca.win_rates) with the seconds each half took.

Without eval.judge.base_url the answers are written and nothing is judged (a GPU job can
write answers; a judge can score them later by running the same command again).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radis.config import RadisConfig
from radis.evaluate import alpaca, mt_bench
from radis.evaluate.answers import AnswerRequest, generate_answers
from radis.evaluate.judge import Judge, judge_cache_path
from radis.generation.decode import DecodingSettings, pad_token_id
from radis.io import AppendOnlyJsonl, write_json_atomic, write_jsonl_atomic
from radis.runtime import dist_info, on_rank0

PARTS = ("mt_bench", "alpaca_eval")


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class JudgedBenchmarks:
    """What MT-Bench and AlpacaEval need, read and checked once for every model."""

    def __init__(self, cfg: RadisConfig, out_root: Path, log: Callable[[str], None], wait_group: Any = None):
        e = cfg.eval
        self.cfg, self.out_root, self.log, self.wait_group = cfg, out_root, log, wait_group
        self.judging = bool(e.judge.base_url)
        self.questions = mt_bench.load_questions(e.mt_bench.questions, e.mt_bench.reference_answers,
                                                 e.mt_bench.limit, need_references=self.judging) \
            if e.mt_bench.questions else None
        self.prompts = mt_bench.load_judge_prompts(e.mt_bench.judge_prompts) \
            if self.questions and self.judging else None
        self.instructions = alpaca.load_instructions(e.alpaca_eval.reference_outputs, e.alpaca_eval.limit) \
            if e.alpaca_eval.reference_outputs else None
        self.reference_size = len(alpaca.load_instructions(e.alpaca_eval.reference_outputs)) \
            if e.alpaca_eval.reference_outputs else None
        if self.instructions is not None and self.judging:
            alpaca.alpaca_eval_package()  # a missing extra fails here, not after the answers
        self.judge: Judge | None = None
        self.weighted: bool | None = None
        if not self.enabled:
            return
        if not self.judging:
            log("eval.judge.base_url is not set: MT-Bench / AlpacaEval answers are written, not judged")
            return

        def check() -> bool:
            judge = Judge(e.judge, judge_cache_path(out_root), log)
            judge.check()
            self.judge = judge
            return bool(judge.supports_logprobs)

        self.weighted = on_rank0("checking the judge endpoint", check, wait_group, share=True)
        if self.instructions is not None:
            log(f"AlpacaEval annotator: {self.annotator}")

    @property
    def enabled(self) -> bool:
        return self.questions is not None or self.instructions is not None

    @property
    def annotator(self) -> str:
        return "weighted (log-probabilities of m / M)" if self.weighted else "text-parsed (the reply's m / M)"

    def parts(self) -> tuple[str, ...]:
        return tuple(p for p, on in zip(PARTS, (self.questions is not None, self.instructions is not None)) if on)

    # ------------------------------------------------------------------ keys

    def _answer_settings(self, part: str, prompt: dict[str, Any]) -> dict[str, Any]:
        e = self.cfg.eval
        if part == "mt_bench":
            return {"questions": [(q.id, q.category, q.turns) for q in self.questions], "seed": e.mt_bench.seed,
                    "max_new_tokens": e.mt_bench.max_new_tokens, "temperature": mt_bench.TEMPERATURE, **prompt}
        return {"instructions": [(i.index, i.instruction) for i in self.instructions],
                "max_new_tokens": e.alpaca_eval.max_new_tokens, **prompt}

    def _judge_settings(self, part: str) -> dict[str, Any] | None:
        e = self.cfg.eval
        if not self.judging:
            return None
        if part == "mt_bench":
            return {"model": e.judge.model, "prompts": self.prompts, "max_tokens": e.mt_bench.judge_max_tokens,
                    "references": [(q.id, q.reference) for q in self.questions]}
        return {"model": e.judge.model, "weighted": self.weighted, "seed": e.alpaca_eval.seed,
                "references": _hash([(i.generator, i.reference) for i in self.instructions]),
                "df_gamed": e.alpaca_eval.df_gamed}

    def keys(self, model_fp: str, prompt: dict[str, Any]) -> dict[str, str | None]:
        """results.json part keys: a change of answers' or judge's settings redoes the part
        (its answers come back from the store when only the judge changed)."""
        return {part: (_hash({"model": model_fp, "answers": self._answer_settings(part, prompt),
                              "judge": self._judge_settings(part)}) if part in self.parts() else None)
                for part in PARTS}

    # ------------------------------------------------------------------ parts

    def run(self, part: str, name: str, model_fp: str, prompt: dict[str, Any], model, fmt, tokenizer) -> dict[str, Any]:
        t0 = time.time()
        settings_key = _hash({"model": model_fp, "answers": self._answer_settings(part, prompt)})
        store = AppendOnlyJsonl(self.out_root / name / f"{part}_store.{settings_key}.jsonl")
        if part == "mt_bench":
            answers = self._mt_bench_answers(name, model, fmt, tokenizer, store)
        else:
            answers = self._alpaca_answers(name, model, fmt, tokenizer, store)
        answer_s = round(time.time() - t0, 1)
        if not self.judging:
            return {"judged": 0, "note": "not judged: eval.judge.base_url is not set", "answer_s": answer_s,
                    "answers": str(self._answers_path(name, part))}
        t1 = time.time()
        judge = (self._judge_mt_bench if part == "mt_bench" else self._judge_alpaca)
        result = on_rank0(f"judging {name}'s {part} answers", lambda: judge(name, answers), self.wait_group, share=True)
        return {**result, "judge": self.cfg.eval.judge.model, "answer_s": answer_s,
                "judge_s": round(time.time() - t1, 1), "answers": str(self._answers_path(name, part))}

    def _answers_path(self, name: str, part: str) -> Path:
        return self.out_root / name / ("mt_bench_answers.jsonl" if part == "mt_bench" else "alpaca_eval_outputs.json")

    def _generate(self, model, fmt, tokenizer, requests: list[AnswerRequest], store: AppendOnlyJsonl, what: str):
        return generate_answers(model, requests, store, stop_token_ids=fmt.stop_token_ids, pad_id=pad_token_id(tokenizer),
                                batch_size=self.cfg.eval.batch_size, wait_group=self.wait_group, log=self.log, what=what)

    def _mt_bench_answers(self, name: str, model, fmt, tokenizer, store: AppendOnlyJsonl) -> dict[int, list[str]]:
        e = self.cfg.eval.mt_bench
        questions = self.questions

        def settings(q: mt_bench.Question) -> DecodingSettings:
            t = mt_bench.temperature(q.category)
            return DecodingSettings(max_new_tokens=e.max_new_tokens, do_sample=t > 1e-4,
                                    temperature=t if t > 1e-4 else 1.0, seed=e.seed)

        first_prompts = fmt.user_prompt_ids_batch([q.turns[0] for q in questions])
        first = self._generate(model, fmt, tokenizer, [
            AnswerRequest(mt_bench.answer_key(q, 1), p, settings(q)) for q, p in zip(questions, first_prompts)],
            store, f"{name}: MT-Bench turn 1")
        # turn 2 follows the model's own first answer, as its generated tokens
        eot = fmt.end_of_turn_ids()
        second = self._generate(model, fmt, tokenizer, [
            AnswerRequest(mt_bench.answer_key(q, 2),
                          p + first[mt_bench.answer_key(q, 1)]["token_ids"] + eot + fmt.followup_ids(q.turns[1]),
                          settings(q)) for q, p in zip(questions, first_prompts)],
            store, f"{name}: MT-Bench turn 2")
        answers = {q.id: [fmt.decode_answer(first[mt_bench.answer_key(q, 1)]["token_ids"]),
                          fmt.decode_answer(second[mt_bench.answer_key(q, 2)]["token_ids"])] for q in questions}
        if dist_info()[0] == 0:
            write_jsonl_atomic(self._answers_path(name, "mt_bench"), mt_bench.model_answer_records(name, questions, answers))
        return answers

    def _alpaca_answers(self, name: str, model, fmt, tokenizer, store: AppendOnlyJsonl) -> list[str]:
        settings = DecodingSettings(max_new_tokens=self.cfg.eval.alpaca_eval.max_new_tokens)
        instructions = self.instructions
        prompts = fmt.user_prompt_ids_batch([i.instruction for i in instructions])
        done = self._generate(model, fmt, tokenizer, [
            AnswerRequest(f"alpaca_eval:{i.index}", p, settings) for i, p in zip(instructions, prompts)],
            store, f"{name}: AlpacaEval")
        outputs = [fmt.decode_answer(done[f"alpaca_eval:{i.index}"]["token_ids"]) for i in instructions]
        if dist_info()[0] == 0:
            write_json_atomic(self._answers_path(name, "alpaca_eval"),
                              alpaca.model_output_records(name, instructions, outputs))
        return outputs

    def _judge_mt_bench(self, name: str, answers: dict[int, list[str]]) -> dict[str, Any]:
        e = self.cfg.eval
        judged = mt_bench.judge_requests(self.questions, answers, self.prompts, e.mt_bench.judge_max_tokens)
        replies = self.judge.judge_all([r for *_, r in judged], what=f"{name}: MT-Bench judgments")
        records = mt_bench.judgment_records(name, e.judge.model, judged, replies)
        write_jsonl_atomic(self.out_root / name / "mt_bench_judgments.jsonl", records)
        summary = mt_bench.summarize(records)
        self.log(f"{name}: MT-Bench {summary['overall']} (turn 1 {summary['turn1']}, turn 2 {summary['turn2']}; "
                 f"{summary['judged']} judged, {summary['unparsed']} unparsed)")
        return summary

    def _judge_alpaca(self, name: str, outputs: list[str]) -> dict[str, Any]:
        e = self.cfg.eval
        requests, swapped = alpaca.judge_requests(self.instructions, outputs, e.alpaca_eval.seed, bool(self.weighted))
        asked = iter(self.judge.judge_all([r for r in requests if r is not None], what=f"{name}: AlpacaEval judgments"))
        replies = [None if r is None else next(asked) for r in requests]  # None: identical outputs, a draw
        kind = "weighted" if self.weighted else "text"
        records = alpaca.annotation_records(name, e.judge.model, kind, self.instructions, outputs, swapped, replies,
                                            bool(self.weighted))
        write_json_atomic(self.out_root / name / "alpaca_eval_annotations.json", records)
        rates = alpaca.win_rates(records, e.alpaca_eval.df_gamed, reference_size=self.reference_size,
                                 reference=self.instructions[0].generator, judge=e.judge.model)
        lc = rates["length_controlled_winrate"]
        self.log(f"{name}: AlpacaEval win rate {rates['win_rate']} (LC {lc if lc is not None else 'not computed'}; "
                 f"{rates['judged']} judged, {rates['unparsed']} unparsed; {self.annotator})")
        return {**rates, "annotator": self.annotator, "reference": self.instructions[0].generator}
