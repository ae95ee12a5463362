"""MT-Bench and AlpacaEval through an OpenAI-compatible judge: what must be exact, with a
scripted judge (a real HTTP server on 127.0.0.1 whose replies each test chooses).

The judged models are the tiny random Llamas of test_evaluate (SmolLM2's tokenizer and
ChatML template); their answers are garbage, the plumbing and the numbers are not.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from scripted_judge import ScriptedJudge, chat_reply, top_logprobs_reply
from test_evaluate import _save_tiny

from radis.config import load_config
from radis.evaluate import alpaca, mt_bench
from radis.evaluate.judge import Judge, JudgeError, JudgeReply, JudgeRequest
from radis.io import AppendOnlyJsonl

CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


# --------------------------------------------------------------------------- data files


def _mt_bench_files(root: Path) -> dict[str, Path]:
    """FastChat-shaped files: a question per category (ids 81...), references for the
    reference categories, and judge prompts whose templates show what was filled in."""
    root.mkdir(parents=True, exist_ok=True)
    q = root / "question.jsonl"
    q.write_text("".join(json.dumps({"question_id": 81 + i, "category": c,
                                     "turns": [f"Q1 of {c}?", f"Q2 of {c}?"]}) + "\n"
                         for i, c in enumerate(CATEGORIES)), encoding="utf-8")
    refs = root / "gpt-4.jsonl"
    refs.write_text("".join(json.dumps({"question_id": 81 + i, "model_id": "gpt-4",
                                        "choices": [{"index": 0, "turns": [f"REF1 {c}", f"REF2 {c}"]}]}) + "\n"
                            for i, c in enumerate(CATEGORIES) if c in mt_bench.REFERENCE_CATEGORIES), encoding="utf-8")
    prompts = root / "judge_prompts.jsonl"
    templates = {
        "single-v1": "T1 question={question} answer={answer} Rate as [[rating]]",
        "single-math-v1": "T1M question={question} ref={ref_answer_1} answer={answer}",
        "single-v1-multi-turn": "T2 q1={question_1} a1={answer_1} q2={question_2} a2={answer_2}",
        "single-math-v1-multi-turn": "T2M q1={question_1} r1={ref_answer_1} a1={answer_1} q2={question_2} "
                                     "r2={ref_answer_2} a2={answer_2}",
        "pair-v2": "pairwise {question} {answer_a} {answer_b}",
    }
    prompts.write_text("".join(json.dumps({"name": n, "type": "single", "system_prompt": f"SYS {n}",
                                           "prompt_template": t, "category": "general"}) + "\n"
                               for n, t in templates.items()), encoding="utf-8")
    return {"questions": q, "reference_answers": refs, "judge_prompts": prompts}


def _alpaca_file(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    p = root / "model_outputs.json"
    datasets = ["helpful_base", "koala", "oasst"]
    p.write_text(json.dumps([{"instruction": f"Instruction {i}: name a colour.", "output": f"REFERENCE OUTPUT {i}",
                              "generator": "gpt4_1106_preview", "dataset": datasets[i % 3]} for i in range(n)]),
                 encoding="utf-8")
    return p


# --------------------------------------------------------------------------- MT-Bench, exact


def test_mt_bench_prompts_follow_fastchat_per_category_and_turn(tmp_path):
    files = _mt_bench_files(tmp_path)
    questions = mt_bench.load_questions(str(files["questions"]), str(files["reference_answers"]))
    prompts = mt_bench.load_judge_prompts(str(files["judge_prompts"]))
    answers = {q.id: [f"A1 {q.category}", f"A2 {q.category}"] for q in questions}
    judged = mt_bench.judge_requests(questions, answers, prompts, max_tokens=2048)
    assert len(judged) == 2 * len(CATEGORIES)
    by = {(q.category, turn): (name, req) for q, turn, name, req in judged}
    name, req = by[("writing", 1)]
    assert name == "single-v1" and req.messages == [
        {"role": "system", "content": "SYS single-v1"},
        {"role": "user", "content": "T1 question=Q1 of writing? answer=A1 writing Rate as [[rating]]"}]
    assert req.params == {"temperature": 0, "max_tokens": 2048}
    name, req = by[("math", 1)]
    assert name == "single-math-v1" and req.messages[1]["content"] == "T1M question=Q1 of math? ref=REF1 math answer=A1 math"
    name, req = by[("coding", 2)]
    assert name == "single-math-v1-multi-turn"
    assert req.messages[1]["content"] == ("T2M q1=Q1 of coding? r1=REF1 coding a1=A1 coding q2=Q2 of coding? "
                                          "r2=REF2 coding a2=A2 coding")
    name, req = by[("stem", 2)]
    assert name == "single-v1-multi-turn" and "REF" not in req.messages[1]["content"]
    assert {c for (c, _), (n, _) in by.items() if "math" in n} == {"math", "coding", "reasoning"}
    # FastChat's sampling temperatures; 0 is greedy
    assert [mt_bench.temperature(c) for c in ("writing", "stem", "math", "unknown")] == [0.7, 0.1, 0.0, 0.7]


@pytest.mark.parametrize("reply,score", [
    ("Good answer. Rating: [[8]]", 8.0), ("[[7.5]]", 7.5), ("Rating: [6]", 6.0), ("[[9]] though [3] earlier", 9.0),
    ("I would give it 8 out of 10.", -1.0), ("", -1.0), ("[[ten]]", -1.0)])
def test_mt_bench_scores_are_parsed_as_fastchat_does(reply, score):
    assert mt_bench.parse_score(reply) == score


def test_mt_bench_unparsed_scores_are_counted_and_left_out_of_the_means():
    rec = lambda qid, cat, turn, score: {"question_id": qid, "category": cat, "turn": turn, "score": score}
    s = mt_bench.summarize([rec(1, "math", 1, 8.0), rec(1, "math", 2, -1.0), rec(2, "writing", 1, 4.0),
                            rec(2, "writing", 2, 6.0)])
    assert s == {"overall": 6.0, "turn1": 6.0, "turn2": 6.0, "categories": {"math": 8.0, "writing": 5.0},
                 "questions": 2, "judged": 4, "unparsed": 1, "judge_errors": 0}
    assert mt_bench.summarize([rec(1, "math", 1, -1.0)])["overall"] is None


def test_mt_bench_inputs_name_the_file_line_and_setting(tmp_path):
    files = _mt_bench_files(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "math", "turns": ["only one"]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: turns: expected a list of two non-empty strings"):
        mt_bench.load_questions(str(bad), None)
    with pytest.raises(ValueError, match=r"eval\.mt_bench\.reference_answers: not set"):
        mt_bench.load_questions(str(files["questions"]), None)
    with pytest.raises(ValueError, match=r"eval\.mt_bench\.questions: .*nope\.jsonl: no such file"):
        mt_bench.load_questions(str(tmp_path / "nope.jsonl"), None)
    only = tmp_path / "prompts.jsonl"
    only.write_text(json.dumps({"name": "single-v1", "system_prompt": "s", "prompt_template": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"no prompt named single-math-v1, single-v1-multi-turn"):
        mt_bench.load_judge_prompts(str(only))
    # a subset keeps every category
    subset = mt_bench.load_questions(str(files["questions"]), str(files["reference_answers"]), limit=4)
    assert len({q.category for q in subset}) == 4


# --------------------------------------------------------------------------- AlpacaEval, exact


def _alpaca_case(tmp_path: Path, n: int, reply, weighted: bool = False, seed: int = 0):
    instructions = alpaca.load_instructions(str(_alpaca_file(tmp_path, n)))
    outputs = [f"MODEL OUTPUT {i}" for i in range(n)]
    requests, swapped = alpaca.judge_requests(instructions, outputs, seed, weighted)
    replies = [reply(r) for r in requests]
    records = alpaca.annotation_records("m1", "judge", "text", instructions, outputs, swapped, replies, weighted)
    return requests, swapped, records


def test_alpaca_order_is_seeded_and_balanced_and_the_template_is_alpaca_evals(tmp_path):
    requests, swapped, _ = _alpaca_case(tmp_path, 8, lambda r: JudgeReply("m", None))
    assert sum(swapped) == 4 and swapped == alpaca.model_shown_first(8, 0) != alpaca.model_shown_first(8, 1)
    system, user = requests[0].messages
    assert system["role"] == "system" and "leaderboard" in system["content"]
    text = user["content"]
    first, second = ("MODEL OUTPUT 0", "REFERENCE OUTPUT 0") if swapped[0] else ("REFERENCE OUTPUT 0", "MODEL OUTPUT 0")
    assert text.index(first) < text.index('"model_identifier": "M"') < text.index(second)
    assert '"""Instruction 0: name a colour."""' in text


@pytest.mark.parametrize("always", ["m", "M"])
def test_a_judge_that_always_picks_one_position_gives_50_percent(tmp_path, always):
    _, _, records = _alpaca_case(tmp_path, 8, lambda r: JudgeReply(always, None))
    rates = alpaca.win_rates(records, None)
    assert rates["win_rate"] == pytest.approx(50.0) and rates["unparsed"] == 0 and rates["judged"] == 8
    assert "not computed" in rates["lc_note"] and rates["length_controlled_winrate"] is None


def test_a_judge_that_prefers_the_model_gives_100_percent_and_unparsed_are_left_out(tmp_path):
    def reply(r: JudgeRequest) -> JudgeReply:
        text = r.messages[1]["content"]
        if "Instruction 5" in text:
            return JudgeReply("I cannot decide.", None)
        return JudgeReply("m" if text.index("MODEL OUTPUT") < text.index("REFERENCE OUTPUT") else "M.", None)

    _, _, records = _alpaca_case(tmp_path, 8, reply)
    rates = alpaca.win_rates(records, None)
    assert rates["win_rate"] == pytest.approx(100.0) and rates["unparsed"] == 1 and rates["n_total"] == 7
    assert [r["preference"] for r in records if r["index"] == 5] == [None]
    none = alpaca.win_rates([dict(r, preference=None) for r in records], None)
    assert none["win_rate"] is None and none["unparsed"] == 8


def test_the_weighted_annotator_reads_the_judges_log_probabilities(tmp_path):
    # P(first shown) = 0.8 for every instruction: the model wins where it was shown first
    lp = top_logprobs_reply(math.log(0.8), math.log(0.2))["choices"][0]["logprobs"]
    requests, swapped, records = _alpaca_case(tmp_path, 6, lambda r: JudgeReply("m", lp), weighted=True)
    assert requests[0].params == {"max_tokens": 1, "temperature": 1, "logprobs": True, "top_logprobs": 5}
    for rec, swap in zip(records, swapped):
        assert rec["preference"] == pytest.approx(1.8 if swap else 1.2)
    assert alpaca.win_rates(records, None)["win_rate"] == pytest.approx(50.0)
    # no logprobs where they were asked for: unparsed, not a crash
    _, _, records = _alpaca_case(tmp_path, 6, lambda r: JudgeReply("m", None), weighted=True)
    assert all(r["preference"] is None for r in records)


def test_length_controlled_win_rate_with_a_df_gamed_file(tmp_path):
    """LC needs AlpacaEval's df_gamed.csv; a synthetic one (same columns) drives the
    real GLM here: a model that always wins gets an LC far above 50, one that always
    loses far below. Without the file, or with a reference file of another size, LC is
    not computed and says why."""
    import random

    n = 40
    instructions = alpaca.load_instructions(str(_alpaca_file(tmp_path, n)))
    rng = random.Random(0)
    outputs = ["x" * rng.randint(5, 400) for _ in range(n)]
    rows = ["index,instruction_difficulty,not_gamed_baseline,std_delta_len,preference,model"]
    for model in ("gamed_concise", "gamed_verbose"):
        for i in range(n):
            rows.append(f"{i},{rng.uniform(-1, 1):.3f},False,{rng.uniform(-2, 2):.3f},{rng.random():.3f},{model}")
    gamed = tmp_path / "df_gamed.csv"
    gamed.write_text("\n".join(rows) + "\n", encoding="utf-8")

    def records(pref):
        return [{"index": ins.index, "output_1": ins.reference, "output_2": out, "generator_1": "gpt4_1106_preview",
                 "generator_2": "m1", "annotator": "text:judge", "preference": pref(i)}
                for i, (ins, out) in enumerate(zip(instructions, outputs))]

    wins = alpaca.win_rates(records(lambda i: 2.0 if i % 8 else 1.0), str(gamed), reference_size=n,
                            reference="gpt4_1106_preview", judge="gpt-4-1106-preview")
    losses = alpaca.win_rates(records(lambda i: 1.0 if i % 8 else 2.0), str(gamed), reference_size=n,
                              reference="gpt4_1106_preview", judge="gpt-4-1106-preview")
    assert wins["win_rate"] == pytest.approx(87.5) and losses["win_rate"] == pytest.approx(12.5)
    assert wins["length_controlled_winrate"] > 60 and losses["length_controlled_winrate"] < 40
    assert wins["lc_standard_error"] is not None and "lc_note" not in wins
    other = alpaca.win_rates(records(lambda i: 2.0), str(gamed), reference_size=n, reference="gpt4_1106_preview",
                             judge="smollm2")
    assert "indicative only" in other["lc_note"] and other["length_controlled_winrate"] is not None
    resized = alpaca.win_rates(records(lambda i: 2.0), str(gamed), reference_size=805)
    assert resized["length_controlled_winrate"] is None and "indexes 40 instructions" in resized["lc_note"]
    with pytest.raises(ValueError, match="eval.alpaca_eval.df_gamed: .*no such file"):
        alpaca.win_rates(records(lambda i: 2.0), str(tmp_path / "missing.csv"))


@pytest.mark.parametrize("reply,pref", [("m", 1.0), ("M", 2.0), ("Model M", 2.0), ("`m`", 1.0), ('"M".', 2.0),
                                        ("Best model identifier: M", 2.0), ("**m**", 1.0), ("Mm", None),
                                        ("I think m", None), ("", None), ("model", None)])
def test_the_text_annotator_reads_m_or_M(reply, pref):
    got = alpaca.parse_preference(JudgeReply(reply, None), weighted=False)
    assert (math.isnan(got) and pref is None) or got == pref


def test_identical_outputs_are_a_draw_without_asking(tmp_path):
    instructions = alpaca.load_instructions(str(_alpaca_file(tmp_path, 4)))
    outputs = [instructions[0].reference, "other", "other", "other"]
    requests, swapped = alpaca.judge_requests(instructions, outputs, 0, weighted=False)
    assert requests[0] is None and all(r is not None for r in requests[1:])
    replies = [None] + [JudgeReply("m", None)] * 3
    records = alpaca.annotation_records("m1", "judge", "text", instructions, outputs, swapped, replies, False)
    assert records[0]["preference"] == 1.5 and records[0]["raw_completion"] is None


def test_alpaca_reference_file_errors_name_the_record(tmp_path):
    p = tmp_path / "outputs.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "c"}]))
    with pytest.raises(ValueError, match=r"outputs\.json: record 2: instruction: expected a string, got a number"):
        alpaca.load_instructions(str(p))


# --------------------------------------------------------------------------- the judge client


def _judge_cfg(base_url: str, **kw):
    cfg = load_config(None, [f"eval.judge.base_url={base_url}", "eval.judge.model=judge", "eval.judge.retries=3",
                             "eval.judge.timeout_s=2"] + [f"eval.judge.{k}={v}" for k, v in kw.items()])
    return cfg.eval.judge


def test_retries_on_500_and_on_a_timeout_then_caches(tmp_path, monkeypatch):
    monkeypatch.setattr("radis.evaluate.judge.MAX_BACKOFF_S", 0.05)
    calls = {"n": 0}

    def script(body):
        calls["n"] += 1
        return (500, {"error": {"message": "overloaded"}}) if calls["n"] == 1 else "[[5]]"

    slow = {"n": 0}

    def delay(body):
        slow["n"] += 1
        return 3.0 if slow["n"] == 2 else 0.0  # the 2nd request (the 1st retry) times out (timeout_s=2)

    logs: list[str] = []
    with ScriptedJudge(script, delay=delay) as server:
        judge = Judge(_judge_cfg(server.base_url), tmp_path / "cache.jsonl", logs.append)
        reqs = [JudgeRequest("a", [{"role": "user", "content": "rate A"}], {"temperature": 0})]
        assert judge.judge_all(reqs)[0].content == "[[5]]"
        assert judge.retried == 2 and any("HTTP 500: overloaded" in m for m in logs)
        assert any("timed out" in m or "TimeoutError" in m for m in logs)
        sent = len(server.requests)
        again = Judge(_judge_cfg(server.base_url), tmp_path / "cache.jsonl", logs.append)  # a new run: resumes
        assert again.judge_all(reqs)[0].cached and len(server.requests) == sent
        changed = [JudgeRequest("a", [{"role": "user", "content": "rate A, changed"}], {"temperature": 0})]
        assert not again.judge_all(changed)[0].cached and len(server.requests) == sent + 1


def test_a_refused_key_an_unknown_model_and_a_dead_url_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.setattr("radis.evaluate.judge.MAX_BACKOFF_S", 0.01)
    secret = "sk-test-" + "7" * 24
    monkeypatch.setenv("RADIS_TEST_JUDGE_KEY", secret + "wrong")
    with ScriptedJudge(lambda b: "m", api_key=secret) as server:
        judge = Judge(_judge_cfg(server.base_url, api_key_env="RADIS_TEST_JUDGE_KEY"), None, lambda m: None)
        with pytest.raises(JudgeError, match=r"HTTP 401 .*refused the API key in \$RADIS_TEST_JUDGE_KEY") as err:
            judge.check()
        assert secret not in str(err.value)
        monkeypatch.setenv("RADIS_TEST_JUDGE_KEY", secret)
        Judge(_judge_cfg(server.base_url, api_key_env="RADIS_TEST_JUDGE_KEY"), None, lambda m: None).check()
        cfg = _judge_cfg(server.base_url, api_key_env="RADIS_TEST_JUDGE_KEY")
        cfg.model = "no-such-judge"
        with pytest.raises(JudgeError, match=r"HTTP 404 .*eval\.judge\.model='no-such-judge'.*does not exist"):
            Judge(cfg, None, lambda m: None).check()
        port = server.server.server_address[1]
    with pytest.raises(JudgeError, match=rf"failed 3 time\(s\).*check eval\.judge\.base_url='http://127.0.0.1:{port}/v1'"):
        Judge(_judge_cfg(f"http://127.0.0.1:{port}/v1"), None, lambda m: None).check()


def test_check_learns_whether_the_endpoint_gives_log_probabilities():
    with ScriptedJudge(lambda b: top_logprobs_reply(-0.1, -2.5) if b.get("logprobs") else "m") as server:
        judge = Judge(_judge_cfg(server.base_url), None, lambda m: None)
        judge.check()
        assert judge.supports_logprobs is True
    with ScriptedJudge(lambda b: chat_reply("m")) as server:  # logprobs asked for and ignored
        judge = Judge(_judge_cfg(server.base_url), None, lambda m: None)
        judge.check()
        assert judge.supports_logprobs is False
    with ScriptedJudge(lambda b: chat_reply("m")) as server, \
            pytest.raises(JudgeError, match=r"eval\.judge\.logprobs=true, but judge .* returned no log-probabilities"):
        Judge(_judge_cfg(server.base_url, logprobs="true"), None, lambda m: None).check()  # forced: fails now, not later
    with ScriptedJudge(lambda b: (400, {"error": {"message": "logprobs not supported"}}) if b.get("logprobs")
                       else chat_reply("m")) as server:  # refused outright: the text-parsed annotator
        judge = Judge(_judge_cfg(server.base_url), None, lambda m: None)
        judge.check()
        assert judge.supports_logprobs is False


def test_a_judgment_cut_short_by_a_kill_is_dropped_and_asked_again(tmp_path):
    store = AppendOnlyJsonl(tmp_path / "c.jsonl")
    store.append([{"key": "a", "content": "x"}])
    with open(store.path, "ab") as f:
        f.write(b'{"key": "b", "cont')
    assert store.read() == [{"key": "a", "content": "x"}]
    store.append([{"key": "c", "content": "y"}])
    assert [r["key"] for r in store.read()] == ["a", "c"]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("judged") / "base", seed=0)


def _eval_config(tmp_path: Path, model: Path, base_url: str, **over):
    files = _mt_bench_files(tmp_path / "mt")
    settings = {
        "model.name_or_path": str(model), "eval.output_dir": str(tmp_path / "eval"), "eval.batch_size": 3,
        "eval.retention": False, "eval.safety": False, "eval.models": f"[orig={model}]",
        "eval.judge.base_url": base_url, "eval.judge.model": "judge", "eval.judge.api_key_env": "RADIS_TEST_JUDGE_KEY",
        "eval.judge.max_in_flight": 3,
        "eval.mt_bench.questions": str(files["questions"]), "eval.mt_bench.reference_answers": str(files["reference_answers"]),
        "eval.mt_bench.judge_prompts": str(files["judge_prompts"]), "eval.mt_bench.limit": 4,
        "eval.mt_bench.max_new_tokens": 5,
        "eval.alpaca_eval.reference_outputs": str(_alpaca_file(tmp_path / "ae", 6)),
        "eval.alpaca_eval.max_new_tokens": 5, **over}
    return load_config(None, [f"{k}={v}" for k, v in settings.items()])


def _judge_script(body: dict):
    text = body["messages"][-1]["content"]
    if "model_identifier" in text:
        return "M"
    return "Fine. Rating: [[6]]" if "T1" in text else "no score here"


def test_evaluate_writes_answers_judgments_and_scores_and_never_the_key(tiny_model, tmp_path, monkeypatch):
    from radis.evaluate.command import evaluate

    secret = "sk-radis-" + "42" * 16
    monkeypatch.setenv("RADIS_TEST_JUDGE_KEY", secret)
    with ScriptedJudge(_judge_script, api_key=secret) as server:
        cfg = _eval_config(tmp_path, tiny_model, server.base_url)
        summary = evaluate(cfg)
        n_first = len(server.requests)
        out = tmp_path / "eval" / "orig"
        result = json.loads((out / "results.json").read_text())
        mt = result["mt_bench"]
        # 4 questions x 2 turns; every turn-2 reply is unparsable
        assert mt["judged"] == 8 and mt["unparsed"] == 4 and mt["overall"] == mt["turn1"] == 6.0 and mt["turn2"] is None
        assert mt["questions"] == 4 and len(mt["categories"]) == 4 and mt["judge"] == "judge"
        ae = result["alpaca_eval"]
        assert ae["judged"] == 6 and ae["unparsed"] == 0 and ae["win_rate"] == pytest.approx(50.0)
        assert ae["annotator"].startswith("text-parsed") and ae["length_controlled_winrate"] is None
        assert "df_gamed" in ae["lc_note"]
        # FastChat's and AlpacaEval's formats
        answers = [json.loads(line) for line in (out / "mt_bench_answers.jsonl").read_text().splitlines()]
        assert len(answers) == 4 and set(answers[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert len(answers[0]["choices"][0]["turns"]) == 2 and answers[0]["model_id"] == "orig"
        outputs = json.loads((out / "alpaca_eval_outputs.json").read_text())
        assert len(outputs) == 6 and set(outputs[0]) == {"instruction", "output", "generator", "dataset"}
        judgments = [json.loads(line) for line in (out / "mt_bench_judgments.jsonl").read_text().splitlines()]
        assert {j["judge"][1] for j in judgments} == set(mt_bench.JUDGE_PROMPTS)  # writing, roleplay, reasoning, math
        row = summary["models"][0]
        assert row["mt_bench"] == 6.0 and row["alpaca_eval_wr"] == pytest.approx(50.0) and row["alpaca_eval_lc"] is None
        # the key is sent, and never written
        assert all(h.get("Authorization") == f"Bearer {secret}" for h, _ in server.requests)
        for f in (tmp_path / "eval").rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f

        # a second run: nothing generated, nothing judged again
        evaluate(cfg)
        assert len(server.requests) == n_first + 1  # the endpoint check only

        # a changed judge prompt: re-judged, the answers reused from the store
        prompts = tmp_path / "mt" / "judge_prompts.jsonl"
        prompts.write_text(prompts.read_text().replace("Rate as [[rating]]", "Rate it as [[rating]]"))
        stores = sorted((out).glob("*_store.*.jsonl"))
        before = {p: p.stat().st_mtime_ns for p in stores}
        evaluate(cfg)
        rejudged = server.judged()[n_first - 1:]
        assert {b["messages"][-1]["content"].split()[0] for b in rejudged[len(rejudged) - 4:]} <= {"T1", "T1M", "T2", "T2M"}
        assert any("Rate it as" in b["messages"][-1]["content"] for b in rejudged)
        assert {p: p.stat().st_mtime_ns for p in sorted(out.glob("*_store.*.jsonl"))} == before


def test_a_bad_judge_stops_the_run_before_any_answer(tiny_model, tmp_path, monkeypatch):
    from radis.evaluate.command import evaluate

    monkeypatch.setenv("RADIS_TEST_JUDGE_KEY", "wrong")
    with ScriptedJudge(_judge_script, api_key="right") as server:
        cfg = _eval_config(tmp_path, tiny_model, server.base_url)
        with pytest.raises(JudgeError, match=r"RADIS_TEST_JUDGE_KEY"):
            evaluate(cfg)
    assert not list((tmp_path / "eval").rglob("*_store.*.jsonl"))


def test_answers_resume_after_a_kill_and_do_not_depend_on_the_batch(tiny_model, tmp_path, capsys):
    """The answer store kept by a killed run: only the missing answers are generated, and
    they equal an uninterrupted run's (sampled ones included: seeded per question)."""
    from radis.evaluate.command import evaluate

    cfg = _eval_config(tmp_path, tiny_model, "", **{"eval.mt_bench.max_new_tokens": 8, "eval.alpaca_eval.reference_outputs": "null"})
    evaluate(cfg)
    out = tmp_path / "eval" / "orig"
    full = (out / "mt_bench_answers.jsonl").read_text()
    result = json.loads((out / "results.json").read_text())
    assert result["mt_bench"]["judged"] == 0 and "not judged" in result["mt_bench"]["note"]
    (store,) = out.glob("mt_bench_store.*.jsonl")
    lines = store.read_text().splitlines(keepends=True)
    assert len(lines) == 8
    store.write_text("".join(lines[:3]) + lines[3][:20])  # a kill mid-write
    (out / "results.json").unlink()
    cfg.eval.batch_size = 2  # other batches: the same answers
    capsys.readouterr()
    evaluate(cfg)
    logs = capsys.readouterr().out
    assert re.search(r"MT-Bench turn 1: 1 to generate", logs), logs
    assert re.search(r"MT-Bench turn 2: 4 to generate", logs), logs
    strip = lambda text: [dict(json.loads(line), tstamp=0) for line in text.splitlines()]
    assert strip((out / "mt_bench_answers.jsonl").read_text()) == strip(full)


