"""Reading parallel data and rationale records (radis.data.sources)."""
import json

import numpy as np
import pytest

from radis.config import SourceConfig
from radis.data.records import example_teacher
from radis.data.sources import DataError, detect_format, read_source, read_sources

PAIRS = [("Die Ware hat 20 Euro gekostet.", "The goods cost 20 euros."),
         ("Guten Morgen\u2028zusammen", "Good morning\u2028everyone"),  # U+2028 must not split a line
         ("Ich hoffe, Sie finden eine Lösung.", "I hope you find a solution.")]


def records(pairs=PAIRS, a="de", b="en"):
    return [{"translation": {a: s, b: t}} for s, t in pairs]


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def test_json_array_and_jsonl_sniffed_with_languages_from_name(tmp_path):
    arr = tmp_path / "a" / "test.de-en.json"
    arr.parent.mkdir()
    arr.write_text(json.dumps(records(), ensure_ascii=False, indent=1), encoding="utf-8")
    lines = write_jsonl(tmp_path / "train.de-en.json", records())  # JSON Lines in a .json file
    for path in (arr, lines):
        exs = read_source(SourceConfig(path=str(path)))
        assert [(e.source, e.reference) for e in exs] == PAIRS
        assert {e.direction for e in exs} == {"de-en"}
    assert read_source(SourceConfig(path=str(arr)))[2].id == "a/test.de-en:2:de-en"
    assert detect_format(SourceConfig(path=str(lines))) == "json"


