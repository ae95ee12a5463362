"""Rationale generation: the batched decoding engine, the crash-safe store, the command.

The engine runs a tiny random Llama built in-test; the command runs it behind the
SmolLM2 tokenizer (a real chat template) so that only the weights are fake; one test
runs the real SmolLM2-135M-Instruct on three pairs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from radis.config import load_config
from radis.data.records import MERGED, MERGED_TOPK, TopkReader, load_topk
from radis.generation.decode import (
    DecodingSettings,
    Request,
    decode,
    example_seed,
    generate,
    length_sorted_batches,
)
from radis.generation.store import GenerationStore, OutputMismatchError

VOCAB = 96


def tiny_llama(vocab: int = VOCAB, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def make_tiny_generator(out_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama with the real SmolLM2 tokenizer (ChatML template), saved
    as an HF directory: a generator that loads like a real one but runs in milliseconds."""
    from transformers import AutoTokenizer

    from radis.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    model = tiny_llama(vocab=len(tok), seed=seed)
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def random_requests(n: int, seed: int, min_new: int = 0) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 23, (1,), generator=g))
        out.append(Request(f"ex{i}", torch.randint(3, VOCAB, (length,), generator=g).tolist(), min_new_tokens=min_new))
    return out


STOPS = list(range(80, VOCAB))  # 16 of 96 ids end a row: a random model stops now and then


# --------------------------------------------------------------------------- engine


def test_batched_greedy_equals_one_at_a_time_with_left_padding():
    model = tiny_llama()
    reqs = random_requests(7, seed=1)
    for i, r in enumerate(reqs):
        r.min_new_tokens = 2 * (i % 2)  # suppression on some rows only
    settings = DecodingSettings(max_new_tokens=10, topk=5)
    batched = generate(model, reqs, settings, stop_token_ids=STOPS, pad_token_id=0)
    reasons = set()
    for req, got in zip(reqs, batched):
        alone = generate(model, [req], settings, stop_token_ids=STOPS, pad_token_id=0)[0]
        assert got.key == req.key and got.prompt_tokens == len(req.prompt_ids)
        assert got.token_ids == alone.token_ids, req.key
        assert got.stop_reason == alone.stop_reason
        np.testing.assert_array_equal(got.topk_ids, alone.topk_ids)
        np.testing.assert_allclose(got.topk_logprobs, alone.topk_logprobs, atol=1e-5)
        assert got.topk_ids.shape == got.topk_logprobs.shape == (len(got.token_ids), 5)
        assert got.topk_ids.dtype == np.int32 and got.topk_logprobs.dtype == np.float32
        reasons.add(got.stop_reason)
    assert reasons == {"eot", "max_length"}, "the fixture should exercise both stop reasons"


def test_without_a_pad_id_the_padding_is_a_stop_id_and_changes_nothing():
    """A tokenizer without a pad token gives None: left padding is masked out, so the
    results are those of any explicit pad id, for the cached engine and for beam search."""
    model = tiny_llama()
    reqs = random_requests(5, seed=3)
    for settings in (DecodingSettings(max_new_tokens=6), DecodingSettings(max_new_tokens=6, num_beams=2)):
        explicit = decode(model, reqs, settings, stop_token_ids=STOPS, pad_token_id=7)
        implicit = decode(model, reqs, settings, stop_token_ids=STOPS, pad_token_id=None)
        assert [g.token_ids for g in implicit] == [g.token_ids for g in explicit]


