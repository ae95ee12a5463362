"""Every reader of a user-supplied file, fed what is not its format (random bytes, an empty
file, a truncated valid file, a directory): an InputError that names the file, never a
traceback from deeper down and never silent success with nothing read."""
from __future__ import annotations

from pathlib import Path

import pytest

from radis.errors import InputError

GARBAGE = {
    "random bytes": bytes(range(256)) * 4,
    "empty": b"",
    "nul bytes": b"\x00" * 64,
    "half a JSON object": b'{"translation": {"de": "Haus", "en": "ho',
    "a number": b"42\n",
    "a JSON string": b'"just text"\n',
}


def _sources(path: Path, fmt: str):
    from radis.config import SourceConfig
    from radis.data.sources import read_sources

    extra = {"target_path": str(path)} if fmt == "text" else {}
    return read_sources([SourceConfig(path=str(path), format=fmt, src_lang="de", tgt_lang="en", **extra)], "error")


def _topk(path: Path):
    from radis.data.records import load_topk

    return load_topk(path)


def _safety(path: Path):
    from radis.evaluate.safety import load_harmful_prompts

    return load_harmful_prompts(path)


def _retention(path: Path):
    from radis.evaluate.retention import load_retention_prompts

    return load_retention_prompts(path)


def _config(path: Path):
    from radis.config import load_config

    return load_config(path)


def _ds_json(path: Path):
    from radis.config import load_config
    from radis.ds_config import RunShape, load_ds_config

    cfg = load_config(None, [f"train.deepspeed_config={path}"])
    return load_ds_config(cfg, RunShape(world_size=1, precision="float32", hidden_size=32, total_steps=10,
                                        warmup_steps=1, cuda=False))


READERS = {
    **{f"source:{fmt}": (lambda p, f=fmt: _sources(p, f)) for fmt in ("auto", "json", "jsonl", "text", "tsv",
                                                                         "rationales")},
    "top-k file": _topk,
    "safety prompts": _safety,
    "retention prompts": _retention,
    "config YAML": _config,
    "DeepSpeed JSON": _ds_json,
}


# What is valid for a reader after all: any UTF-8 lines are text-format data (source and
# target side here are the same file), and an empty YAML file is the default config.
VALID = {("source:text", "half a JSON object"), ("source:text", "a number"), ("source:text", "a JSON string"),
         ("config YAML", "empty")}


@pytest.mark.parametrize("garbage", list(GARBAGE))
@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_names_the_file_it_cannot_read(reader, garbage, tmp_path):
    path = tmp_path / ("in.safetensors" if reader == "top-k file" else "in.yaml" if reader == "config YAML"
                       else "in.json" if reader == "DeepSpeed JSON" else "in.de-en.jsonl")
    path.write_bytes(GARBAGE[garbage])
    if (reader, garbage) in VALID:
        READERS[reader](path)
        return
    try:
        READERS[reader](path)
    except InputError as err:
        assert path.name in str(err), err
        return
    pytest.fail(f"{reader} read {garbage!r} without an error")


@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_refuses_a_directory_or_a_missing_file(reader, tmp_path):
    for path in (tmp_path / "a_dir", tmp_path / "missing.jsonl"):
        if path.name == "a_dir":
            path.mkdir()
        with pytest.raises(InputError, match=path.name):
            READERS[reader](path)


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """write_jsonl_atomic leaves U+2028, U+2029 and U+0085 raw inside strings; str.splitlines
    would cut records there."""
    from radis.io import iter_jsonl_objects, write_jsonl_atomic

    recs = [{"prompt": "line one\u2028line two"}, {"prompt": "a\u2029b\x85c"}, {"prompt": "crlf"}]
    path = tmp_path / "p.jsonl"
    write_jsonl_atomic(path, recs[:2])
    path.write_bytes(path.read_bytes() + b'\n{"prompt": "crlf"}\r\n')  # a blank line, a CRLF line
    assert list(iter_jsonl_objects(path)) == [(1, recs[0]), (2, recs[1]), (4, recs[2])]