def test_directions_limit_ids_and_stats(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", records())
    cfg = SourceConfig(path=str(path), directions=["de-en", "en-de"], limit=2)
    exs, stats = read_sources([cfg])
    assert [e.id for e in exs] == [f"{tmp_path.name}/pairs:{i}:{d}" for i in (0, 1) for d in ("de-en", "en-de")]
    assert (exs[1].source, exs[1].reference) == (PAIRS[0][1], PAIRS[0][0])
    assert stats.pairs == 2 and stats.examples == 4 and dict(stats.per_direction) == {"de-en": 2, "en-de": 2}
    with pytest.raises(DataError, match="direction 'de-fr'"):
        read_source(SourceConfig(path=str(path), directions=["de-fr"]))
    # No language order anywhere (no config, no "xx-yy" in the name, no directions): an error.
    with pytest.raises(DataError, match="cannot tell source from target.*src_lang and tgt_lang"):
        read_source(SourceConfig(path=str(path)))
    assert read_source(SourceConfig(path=str(path), src_lang="en"))[0].direction == "en-de"
    with pytest.raises(DataError, match="listed twice"):
        read_sources([cfg, cfg])


def test_text_pair_and_tsv(tmp_path):
    de, en = tmp_path / "train.de-en.de", tmp_path / "train.de-en.en"
    de.write_text("".join(s + "\r\n" for s, _ in PAIRS), encoding="utf-8")
    en.write_text("".join(t + "\n" for _, t in PAIRS), encoding="utf-8")
    exs = read_source(SourceConfig(path=str(de), target_path=str(en)))
    assert [(e.source, e.reference, e.direction) for e in exs] == [(s, t, "de-en") for s, t in PAIRS]
    assert exs[0].id == f"{tmp_path.name}/train.de-en:0:de-en"

    en.write_text("".join(t + "\n" for _, t in PAIRS[:2]), encoding="utf-8")
    with pytest.raises(DataError, match=r"train.de-en.de has 3 lines.*train.de-en.en has 2"):
        read_source(SourceConfig(path=str(de), target_path=str(en)))

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("de\ten\n" + "".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    exs = read_source(SourceConfig(path=str(tsv), directions=["en-de"]))
    assert [(e.source, e.reference) for e in exs] == [(t, s) for s, t in PAIRS]
    headless = tmp_path / "headless.tsv"
    headless.write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    with pytest.raises(DataError, match="no header row"):
        read_source(SourceConfig(path=str(headless)))
    assert len(read_source(SourceConfig(path=str(headless), src_lang="de", tgt_lang="en"))) == 3
    headless.write_text("a\tb\nc\td\te\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"headless.tsv:2: expected 2 tab-separated columns.*got 3"):
        read_source(SourceConfig(path=str(headless), src_lang="de", tgt_lang="en"))


def test_bad_json_missing_key_and_encoding_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.de-en.jsonl"
    bad.write_text(json.dumps(records()[0]) + "\n" + '{"translation": {"de": "x", "en": }\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.de-en.jsonl:2:\d+: malformed JSON"):
        read_source(SourceConfig(path=str(bad)))
    arr = tmp_path / "bad.de-en.json"
    arr.write_text('[\n{"translation": {"de": "a", "en": "b"}},\n{"translation": {"de": "a" "en": "b"}}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.de-en.json:3:\d+: malformed JSON"):
        read_source(SourceConfig(path=str(arr)))

    missing = write_jsonl(tmp_path / "m.de-en.jsonl", records() + [{"translation": {"de": "x", "fr": "y"}}])
    with pytest.raises(DataError, match=r"m.de-en.jsonl:4: missing language key 'en'.*\['de', 'fr'\]"):
        read_source(SourceConfig(path=str(missing)))
    arr.write_text(json.dumps([records()[0], {"translation": {"en": "y"}}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.de-en.json: record 1: missing language key 'de'"):
        read_source(SourceConfig(path=str(arr)))

    latin1 = tmp_path / "l.de-en.jsonl"
    latin1.write_bytes(json.dumps(records()[0]).encode() + b"\n" + '{"translation": {"de": "Grüße", "en": "x"}}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"l.de-en.jsonl:2: not valid UTF-8 at byte offset \d+"):
        read_source(SourceConfig(path=str(latin1)))


def test_empty_sides_skip_with_counts_or_error(tmp_path):
    path = write_jsonl(tmp_path / "e.de-en.jsonl", records(PAIRS + [("", "x"), ("y", "  "), ("z", "w")]))
    exs, stats = read_sources([SourceConfig(path=str(path))], on_empty="skip")
    assert len(exs) == 4 and dict(stats.skipped) == {"empty_source": 1, "empty_target": 1}
    assert exs[-1].id.endswith(":5:de-en")  # ids keep the record index
    with pytest.raises(DataError, match=r"e.de-en.jsonl:4: empty source"):
        read_sources([SourceConfig(path=str(path))], on_empty="error")


def test_hf_save_to_disk(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(records()),
                               "test": datasets.Dataset.from_dict({"cs": ["Ahoj"], "en": ["Hello"]})})
    ds.save_to_disk(str(tmp_path / "hf"))
    path = str(tmp_path / "hf")
    assert detect_format(SourceConfig(path=path)) == "hf"
    exs = read_source(SourceConfig(path=path, split="train", hf_config="de-en"))
    assert [(e.source, e.reference) for e in exs] == PAIRS
    exs = read_source(SourceConfig(path=path, split="test", src_lang="cs", tgt_lang="en"))
    assert (exs[0].source, exs[0].reference, exs[0].direction) == ("Ahoj", "Hello", "cs-en")
    with pytest.raises(DataError, match=r"splits \['train', 'test'\] needs `split`"):
        read_source(SourceConfig(path=path, hf_config="de-en"))


def test_rationale_records_with_meta_and_topk(tmp_path):
    from radis.data.records import save_topk_atomic

    out = tmp_path / "rationales"
    out.mkdir()
    recs = [{"id": f"deen/x:{i}:de-en", "src_lang": "de", "tgt_lang": "en", "source": s, "reference": t,
             "rationale": f"Because {i}.", "rationale_token_ids": [5, 6, 7], "tokenizer_fingerprint": "abc",
             "decoding": {"temperature": 0.0, "max_new_tokens": 8}, "note": f"only record {i} says this"}
            for i, (s, t) in enumerate(PAIRS)]
    recs[1]["rationale"] = ""
    recs.append(dict(recs[0]))  # written twice by a resumed run
    write_jsonl(out / "rationales.jsonl", recs)
    write_jsonl(out / "skipped.jsonl", [{"id": "z", "reason": "source_too_long"}])
    topk = (np.arange(6, dtype=np.int32).reshape(3, 2), np.full((3, 2), -0.5, np.float32))
    save_topk_atomic(out / "rationales.topk.safetensors", {"deen/x:0:de-en": topk})
    exs, stats = read_sources([SourceConfig(path=str(out))])
    assert [e.id for e in exs] == [r["id"] for r in recs[:3]]
    assert exs[0].rationale == "Because 0." and exs[1].rationale is None and stats.empty_rationale == 1
    assert stats.skipped["duplicate_id"] == 1
    ids = exs[0].meta["rationale_token_ids"]  # held compactly: an int32 array (record_to_example)
    assert ids.dtype == np.int32 and ids.tolist() == [5, 6, 7] and exs[0].meta["tokenizer_fingerprint"] == "abc"
    # what every record of a run repeats is held once, not once per record (json makes new objects)
    assert exs[0].meta["decoding"] is exs[2].meta["decoding"] == {"temperature": 0.0, "max_new_tokens": 8}
    assert exs[0].meta["tokenizer_fingerprint"] is exs[2].meta["tokenizer_fingerprint"]
    assert [e.meta["note"] for e in exs] == [f"only record {i} says this" for i in range(3)]
    np.testing.assert_array_equal(example_teacher(exs[0].meta)[0], topk[0])  # read lazily, from the file
    assert example_teacher(exs[2].meta) is None
    # One shard file, sniffed by its records.
    one = write_jsonl(tmp_path / "shard.jsonl", recs[:1])
    assert detect_format(SourceConfig(path=str(one))) == "rationales"
    write_jsonl(one, [{"id": "a", "source": "x", "reference": "y"}])
    with pytest.raises(DataError, match=r"shard.jsonl:1: rationale record lacks \['src_lang', 'tgt_lang'\]"):
        read_source(SourceConfig(path=str(one)))


def test_real_alma_files(shared_data):
    alma = shared_data / "alma"
    text = SourceConfig(path=str(alma / "deen/train.de-en.de"), target_path=str(alma / "deen/train.de-en.en"), limit=500)
    lines = SourceConfig(path=str(alma / "csen/train.cs-en.json"), directions=["cs-en", "en-cs"], limit=300)
    array = SourceConfig(path=str(alma / "zhen/test.zh-en.json"))
    exs, stats = read_sources([text, lines, array])
    assert stats.per_source[text.path] == 500 and stats.per_source[lines.path] == 600
    assert stats.per_direction["de-en"] == 500 and stats.per_direction["en-cs"] == 300
    assert stats.per_direction["zh-en"] == stats.per_source[array.path] > 500
    assert len({e.id for e in exs}) == len(exs)
    first = exs[0]
    assert first.source.startswith("28-jähriger Koch") and first.reference.startswith("28-Year-Old Chef")
    zh = [e for e in exs if e.direction == "zh-en"]
    assert zh[0].source == "是否有途径处罚他" and zh[0].reference == "Is there a way to punish him?"


def test_one_language_given_takes_the_other_from_the_file_and_same_or_contradicting_ones_are_errors(tmp_path):
    # Only tgt_lang: the source is the pair's other language, never tgt_lang again (de-de copies).
    lines = write_jsonl(tmp_path / "h.de-en.jsonl", records())
    tsv = tmp_path / "c.de-en.tsv"
    tsv.write_text("de\ten\n" + "".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    for path in (lines, tsv):
        exs = read_source(SourceConfig(path=str(path), tgt_lang="de"))
        assert [(e.direction, e.source, e.reference) for e in exs] == [("en-de", t, s) for s, t in PAIRS]
    with pytest.raises(DataError, match=r"h.de-en.jsonl: source and target language are both 'de'"):
        read_source(SourceConfig(path=str(lines), src_lang="de", tgt_lang="de"))
    with pytest.raises(DataError, match=r"h.de-en.jsonl: src_lang is 'fr', not one of the file's languages de-en"):
        read_source(SourceConfig(path=str(lines), src_lang="fr"))
    # A text pair: the suffixes say which file holds which language; a config saying otherwise is an error.
    de, en = tmp_path / "train.de-en.de", tmp_path / "train.de-en.en"
    de.write_text("".join(s + "\n" for s, _ in PAIRS), encoding="utf-8")
    en.write_text("".join(t + "\n" for _, t in PAIRS), encoding="utf-8")
    with pytest.raises(DataError, match=r"train.de-en.en: its suffix says its lines are 'en', but tgt_lang is 'de'"):
        read_source(SourceConfig(path=str(de), target_path=str(en), tgt_lang="de"))
    with pytest.raises(DataError, match=r"train.de-en.de: its suffix says its lines are 'de', but src_lang is 'en'"):
        read_source(SourceConfig(path=str(de), target_path=str(en), src_lang="en", tgt_lang="de"))
    assert read_source(SourceConfig(path=str(de), target_path=str(en), tgt_lang="en"))[0].direction == "de-en"
    # Suffixes that are no languages ("src" / "tgt"): the config decides, but not one language twice.
    src, tgt = tmp_path / "train.src", tmp_path / "train.tgt"
    src.write_text(de.read_text(encoding="utf-8"), encoding="utf-8")
    tgt.write_text(en.read_text(encoding="utf-8"), encoding="utf-8")
    exs = read_source(SourceConfig(path=str(src), target_path=str(tgt), src_lang="de", tgt_lang="en"))
    assert [(e.direction, e.source, e.reference) for e in exs] == [("de-en", s, t) for s, t in PAIRS]
    with pytest.raises(DataError, match=r"train.src: source and target language are both 'en'"):
        read_source(SourceConfig(path=str(src), target_path=str(tgt), src_lang="en", tgt_lang="en"))


def _rationale_records(n: int = 3, src: str = "de", tgt: str = "en") -> list[dict]:
    return [{"id": f"r:{i}", "src_lang": src, "tgt_lang": tgt, "source": s, "reference": t, "rationale": "Because."}
            for i, (s, t) in enumerate(PAIRS[:n])]


def test_a_first_record_longer_than_any_head_is_still_sniffed_as_a_rationale_record(tmp_path):
    long = dict(_rationale_records(1)[0], rationale="word " * 3000, rationale_token_ids=list(range(10_000, 20_000)))
    path = write_jsonl(tmp_path / "shard.jsonl", [long] + _rationale_records()[1:])
    assert len(path.read_bytes().split(b"\n", 1)[0]) > 1 << 16
    path.write_bytes(b"\xef\xbb\xbf\n  \n" + path.read_bytes())  # a BOM and blank lines before it
    assert detect_format(SourceConfig(path=str(path))) == "rationales"
    assert [e.id for e in read_source(SourceConfig(path=str(path)))] == ["r:0", "r:1", "r:2"]


def test_records_all_removed_by_a_filter_name_the_filter(tmp_path):
    path = write_jsonl(tmp_path / "x.rationales.jsonl", _rationale_records())
    with pytest.raises(DataError, match=r"x.rationales.jsonl: keeps none of its records: directions \['en-de'\] "
                                        r"leave out 3 de-en"):
        read_source(SourceConfig(path=str(path), directions=["en-de"]))
    with pytest.raises(DataError, match=r"x.rationales.jsonl: keeps none of its records: limit is 0"):
        read_source(SourceConfig(path=str(path), limit=0))
    write_jsonl(path, [dict(r, reference=" ") for r in _rationale_records()])
    with pytest.raises(DataError, match=r"keeps none of its records: 3 have an empty source or reference"):
        read_source(SourceConfig(path=str(path)))
    path.write_text("\n", encoding="utf-8")  # truly empty: the old message, which is right here
    with pytest.raises(DataError, match=r"x.rationales.jsonl: holds no records .*remove the source"):
        read_source(SourceConfig(path=str(path)))