def test_topk_rows_are_log_softmax_of_teacher_forced_logits():
    model = tiny_llama()
    req = Request("a", [5, 9, 17, 33], min_new_tokens=3)
    got = generate(model, [req], DecodingSettings(max_new_tokens=8, topk=4), stop_token_ids=STOPS, pad_token_id=0)[0]
    full = torch.tensor([req.prompt_ids + got.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(full).logits[0].float(), dim=-1)
    for j in range(len(got.token_ids)):
        # Row j is the distribution that chose generated token j (raw: no suppression).
        ref_lp, ref_ix = logp[len(req.prompt_ids) - 1 + j].topk(4)
        np.testing.assert_array_equal(got.topk_ids[j], ref_ix.numpy())
        np.testing.assert_allclose(got.topk_logprobs[j], ref_lp.numpy(), atol=1e-5)


def test_stop_tokens_suppressed_for_min_new_tokens():
    model = tiny_llama()
    only = 7
    stops = [t for t in range(VOCAB) if t != only]  # every other token ends the row
    free = generate(model, [Request("x", [3, 4, 5])], DecodingSettings(max_new_tokens=20), stop_token_ids=stops, pad_token_id=0)[0]
    assert free.token_ids == [] and free.stop_reason == "eot"  # unsuppressed, it stops at once
    req = Request("x", [3, 4, 5], min_new_tokens=5)
    got = generate(model, [req], DecodingSettings(max_new_tokens=20, topk=2), stop_token_ids=stops, pad_token_id=0)[0]
    assert len(got.token_ids) >= 5 and set(got.token_ids) == {only}
    # The top-k record is the raw distribution: it still shows the suppressed ids.
    assert set(got.topk_ids[:5].ravel().tolist()) - {only}
    sampled = generate(model, [req], DecodingSettings(max_new_tokens=20, do_sample=True, seed=3), stop_token_ids=stops, pad_token_id=0)[0]
    assert len(sampled.token_ids) >= 5 and set(sampled.token_ids) == {only}


def test_max_length_and_empty_prompt():
    model = tiny_llama()
    got = generate(model, [Request("m", [4, 5])], DecodingSettings(max_new_tokens=3), stop_token_ids=[], pad_token_id=0)[0]
    assert len(got.token_ids) == 3 and got.stop_reason == "max_length" and got.topk_ids is None
    with pytest.raises(ValueError, match="'e': empty prompt"):
        generate(model, [Request("e", [])], DecodingSettings(), stop_token_ids=[], pad_token_id=0)


def test_sampling_is_reproducible_per_example_whatever_the_batch():
    model = tiny_llama()
    reqs = random_requests(5, seed=2)
    s = DecodingSettings(max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.9, seed=11)
    batched = generate(model, reqs, s, stop_token_ids=[], pad_token_id=0)
    reversed_batch = generate(model, reqs[::-1], s, stop_token_ids=[], pad_token_id=0)[::-1]
    for a, b in zip(batched, reversed_batch):
        assert a.token_ids == b.token_ids
    other_seed = generate(model, reqs, DecodingSettings(max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.9, seed=12),
                          stop_token_ids=[], pad_token_id=0)
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in batched]
    # A nucleus this small keeps only the top token: sampling becomes greedy.
    greedy = generate(model, reqs, DecodingSettings(max_new_tokens=12), stop_token_ids=[], pad_token_id=0)
    narrow = generate(model, reqs, DecodingSettings(max_new_tokens=12, do_sample=True, top_p=1e-6, seed=5), stop_token_ids=[], pad_token_id=0)
    assert [g.token_ids for g in narrow] == [g.token_ids for g in greedy]
    assert example_seed(1, "a") != example_seed(1, "b") and example_seed(1, "a") == example_seed(1, "a")


@pytest.mark.parametrize("prefill", [1, 3])
def test_merged_prefill_caches_decode_like_one_at_a_time(prefill):
    """Prompts prefilled in micro-batches of different widths, their caches merged into
    one decode batch: greedy tokens, stop reasons and top-k rows equal one at a time."""
    model = tiny_llama()
    reqs = random_requests(9, seed=4)
    for i, r in enumerate(reqs):
        r.min_new_tokens = 3 * (i % 3 == 0)
    widths = {len(r.prompt_ids) for r in reqs}
    assert len(widths) > 3, "the fixture should give micro-batches of different widths"
    settings = DecodingSettings(max_new_tokens=10, topk=3)
    merged = generate(model, reqs, settings, stop_token_ids=STOPS, pad_token_id=0, prefill_batch_size=prefill)
    reasons = set()
    for req, got in zip(reqs, merged):
        alone = generate(model, [req], settings, stop_token_ids=STOPS, pad_token_id=0)[0]
        assert got.key == req.key and got.token_ids == alone.token_ids and got.stop_reason == alone.stop_reason
        np.testing.assert_array_equal(got.topk_ids, alone.topk_ids)
        np.testing.assert_allclose(got.topk_logprobs, alone.topk_logprobs, atol=1e-5)
        assert got.topk_ids.shape == (len(got.token_ids), 3)
        reasons.add(got.stop_reason)
    assert reasons == {"eot", "max_length"}, "rows should finish at different steps"


