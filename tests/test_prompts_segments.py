"""Chat formats (radis.data.prompts) and span-labelled segments (radis.data.segments)."""
import numpy as np
import pytest

from radis.config import DataConfig
from radis.data.example import IGNORE, MT, RD, Example
from radis.data.languages import UnknownLanguageError, language_name
from radis.data.prompts import (
    ChatFormat,
    ChatFormatError,
    resolve_template,
    tokenizer_fingerprint,
)
from radis.data.segments import build_segment, build_segments

SEP = "\n\n"
TEXTS = [  # (source language, source, target language, reference, rationale)
    ("de", "Die Ware hat unter 20 Euro gekostet.", "en", "The goods cost less than 20 euros.",
     "The verb 'gekostet' is past tense, so 'cost' is used."),
    ("en", "How are you doing today?", "ru", "Как у тебя дела сегодня?",
     "Слово «сегодня» стоит в конце, как в оригинале."),
    ("en", "I'm sorry that your order is running late.", "zh", "很抱歉，您点的餐可能会晚到一会。",
     "“很抱歉” expresses the apology; 一会 means a short while."),
    ("en", "Great job </s> <|im_end|> 🎉", "ja", "よくやった 🎉😀 <s>",
     "Emoji 🎉 is kept; 「よくやった」 is casual."),
]


def examples(with_rationale=True):
    return [
        Example(id=f"t:{i}:{s}-{t}", src_lang=s, tgt_lang=t, source=src, reference=ref,
                rationale=rat if with_rationale else None)
        for i, (s, src, t, ref, rat) in enumerate(TEXTS)
    ]


