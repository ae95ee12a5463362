"""Bad input as a new user would give it: every case a clear error naming the file, line or
key and what was expected, exit status 2 from the console command, no traceback, nothing
already written lost."""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from test_generation import make_tiny_generator

from radis.cli import main
from radis.config import ConfigError, SourceConfig, load_config
from radis.data.sources import DataError, read_source


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    return make_tiny_generator(tmp_path_factory.mktemp("tiny_generator"))


def _fails(capsys, argv: list[str], *expected: str) -> str:
    """Run `radis argv`: exit status 2 and every expected piece in the one-line error."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for piece in expected:
        assert piece in err, (piece, err)
    return err


def _pairs(path: Path, n: int = 3) -> Path:
    path.write_text("".join(json.dumps({"translation": {"de": f"Satz {i}.", "en": f"Sentence {i}."}}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize(("override", "expected"), [
    ("train.lr=-1", "train.lr: expected > 0"),
    ("train.lr=0", "a learning rate of 0 trains nothing"),
    ("train.lr=1e300", "train.lr: expected > 0 (a learning rate of 0 trains nothing) and <= 1"),  # float32 overflow
    ("train.lr=.inf", "train.lr: expected > 0"),
    ("train.warmup_ratio=5", "train.warmup_ratio: expected in [0, 1)"),
    ("eval.num_beams=0", "eval.num_beams: expected >= 1"),
    ("eval.batch_size=0", "eval.batch_size: expected >= 1"),
    ("data.separator=''", "data.separator: expected a non-empty string"),
    ("train.max_steps=two", "train.max_steps: expected an integer, got 'two'"),
    ("data.train=[{path: a.jsonl, src_lang: en, tgt_lang: en}]", "src_lang and tgt_lang are both 'en'"),
])
def test_config_values_out_of_range(override, expected, capsys, tmp_path):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name_or_path: smollm2}\n")
    _fails(capsys, ["build-data", "--config", str(cfg), override], "config error", expected)


def test_a_key_given_twice_in_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 1.0e-4\neval: {}\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: invalid YAML: key 'train' appears twice"):
        load_config(cfg)


# --------------------------------------------------------------------------- models


def test_missing_or_broken_models(tiny_generator, tmp_path, capsys):
    data = _pairs(tmp_path / "p.de-en.jsonl")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"data": {"train": [{"path": str(data)}]}, "rationale": {"output_dir": str(tmp_path / "r")},
                               "eval": {"test": [{"path": str(data)}], "retention": False, "safety": False}}))
    for cmd in ("build-data", "inspect-data", "generate"):
        _fails(capsys, [cmd, "--config", str(cfg), f"model.name_or_path={tmp_path / 'nope'}"],
               f"radis {cmd}: error: model '{tmp_path / 'nope'}': no such directory")
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(tiny_generator / "config.json", only_config)
    _fails(capsys, ["build-data", "--config", str(cfg), f"model.name_or_path={only_config}"],
           f"{only_config}: cannot load the tokenizer")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_generator, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    _fails(capsys, ["generate", "--config", str(cfg), f"model.name_or_path={truncated}", "--no-progress"],
           f"{truncated}: cannot load the model", "SafetensorError")
    _fails(capsys, ["evaluate", "--config", str(cfg), f"model.name_or_path={truncated}",
                    f"eval.output_dir={tmp_path / 'e'}"], f"{truncated}: cannot load the model")


def test_a_truncated_bin_weights_file_is_named(tiny_generator, tmp_path, capsys):
    """torch's "PytorchStreamReader failed reading zip archive" names no file."""
    import torch
    from safetensors.torch import load_file

    bin_model = tmp_path / "bin_model"
    shutil.copytree(tiny_generator, bin_model)
    weights = bin_model / "pytorch_model.bin"
    torch.save(load_file(bin_model / "model.safetensors"), weights)
    (bin_model / "model.safetensors").unlink()
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    data = _pairs(tmp_path / "p.de-en.jsonl")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"data": {"train": [{"path": str(data)}]}, "rationale": {"output_dir": str(tmp_path / "r")}}))
    _fails(capsys, ["generate", "--config", str(cfg), f"model.name_or_path={bin_model}", "--no-progress"],
           f"{bin_model}: cannot load the model: a torch weights file (.bin) in it is truncated or damaged "
           "(PytorchStreamReader failed reading zip archive")