def test_compare_table_report_and_plot_show_mt_bench_and_alpaca_eval(tmp_path):
    from radis.compare import comparison_table
    from radis.evaluate.plot import panels, plot_quality_vs_general
    from radis.evaluate.report import format_table, summary_row

    def result(mt, wr, lc):
        return {"average": {"raw": {"chrf": 50.0}, "cut": {}}, "directions": {}, "cut": {"applied": False},
                "mt_bench": {"overall": mt, "unparsed": 1}, "alpaca_eval": {"win_rate": wr, "length_controlled_winrate": lc}}

    rows = [summary_row("original", result(6.25, 40.0, None)), summary_row("radis", result(5.5, 35.25, 30.5))]
    assert rows[1]["mt_bench"] == 5.5 and rows[1]["alpaca_eval_lc"] == 30.5 and rows[0]["mt_bench_unparsed"] == 1
    table = comparison_table(rows)
    assert "| MT-Bench | AlpacaEval WR | AlpacaEval LC |" in table
    assert "| original | - | - | 50.00* | - | - | 6.25 (1 unparsed) | 40.0 | - |" in table
    # a judge that never gave a score: the column stays and says so
    weak = [summary_row("original", {**result(None, None, None), "mt_bench": {"overall": None, "unparsed": 16}})]
    assert "| MT-Bench |" in comparison_table(weak) and "| - (16 unparsed) |" in comparison_table(weak)
    assert "MT-Bench" in format_table(rows) and "35.2" in format_table(rows)
    titles = [p[0] for p in panels(rows)]
    assert titles[:2] == ["MT-Bench", "AlpacaEval (length-controlled)"]
    assert plot_quality_vs_general(rows, tmp_path / "q.png").stat().st_size > 1000
    # off: no columns, no panels
    plain = [summary_row("original", {"average": {"raw": {"chrf": 50.0}, "cut": {}}, "directions": {}})]
    assert "MT-Bench" not in comparison_table(plain) and not panels(plain)