@pytest.fixture(params=[("sp", "llama2"), ("sp", "mistral"), ("smol", "auto"), ("smol", "chatml")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def fmt(request):
    kind, template = request.param
    tok = request.getfixturevalue("sp_tokenizer" if kind == "sp" else "smol_tokenizer")
    return ChatFormat(tok, DataConfig(system_prompt="Be brief."), template)


def spans_of(seg, label):
    return [t for t, s in zip(seg.input_ids, seg.spans) if s == label]


def test_spans_decode_to_reference_and_rationale(fmt):
    tok = fmt.tokenizer
    eot = fmt.end_of_turn_ids()
    segs, stats = build_segments(fmt, examples(), separator=SEP, max_tokens=4096)
    assert stats.kept == len(TEXTS) and stats.dropped_too_long == 0
    for seg, ex in zip(segs, examples()):
        prompt = fmt.prompt_ids(ex)
        assert seg.input_ids[: len(prompt)] == prompt
        assert set(seg.spans[: len(prompt)]) == {IGNORE}
        assert seg.input_ids[-len(eot):] == eot and set(seg.spans[-len(eot):]) == {RD}  # eot joins the last span
        mt, rd = spans_of(seg, MT), spans_of(seg, RD)[: -len(eot)]
        # The MT span is exactly the reference (sentencepiece: modulo its leading "▁").
        assert tok.decode(mt) == ex.reference
        assert tok.decode(rd) == SEP + ex.rationale
        assert tok.decode(mt + rd) == ex.reference + SEP + ex.rationale
        # Special-token strings inside the data stay text: no stop token inside the answer.
        assert not set(mt + rd) & set(fmt.stop_token_ids)
        assert len(seg.spans) == len(seg.input_ids)
    total = sum(len(s) for s in segs)
    assert sum(stats.tokens.values()) == total


SPACE_LED = ["  Two spaces first.", " One space.", "   three", " \tTab", "  Привет", "  很抱歉", "x  y  "]


def _sentencepiece_oracles(sp_tokenizer):
    """(name, HF tokenizer, sentencepiece processor of the same model): the tests' own
    model, and Mistral's v1 model when the mistral-common wheel is installed."""
    import importlib.util
    from pathlib import Path

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    # conftest.sp_tokenizer trains src/tokenizer.model and saves the HF tokenizer next to it
    model_file = Path(sp_tokenizer.name_or_path).parent / "src" / "tokenizer.model"
    out = [("tests", sp_tokenizer, spm.SentencePieceProcessor(model_file=str(model_file)))]
    spec = importlib.util.find_spec("mistral_common")
    if spec is not None:
        v1 = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
        if v1.is_file():
            import shutil
            import tempfile

            folder = Path(tempfile.mkdtemp())
            shutil.copy(v1, folder / "tokenizer.model")
            for legacy in (True, False):
                out.append((f"mistral-v1-legacy-{legacy}", LlamaTokenizer.from_pretrained(str(folder), legacy=legacy),
                            spm.SentencePieceProcessor(model_file=str(v1))))
    return out


def test_a_reference_that_starts_with_spaces_keeps_them(sp_tokenizer):
    """HF's Metaspace leaves out sentencepiece's dummy "▁" when a text starts with a space;
    the mistral template encodes the answer on its own, so it must spell the same pieces
    as sentencepiece (what Mistral's own tokenizer runs) and decode to the reference,
    every space kept. (The segmentation of a run of spaces may still differ: HF's BPE
    merges "▁▁" where sentencepiece splits at whitespace, ['▁▁', 'One'] against
    ['▁', '▁One']; both decode the same.)"""
    for name, tok, sp in _sentencepiece_oracles(sp_tokenizer):
        fmt = ChatFormat(tok, DataConfig(), "mistral")
        for ref in SPACE_LED + ["No space."]:
            pieces = tok.convert_ids_to_tokens(fmt.answer_ids(ref, continuation=False))
            assert "".join(pieces) == "".join(sp.encode(ref, out_type=str)), (name, ref, pieces)
            ex = Example(id="a", src_lang="de", tgt_lang="en", source="Hallo", reference=ref, rationale="Weil.")
            seg = build_segment(fmt, ex, separator=SEP, max_tokens=4096)
            assert tok.decode(spans_of(seg, MT)) == ref, (name, ref)


def test_vanilla_and_missing_rationale_end_in_mt(fmt):
    eot = fmt.end_of_turn_ids()
    for with_rationale, exs in ((False, examples()), (True, examples(with_rationale=False))):
        segs, stats = build_segments(fmt, exs, separator=SEP, max_tokens=4096, with_rationale=with_rationale)
        assert stats.without_rationale == len(exs) and stats.tokens["rd"] == 0
        for seg, ex in zip(segs, exs):
            assert RD not in seg.spans
            assert seg.input_ids[-len(eot):] == eot and set(seg.spans[-len(eot):]) == {MT}
            assert fmt.tokenizer.decode(spans_of(seg, MT)[: -len(eot)]) == ex.reference


def test_truncation_cuts_rationale_keeps_eot_and_drops_what_cannot_fit(sp_tokenizer):
    fmt = ChatFormat(sp_tokenizer, DataConfig(), "llama2")
    ex = examples()[0]
    eot = fmt.end_of_turn_ids()
    full = build_segment(fmt, ex, separator=SEP, max_tokens=4096)
    fixed = len(fmt.prompt_ids(ex)) + len(fmt.answer_ids(ex.reference, continuation=False)) + len(eot)
    n_rd = len(full) - fixed
    assert n_rd > 5

    segs, stats = build_segments(fmt, [ex], separator=SEP, max_tokens=fixed + 3)
    (cut,) = segs
    assert stats.rationale_truncated == 1 and len(cut) == fixed + 3
    assert cut.input_ids[: fixed - len(eot) + 3] == full.input_ids[: fixed - len(eot) + 3]  # first rationale tokens
    assert cut.input_ids[-len(eot):] == eot and cut.spans[-len(eot):] == [RD] * len(eot)
    assert spans_of(cut, MT) == spans_of(full, MT)  # the reference is never cut

    exact = build_segment(fmt, ex, separator=SEP, max_tokens=fixed)  # room for no rationale token
    assert RD not in exact.spans and exact.spans[-len(eot):] == [MT] * len(eot)

    segs, stats = build_segments(fmt, [ex, examples()[1]], separator=SEP, max_tokens=fixed - 1)
    assert build_segment(fmt, ex, separator=SEP, max_tokens=fixed - 1) is None
    assert stats.dropped_too_long >= 1 and stats.kept + stats.dropped_too_long == 2


def test_recorded_rationale_ids_and_teacher_topk_are_aligned(smol_tokenizer):
    fmt = ChatFormat(smol_tokenizer, DataConfig(), "auto")
    ex = examples()[0]
    recorded = fmt.answer_ids(ex.rationale, continuation=True)
    n, k = len(recorded), 3
    rng = np.random.default_rng(0)
    tids = rng.integers(0, 1000, size=(n, k)).astype(np.int32)
    tlp = np.log(rng.dirichlet(np.ones(k), size=n)).astype(np.float32)
    ex.meta = {"tokenizer_fingerprint": fmt.fingerprint, "separator": SEP, "rationale_token_ids": recorded,
               "teacher_topk_ids": tids.tolist(), "teacher_topk_logprobs": tlp.tolist()}
    seg = build_segment(fmt, ex, separator=SEP, max_tokens=4096)
    sep_ids = fmt.answer_ids(SEP, continuation=True)
    start = len(fmt.prompt_ids(ex)) + len(fmt.answer_ids(ex.reference, continuation=False)) + len(sep_ids)
    assert seg.input_ids[start:start + n] == recorded
    # rows only for the rationale tokens, row j belonging to token teacher_start + j
    assert seg.teacher_ids.shape == (n, k) and seg.teacher_logprobs.dtype == np.float32
    assert seg.teacher_start == start
    np.testing.assert_array_equal(seg.teacher_ids, tids)
    np.testing.assert_array_equal(seg.teacher_logprobs, tlp)
    assert all(seg.spans[i] == RD for i in range(start, start + n))

    # Truncated: the first rows stay, aligned.
    cut = build_segment(fmt, ex, separator=SEP, max_tokens=start + 4 + len(fmt.end_of_turn_ids()))
    assert cut.teacher_start == start
    np.testing.assert_array_equal(cut.teacher_ids, tids[:4])

    # The same prompt as recorded (radis generate writes its provenance): used as is.
    from radis.data.segments import prompt_provenance

    same = Example(**{**ex.__dict__, "meta": {**ex.meta, "prompt": prompt_provenance(fmt, SEP)}})
    assert build_segments(fmt, [same], separator=SEP, max_tokens=4096)[1].rationale_from_ids == 1
    # Another tokenizer (fingerprint differs), separator, an `ask` rationale, or a prompt
    # built from another template / system prompt / instruction (generated in another
    # context): the text is re-tokenised, no teacher, counted by why.
    provenance = prompt_provenance(fmt, SEP)
    for change, why in (({"tokenizer_fingerprint": "other"}, "another tokenizer"), ({"separator": "\n"}, "another separator"),
                        ({"strategy": "ask"}, "the ask strategy"),
                        ({"prompt": {**provenance, "chat_template": "llama2"}}, "another chat template"),
                        ({"prompt": {**provenance, "system_prompt": "Be brief."}}, "another system prompt"),
                        ({"prompt": {**provenance, "chat_template_id": "model:0123"}}, "another chat template"),
                        ({"prompt": {**provenance, "language_names": {"de": "Deutsch"}}}, "other language names"),
                        ({"prompt": {**provenance, "instruction": "Translate: {source}"}}, "another instruction")):
        other = Example(**{**ex.__dict__, "meta": {**ex.meta, **change}})
        segs, stats = build_segments(fmt, [other], separator=SEP, max_tokens=4096)
        assert segs[0].teacher_ids is None and stats.rationale_from_ids == 0
        assert stats.retokenised == {why: 1} and stats.teacher_dropped == 1
        assert smol_tokenizer.decode(spans_of(segs[0], RD)[:-2]) == SEP + ex.rationale

    bad = Example(**{**ex.__dict__, "meta": {**ex.meta, "teacher_topk_ids": tids[:-1].tolist()}})
    with pytest.raises(ValueError, match=r"t:0:de-en.*\[n_rationale_tokens"):
        build_segment(fmt, bad, separator=SEP, max_tokens=4096)


def test_the_model_template_is_identified_by_its_text(smol_tokenizer):
    """Two tokenizers that encode alike (one fingerprint) but whose own chat templates
    differ (here a default system prompt) build other prompts: the template id, which keys
    the packed cache and the recorded provenance, tells them apart."""
    import copy

    fmt = ChatFormat(smol_tokenizer, DataConfig(), "auto")
    assert fmt.template == "model" and fmt.template_id.startswith("model:")
    other_tok = copy.deepcopy(smol_tokenizer)
    other_tok.chat_template = smol_tokenizer.chat_template.replace("You are a helpful", "You are a terse")
    other = ChatFormat(other_tok, DataConfig(), "auto")
    assert other.fingerprint == fmt.fingerprint and other.template_id != fmt.template_id
    assert other.prompt_ids(examples()[0]) != fmt.prompt_ids(examples()[0])
    assert ChatFormat(smol_tokenizer, DataConfig(), "chatml").template_id == "chatml"


def test_smollm2_special_tokens_are_the_gguf_files(smol_tokenizer):
    # transformers 5.17's GGUF conversion reads eos as <|im_start|> and no pad; the
    # conversion sets what the file says (radis.models.set_special_tokens_from_gguf)
    from radis.models import gguf_special_token_ids, smollm2_gguf_path

    ids = gguf_special_token_ids(smollm2_gguf_path())
    assert ids == {"bos_token": 1, "eos_token": 2, "unk_token": 0, "pad_token": 2}
    tok = smol_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 2)
    assert tok.eos_token == "<|im_end|>"


def test_a_gguf_special_token_outside_the_vocabulary_is_a_clear_error(tmp_path, smol_tokenizer):
    from gguf import GGUFWriter

    from radis.models import ModelLoadError, set_special_tokens_from_gguf

    path = tmp_path / "bad.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_eos_token_id(10**6)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"bad.gguf: tokenizer.ggml.eos_token_id = 1000000 is outside"):
        set_special_tokens_from_gguf(smol_tokenizer, path)
    assert smol_tokenizer.eos_token_id == 2  # left as it was


def test_model_template_equals_apply_chat_template(smol_tokenizer):
    tok = smol_tokenizer
    for system in (None, "Be brief."):
        fmt = ChatFormat(tok, DataConfig(system_prompt=system), "auto")
        assert fmt.template == "model"
        ex = examples()[0]
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": fmt.user_text(ex)}]
        want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        want = list(want["input_ids"] if not isinstance(want, list) else want)
        assert fmt.prompt_ids(ex) == want
        assert tok.decode(fmt.end_of_turn_ids()) == "<|im_end|>\n"
        assert tok.decode(fmt.followup_ids("Why?")) == "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
        assert tok.convert_tokens_to_ids("<|im_end|>") in fmt.stop_token_ids
    # The built-in chatml with the model's default system prompt gives the same ids.
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    own = ChatFormat(tok, DataConfig(), "auto")
    built_in = ChatFormat(tok, DataConfig(system_prompt=default_system), "chatml")
    assert own.prompt_ids(examples()[1]) == built_in.prompt_ids(examples()[1])
    assert own.end_of_turn_ids() == built_in.end_of_turn_ids()


def test_llama2_and_mistral_layouts(sp_tokenizer):
    tok = sp_tokenizer
    ex = examples()[3]  # the source holds "</s>": it must stay text
    cfg = DataConfig(system_prompt="Be brief.")
    llama = ChatFormat(tok, cfg, "llama2")
    user = llama.user_text(ex)
    ids = llama.prompt_ids(ex)
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.decode(ids[1:]) == f"[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{user} [/INST]"
    assert tok.convert_ids_to_tokens(llama.answer_ids("The", continuation=False))[0].startswith("▁")
    assert llama.end_of_turn_ids() == [tok.eos_token_id] == llama.stop_token_ids
    assert tok.decode(llama.followup_ids("Why?")) == "<s> [INST] Why? [/INST]"

    mistral = ChatFormat(tok, cfg, "mistral")
    ids = mistral.prompt_ids(ex)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == f"[INST] Be brief.\n\n{user} [/INST]"  # system folded into the user turn
    # A continuation carries no sentencepiece "▁" of its own.
    assert tok.decode(mistral.answer_ids("goods", continuation=False) + mistral.answer_ids("\nok", continuation=True)) == "goods\nok"
    assert tok.convert_ids_to_tokens(mistral.answer_ids("x", continuation=True))[0] != "▁"
    assert mistral.decode_answer(mistral.answer_ids(" Hallo Welt ", continuation=False) + [tok.eos_token_id, 5, 6]) == "Hallo Welt"


def test_template_choice_and_config_errors(sp_tokenizer, smol_tokenizer):
    with pytest.raises(ChatFormatError, match="model has no chat template.*model.chat_template"):
        ChatFormat(sp_tokenizer, DataConfig(), "auto")
    with pytest.raises(ChatFormatError, match="<\\|im_start\\|>"):
        ChatFormat(sp_tokenizer, DataConfig(), "chatml")
    with pytest.raises(ChatFormatError, match="no chat template"):
        ChatFormat(sp_tokenizer, DataConfig(), "model")
    assert resolve_template(smol_tokenizer, "auto") == "model"
    with pytest.raises(ChatFormatError, match="must contain \\{source\\}"):
        ChatFormat(smol_tokenizer, DataConfig(instruction="Translate {src_lang}"), "auto")
    with pytest.raises(ChatFormatError, match="placeholders"):
        ChatFormat(smol_tokenizer, DataConfig(instruction="{lang}: {source}"), "auto")
    fmt = ChatFormat(smol_tokenizer, DataConfig(language_names={"ga": "Irish"}), "auto")
    assert "Irish" in fmt.user_text(Example("x", "ga", "en", "Dia duit", "Hello"))
    with pytest.raises(UnknownLanguageError, match="data.language_names"):
        fmt.user_text(Example("x", "qq", "en", "?", "Hello"))


def test_languages_and_fingerprint(sp_tokenizer, smol_tokenizer):
    assert language_name("de") == "German" and language_name("zh_Hans") == "Chinese"
    assert language_name("CS") == "Czech" and language_name("is") == "Icelandic"
    assert language_name("de", {"de": "Deutsch"}) == "Deutsch"
    assert tokenizer_fingerprint(smol_tokenizer) == tokenizer_fingerprint(smol_tokenizer)
    assert tokenizer_fingerprint(smol_tokenizer) != tokenizer_fingerprint(sp_tokenizer)


def test_fast_backend_path_equals_tokenizer_call(sp_tokenizer, smol_tokenizer):
    texts = [t for row in TEXTS for t in (row[1], row[3], row[4])] + ["a </s> <|im_end|> <s> b", ""]
    for tok, template in ((sp_tokenizer, "llama2"), (smol_tokenizer, "auto")):
        fmt = ChatFormat(tok, DataConfig(), template)
        for split in (True, False):
            want = tok(texts, add_special_tokens=False, split_special_tokens=split)["input_ids"]
            assert fmt._tokenize(texts, split_special=split) == [list(w) for w in want]


# LLaMA-2-chat's own Jinja template (as shipped with its tokenizer), to run the "model"
# path on a sentencepiece tokenizer: system folded into the first user turn, bos per turn.
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def test_model_template_on_sentencepiece(sp_tokenizer):
    import copy

    tok = copy.deepcopy(sp_tokenizer)
    tok.chat_template = LLAMA2_JINJA
    fmt = ChatFormat(tok, DataConfig(system_prompt="Be brief."), "auto")
    assert fmt.template == "model"
    ex = examples()[0]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": fmt.user_text(ex)}]
    assert tok.decode(fmt.prompt_ids(ex)) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    for other in examples():  # same ids as apply_chat_template, except that "</s>" in data stays text
        msgs[1]["content"] = fmt.user_text(other)
        want = list(tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"])
        has_special = "</s>" in other.source
        assert (fmt.prompt_ids(other) == want) != has_special
        assert (want.count(tok.eos_token_id) == 1) == has_special and tok.eos_token_id not in fmt.prompt_ids(other)
    # The answer follows "[/INST] " like the template's " " + content: one leading "▁".
    answer = fmt.answer_ids(ex.reference, continuation=False)
    assert tok.convert_ids_to_tokens(answer)[0].startswith("▁") and tok.decode(answer) == ex.reference
    assert fmt.end_of_turn_ids()[-1] == tok.eos_token_id and fmt.stop_token_ids == [tok.eos_token_id]
    assert tok.decode(fmt.followup_ids("Why?")) == "<s>[INST] Why? [/INST]"
    seg = build_segment(fmt, ex, separator=SEP, max_tokens=4096)
    assert tok.decode(spans_of(seg, MT)) == ex.reference


def test_model_template_text_before_every_answer_goes_to_the_prompt(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (  # a "thinking" chat template: an empty think block before each answer
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    fmt = ChatFormat(tok, DataConfig(), "auto")
    ex = examples()[1]
    assert tok.decode(fmt.prompt_ids(ex)).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    seg = build_segment(fmt, ex, separator=SEP, max_tokens=4096)
    assert tok.decode(spans_of(seg, MT)) == ex.reference