def test_a_gguf_name_on_a_file_that_is_not_gguf(tmp_path, capsys):
    """Named as not GGUF before transformers' reader meets it (a ValueError traceback about
    "GGUF v3682080226" there), and a damaged one past its header named too; no cache left."""
    from radis.models import ModelLoadError, resolve_model_path, smollm2_gguf_path

    data = _pairs(tmp_path / "p.de-en.jsonl")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"data": {"train": [{"path": str(data)}]}, "model": {"cache_dir": str(tmp_path / "cache")}}))
    page = tmp_path / "page.gguf"
    page.write_text("<html>404 Not Found</html>\n")  # a download that saved an error page
    _fails(capsys, ["build-data", "--config", str(cfg), f"model.name_or_path={page}"],
           f"radis build-data: error: {page}: not a GGUF file (bad magic: it starts with b'<htm'")
    version = tmp_path / "version.gguf"
    version.write_bytes(b"GGUF" + (3682080226).to_bytes(4, "little") + bytes(64))
    _fails(capsys, ["build-data", "--config", str(cfg), f"model.name_or_path={version}"],
           f"{version}: not a GGUF file radis can read (format version 3682080226, expected one of [2, 3])")
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(300_000))  # the header whole, the tokenizer's tables cut
    with pytest.raises(ModelLoadError, match=rf"{cut}: cannot load the GGUF model"):
        resolve_model_path(str(cut), str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("models/*/config.json"))


# --------------------------------------------------------------------------- data files


def test_data_files_that_are_not_what_they_seem(tmp_path):
    cr = tmp_path / "cr.de"
    cr.write_bytes(b"Satz eins.\rSatz zwei.\r")
    (tmp_path / "cr.en").write_bytes(b"Sentence one.\rSentence two.\r")
    with pytest.raises(DataError, match=r"cr.de: its lines end in CR only"):
        read_source(SourceConfig(path=str(cr), target_path=str(tmp_path / "cr.en")))
    loop = tmp_path / "loop.de-en.jsonl"
    os.symlink(loop, loop)
    with pytest.raises(DataError, match=r"loop.de-en.jsonl: .*(symbolic link loop|no such file)"):
        read_source(SourceConfig(path=str(loop), format="jsonl"))
    deep = tmp_path / "deep.de-en.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError, match=r"deep.de-en.json: JSON nested too deeply"):
        read_source(SourceConfig(path=str(deep)))
    utf16 = tmp_path / "u.de-en.jsonl"
    utf16.write_text(json.dumps({"translation": {"de": "a", "en": "b"}}), encoding="utf-16")
    with pytest.raises(DataError, match=r"u.de-en.jsonl: UTF-16 text"):
        read_source(SourceConfig(path=str(utf16)))


def test_a_pretty_printed_json_object_is_named_as_such(tmp_path):
    """Not "malformed JSON line 1:2": the file is one object over several lines."""
    one = tmp_path / "one.de-en.json"
    one.write_text(json.dumps({"translation": {"de": "Hallo", "en": "Hello"}}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"one.de-en.json:1: expected a JSON array or JSON Lines, found one object "
                                        r"over several lines \(lines 1-6\)"):
        read_source(SourceConfig(path=str(one)))
    later = tmp_path / "later.de-en.jsonl"  # JSON Lines with one record pretty-printed
    later.write_text(json.dumps({"translation": {"de": "a", "en": "b"}}) + "\n"
                     + json.dumps({"translation": {"de": "c", "en": "d"}}, indent=1) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"later.de-en.jsonl:2: expected JSON Lines \(one record per line\), found an "
                                        r"object over several lines \(lines 2-7\)"):
        read_source(SourceConfig(path=str(later)))
    records = tmp_path / "r.rationales.jsonl"
    records.write_text(json.dumps(_record(0), indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"r.rationales.jsonl:1: .*found one object over several lines"):
        read_source(SourceConfig(path=str(records)))


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.de-en.jsonl"
    os.mkfifo(fifo)
    result: list[BaseException] = []

    def read():
        try:
            read_source(SourceConfig(path=str(fifo), format="jsonl"))
        except BaseException as err:  # noqa: BLE001 -- reported to the test below
            result.append(err)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert isinstance(result[0], DataError) and "not a regular file" in str(result[0])


def test_a_file_this_user_may_not_read_is_named(tmp_path, monkeypatch):
    """Named before any read (root reads everything, so the permission is what os.access
    answers for another user)."""
    from radis.data import sources

    path = tmp_path / "locked.de-en.jsonl"
    path.write_text('{"de": "Hallo", "en": "Hello"}\n', encoding="utf-8")
    monkeypatch.setattr(sources.os, "access", lambda p, mode: Path(p) != path)
    with pytest.raises(DataError, match=r"locked.de-en.jsonl: permission denied; expected a file this user can read"):
        read_source(SourceConfig(path=str(path)))


def test_records_with_a_bom_are_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    rec = {"id": "x:0", "src_lang": "de", "tgt_lang": "en", "source": "a", "reference": "b", "rationale": "c"}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rec).encode() + b"\n")
    (ex,) = read_source(SourceConfig(path=str(path)))
    assert ex.id == "x:0" and ex.rationale == "c"