def test_the_real_mt_bench_and_alpaca_eval_files_give_every_request(shared_data):
    """FastChat's and AlpacaEval's own files (../shared/data): 80 questions, 30 of them
    with references, the four single prompts filled for all 160 turns; 805 instructions
    in alpaca_eval's template."""
    mt = shared_data / "mt_bench"
    if not (mt / "question.jsonl").is_file():
        pytest.skip(f"no MT-Bench files at {mt}")
    questions = mt_bench.load_questions(str(mt / "question.jsonl"), str(mt / "reference_answer" / "gpt-4.jsonl"))
    assert len(questions) == 80 and sum(q.reference is not None for q in questions) == 30
    prompts = mt_bench.load_judge_prompts(str(mt / "judge_prompts.jsonl"))
    judged = mt_bench.judge_requests(questions, {q.id: ["first answer", "second answer"] for q in questions}, prompts, 2048)
    assert len(judged) == 160
    for q, turn, name, req in judged:
        text = req.messages[1]["content"]
        assert "second answer" in text if turn == 2 else "first answer" in text
        assert (q.reference[turn - 1] in text) if q.needs_reference else ("-math-" not in name)
        assert "{" + "answer" not in text  # every placeholder filled
    refs = shared_data / "alpaca_eval" / "results" / "gpt4_1106_preview" / "model_outputs.json"
    instructions = alpaca.load_instructions(str(refs))
    assert len(instructions) == 805 and instructions[0].generator == "gpt4_1106_preview"
    subset = alpaca.load_instructions(str(refs), limit=40)
    assert len(subset) == 40 and len({i.dataset for i in subset}) == 5  # balanced over AlpacaEval's five sources
    requests, swapped = alpaca.judge_requests(instructions, [f"answer {i.index}" for i in instructions], 0,
                                              weighted=False)
    assert len(requests) == 805 and sum(swapped) == 402
    assert all(r.messages[1]["content"].count(i.reference) >= 1 for r, i in zip(requests[:50], instructions))