def test_shared_prefix_prefill_decodes_like_one_at_a_time():
    """Prompts that share a system prompt: the prefix runs once (for all micro-batches when
    every prompt has it, else per micro-batch), its cache repeated for the rows; outputs
    equal one at a time (also a prompt that is the prefix plus one token, micro-batches
    whose prefix is too short to share, and one whose prompts share a longer prefix)."""
    from radis.generation.decode import MIN_SHARED_PREFIX, _shared_prefix_length

    model = tiny_llama()
    head = list(range(40, 40 + MIN_SHARED_PREFIX + 3))
    reqs = [Request(r.key, head + r.prompt_ids, min_new_tokens=2) for r in random_requests(6, seed=7)]
    reqs.append(Request("short", head[:-1] + [5]))  # diverges inside the head
    reqs.append(Request("tiny", head[:2]))  # too short to share anything
    assert _shared_prefix_length([r.prompt_ids for r in reqs[:6]]) >= MIN_SHARED_PREFIX
    settings = DecodingSettings(max_new_tokens=8, topk=3)
    for prefill in (3, None):
        merged = generate(model, reqs, settings, stop_token_ids=STOPS, pad_token_id=0, prefill_batch_size=prefill)
        for req, got in zip(reqs, merged):
            alone = generate(model, [req], settings, stop_token_ids=STOPS, pad_token_id=0)[0]
            assert got.token_ids == alone.token_ids and got.stop_reason == alone.stop_reason, (prefill, req.key)
            np.testing.assert_allclose(got.topk_logprobs, alone.topk_logprobs, atol=1e-5)
    # Every prompt shares the head: it runs once for all micro-batches; two long prompts
    # share a longer run, which their micro-batch computes instead.
    longer = head + list(range(60, 70))
    common = [Request(r.key, head + r.prompt_ids, min_new_tokens=2) for r in random_requests(5, seed=8)]
    common += [Request("long-a", longer + [3] * 30 + [4]), Request("long-b", longer + [3] * 30 + [5])]
    for prefill in (2, 3):
        merged = generate(model, common, settings, stop_token_ids=STOPS, pad_token_id=0, prefill_batch_size=prefill)
        for req, got in zip(common, merged):
            alone = generate(model, [req], settings, stop_token_ids=STOPS, pad_token_id=0)[0]
            assert got.token_ids == alone.token_ids and got.stop_reason == alone.stop_reason, (prefill, req.key)
            np.testing.assert_allclose(got.topk_logprobs, alone.topk_logprobs, atol=1e-5)
    assert _shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps a token of its own
    assert _shared_prefix_length([[1, 2], [3, 2]]) == 0


def test_merged_prefill_sampling_is_reproducible_per_example():
    model = tiny_llama()
    reqs = random_requests(7, seed=5)
    s = DecodingSettings(max_new_tokens=12, do_sample=True, temperature=1.2, top_p=0.95, seed=2, topk=2)
    whole = generate(model, reqs, s, stop_token_ids=STOPS, pad_token_id=0)
    merged = generate(model, reqs[::-1], s, stop_token_ids=STOPS, pad_token_id=0, prefill_batch_size=2)[::-1]
    for a, b in zip(whole, merged):
        assert a.key == b.key and a.token_ids == b.token_ids and a.stop_reason == b.stop_reason
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    assert any(len(g.token_ids) > 2 for g in whole)
    with pytest.raises(ValueError, match="prefill_batch_size"):
        generate(model, reqs, s, stop_token_ids=STOPS, pad_token_id=0, prefill_batch_size=0)