def test_unknown_language_code(tmp_path, capsys):
    data = tmp_path / "p.xx-en.jsonl"
    data.write_text(json.dumps({"translation": {"xx": "a", "en": "b"}}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"data": {"train": [{"path": str(data)}]}}))
    _fails(capsys, ["inspect-data", "--config", str(cfg)], "radis inspect-data: error:", "'xx'")


# --------------------------------------------------------------------------- records and the store


def _record(i: int, **extra) -> dict:
    return {"id": f"r:{i}", "src_lang": "de", "tgt_lang": "en", "source": f"Satz {i}.", "reference": f"Sentence {i}.",
            "rationale": "Because.", "strategy": "continue", **extra}


def test_recorded_ids_and_top_k_are_checked(smol_tokenizer, tmp_path):
    from radis.data.prompts import ChatFormat
    from radis.data.records import RecordError
    from radis.data.segments import build_segments
    from radis.data.sources import read_sources

    fmt = ChatFormat(smol_tokenizer, load_config(None, []).data, "auto")
    common = {"tokenizer_fingerprint": fmt.fingerprint, "separator": "\n\n"}
    cases = [
        (_record(0, rationale_token_ids=[5, 10**7], **common), "ids outside the tokenizer's vocabulary"),
        (_record(1, rationale_token_ids=[5, 6], teacher_topk_ids=[[1, 2], [3]], teacher_topk_logprobs=[[0.0, -1.0], [0.0]],
                 **common), "not a rectangular numeric array"),
        (_record(2, rationale_token_ids=[5, 6], teacher_topk_ids=[[1, 2], [3, 4]],
                 teacher_topk_logprobs=[[0.0, float("nan")], [0.0, -1.0]], **common), "NaN or +inf"),
    ]
    for i, (rec, expected) in enumerate(cases):
        path = tmp_path / f"case{i}.rationales.jsonl"
        path.write_text(json.dumps(rec) + "\n")
        examples, _ = read_sources([SourceConfig(path=str(path))])
        with pytest.raises(RecordError, match=rf"example r:{i}: .*{re.escape(expected)}"):
            build_segments(fmt, examples, separator="\n\n", max_tokens=512)


def test_recorded_ids_of_the_wrong_kind_name_the_file_and_line(tmp_path):
    from radis.data.sources import DataError, read_sources

    cases = [([5, 6.0], "expected a list of integers"), ([5, True], "expected a list of integers"),
             ("5 6", "expected a list of integers"), ([5, -1], r"token ids are in \[0, 2\^31\), got -1"),
             ([2**31], r"token ids are in .*, got 2147483648")]
    for i, (ids, expected) in enumerate(cases):
        path = tmp_path / f"case{i}.rationales.jsonl"
        path.write_text(json.dumps(_record(0)) + "\n" + json.dumps(_record(1, rationale_token_ids=ids)) + "\n")
        with pytest.raises(DataError, match=rf"{path.name}:2: 'rationale_token_ids': {expected}"):
            read_sources([SourceConfig(path=str(path))])