@pytest.mark.distributed
def test_two_ranks_answer_and_score_as_one(tiny_model, tmp_path):
    """torchrun with 2 CPU ranks: answers sharded and gathered (sampled ones too), judged
    once on rank 0; the same answers, judge requests and scores as one process."""
    import os
    import subprocess
    import sys

    import yaml

    from radis.evaluate.command import evaluate

    with ScriptedJudge(_judge_script) as server:
        cfg = _eval_config(tmp_path, tiny_model, server.base_url, **{"eval.judge.api_key_env": "RADIS_NO_SUCH_KEY_VAR"})
        cfg_file = tmp_path / "c.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--module",
               "radis.cli", "evaluate", "--config", str(cfg_file), f"eval.output_dir={tmp_path / 'eval2'}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        two = sorted(json.dumps(b, sort_keys=True) for b in server.judged())
        n = len(server.requests)
        evaluate(load_config(cfg_file, [f"eval.output_dir={tmp_path / 'eval1'}"]))
        one = sorted(json.dumps(b, sort_keys=True) for _, b in server.requests[n:] if b in server.judged())
    assert len(two) == 4 * 2 + 6 and one == two
    for name in ("mt_bench_answers.jsonl", "alpaca_eval_outputs.json"):
        a, b = ((tmp_path / f"eval{k}" / "orig" / name).read_text() for k in (1, 2))
        assert re.sub(r'"tstamp": [0-9.]+', "", a) == re.sub(r'"tstamp": [0-9.]+', "", b)
    results = [json.loads((tmp_path / f"eval{k}" / "orig" / "results.json").read_text()) for k in (1, 2)]
    for part in ("mt_bench", "alpaca_eval"):
        drop = ("answer_s", "judge_s", "answers")
        assert {k: v for k, v in results[0][part].items() if k not in drop} == \
            {k: v for k, v in results[1][part].items() if k not in drop}


