"""The paper's baselines as data: Seq-KD and SDFT targets from `radis generate`, trained as the MT span.

The rules (radis.generation.strategies) are checked on hand-made generations; the
command runs the tiny random generator of test_generation (a real ChatML tokenizer)
and, for what only a real chat model shows (it translates and stops), SmolLM2.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_generation import _cfg, _examples, _lines, make_tiny_generator, tiny_llama

from radis.config import SourceConfig, load_config
from radis.data.example import MT, RD, Example
from radis.data.records import MERGED, STRATEGIES, record_to_example, training_target
from radis.generation import strategies as st
from radis.generation.decode import (
    DecodingSettings,
    Generation,
    Request,
    beam_search,
    decode,
    generate,
)


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    return make_tiny_generator(tmp_path_factory.mktemp("tiny_generator"))


def _gen(stop_reason: str = "eot") -> Generation:
    return Generation(key="k", token_ids=[1, 2, 3], stop_reason=stop_reason, prompt_tokens=5)


class _Text:
    """A prompt format whose decode_answer returns a fixed text (the rules see text only)."""

    fingerprint = "f"

    def __init__(self, text: str):
        self.text = text

    def decode_answer(self, ids) -> str:
        return self.text


# --------------------------------------------------------------------------- rules


def test_strategy_names_agree_with_the_record_format():
    assert tuple(st.STRATEGIES) == STRATEGIES
    assert {s.name for s in st.STRATEGIES.values() if s.kind == "target"} == {"seqkd", "sdft"}


@pytest.mark.parametrize(("answer", "stop", "reason"), [
    ("The house is blue.", "eot", None),
    ("The home is blue.", "eot", None),                          # a paraphrase keeps chrF high
    ("   ", "eot", "empty"),
    ("The house is blue and", "max_length", "max_length"),       # cut off: not a whole answer
    ("Here is my translation: The house is blue.", "eot", "meta_talk"),
    ("As the reference answer says, the house is blue.", "eot", "meta_talk"),
    ("Completely unrelated words about trains.", "eot", "low_chrf"),
])
def test_sdft_rejection_rules(answer, stop, reason):
    cfg = load_config(None, ["rationale.strategy=sdft", "rationale.sdft_min_chrf=20"])
    ex = Example("e", "de", "en", "Das Haus ist blau.", "The house is blue.")
    fields = st.SDFT().fields(ex, _gen(stop), _Text(answer), cfg)
    assert fields["rejected"] == reason
    if reason is None:
        assert fields["target"] == answer and fields["target_from"] == "generated"
    else:
        assert fields["target"] == ex.reference and fields["target_from"] == "reference"
    assert fields["generated"] == answer and fields["generated_tokens"] == 3


def test_meta_talk_spares_phrases_of_the_reference_itself():
    ref = "Here is the station."  # "here is" belongs to the sentence, not to a preamble
    assert st.meta_talk("Here is the station.", ref) is None
    assert st.meta_talk("Your answer: here is the station.", ref) == "your answer"
    cfg = load_config(None, ["rationale.strategy=sdft"])
    ex = Example("e", "de", "en", "Hier ist der Bahnhof.", ref)
    assert st.SDFT().fields(ex, _gen(), _Text("Here is the station."), cfg)["rejected"] is None


def test_seqkd_keeps_what_the_model_translates_unless_empty_or_cut_off():
    cfg = load_config(None, ["rationale.strategy=seqkd"])
    ex = Example("e", "de", "en", "Das Haus ist blau.", "The house is blue.")
    keep = st.SeqKD().fields(ex, _gen(), _Text("Here is the translation: The house is blue."), cfg)
    assert keep["rejected"] is None and keep["target"].startswith("Here is")  # Seq-KD trains on the model's output
    assert 0 < keep["chrf"] < 100
    assert st.SeqKD().fields(ex, _gen(), _Text(""), cfg)["rejected"] == "empty"
    assert st.SeqKD().fields(ex, _gen("max_length"), _Text("The house"), cfg)["rejected"] == "max_length"


def test_strategy_settings_are_checked():
    with pytest.raises(st.StrategyError, match=r"rationale.sdft_prompt .* must contain \{reference\}"):
        st.SDFT().check(load_config(None, ["rationale.sdft_prompt='{request} only'"]))
    with pytest.raises(st.StrategyError, match=r"rationale.sdft_prompt .*placeholders"):
        st.SDFT().check(load_config(None, ["rationale.sdft_prompt='{request} {reference} {other}'"]))
    with pytest.raises(st.StrategyError, match=r"rationale.topk=4 with rationale.strategy=seqkd"):
        st.SeqKD().check(load_config(None, ["rationale.topk=4"]))
    with pytest.raises(st.StrategyError, match="rationale.strategy: expected one of"):
        st.get_strategy("distill")
    with pytest.raises(ValueError, match="num_beams > 1 is beam search: it cannot sample"):
        DecodingSettings(num_beams=2, do_sample=True)


# --------------------------------------------------------------------------- the command


def test_seqkd_and_sdft_records_from_the_command(tiny_generator, tmp_path):
    """Records carry the target fields; prompts are the training prompt (seqkd) or the SDFT
    user turn; the random model writes only newlines, so every answer is empty and the
    reference kept, counted in the summary by reason."""
    from transformers import AutoTokenizer

    from radis.data.prompts import ChatFormat
    from radis.generation.command import (
        GenerationInputError,
        build_requests,
        generate_records,
    )

    examples = [ex for ex in _examples() if ex.id not in ("t:empty", "t:long")]
    tok = AutoTokenizer.from_pretrained(tiny_generator)
    for strategy in ("seqkd", "sdft"):
        out = tmp_path / strategy
        cfg = _cfg(tiny_generator, out, f"rationale.strategy={strategy}")
        summary = generate_records(cfg, examples=examples, progress=False)
        assert summary["strategy"] == strategy and summary["count"] == len(examples)
        assert summary["rejected"] == {"empty": len(examples)} and summary["generated_targets"] == 0
        recs = _lines(out / MERGED)
        fmt = ChatFormat(tok, cfg.data, "auto")
        requests = build_requests(fmt, examples, cfg)
        engine = generate(tiny_llama(vocab=len(tok)), requests, DecodingSettings(max_new_tokens=6),
                          stop_token_ids=fmt.stop_token_ids, pad_token_id=tok.pad_token_id)
        for rec, ex, req, gen in zip(recs, examples, requests, engine):
            assert rec["strategy"] == strategy and rec["reference"] == ex.reference
            assert rec["generated_token_ids"] == gen.token_ids and rec["generated"] == fmt.decode_answer(gen.token_ids)
            assert rec["target"] == ex.reference and rec["target_from"] == "reference" and rec["rejected"] == "empty"
            assert rec["decoding"]["min_new_tokens"] == 0 and "rationale" not in rec
            if strategy == "seqkd":
                assert req.prompt_ids == fmt.prompt_ids(ex)
            else:
                text = cfg.rationale.sdft_prompt.format(request=fmt.user_text(ex), reference=ex.reference)
                assert req.prompt_ids == fmt.user_prompt_ids_batch([text])[0]
                assert ex.reference in tok.decode(req.prompt_ids)
    with pytest.raises(GenerationInputError, match="rationale.topk=2 with rationale.strategy=sdft"):
        generate_records(_cfg(tiny_generator, tmp_path / "x", "rationale.strategy=sdft", "rationale.topk=2"),
                         examples=examples, progress=False)


def test_beam_search_records_the_best_beam_of_transformers(tiny_generator, tmp_path):
    from transformers import AutoTokenizer

    from radis.data.prompts import ChatFormat
    from radis.generation.command import generate_records

    examples = [ex for ex in _examples() if ex.id not in ("t:empty", "t:long")][:3]
    out = tmp_path / "beam"
    cfg = _cfg(tiny_generator, out, "rationale.strategy=seqkd", "rationale.num_beams=3")
    generate_records(cfg, examples=examples, progress=False)
    recs = _lines(out / MERGED)
    tok = AutoTokenizer.from_pretrained(tiny_generator)
    fmt = ChatFormat(tok, cfg.data, "auto")
    model = tiny_llama(vocab=len(tok))
    for rec, ex in zip(recs, examples):
        ids = torch.tensor([fmt.prompt_ids(ex)])
        best = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=3, do_sample=False,
                              max_new_tokens=6, eos_token_id=list(fmt.stop_token_ids), pad_token_id=tok.pad_token_id)
        assert rec["generated_token_ids"] == best[0, ids.shape[1]:].tolist()
        assert rec["decoding"]["num_beams"] == 3
    assert "beam 3" in training_target(record_to_example({**recs[0], "target_from": "generated", "rejected": None}))
    with pytest.raises(ValueError, match="one min_new_tokens per batch"):
        beam_search(model, [Request("a", [1, 2], 1), Request("b", [1, 2], 2)], DecodingSettings(num_beams=2),
                    stop_token_ids=[0], pad_token_id=0)
    greedy = [Request("a", fmt.prompt_ids(examples[0]))]
    assert decode(model, greedy, DecodingSettings(max_new_tokens=4), stop_token_ids=[0], pad_token_id=0)[0].token_ids == \
        generate(model, greedy, DecodingSettings(max_new_tokens=4), stop_token_ids=[0], pad_token_id=0)[0].token_ids


# --------------------------------------------------------------------------- training on them


def _target_record(i: int, target_from: str, **extra) -> dict:
    rec = {"id": f"s:{i}", "src_lang": "de", "tgt_lang": "en", "direction": "de-en", "source": f"Quelle {i}.",
           "reference": f"Human reference {i}.", "strategy": "seqkd", "generator": "teacher-x",
           "decoding": {"num_beams": 1, "do_sample": False}, "target_from": target_from,
           "target": f"Generated target {i}." if target_from == "generated" else f"Human reference {i}.",
           "rejected": None if target_from == "generated" else "empty", "generated": ""}
    rec.update(extra)
    return rec


def test_target_records_train_their_target_as_the_mt_span(smol_tokenizer, tmp_path, capsys):
    from radis.data.inspect import inspect_examples
    from radis.data.prompts import ChatFormat
    from radis.data.segments import build_segments
    from radis.data.sources import read_sources

    path = tmp_path / "seqkd" / MERGED
    path.parent.mkdir()
    recs = [_target_record(0, "generated"), _target_record(1, "reference"),
            _target_record(2, "generated", strategy="sdft")]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    examples, stats = read_sources([SourceConfig(path=str(path.parent))])
    assert [ex.reference for ex in examples] == [r["target"] for r in recs]
    assert examples[0].meta["human_reference"] == "Human reference 0." and stats.reference_kept == 1
    cfg = load_config(None, ["model.name_or_path=smollm2", f"data.train=[{{path: {path.parent}}}]"])
    fmt = ChatFormat(smol_tokenizer, cfg.data, "auto")
    for method in ("radis", "vanilla"):  # the baselines are data: the loss method changes nothing
        segs, _ = build_segments(fmt, examples, separator="\n\n", max_tokens=512,
                                         with_rationale=method == "radis")
        for seg, rec in zip(segs, recs):
            mt = [t for t, s in zip(seg.input_ids, seg.spans) if s == MT]
            assert RD not in seg.spans
            assert smol_tokenizer.decode(mt).strip().startswith(rec["target"])
    inspect_examples(cfg, num=3, tokenizer=smol_tokenizer)
    out = capsys.readouterr().out
    assert f"from {path.parent}; target: seqkd answer of teacher-x (greedy), replacing the human reference" in out
    assert "target: the human reference (seqkd answer of teacher-x rejected: empty)" in out
    assert "target: sdft answer of teacher-x" in out and "⟦MT Generated target 0." in out


def test_kd_preflight_names_a_source_without_teacher(tmp_path, smol_tokenizer):
    """loss.kd_weight > 0 is refused before training when no source can give a teacher."""
    from radis.config import ConfigError
    from radis.data.records import save_topk_atomic
    from radis.train.recipe import _check_teacher_sources

    pairs = tmp_path / "pairs.de-en.jsonl"
    pairs.write_text(json.dumps({"translation": {"de": "a", "en": "b"}}) + "\n", encoding="utf-8")
    seqkd = tmp_path / "seqkd"
    seqkd.mkdir()
    (seqkd / MERGED).write_text(json.dumps(_target_record(0, "generated")) + "\n", encoding="utf-8")
    rat = tmp_path / "rat"
    rat.mkdir()
    rec = {"id": "r:0", "src_lang": "de", "tgt_lang": "en", "source": "a", "reference": "b", "rationale": "c",
           "strategy": "continue"}
    (rat / MERGED).write_text(json.dumps(rec) + "\n", encoding="utf-8")

    def cfg(*paths):
        return load_config(None, ["loss.kd_weight=0.5", "data.train=[" + ", ".join(f"{{path: {p}}}" for p in paths) + "]"])

    with pytest.raises(ConfigError, match=r"data.train\[0\]: .*pairs.de-en.jsonl holds plain pairs"):
        _check_teacher_sources(cfg(pairs))
    with pytest.raises(ConfigError, match=r"data.train\[0\]: .*seqkd holds seqkd records"):
        _check_teacher_sources(cfg(seqkd))
    with pytest.raises(ConfigError, match=r"data.train\[1\]: .*rat has no top-k file .*rationale.topk"):
        _check_teacher_sources(cfg(pairs, rat))
    import numpy as np

    save_topk_atomic(rat / "rationales.topk.safetensors", {"r:0": (np.zeros((1, 2), np.int32), np.zeros((1, 2), np.float32))})
    _check_teacher_sources(cfg(pairs, rat))  # one source with a teacher is enough


# --------------------------------------------------------------------------- the real model


def test_real_smollm2_seqkd_and_sdft(shared_data, tmp_path, one_thread):
    """SmolLM2 translates and stops: Seq-KD targets are its own translations (batched
    decoding equals one at a time), SDFT answers are judged by the documented rules."""
    from radis.data.prompts import ChatFormat
    from radis.data.sources import read_source
    from radis.generation.command import generate_records
    from radis.models import load_model, load_tokenizer

    pairs = read_source(SourceConfig(path=str(shared_data / "alma" / "deen" / "valid.de-en.json"), limit=12))
    examples = sorted(pairs, key=lambda ex: len(ex.source))[:3]
    model = load_model("smollm2").eval()
    tok = load_tokenizer("smollm2")
    for strategy in ("seqkd", "sdft"):
        out = tmp_path / strategy
        cfg = load_config(None, ["model.name_or_path=smollm2", f"rationale.output_dir={out}",
                                 f"rationale.strategy={strategy}", "rationale.max_new_tokens=40",
                                 "rationale.batch_size=3", "rationale.prefill_batch_size=1"])
        summary = generate_records(cfg, examples=examples, model=model, progress=False)
        recs = _lines(out / MERGED)
        assert summary["count"] == 3 and summary["generated_targets"] + summary["reference_kept"] == 3
        assert sum(summary["rejected"].values()) == summary["reference_kept"]
        fmt = ChatFormat(tok, cfg.data, "auto")
        for rec, ex in zip(recs, examples):
            assert rec["generator"] == "smollm2" and rec["generated"].strip()
            if rec["target_from"] == "generated":
                assert rec["target"] == rec["generated"] and rec["rejected"] is None
            else:
                assert rec["target"] == ex.reference and rec["rejected"] in ("max_length", "meta_talk", "low_chrf")
            if strategy == "seqkd":
                alone = generate(model, [Request(ex.id, fmt.prompt_ids(ex))], DecodingSettings(max_new_tokens=40),
                                 stop_token_ids=fmt.stop_token_ids, pad_token_id=tok.pad_token_id)[0]
                assert alone.token_ids == rec["generated_token_ids"]
        if strategy == "seqkd":
            assert summary["generated_targets"] >= 1  # a real chat model does translate