def test_an_empty_generated_target_is_an_empty_side(tmp_path):
    """A seqkd / sdft record trains its `target`: an empty one is skipped and counted, or
    an error with on_empty=error, like any empty side (not an empty MT span)."""
    from radis.data.sources import read_sources

    path = tmp_path / "t.rationales.jsonl"
    recs = [_record(i, strategy=strategy, target=target, target_from="generated")
            for i, (strategy, target) in enumerate([("seqkd", "Sentence 0."), ("seqkd", ""), ("sdft", " \n")])]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    examples, stats = read_sources([SourceConfig(path=str(path))])
    assert [ex.id for ex in examples] == ["r:0"] and stats.skipped["empty_target"] == 2
    with pytest.raises(DataError, match=rf"{path.name}:2: empty target text \('target'\)"):
        read_sources([SourceConfig(path=str(path))], on_empty="error")


def test_damaged_parts_fail_the_merge_without_touching_what_it_wrote_before(tmp_path):
    from radis.data.records import MERGED, MERGED_TOPK
    from radis.generation.store import GenerationStore, OutputMismatchError

    store = GenerationStore(tmp_path)
    store.prepare({"a": 1}, overwrite=False)
    topk = lambda: (np.zeros((2, 3), np.int32), np.zeros((2, 3), np.float32))
    store.commit([_record(i) for i in range(3)], {f"r:{i}": topk() for i in range(3)})
    store.merge([f"r:{i}" for i in range(3)], with_topk=True)
    before = ((tmp_path / MERGED).read_bytes(), (tmp_path / MERGED_TOPK).read_bytes())
    part = store.commit([_record(3)], {"r:3": topk()})
    side = part.with_name(part.name.replace(".jsonl", ".topk.safetensors"))
    side.write_bytes(side.read_bytes()[:20])  # truncated by a full disk, say
    with pytest.raises(OutputMismatchError, match=rf"{side.name}: unreadable top-k file .*delete {part.name}"):
        store.merge([f"r:{i}" for i in range(4)], with_topk=True)
    assert ((tmp_path / MERGED).read_bytes(), (tmp_path / MERGED_TOPK).read_bytes()) == before
    part.write_text(part.read_text()[:10])  # a broken line
    with pytest.raises(OutputMismatchError, match=rf"{part.name}:1: broken record"):
        store.completed_ids()
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(OutputMismatchError, match="exists and is not a directory"):
        GenerationStore(afile).prepare({"a": 1}, overwrite=False)


def test_truncated_cache_file(tmp_path, smol_tokenizer):
    from radis.data.build import DataBuildError, load_or_build

    data = _pairs(tmp_path / "p.de-en.jsonl", 4)
    cfg = load_config(None, [f"data.train=[{{path: {data}}}]", f"data.cache_dir={tmp_path / 'cache'}"])
    ds = load_or_build(cfg, "train", smol_tokenizer, progress=False, log=None)
    tokens = Path(ds.meta["cache_dir"]) / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:200])
    with pytest.raises(DataBuildError, match=r"tokens.npy: unreadable \(truncated: 200 bytes.*delete .* to rebuild"):
        load_or_build(cfg, "train", smol_tokenizer, progress=False, log=None)
    tokens.write_bytes(b"not an npy file at all")
    with pytest.raises(DataBuildError, match=r"tokens.npy: unreadable"):
        load_or_build(cfg, "train", smol_tokenizer, progress=False, log=None)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_names_a_bad_test_set(tiny_generator, tmp_path, capsys):
    test = tmp_path / "t.de-en.jsonl"
    test.write_text("{not json\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": {"name_or_path": str(tiny_generator)},
                               "eval": {"test": [{"path": str(test)}], "output_dir": str(tmp_path / "e")}}))
    _fails(capsys, ["evaluate", "--config", str(cfg)], f"{test}:1:2: malformed JSON line")
    test.write_text(json.dumps({"translation": {"de": "a", "en": "b"}}), encoding="utf-16")
    _fails(capsys, ["evaluate", "--config", str(cfg)], f"{test}: UTF-16 text")