def test_compare_asks_the_judge_before_its_first_stage_and_only_warns(tmp_path, monkeypatch):
    from radis.compare import early_judge_check

    monkeypatch.setenv("RADIS_TEST_JUDGE_KEY", "wrong")
    cfg_file = tmp_path / "c.yaml"
    logs: list[str] = []
    with ScriptedJudge(_judge_script, api_key="right") as server:
        cfg_file.write_text(f"eval:\n  judge: {{base_url: '{server.base_url}', model: judge, "
                            f"api_key_env: RADIS_TEST_JUDGE_KEY}}\n  alpaca_eval: {{reference_outputs: x.json}}\n")
        assert early_judge_check(cfg_file, [], log=logs.append) is False
        assert "warning: the judge does not answer yet" in logs[-1] and "RADIS_TEST_JUDGE_KEY" in logs[-1]
        monkeypatch.setenv("RADIS_TEST_JUDGE_KEY", "right")
        assert early_judge_check(cfg_file, [], log=logs.append) is True
        assert early_judge_check(cfg_file, ["eval.alpaca_eval.reference_outputs=null"], log=logs.append) is True
        assert len(server.requests) == 2  # nothing to judge: not asked


def test_bench_judged_tabulates_each_models_judged_parts(tmp_path):
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_judged")
    (tmp_path / "eval" / "radis").mkdir(parents=True)
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"models": [{"model": "radis"}]}))
    (tmp_path / "eval" / "radis" / "results.json").write_text(json.dumps({
        "mt_bench": {"answer_s": 12.0, "judge_s": 80.5, "judged": 16, "unparsed": 11, "overall": 4.2},
        "alpaca_eval": {"answer_s": 20.0, "judge_s": 30.0, "judged": 20, "unparsed": 3, "win_rate": 12.5,
                        "annotator": "text-parsed (the reply's m / M)"}}))
    lines = bench.table(tmp_path).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 13
    assert lines[2] == "| radis | 12.0 | 80.5 | 16 | 11 | 4.20 | 20.0 | 30.0 | 20 | 3 | 12.5 | text-parsed |"