def test_sliding_window_cache_is_not_merged():
    """A sliding-window layer keeps more than keys and values: merging is refused with
    a clear error, one micro-batch keeps the model's own cache."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4,
    )).eval()
    reqs = random_requests(3, seed=6)
    s = DecodingSettings(max_new_tokens=4)
    with pytest.raises(ValueError, match="prefill batch size"):
        generate(model, reqs, s, stop_token_ids=[], pad_token_id=0, prefill_batch_size=1)
    got = generate(model, reqs, s, stop_token_ids=[], pad_token_id=0, prefill_batch_size=3)
    assert [len(g.token_ids) for g in got] == [4, 4, 4]


def test_length_sorted_batches():
    reqs = random_requests(10, seed=3)
    batches = length_sorted_batches(reqs, 4)
    assert [len(b) for b in batches] == [4, 4, 2]
    lengths = [len(r.prompt_ids) for b in batches for r in b]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(r.key for b in batches for r in b) == sorted(r.key for r in reqs)
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches(reqs, 0)


def test_bad_decoding_settings():
    with pytest.raises(ValueError, match="top_p"):
        DecodingSettings(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        DecodingSettings(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodingSettings(max_new_tokens=0)


# --------------------------------------------------------------------------- store


def _rec(key: str) -> dict:
    return {"id": key, "rationale": f"because {key}", "rationale_tokens": 2, "stop_reason": "eot"}


def _topk(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 100, (n, 3)).astype(np.int32), rng.standard_normal((n, 3)).astype(np.float32)


def test_store_commit_resume_merge_and_topk(tmp_path):
    desc = {"generator": "g", "decoding": {"max_new_tokens": 4}}
    store = GenerationStore(tmp_path, rank=0)
    store.prepare(desc, overwrite=False)
    tk = {k: _topk(i + 1, i) for i, k in enumerate(["c", "a", "b", "z"])}
    store.commit([_rec("c"), _rec("a")], {"c": tk["c"], "a": tk["a"]})
    other = GenerationStore(tmp_path, rank=1)
    other.verify(desc)
    other.commit([_rec("b"), _rec("z")], {"b": tk["b"], "z": tk["z"]})  # "z" is not in the example set
    # A killed run leaves a temp file and an orphaned top-k file (its .jsonl never came).
    (tmp_path / "parts" / ".tmp-abc").write_text('{"id": "half')
    (tmp_path / "parts" / "r00000-000001.topk.safetensors").write_bytes(b"junk")
    assert store.completed_ids() == {"a", "b", "c", "z"}

    restarted = GenerationStore(tmp_path, rank=0)
    restarted.prepare(desc, overwrite=False)  # same config: resume, clean the leftovers
    names = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert names == ["r00000-000000.jsonl", "r00000-000000.topk.safetensors", "r00001-000000.jsonl", "r00001-000000.topk.safetensors"]
    restarted.commit([_rec("d")], {"d": _topk(2, 9)})
    assert (tmp_path / "parts" / "r00000-000001.jsonl").exists()  # numbering continues

    stats = restarted.merge(["a", "b", "c", "d", "e"], with_topk=True)
    assert (stats.written, stats.stale, stats.duplicates, stats.missing) == (4, 1, 0, ["e"])
    lines = (tmp_path / MERGED).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c", "d"]
    merged = load_topk(tmp_path / MERGED_TOPK)
    assert sorted(merged) == ["a", "b", "c", "d"]
    for key in "abc":
        np.testing.assert_array_equal(merged[key][0], tk[key][0])
        np.testing.assert_array_equal(merged[key][1], tk[key][1])
    reader = TopkReader(tmp_path / MERGED_TOPK)
    assert "a" in reader and "z" not in reader
    np.testing.assert_array_equal(reader.get("b")[1], tk["b"][1])
    with pytest.raises(KeyError, match="'z'"):
        reader.get("z")


def test_store_refuses_other_config_unless_overwrite(tmp_path):
    store = GenerationStore(tmp_path)
    store.prepare({"decoding": {"max_new_tokens": 4}, "strategy": "continue"}, overwrite=False)
    store.commit([_rec("a")])
    new = {"decoding": {"max_new_tokens": 8}, "strategy": "continue"}
    with pytest.raises(OutputMismatchError, match=r"decoding\.max_new_tokens: 4 -> 8.*rationale\.overwrite=true"):
        GenerationStore(tmp_path).prepare(new, overwrite=False)
    with pytest.raises(OutputMismatchError, match="rank 1"):
        GenerationStore(tmp_path, rank=1).verify(new)
    GenerationStore(tmp_path).prepare(new, overwrite=True)
    assert GenerationStore(tmp_path).completed_ids() == set()
    GenerationStore(tmp_path, rank=1).verify(new)
    # Outputs without a manifest are not ours to extend either.
    (tmp_path / "manifest.json").unlink()
    GenerationStore(tmp_path).commit([_rec("b")])
    with pytest.raises(OutputMismatchError, match="has no manifest.json"):
        GenerationStore(tmp_path).prepare(new, overwrite=False)


def test_store_reports_a_damaged_part(tmp_path):
    store = GenerationStore(tmp_path)
    store.prepare({}, overwrite=False)
    path = store.commit([_rec("a"), _rec("b")])
    path.write_text(path.read_text()[:-5])
    with pytest.raises(ValueError, match=r"r00000-000000\.jsonl:2: broken record"):
        store.completed_ids()


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    return make_tiny_generator(tmp_path_factory.mktemp("tiny_generator"))


def _examples() -> list:
    from radis.data.example import Example

    pairs = [
        ("Das Haus ist blau.", "The house is blue."),
        ("Ich habe Hunger.", "I am hungry."),
        ("Wir fahren morgen nach Berlin, wenn das Wetter gut ist.", "We are going to Berlin tomorrow if the weather is good."),
        ("Danke!", "Thanks!"),
        ("Der Zug hat Verspätung.", "The train is late."),
        ("Sie liest ein Buch über die Geschichte Europas.", "She is reading a book about the history of Europe."),
    ]
    out = [Example(f"t:{i}", "de", "en", src, ref, meta={"line": i}) for i, (src, ref) in enumerate(pairs)]
    out.insert(2, Example("t:empty", "de", "en", "Hallo", "  "))
    out.insert(5, Example("t:long", "de", "en", "sehr " * 60, "very " * 60))
    return out


def _cfg(gen: Path, out: Path, *extra: str):
    return load_config(None, [
        f"model.name_or_path={gen}", "model.dtype=float32", f"rationale.output_dir={out}", "rationale.max_new_tokens=6",
        "rationale.min_rationale_tokens=3", "rationale.batch_size=3", "rationale.max_source_tokens=40", *extra,
    ])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_command_records_topk_skips_resume_and_mismatch(tiny_generator, tmp_path):
    from transformers import AutoTokenizer

    from radis.data.prompts import ChatFormat
    from radis.generation.command import build_requests, generate_records
    from radis.generation.store import SKIPPED, SUMMARY

    out = tmp_path / "out"
    cfg = _cfg(tiny_generator, out, "rationale.topk=4")
    examples = _examples()
    summary = generate_records(cfg, examples=examples, progress=False)
    good = [ex for ex in examples if ex.id not in ("t:empty", "t:long")]
    recs = _lines(out / MERGED)
    assert [r["id"] for r in recs] == [ex.id for ex in good]  # example order, not length order
    assert summary["count"] == 6 and summary["skipped"] == {"empty_reference": 1, "source_too_long": 1}
    assert summary["this_run"]["generated"] == 6 and summary["missing"] == 0
    assert json.loads((out / SUMMARY).read_text())["count"] == 6
    assert {(s["id"], s["reason"]) for s in _lines(out / SKIPPED)} == {("t:empty", "empty_reference"), ("t:long", "source_too_long")}

    tok = AutoTokenizer.from_pretrained(tiny_generator)
    fmt = ChatFormat(tok, cfg.data, "auto")
    requests = {r.key: r for r in build_requests(fmt, good, cfg)}
    model = tiny_llama(vocab=len(tok))  # the same seed-0 weights as the saved generator
    engine = generate(model, list(requests.values()), DecodingSettings(max_new_tokens=6, topk=4),
                      stop_token_ids=fmt.stop_token_ids, pad_token_id=tok.pad_token_id)
    topk = load_topk(out / MERGED_TOPK)
    for rec, ex, gen in zip(recs, good, engine):
        assert (rec["source"], rec["reference"], rec["direction"], rec["meta"]) == (ex.source, ex.reference, "de-en", ex.meta)
        assert rec["rationale_token_ids"] == gen.token_ids and rec["rationale_tokens"] == len(gen.token_ids)
        assert rec["rationale"] == fmt.decode_answer(gen.token_ids)
        assert rec["stop_reason"] == gen.stop_reason and rec["prompt_tokens"] == len(requests[ex.id].prompt_ids)
        assert rec["tokenizer_fingerprint"] == fmt.fingerprint and rec["separator"] == "\n\n"
        assert rec["generator"] == str(tiny_generator) and rec["decoding"]["max_new_tokens"] == 6
        ids, lps = topk[ex.id]
        assert ids.shape == lps.shape == (len(gen.token_ids), 4)
        np.testing.assert_allclose(lps, gen.topk_logprobs, atol=1e-5)
    # The prompt of "continue" ends with the reference and the separator.
    tail = fmt.answer_ids(good[0].reference, continuation=False) + fmt.answer_ids("\n\n", continuation=True)
    assert requests[good[0].id].prompt_ids[-len(tail):] == tail

    before = (out / MERGED).read_bytes()
    again = generate_records(cfg, examples=examples, progress=False)
    assert again["this_run"]["generated"] == 0 and (out / MERGED).read_bytes() == before

    with pytest.raises(OutputMismatchError, match=r"max_new_tokens: 6 -> 5"):
        generate_records(_cfg(tiny_generator, out, "rationale.topk=4", "rationale.max_new_tokens=5"), examples=examples, progress=False)
    redo = generate_records(_cfg(tiny_generator, out, "rationale.max_new_tokens=5", "rationale.overwrite=true"),
                               examples=examples, progress=False)
    assert redo["this_run"]["generated"] == 6 and redo["max_rationale_tokens"] <= 5
    assert not (out / MERGED_TOPK).exists()


def test_other_language_names_are_another_generation_config(tiny_generator, tmp_path):
    """data.language_names fill {src_lang}/{tgt_lang} of every prompt: an output made with
    other names is refused, naming the difference, not resumed into."""
    from radis.generation.command import generate_records

    out = tmp_path / "out"
    examples = _examples()[:2]
    generate_records(_cfg(tiny_generator, out), examples=examples, progress=False)
    with pytest.raises(OutputMismatchError, match=r"language_names: None -> \{'de': 'Deutsch'\}.*rationale\.overwrite=true"):
        generate_records(_cfg(tiny_generator, out, "data.language_names={de: Deutsch}"), examples=examples,
                         progress=False)


def test_command_ask_strategy_and_bad_input(tiny_generator, tmp_path, capsys):
    from transformers import AutoTokenizer

    from radis.data.prompts import ChatFormat, ChatFormatError
    from radis.generation.command import (
        GenerationInputError,
        build_requests,
        generate_records,
    )

    cfg = _cfg(tiny_generator, tmp_path / "ask", "rationale.strategy=ask", "rationale.ask_prompt=Why?")
    examples = _examples()[:2]
    summary = generate_records(cfg, examples=examples, progress=False)
    assert summary["count"] == 2 and {r["strategy"] for r in _lines(tmp_path / "ask" / MERGED)} == {"ask"}
    fmt = ChatFormat(AutoTokenizer.from_pretrained(tiny_generator), cfg.data, "auto")
    req = build_requests(fmt, examples[:1], cfg)[0]
    tail = fmt.end_of_turn_ids() + fmt.followup_ids("Why?")
    assert req.prompt_ids[-len(tail):] == tail and req.min_new_tokens == 0

    # Through the console command: a clear message and exit status 2, no traceback.
    from radis.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"translation": {"de": "Hallo Welt.", "en": "Hello world."}}) + "\n", encoding="utf-8")
    yaml_path = tmp_path / "ask.yaml"
    yaml_path.write_text(json.dumps({
        "model": {"name_or_path": str(tiny_generator)},
        "data": {"train": [{"path": str(data), "src_lang": "de", "tgt_lang": "en"}]},
        "rationale": {"output_dir": str(tmp_path / "ask"), "strategy": "continue"},
    }), encoding="utf-8")
    assert main(["rationales", "--config", str(yaml_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "radis rationales: error: rationale.output_dir" in err and "strategy: 'ask' -> 'continue'" in err

    strict = _cfg(tiny_generator, tmp_path / "strict", "data.on_empty=error")
    with pytest.raises(GenerationInputError, match=r"'t:empty': empty reference"):
        generate_records(strict, examples=_examples(), progress=False)
    from radis.config import ConfigError

    with pytest.raises(ConfigError, match=r"rationale.prefill_batch_size: expected >= 1, got 0"):
        _cfg(tiny_generator, tmp_path / "np", "rationale.prefill_batch_size=0")
    no_prefill = _cfg(tiny_generator, tmp_path / "np")
    no_prefill.rationale.prefill_batch_size = 0  # set by API use, past load_config's checks
    with pytest.raises(GenerationInputError, match=r"rationale.prefill_batch_size must be >= 1, got 0"):
        generate_records(no_prefill, examples=_examples(), progress=False)

    # A tokenizer without a chat template and no built-in fallback for it.
    bare = tmp_path / "bare"
    tok = AutoTokenizer.from_pretrained(tiny_generator)
    tok.chat_template = None
    tok.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    tiny_llama(vocab=len(tok)).save_pretrained(bare)
    # "auto" would fall back to the built-in chatml (SmolLM2's vocabulary has its
    # tokens); "model" insists on the tokenizer's own template, which is gone.
    no_template = _cfg(bare, tmp_path / "bare_out", "model.chat_template=model")
    with pytest.raises(ChatFormatError, match="no chat template"):
        generate_records(no_template, examples=examples, progress=False)


def test_real_smollm2_on_three_pairs(shared_data, tmp_path, one_thread):
    """SmolLM2-135M-Instruct (the embedded real chat model) on real de-en pairs."""
    from radis.config import SourceConfig
    from radis.data.prompts import ChatFormat
    from radis.data.sources import read_source
    from radis.generation.command import build_requests, generate_records
    from radis.models import load_model, load_tokenizer

    pairs = read_source(SourceConfig(path=str(shared_data / "alma" / "deen" / "valid.de-en.json"), limit=12))
    by_length = {len(ex.source) + len(ex.reference): ex for ex in pairs}
    examples = [by_length[n] for n in sorted(by_length)[:3]]  # the 3 shortest: cheap on CPU
    cfg = load_config(None, [
        "model.name_or_path=smollm2", f"rationale.output_dir={tmp_path}", "rationale.max_new_tokens=6",
        "rationale.min_rationale_tokens=3", "rationale.batch_size=3", "rationale.topk=2",
        "rationale.prefill_batch_size=1",  # three prefills merged into one decode batch
    ])
    model = load_model("smollm2").eval()
    summary = generate_records(cfg, examples=examples, model=model, progress=False)
    assert summary["count"] == 3 and summary["share_empty"] == 0.0
    recs = _lines(tmp_path / MERGED)
    for rec in recs:
        assert 3 <= rec["rationale_tokens"] <= 6 and rec["rationale"].strip()
        assert rec["stop_reason"] in ("eot", "max_length") and rec["generator"] == "smollm2"

    # Left padding and merged caches with the real model: the batch of three equals
    # one at a time.
    tok = load_tokenizer("smollm2")
    fmt = ChatFormat(tok, cfg.data, "auto")
    requests = build_requests(fmt, examples, cfg)
    assert len({len(r.prompt_ids) for r in requests}) == 3  # really different lengths
    settings = DecodingSettings(max_new_tokens=6)
    # All three prompts start with the same system prompt: prefilled once, shared.
    shared = generate(model, requests, settings, stop_token_ids=fmt.stop_token_ids, pad_token_id=tok.pad_token_id)
    for req, rec, both in zip(requests, recs, shared):
        alone = generate(model, [req], settings, stop_token_ids=fmt.stop_token_ids, pad_token_id=tok.pad_token_id)[0]
        assert alone.token_ids == rec["rationale_token_ids"] and alone.stop_reason == rec["stop_reason"]
        assert both.token_ids == alone.token_ids and both.stop_reason == alone.stop_reason
