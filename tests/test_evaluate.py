"""Evaluation: metrics, cutting at the separator, translation end to end, retention, plot.

Models are tiny random Llamas behind the real SmolLM2 tokenizer (ChatML template), saved
as HF directories in a tmp dir: they load and run like real models in milliseconds.
Their translations are garbage, which is fine: the tests check plumbing and numbers
against sacreBLEU itself, not quality.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sacrebleu.metrics import BLEU, CHRF

from radis.config import load_config
from radis.evaluate import metrics
from radis.evaluate.metrics import bleu_tokenizer, cut_at_separator, score_corpus
from radis.evaluate.retention import load_retention_prompts, shipped_prompts_path

DEMO = Path(__file__).resolve().parents[1] / "radis" / "resources" / "demo"


# --------------------------------------------------------------------------- metrics


def test_scores_equal_sacrebleu_and_signatures_name_the_tokenizer():
    hyps = ["The cat sits on the mat.", "It is raining in Berlin today.", "I like green tea."]
    refs = ["The cat is sitting on the mat.", "Today it is raining in Berlin.", "I like green tea."]
    s = score_corpus(hyps, refs, "en")
    assert s.bleu == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
    assert s.chrf == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
    assert 0 < s.bleu < 100 and 0 < s.chrf < 100
    assert "tok:13a" in s.bleu_signature and "chrF2" not in s.bleu_signature
    assert "nc:6" in s.chrf_signature


def test_chinese_target_uses_the_zh_tokenizer():
    assert bleu_tokenizer("zh") == "zh" and bleu_tokenizer("zh_Hans") == "zh" and bleu_tokenizer("de") == "13a"
    assert bleu_tokenizer("ja") in {"ja-mecab", "char"}  # mecab only where installed
    hyps, refs = ["我们明天去北京看长城。"], ["我们明天去北京参观长城。"]
    s = score_corpus(hyps, refs, "zh")
    assert "tok:zh" in s.bleu_signature
    assert s.bleu == pytest.approx(BLEU(tokenize="zh").corpus_score(hyps, [refs]).score)
    # 13a would see each sentence as one word: no n-gram matches at all.
    assert BLEU(tokenize="13a").corpus_score(hyps, [refs]).score == 0.0 < s.bleu


def test_cut_at_separator():
    assert cut_at_separator("The goods cost 20 euros.\n\nThe word 'Ware' means goods.", "\n\n") == "The goods cost 20 euros."
    assert cut_at_separator("\n\nLeading blank lines.\n\nRationale", "\n\n") == "Leading blank lines."
    assert cut_at_separator("No rationale here. ", "\n\n") == "No rationale here."
    assert cut_at_separator("A ### B", " ### ") == "A"
    assert cut_at_separator("keep\n\nall", "") == "keep\n\nall"


def test_comet_is_skipped_with_a_reason():
    assert "comet_model" in metrics.comet_unavailable_reason(None)
    reason = metrics.comet_unavailable_reason("Unbabel/wmt22-comet-da")
    if reason is not None:  # unbabel-comet not installed here
        assert "comet" in reason and "pip install" in reason


def test_a_comet_that_cannot_be_imported_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """An installed but broken comet (a dependency missing) is skipped like a missing one."""
    import sys

    pkg = tmp_path / "comet"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import radis_no_such_dependency_xyz\n", encoding="utf-8")
    monkeypatch.delitem(sys.modules, "comet", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    reason = metrics.comet_unavailable_reason("Unbabel/wmt22-comet-da")
    assert reason is not None and reason.startswith("COMET skipped: ")
    assert "cannot be imported" in reason and "radis_no_such_dependency_xyz" in reason and "pip install" in reason


def test_a_comet_model_that_cannot_load_names_eval_comet_model(monkeypatch):
    """comet imports but the model cannot be had (offline download, bad checkpoint): an
    InputError naming eval.comet_model, which `radis evaluate` reports without a traceback."""
    import sys
    import types

    from radis.errors import InputError

    def offline(name: str) -> str:
        raise ConnectionError(f"cannot reach the hub for {name}")

    fake = types.ModuleType("comet")
    fake.download_model, fake.load_from_checkpoint = offline, lambda path: None
    monkeypatch.setitem(sys.modules, "comet", fake)
    with pytest.raises(InputError, match=r"eval.comet_model: 'Unbabel/wmt22-comet-da': cannot load the COMET model "
                                         r"\(ConnectionError: cannot reach the hub .*only a path works"):
        metrics.CometScorer("Unbabel/wmt22-comet-da")


# --------------------------------------------------------------------------- shipped resources


def test_shipped_retention_prompts_are_varied_and_valid():
    prompts = load_retention_prompts()
    assert shipped_prompts_path().is_file() and 90 <= len(prompts) <= 130
    cats = {p.category for p in prompts}
    assert {"knowledge", "reasoning", "math", "instruction_following", "writing", "coding", "harmful"} <= cats
    assert len({p.id for p in prompts}) == len(prompts)
    subset = load_retention_prompts(limit=14)
    assert len(subset) == 14 and {p.category for p in subset} == cats  # balanced over categories


def test_bad_retention_prompt_file_names_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "category": "x", "prompt": "hi"}\n{"id": "b", "category": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: field 'prompt'"):
        load_retention_prompts(f)


def test_a_retention_prompt_needs_only_its_prompt(tmp_path):
    """id and category are optional, as in a safety-prompts file (README, Evaluation)."""
    from radis.evaluate.retention import RetentionPrompt

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi"}\n\n{"prompt": "yo", "id": "b", "category": "c"}\n', encoding="utf-8")
    assert load_retention_prompts(f) == [RetentionPrompt("p-1", "user", "hi"), RetentionPrompt("b", "c", "yo")]
    f.write_text('{"id": "p-2", "prompt": "hi"}\n{"prompt": "yo"}\n', encoding="utf-8")  # a default id taken already
    with pytest.raises(ValueError, match=r"p\.jsonl:2: duplicate id 'p-2'"):
        load_retention_prompts(f)
    f.write_text('{"prompt": 42}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl:1: field 'prompt' must be a string, got a number \(42\)"):
        load_retention_prompts(f)


def test_demo_sample_is_parallel_de_en():
    for name, lo, hi in (("train.de-en.jsonl", 140, 200), ("test.de-en.jsonl", 35, 60)):
        rows = [json.loads(line)["translation"] for line in (DEMO / name).read_text(encoding="utf-8").splitlines()]
        assert lo <= len(rows) <= hi
        assert all(r["de"].strip() and r["en"].strip() for r in rows)
    train = {json.loads(x)["translation"]["de"] for x in (DEMO / "train.de-en.jsonl").read_text(encoding="utf-8").splitlines()}
    test = {json.loads(x)["translation"]["de"] for x in (DEMO / "test.de-en.jsonl").read_text(encoding="utf-8").splitlines()}
    assert not train & test  # no test sentence is trained on


# --------------------------------------------------------------------------- tiny models


def _save_tiny(out: Path, seed: int, perturb_from: Path | None = None) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from radis.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    if perturb_from is not None:
        model = LlamaForCausalLM.from_pretrained(perturb_from)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    else:
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = _save_tiny(root / "base", seed=0)
    tuned = _save_tiny(root / "tuned", seed=1, perturb_from=base)
    return base, tuned


def _config(tmp_path: Path, base: Path, models: list[str], tests: list[dict], **eval_overrides) -> object:
    cfg = load_config(None, [
        f"model.name_or_path={base}",
        f"eval.output_dir={tmp_path / 'eval'}",
        "eval.max_new_tokens=6",
        "eval.retention_max_new_tokens=6",
        "eval.retention_limit=7",
        "eval.safety_limit=5",
        "eval.safety_max_new_tokens=6",
        "eval.batch_size=4",
    ] + [f"eval.{k}={v}" for k, v in eval_overrides.items()])
    from radis.config import SourceConfig

    cfg.eval.models = models
    cfg.eval.test = [SourceConfig(**t) for t in tests]
    return cfg


def test_translate_end_to_end_writes_scores_retention_and_plot(tiny_models, tmp_path):
    from radis.evaluate.command import evaluate

    base, tuned = tiny_models
    test_file = tmp_path / "test.de-en.jsonl"
    test_file.write_text("".join(
        json.dumps({"translation": {"de": de, "en": en}}, ensure_ascii=False) + "\n"
        for de, en in [("Guten Morgen.", "Good morning."), ("Der Zug ist spät.", "The train is late."),
                       ("Ich trinke Tee.", "I drink tea."), ("Wo ist der Bahnhof?", "Where is the station?"),
                       ("Das Wetter ist schön.", "The weather is nice.")]), encoding="utf-8")
    cfg = _config(tmp_path, base, [f"original={base}", f"tuned={tuned}"],
                  [{"path": str(test_file), "src_lang": "de", "tgt_lang": "en"}])
    summary = evaluate(cfg)

    out = tmp_path / "eval"
    rows = {r["model"]: r for r in summary["models"]}
    assert set(rows) == {"original", "tuned"}
    translations = json.loads((out / "tuned" / "translations.json").read_text(encoding="utf-8"))
    assert [t["reference"] for t in translations][:2] == ["Good morning.", "The train is late."]
    for t in translations:  # cut = raw up to the first separator; not trained with rationales: scored raw
        assert t["cut"] == cut_at_separator(t["raw"], cfg.data.separator) and t["new_tokens"] <= 6
        assert t["hypothesis"] == t["raw"]
    # Scores are sacreBLEU's on exactly the written hypotheses.
    result = json.loads((out / "tuned" / "results.json").read_text(encoding="utf-8"))
    assert result["cut"]["applied"] is False and "no radis_training.json" in result["cut"]["reason"]
    assert rows["tuned"]["chrf"] == rows["tuned"]["chrf_raw"]
    cut = result["directions"]["de-en"]["cut"]
    hyps, refs = [t["cut"] for t in translations], [t["reference"] for t in translations]
    assert cut["chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score, abs=1e-3)
    assert cut["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score, abs=1e-3)
    assert rows["tuned"]["chrf_cut"] == pytest.approx(cut["chrf"], abs=1e-3)
    # Retention: the original against itself is exactly unchanged; the perturbed copy is not.
    same, moved = rows["original"]["retention"], rows["tuned"]["retention"]
    assert same["kl"] == 0.0 and same["changed"] == 0.0 and same["nll_tuned"] == pytest.approx(same["nll_original"])
    assert moved["kl"] > 1e-4 and moved["nll_original"] == pytest.approx(same["nll_original"], rel=1e-5)
    assert moved["answer_tokens"] == same["answer_tokens"] > 0
    assert (out / "quality_vs_retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cached = list((out / "retention").glob("original.*.json"))
    assert len(cached) == 1
    # Safety: the refusal rate on 5 harmful requests, the original's drop is 0.
    assert rows["original"]["safety"]["refusal_drop"] == 0.0 and rows["tuned"]["safety"]["prompts"] == 5
    answers = json.loads((out / "tuned" / "safety_answers.json").read_text(encoding="utf-8"))
    assert len(answers) == 5 and all("refusal" in a and "prompt" in a for a in answers)
    # A second run finds everything up to date and returns the same summary.
    assert evaluate(cfg)["models"] == summary["models"]


def test_test_set_without_references_is_translated_not_scored(tiny_models, tmp_path, capsys):
    from radis.evaluate.command import evaluate

    base, _ = tiny_models
    src = tmp_path / "news.txt"
    src.write_text("Guten Tag.\n\nWie geht es dir?\n", encoding="utf-8")  # one empty line: skipped
    cfg = _config(tmp_path, base, [f"base={base}"], [{"path": str(src), "src_lang": "de", "tgt_lang": "en"}],
                  retention="false")
    summary = evaluate(cfg)
    out = capsys.readouterr().out
    assert "no references" in out
    result = json.loads((tmp_path / "eval" / "base" / "results.json").read_text(encoding="utf-8"))
    d = result["directions"]["de-en"]
    assert d["n"] == 2 and d["scored"] == 0 and d["cut"] is None and "not scored" in d["note"]
    assert result["test_sets"][0]["skipped_empty"] == 1
    assert summary["models"][0]["chrf_cut"] is None and summary["models"][0]["retention"] is None
    translations = json.loads((tmp_path / "eval" / "base" / "translations.json").read_text(encoding="utf-8"))
    assert [t["source"] for t in translations] == ["Guten Tag.", "Wie geht es dir?"]
    assert all(t["reference"] is None for t in translations)


def test_empty_line_is_an_error_when_on_empty_is_error(tmp_path):
    from radis.config import SourceConfig
    from radis.evaluate.command import read_test_set

    src = tmp_path / "news.txt"
    src.write_text("Guten Tag.\n   \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"eval.test\[0\]: .*news.txt: line 2: empty"):
        read_test_set(SourceConfig(path=str(src), src_lang="de", tgt_lang="en"), "error", 0)


def test_bleu_tokenizer_follows_a_hyphenated_source_code(tiny_models, tmp_path):
    """pt-BR -> zh: direction "pt-BR-zh" cannot be split back into its languages; Chinese
    is scored with the zh tokenizer all the same."""
    from radis.evaluate.command import evaluate

    base, _ = tiny_models
    test_file = tmp_path / "t.jsonl"
    test_file.write_text(json.dumps({"translation": {"pt-BR": "Bom dia.", "zh": "早上好。"}}, ensure_ascii=False) + "\n",
                         encoding="utf-8")
    cfg = _config(tmp_path, base, [f"base={base}"], [{"path": str(test_file), "src_lang": "pt-BR", "tgt_lang": "zh"}],
                  retention="false", safety="false")
    cfg.data.language_names = {"pt-BR": "Brazilian Portuguese"}
    evaluate(cfg)
    result = json.loads((tmp_path / "eval" / "base" / "results.json").read_text(encoding="utf-8"))
    d = result["directions"]["pt-BR-zh"]
    assert d["bleu_tokenizer"] == "zh" and "tok:zh" in d["raw"]["bleu_signature"]


@pytest.mark.parametrize("setting", ["data.language_names={de: Deutsch}", "model.attn_implementation=eager"])
def test_language_names_and_attention_are_part_of_the_translation_key(setting):
    """data.language_names fill {src_lang}/{tgt_lang} of the prompt, and another attention
    kernel changes greedy answers: either way, new translations."""
    from radis.config import SourceConfig
    from radis.evaluate.command import part_keys

    cut = (False, "r", "\n\n")
    a = load_config(None, [])
    b = load_config(None, [setting])
    for cfg in (a, b):
        cfg.eval.test = [SourceConfig(path="t.jsonl")]
    assert part_keys(a, "fp", [], cut, None, None)["translation"] != part_keys(b, "fp", [], cut, None, None)["translation"]


@pytest.mark.parametrize("setting", ["model.dtype=bfloat16", "model.attn_implementation=eager"])
def test_original_answers_are_cached_per_dtype_and_attention(tiny_models, tmp_path, setting):
    """The original's cached greedy answers are not reused under another dtype or kernel."""
    from radis.evaluate import command, retention

    base, _ = tiny_models
    runs = []

    def fake_greedy(model, prompts, fmt, tokenizer, max_new_tokens):
        runs.append(len(prompts))
        n = len(prompts)
        return retention.Answers([p.id for p in prompts], [[1]] * n, [[2]] * n, ["a"] * n, ["eot"] * n)

    for extra in ([], [setting], []):
        cfg = load_config(None, [f"model.name_or_path={base}", f"eval.output_dir={tmp_path}", "eval.retention_limit=3",
                                 *extra])
        original = command._Original(cfg)
        original._greedy = fake_greedy
        original._cached_answers("retention", original.prompts, None, None, 8, None, lambda *a: None)
    assert runs == [3, 3]  # the third run, like the first, reads the first's cache
    assert len(list((tmp_path / "retention").glob("original.*.json"))) == 2