def test_the_key_is_scrubbed_from_every_message_and_never_sent_on(tmp_path, monkeypatch, capsys):
    """A server that echoes the Authorization header in its errors (a 400 for one request,
    a 500 for another), a key with a trailing newline, a redirect, the key pasted where
    its variable's name belongs: the key is in no message, log or file."""
    monkeypatch.setattr("radis.evaluate.judge.MAX_BACKOFF_S", 0.01)
    secret = "sk-echo-" + "9" * 30
    monkeypatch.setenv("RADIS_TEST_JUDGE_KEY", secret + "\n")  # as a secrets file leaves it
    seen = {"n": 0}

    def script(body):
        text = body["messages"][-1]["content"]
        if text == "too long":
            return 400, {"error": {"message": f"context length exceeded for Bearer {secret}"}}
        if text == "flaky":
            seen["n"] += 1
            if seen["n"] == 1:
                return 500, {"error": {"message": f"upstream saw Authorization: Bearer {secret}"}}
        return "[[3]]"

    logs: list[str] = []
    with ScriptedJudge(script, api_key=secret) as server:
        judge = Judge(_judge_cfg(server.base_url, api_key_env="RADIS_TEST_JUDGE_KEY"), tmp_path / "c.jsonl", logs.append)
        judge.check()
        replies = judge.judge_all([JudgeRequest(k, [{"role": "user", "content": k}]) for k in ("too long", "flaky", "ok")])
    assert replies[0].error is not None and replies[0].content == "" and "context length exceeded" in replies[0].error
    assert [r.content for r in replies[1:]] == ["[[3]]", "[[3]]"] and judge.errors == 1
    assert not any(secret in m for m in logs + [replies[0].error]) and any("<key>" in m for m in logs)
    assert secret not in (tmp_path / "c.jsonl").read_text() and "too long" not in (tmp_path / "c.jsonl").read_text()
    monkeypatch.setenv("RADIS_TEST_JUDGE_KEY", "sk-bad\x07key")
    with pytest.raises(JudgeError, match="control characters") as err:
        Judge(_judge_cfg("http://127.0.0.1:9/v1", api_key_env="RADIS_TEST_JUDGE_KEY"), None, logs.append)
    assert "sk-bad" not in str(err.value)
    with pytest.raises(JudgeError, match="expected the NAME of an environment variable") as err:
        Judge(_judge_cfg("http://127.0.0.1:9/v1", api_key_env=secret), None, logs.append)
    assert secret not in str(err.value)
    # a redirect is refused: the header would travel with it
    import http.server
    import threading

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("RADIS_TEST_JUDGE_KEY", secret)
        judge = Judge(_judge_cfg(f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key_env="RADIS_TEST_JUDGE_KEY"),
                      None, logs.append)
        with pytest.raises(JudgeError, match="redirects .* to http://127.0.0.1:9/elsewhere"):
            judge.check()
    finally:
        srv.shutdown()
        srv.server_close()
    out = capsys.readouterr()
    assert secret not in out.out + out.err