def test_cut_models_must_name_models_of_eval_models(tmp_path, capsys):
    """A config error before anything runs (the test set is not even read)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"eval": {"models": ["original=smollm2", "radis=outputs/radis/hf"],
                                        "cut_models": {"radis": True, "radsi": True},
                                        "test": [{"path": str(tmp_path / "not_read.de-en.jsonl")}]}}))
    _fails(capsys, ["evaluate", "--config", str(cfg)], "radis evaluate: config error: "
           "eval.cut_models: no model of eval.models is named 'radsi'; expected names among ['original', 'radis']")


def test_a_source_only_test_set_names_a_source_of_the_wrong_type(tmp_path):
    """Not skipped as an "empty" source: a number is there, of the wrong type."""
    from radis.evaluate.command import read_test_set

    path = tmp_path / "src.jsonl"
    path.write_text('{"de": "Hallo."}\n{"de": 42}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"eval.test\[0\]: .*src.jsonl: record 2: 'de': expected a string, "
                                         r"got a number \(42\)"):
        read_test_set(SourceConfig(path=str(path), src_lang="de", tgt_lang="en"), "skip", 0)
    path.write_text('{"de": "Hallo."}\n["Hallo."]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"src.jsonl: record 2: expected .* got a list"):
        read_test_set(SourceConfig(path=str(path), src_lang="de", tgt_lang="en"), "skip", 0)


def test_damaged_evaluation_outputs_are_named(tiny_generator, tmp_path, capsys):
    """results.json and the original's cached answers, cut by a full disk or an editor:
    the file is named (json alone names a line and column), and left as it was."""
    from radis.evaluate.retention import load_cached_answers

    test = _pairs(tmp_path / "t.de-en.jsonl", 1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"eval": {"models": [f"tiny={tiny_generator}"], "test": [{"path": str(test)}],
                                        "output_dir": str(tmp_path / "e"), "retention": False, "safety": False}}))
    results = tmp_path / "e" / "tiny" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text('{"model": "tiny", "parts": {"transl', encoding="utf-8")
    _fails(capsys, ["evaluate", "--config", str(cfg)], f"{results}: not valid JSON", "delete it to evaluate this model again")
    assert results.read_text(encoding="utf-8") == '{"model": "tiny", "parts": {"transl'
    cache = tmp_path / "original.abc.json"
    cache.write_text('{"meta": {}, "answers": {"ids": ["a"], "prompt_ids"', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{cache.name}: not valid JSON .*delete it to generate the answers again"):
        load_cached_answers(cache)
    cache.write_text('{"meta": {}}', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{cache.name}: expected the cached answers"):
        load_cached_answers(cache)


# --------------------------------------------------------------------------- checkpoints


def _checkpoints(root: Path, config: Path, steps=(2, 4)) -> Path:
    """A checkpoints root as the trainer leaves it (ZeRO, one rank), `latest` at the last step."""
    import torch

    for step in steps:
        tag = root / f"global_step{step}"
        (tag / "hf").mkdir(parents=True)
        shutil.copy(config, tag / "hf" / "config.json")
        torch.save({"module": None, "step": step}, tag / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"w": torch.zeros(64)}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        torch.save({"loader": {"epoch": 0, "position": step}}, tag / "trainer_state_rank0.pt")
    (root / "latest").write_text(f"global_step{steps[-1]}")
    return root


def test_a_truncated_checkpoint_file_is_named_with_what_to_do(tiny_generator, tmp_path, capsys):
    """torch says only "PytorchStreamReader failed reading zip archive": export and the
    resume of train name the file, that it is cut, and the checkpoint to use instead."""
    from radis.train.checkpoint import CheckpointStateError, load_weights_only

    root = _checkpoints(tmp_path / "out" / "checkpoints", tiny_generator / "config.json")
    optim = root / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:400])  # a copy or a save cut short
    _fails(capsys, ["export", "--checkpoint", str(root), "--out", str(tmp_path / "hf")],
           f"{optim}: truncated or damaged: not a whole torch file",
           f"export the one before it with --checkpoint {root} --tag global_step2")
    data = _pairs(tmp_path / "p.de-en.jsonl")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": {"name_or_path": str(tiny_generator)}, "data": {"train": [{"path": str(data)}]},
                               "train": {"output_dir": str(tmp_path / "out"), "zero_stage": 0}}))
    _fails(capsys, ["train", "--config", str(cfg)], f"radis train: error: {optim}: truncated or damaged",
           f"move {root / 'global_step4'} out of {root} and run the same command again to resume from global_step2")
    assert not (tmp_path / "hf").exists() and (root / "latest").read_text() == "global_step4"  # nothing touched
    shutil.rmtree(root / "global_step2")
    _fails(capsys, ["train", "--config", str(cfg)], "there is no earlier checkpoint")
    # what DeepSpeed loads itself (a universal checkpoint's files) goes through the same load
    with pytest.raises(CheckpointStateError, match=rf"{optim.name}: truncated or damaged: not a whole torch file "
                                                   r"\(PytorchStreamReader failed reading zip archive"):
        load_weights_only(optim)


def test_an_empty_latest_file_is_named(tiny_generator, tmp_path, capsys):
    """Not "checkpoints/hf: no config.json", which sent the user to the wrong place."""
    from radis.train.checkpoint import resume_point

    root = _checkpoints(tmp_path / "checkpoints", tiny_generator / "config.json")
    (root / "latest").write_text("\n")
    _fails(capsys, ["export", "--checkpoint", str(root), "--out", str(tmp_path / "hf")],
           f"{root / 'latest'} is empty; expected the tag of a checkpoint (e.g. global_step4); give --tag global_step4")
    tag, note = resume_point(root)  # train resumes from the newest, saying why
    assert tag == "global_step4" and "`latest` is empty; resuming from the newest complete checkpoint" in note


# --------------------------------------------------------------------------- train


def test_train_reports_data_and_model_problems(sp_tokenizer, tmp_path, capsys):
    """Errors found after the process group exists (the data build, the tokenizer): every
    rank reports rank 0's message and exits 2."""
    from test_train_dist import make_tiny_llama, write_rationales

    model = make_tiny_llama(sp_tokenizer, tmp_path / "model")
    data = tmp_path / "d.rationales.jsonl"
    write_rationales(data, 4, seed=1, prefix="d")
    base = [f"model.name_or_path={model}", "model.chat_template=llama2", f"data.train=[{{path: {data}}}]",
            f"data.cache_dir={tmp_path / 'cache'}", "train.zero_stage=0", "train.max_steps=1"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    _fails(capsys, ["train", "--config", str(cfg), *base, "data.max_tokens=20", f"train.output_dir={tmp_path / 'o1'}"],
           "radis train: error: data.train: no example fits data.max_tokens=20")
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(model / f, no_tok)
    _fails(capsys, ["train", "--config", str(cfg), *base, f"model.name_or_path={no_tok}",
                    f"train.output_dir={tmp_path / 'o2'}"], f"{no_tok}: cannot load the tokenizer")


def test_records_are_read_a_line_at_a_time_and_bad_bytes_name_their_line_and_offset(tmp_path):
    good = [json.dumps(_record(i)).encode() + b"\n" for i in range(3)]
    for bad, expected in ((b'{"id": "\x00"}\n', "a NUL byte at byte offset"), (b'{"id": "\xff"}\n', "not valid UTF-8 at byte offset")):
        path = tmp_path / "r.rationales.jsonl"
        path.write_bytes(good[0] + good[1] + bad + good[2])
        offset = len(good[0]) + len(good[1]) + bad.index(b"\x00" if b"\x00" in bad else b"\xff")
        with pytest.raises(DataError, match=rf"r.rationales.jsonl:3: {expected} {offset}\b"):
            read_source(SourceConfig(path=str(path)))
    array = tmp_path / "a.rationales.json"  # a JSON array, after a BOM, is read whole
    array.write_bytes(b"\xef\xbb\xbf \n[" + b",".join(g.strip() for g in good) + b"]")
    assert [ex.id for ex in read_source(SourceConfig(path=str(array), format="rationales"))] == ["r:0", "r:1", "r:2"]


def test_a_key_given_twice_in_a_json_record_names_file_line_and_key(tmp_path):
    # json keeps the last silently: the first record would become an empty target, skipped unseen
    path = tmp_path / "dup.de-en.jsonl"
    path.write_text('{"translation": {"de": "Hallo", "en": "Hello"}}\n'
                    '{"translation": {"de": "Hallo", "en": "Hello", "en": ""}}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"dup.de-en.jsonl:2: key 'en' given twice in one JSON object"):
        read_source(SourceConfig(path=str(path)))
    array = tmp_path / "dup.de-en.json"  # read whole: the file and key, without a line
    array.write_text('[{"translation": {"de": "a", "en": "b"}, "translation": {"de": "c", "en": "d"}}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"dup.de-en.json: key 'translation' given twice"):
        read_source(SourceConfig(path=str(array)))
    records = tmp_path / "r.rationales.jsonl"
    records.write_text(json.dumps(_record(0)) + "\n" + json.dumps(_record(1))[:-1] + ', "id": "r:0"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"r.rationales.jsonl:2: key 'id' given twice"):
        read_source(SourceConfig(path=str(records)))