def test_a_path_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    from radis.evaluate import command

    (tmp_path / "not_a_model").mkdir()
    src = tmp_path / "t.txt"
    src.write_text("Hallo.\n", encoding="utf-8")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        f"eval:\n  models: ['{tmp_path / 'not_a_model'}']\n  retention: false\n"
        f"  test: [{{path: '{src}', src_lang: de, tgt_lang: en}}]\n  output_dir: '{tmp_path / 'eval'}'\n",
        encoding="utf-8")
    from radis.cli import main

    assert main(["evaluate", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "eval.models" in err and "not_a_model" in err and "config.json" in err
    # A config.json without weights: named as well, not a traceback.
    (tmp_path / "not_a_model" / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    assert main(["evaluate", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "eval.models:" in err and "not_a_model: cannot load" in err and "model.safetensors" in err
    with pytest.raises(ValueError, match="duplicate model name"):
        command.parse_model_specs(load_config(None, ["eval.models=[a=x, a=y]"]))


def test_plot_writes_a_png_with_a_legend_and_a_panel_per_measure(tmp_path):
    from radis.evaluate.plot import panels, plot_quality_vs_general

    rows = [
        {"model": "original", "chrf": 18.8, "retention": {"kl": 0.0, "nll_tuned": 0.89, "chrf_to_original": 100.0},
         "safety": {"refusal_rate": 0.9}, "general": {"radis_knowledge": 0.6, "radis_arithmetic": 0.2}},
        {"model": "vanilla", "chrf": 21.9, "retention": {"kl": 0.068, "nll_tuned": 0.92, "chrf_to_original": 39.3},
         "safety": {"refusal_rate": 0.5}, "general": {"radis_knowledge": 0.5, "radis_arithmetic": None}},
        # scores as close as the ones whose text labels printed over each other before
        {"model": "radis", "chrf": 22.0, "retention": {"kl": 0.113, "nll_tuned": 0.78, "chrf_to_original": 48.3},
         "safety": {"refusal_rate": 0.8}, "general": {"radis_knowledge": 0.55}},
    ]
    todo = panels(rows)
    assert [p[0] for p in todo] == ["KL(original || tuned)", "NLL of the original's answers",
                                    "new answers vs the original's", "refusal rate", "radis_knowledge", "radis_arithmetic"]
    assert [m for m, _, _ in todo[-1][3]] == ["original"]  # a missing score leaves the point out
    png = plot_quality_vs_general(rows, tmp_path / "fig" / "q.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert not list(png.parent.glob(".*tmp*"))  # the temporary file was renamed away
    assert plot_quality_vs_general([{"model": "x", "chrf": None, "retention": None}], tmp_path / "none.png") is None


def test_retention_proxies_of_two_loads_of_the_same_weights_are_zero(tiny_models):
    """Two separately loaded copies (not the same object): the computation itself gives 0."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from radis.data.prompts import ChatFormat
    from radis.evaluate import retention
    from radis.generation.decode import pad_token_id

    base, tuned_dir = tiny_models
    cfg = load_config(None, [])
    tok = AutoTokenizer.from_pretrained(base)
    fmt = ChatFormat(tok, cfg.data, "auto")
    a, b = LlamaForCausalLM.from_pretrained(base), LlamaForCausalLM.from_pretrained(base)
    tuned = LlamaForCausalLM.from_pretrained(tuned_dir)
    prompts = retention.load_retention_prompts(limit=5)
    kw = {"stop_token_ids": fmt.stop_token_ids, "pad_id": pad_token_id(tok), "max_new_tokens": 5, "batch_size": 3}
    encode = lambda text: fmt.user_prompt_ids_batch([text])[0]
    old = retention.greedy_answers(a, prompts, encode, fmt.decode_answer, **kw)
    new = retention.greedy_answers(b, prompts, encode, fmt.decode_answer, **kw)
    same = retention.retention_proxies(retention.teacher_forced_sums(a, b, old, pad_id=kw["pad_id"]),
                                       retention.compare_answers(old, new))
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["changed"] == 0.0
    assert same["nll_tuned"] == pytest.approx(same["nll_original"], rel=1e-6)
    moved = retention.retention_proxies(retention.teacher_forced_sums(a, tuned, old, pad_id=kw["pad_id"]),
                                        retention.compare_answers(old, old))
    assert moved["kl"] > 1e-4 and moved["nll_tuned"] != pytest.approx(moved["nll_original"], rel=1e-4)
    # Batched teacher forcing (right padding) equals one prompt at a time.
    one = retention.teacher_forced_sums(a, tuned, old, pad_id=kw["pad_id"], batch_size=1)
    assert one["kl"] == pytest.approx(moved["kl"] * moved["answer_tokens"], rel=1e-4)


@pytest.mark.distributed
def test_two_ranks_give_the_same_results_as_one(tiny_models, tmp_path):
    """torchrun with 2 CPU ranks (gloo): sharded translation and retention, gathered in order."""
    import os
    import subprocess
    import sys

    base, tuned = tiny_models
    test_file = tmp_path / "test.de-en.jsonl"
    test_file.write_text("".join(json.dumps({"translation": {"de": f"Satz Nummer {i}.", "en": f"Sentence number {i}."}}) + "\n"
                                 for i in range(7)), encoding="utf-8")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        f"model: {{name_or_path: '{base}'}}\n"
        f"eval:\n  models: ['original={base}', 'tuned={tuned}']\n  max_new_tokens: 5\n  retention_max_new_tokens: 5\n"
        f"  retention_limit: 5\n  safety_limit: 5\n  safety_max_new_tokens: 5\n  batch_size: 2\n"
        f"  test: [{{path: '{test_file}', src_lang: de, tgt_lang: en}}]\n",
        encoding="utf-8")
    from radis.evaluate.command import evaluate

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--module", "radis.cli", "evaluate", "--config", str(cfg_file), f"eval.output_dir={tmp_path / 'eval2'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluate(load_config(cfg_file, [f"eval.output_dir={tmp_path / 'eval1'}"]))  # one process, in this one
    runs = {n: (json.loads((tmp_path / f"eval{n}" / "summary.json").read_text(encoding="utf-8"))["models"],
                json.loads((tmp_path / f"eval{n}" / "tuned" / "translations.json").read_text(encoding="utf-8")))
            for n in (1, 2)}
    assert [t["id"] for t in runs[2][1]] == [t["id"] for t in runs[1][1]]
    assert [t["raw"] for t in runs[2][1]] == [t["raw"] for t in runs[1][1]]
    for one, two in zip(runs[1][0], runs[2][0]):
        assert two["chrf_cut"] == pytest.approx(one["chrf_cut"])
        for key in ("kl", "nll_tuned", "nll_original", "changed", "chrf_to_original"):
            assert two["retention"][key] == pytest.approx(one["retention"][key], rel=1e-4, abs=1e-6)
        assert two["safety"] == one["safety"]


@pytest.mark.distributed
def test_a_failed_export_stops_every_rank_with_its_message(tiny_models, tmp_path):
    """eval.models names a training output whose checkpoint cannot be exported: rank 0's
    `radis export` fails, and both ranks print the same message and exit 2 (the other
    rank used to raise a RuntimeError with a traceback)."""
    import os
    import subprocess
    import sys

    base, _ = tiny_models
    broken = tmp_path / "run" / "checkpoints"
    (broken / "global_step1").mkdir(parents=True)  # `latest` names a tag with no files in it
    (broken / "latest").write_text("global_step1")
    test_file = tmp_path / "test.de-en.jsonl"
    test_file.write_text(json.dumps({"translation": {"de": "Satz.", "en": "Sentence."}}) + "\n", encoding="utf-8")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model: {{name_or_path: '{base}'}}\n"
                        f"eval:\n  models: ['broken={tmp_path / 'run'}']\n  retention: false\n  safety: false\n"
                        f"  test: [{{path: '{test_file}', src_lang: de, tgt_lang: en}}]\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--module", "radis.cli", "evaluate", "--config", str(cfg_file), f"eval.output_dir={tmp_path / 'eval'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0, done.stderr[-3000:]
    message = f"radis evaluate: eval.models: broken: `radis export` of {broken} failed (exit"
    assert done.stderr.count(message) == 2, done.stderr[-5000:]
    assert "rank 0 failed" not in done.stderr, done.stderr[-5000:]


def test_beam_search_translates_and_stops_cleanly(tiny_models):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from radis.data.example import Example
    from radis.data.prompts import ChatFormat
    from radis.evaluate.translate import translate
    from radis.generation.decode import pad_token_id

    base, _ = tiny_models
    tok = AutoTokenizer.from_pretrained(base)
    fmt = ChatFormat(tok, load_config(None, []).data, "auto")
    model = LlamaForCausalLM.from_pretrained(base)
    examples = [Example(id=f"e{i}", src_lang="de", tgt_lang="en", source=s, reference="x")
                for i, s in enumerate(["Hallo.", "Der Zug ist heute sehr spät angekommen.", "Ja."])]
    greedy = translate(model, fmt, examples, pad_id=pad_token_id(tok), batch_size=2, max_new_tokens=5)
    beam = translate(model, fmt, examples, pad_id=pad_token_id(tok), batch_size=2, max_new_tokens=5, num_beams=3)
    assert [t.id for t in beam] == ["e0", "e1", "e2"]
    for t in greedy + beam:
        assert 0 <= t.new_tokens <= 5 and t.stop_reason in {"eot", "max_length"}
    # Beam search in one batch equals beam search one sentence at a time (left padding is sound).
    single = [translate(model, fmt, [ex], pad_id=pad_token_id(tok), max_new_tokens=5, num_beams=3)[0] for ex in examples]
    assert [t.raw for t in single] == [t.raw for t in beam]


def test_output_dir_expands_the_home_directory():
    """eval.output_dir "~/eval" is under the home directory, as train.output_dir is, not a
    directory named "~" in the working directory."""
    from pathlib import Path

    from radis.config import load_config
    from radis.evaluate.command import eval_output_dir

    assert eval_output_dir(load_config(None, ["eval.output_dir=~/eval"])) == Path.home() / "eval"