def test_judging_killed_halfway_resumes_with_what_was_cached(tmp_path, monkeypatch):
    """The judge goes away after 3 judgments (the run dies with a JudgeError, as a kill
    would stop it): the 3 are in the cache, and the next run asks only for the rest."""
    monkeypatch.setattr("radis.evaluate.judge.MAX_BACKOFF_S", 0.01)
    answered = {"n": 0}

    def script(body):
        answered["n"] += 1
        return "[[4]]" if answered["n"] <= 3 else (503, {"error": {"message": "gone"}})

    reqs = [JudgeRequest(f"q{i}", [{"role": "user", "content": f"rate {i}"}]) for i in range(8)]
    with ScriptedJudge(script) as server:
        judge = Judge(_judge_cfg(server.base_url, max_in_flight=1, retries=0), tmp_path / "c.jsonl", lambda m: None)
        with pytest.raises(JudgeError, match="failed 1 time"):
            judge.judge_all(reqs)
    assert len(AppendOnlyJsonl(tmp_path / "c.jsonl").read()) == 3
    with ScriptedJudge(lambda body: "[[5]]") as server:
        judge = Judge(_judge_cfg(server.base_url), tmp_path / "c.jsonl", lambda m: None)
        replies = judge.judge_all(reqs)
        assert len(server.requests) == 5
    assert [r.content for r in replies] == ["[[4]]"] * 3 + ["[[5]]"] * 5 and sum(r.cached for r in replies) == 3
