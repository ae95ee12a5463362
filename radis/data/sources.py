"""Parallel data (and generated rationales) from files into `list[Example]`.

    read_sources(cfg.data.train, on_empty=cfg.data.on_empty) -> (examples, SourceStats)

Formats (`SourceConfig.format`, "auto" infers it from the path):

- json / jsonl: records {"translation": {"de": "...", "en": "..."}}, either one JSON
  array or one object per line; which of the two is sniffed from the first
  non-blank character, whatever the suffix (the ALMA data has JSON Lines in `.json`
  files). A JSON Lines file whose records have "source" and "reference" is read as
  rationale records.
- text: line-aligned pair, `path` = source side, `target_path` = target side
  (e.g. train.de-en.de + train.de-en.en). Lines are split on "\\n" only (a "\\r"
  before it is dropped), so U+2028 and friends inside a sentence do not shift the
  alignment.
- tsv: one pair per line, `source<TAB>target`, no quoting (a tab inside a sentence is
  an error: that line then has more than two columns). An optional header row naming
  the languages ("de<TAB>en") is recognised when both its cells look like language
  codes; it then sets the column languages (and must agree with src_lang/tgt_lang).
- hf: a `datasets` `save_to_disk` directory (read offline with load_from_disk), or a
  hub name with `split` (and `hf_config`) when online. Columns: a "translation" dict
  column or one column per language.
- rationales: the records of `radis generate` (RaDis rationales, or the Seq-KD /
  SDFT targets of the baselines), one file or a directory of `*.jsonl` shards (read
  in name order); the format is radis.data.records. The id is kept (it joins
  rationales to pairs); every other field goes to `Example.meta` (e.g.
  "rationale_token_ids"). A seqkd / sdft record trains its `target` as the translation.

Languages: `src_lang`/`tgt_lang` from the config; otherwise from the file name
("test.de-en.json" -> de, en; "train.de-en.de" + "train.de-en.en" -> de, en; an HF
config "de-en"); otherwise, when `directions` are given, any record that has both
languages is fine. Only one of src_lang/tgt_lang given: the other is the pair's other
language. A pair whose order cannot be told, the same language on both sides, and a
language given that contradicts a text pair's suffixes are errors.

Directions: `directions: ["de-en", "en-de"]` makes one Example per direction per pair
(both languages must be the pair's); the default is src_lang-tgt_lang. Ids:
"{parent dir}/{file stem}:{record index}:{src}-{tgt}", e.g. "deen/train.de-en:17:de-en"
(the index counts records in the file, skipped ones included, so ids stay stable).
Ids must be unique across all sources of a run (a file listed twice is an error).

Bad input raises DataError naming the file, the line or record, and what was expected.
Empty source or target: `on_empty="skip"` counts it (SourceStats.skipped, by reason),
"error" raises. `limit` keeps the first N usable pairs of a source.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radis.config import SourceConfig
from radis.data.example import Example
from radis.data.languages import LANGUAGE_NAMES, is_language_code
from radis.data.records import (
    MERGED,
    RATIONALE_STRATEGIES,
    RecordError,
    TopkReader,
    check_record,
    record_to_example,
    topk_path,
)
from radis.errors import InputError
from radis.io import multiline_json_problem

FORMATS = ("json", "jsonl", "text", "tsv", "hf", "rationales")
# "<src>-<tgt>" inside a file name, e.g. "train.de-en.json", "valid.zh-en"
_PAIR_IN_NAME = re.compile(r"(?:^|[._/])([a-z]{2,3})-([a-z]{2,3})(?=$|[._])")


class DataError(InputError):
    """Bad input data: names the file, the line or record, and what was expected."""


@dataclass
class SourceStats:
    pairs: int = 0  # usable pairs read (after skipping, after `limit`)
    examples: int = 0  # Examples made (pairs x directions)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    per_direction: Counter = field(default_factory=Counter)  # "de-en" -> examples
    per_source: dict[str, int] = field(default_factory=dict)  # path -> examples
    empty_rationale: int = 0  # rationale records kept as plain pairs (no / blank rationale)
    reference_kept: int = 0  # seqkd / sdft records whose generated target was rejected

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "examples": self.examples, "skipped": dict(self.skipped),
                "per_direction": dict(self.per_direction), "per_source": dict(self.per_source),
                "empty_rationale": self.empty_rationale, "reference_kept": self.reference_kept}


# A pair as read from a file: (index in file, line number or None, {lang: text}).
_Pair = tuple[int, int | None, dict[str, Any]]


def read_sources(sources: list[SourceConfig], on_empty: str = "skip") -> tuple[list[Example], SourceStats]:
    """All sources in order; ids checked unique across them."""
    if on_empty not in ("skip", "error"):
        raise ValueError(f"on_empty: expected 'skip' or 'error', got {on_empty!r}")
    stats = SourceStats()
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for cfg in sources:
        got = read_source(cfg, on_empty=on_empty, stats=stats)
        for ex in got:
            if ex.id in seen:
                raise DataError(
                    f"{cfg.path}: example id {ex.id!r} also comes from {seen[ex.id]}; "
                    "is a file listed twice, or do two files share a directory and name?"
                )
            seen[ex.id] = cfg.path
        examples.extend(got)
    return examples, stats


def read_source(cfg: SourceConfig, on_empty: str = "skip", stats: SourceStats | None = None) -> list[Example]:
    """Examples of one source (see the module doc); updates `stats` when given."""
    stats = stats if stats is not None else SourceStats()
    if not cfg.path:
        raise DataError("data source without a path")
    cfg = expand_user_paths(cfg)
    fmt = detect_format(cfg)
    if fmt == "rationales":
        examples, records = _read_rationales(cfg, on_empty, stats)
    else:
        if fmt in ("json", "jsonl"):
            pairs, file_langs = _read_json_pairs(Path(cfg.path))
        elif fmt == "text":
            pairs, file_langs = _read_text_pair(cfg)
        elif fmt == "tsv":
            pairs, file_langs = _read_tsv(Path(cfg.path), cfg)
        else:
            pairs, file_langs = _read_hf(cfg)
        records = len(pairs)
        examples = _pairs_to_examples(cfg, pairs, file_langs, on_empty, stats)
    if records == 0:
        # an empty file is a truncated download or a wrong path far more often than intent
        raise DataError(f"{cfg.path}: holds no {'records' if fmt == 'rationales' else 'pairs'} "
                        f"(format {fmt}); remove the source or give it data")
    for ex in examples:
        stats.per_direction[ex.direction] += 1
    stats.examples += len(examples)
    stats.per_source[cfg.path] = stats.per_source.get(cfg.path, 0) + len(examples)
    return examples


def expand_user_paths(cfg: SourceConfig) -> SourceConfig:
    """`cfg` with "~" expanded in `path` and `target_path`.

    The one place a source's paths are expanded: the readers here and the build cache
    key (radis.data.build.source_files) both go through it, so the files hashed are the
    files read.
    """
    path = os.path.expanduser(cfg.path)
    target = os.path.expanduser(cfg.target_path) if cfg.target_path else cfg.target_path
    if (path, target) == (cfg.path, cfg.target_path):
        return cfg
    return dataclasses.replace(cfg, path=path, target_path=target)


def detect_format(cfg: SourceConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    cfg = expand_user_paths(cfg)
    p = Path(cfg.path)
    if cfg.target_path:
        return "text"
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return "hf"
        if (p / MERGED).is_file() or any(p.glob("*.jsonl")):
            return "rationales"
        raise DataError(f"{p}: directory is neither a datasets save_to_disk directory nor a directory of *.jsonl rationale shards")
    if p.name.endswith(".rationales.jsonl"):
        return "rationales"
    if p.suffix == ".tsv":
        return "tsv"
    if p.suffix in (".json", ".jsonl"):
        if p.is_file() and _first_record_is_rationale(p):
            return "rationales"
        return "json"
    if not p.exists():
        if cfg.split or cfg.hf_config:
            return "hf"  # a hub dataset name
        raise DataError(f"{p}: no such file or directory")
    raise DataError(
        f"{p}: cannot tell the format from the name; set format to one of {', '.join(FORMATS)} "
        "(a line-aligned text pair also needs target_path)"
    )


# --------------------------------------------------------------------------- file reading


def _check_text_file(path: Path) -> None:
    """Raise unless `path` is a regular file that can be read.

    Not a regular file (a FIFO, a socket, a device: reading could block forever), a
    directory, a symbolic-link loop, a missing file and one this user may not read are
    DataErrors naming the path.
    """
    try:
        st = os.stat(path)  # follows links: a loop raises ELOOP here
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err} (a symbolic link loop?)") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: is a directory, expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file (a FIFO, socket or device; reading it could block forever)")
    if not os.access(path, os.R_OK):  # else a PermissionError traceback from the reader
        raise DataError(f"{path}: permission denied; expected a file this user can read")


def _decode_text(raw: bytes, path: Path, offset: int, line_of: Callable[[int], int]) -> str:
    """`raw` (the bytes of `path` from byte `offset` on) as text: a UTF-16 BOM, a NUL byte
    or bad UTF-8 is a DataError naming the line (`line_of(position in raw)`) and the byte
    offset in the file; a UTF-8 BOM at the file's start is dropped (it is not data)."""
    if offset == 0 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); convert the file to UTF-8")
    nul = raw.find(b"\x00")
    if nul >= 0:  # valid UTF-8, but no text file holds NUL bytes: a binary file, or a damaged one
        raise DataError(f"{path}:{line_of(nul)}: a NUL byte at byte offset {offset + nul}; expected a text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}:{line_of(err.start)}: not valid UTF-8 at byte offset {offset + err.start} "
            f"({raw[err.start:err.start + 4]!r}: {err.reason}); convert the file to UTF-8"
        ) from None
    return text.removeprefix("\ufeff") if offset == 0 else text


def read_text_file(path: Path) -> str:
    """UTF-8 text of a regular file (checked by `_check_text_file` and `_decode_text`)."""
    _check_text_file(path)
    data = path.read_bytes()
    return _decode_text(data, path, 0, lambda pos: data.count(b"\n", 0, pos) + 1)


def _streamed_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, read a line at a time, split on "\\n"
    only (a final newline makes no extra empty line; a "\\r" before it is dropped).

    The checks of `read_text_file` (`_decode_text`: BOM, NUL bytes, UTF-8) and CR-only
    line endings (a file that has them would be one line: a DataError instead), each
    error naming the line and byte offset, without holding the file: a records file of
    the paper's size is hundreds of MB of text, and held whole, as bytes, text and lines
    at once, it was the largest part of a build's peak memory.
    """
    _check_text_file(path)
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            line = _decode_text(raw, path, offset, lambda _pos, n=lineno: n)
            if lineno == 1 and not line.endswith("\n") and "\r" in line.rstrip("\r"):
                raise DataError(f"{path}: its lines end in CR only (classic Mac OS line endings); convert them to LF")
            offset += len(raw)
            yield lineno, line.removesuffix("\n").removesuffix("\r")


def _starts_with_bracket(path: Path) -> bool:
    """Whether the file's first non-blank byte is "[" (a JSON array, not JSON Lines)."""
    _check_text_file(path)
    with open(path, "rb") as f:
        first = True
        while chunk := f.read(4096):
            stripped = (chunk.removeprefix(b"\xef\xbb\xbf") if first else chunk).lstrip()
            first = False
            if stripped:
                return stripped.startswith(b"[")
    return False


def _json_records(path: Path) -> Iterator[tuple[int, int | None, Any]]:
    """(record index, line number or None, record) of a JSON array or JSON Lines file.
    JSON Lines are read a line at a time (`_streamed_lines`); an array is read whole."""
    if not _starts_with_bracket(path):
        yield from _json_lines(path)
        return
    for i, rec in enumerate(_parse_json(read_text_file(path), path, None)):
        yield i, None, rec


def _json_lines(path: Path) -> Iterator[tuple[int, int, Any]]:
    index = 0
    for lineno, line in _streamed_lines(path):
        if line.strip():
            try:
                rec = _parse_json(line, path, lineno)
            except DataError:
                # a pretty-printed record (one object over several lines) is named as such
                problem = multiline_json_problem(read_text_file(path), lineno, array_ok=True)
                if problem is None:
                    raise
                raise DataError(f"{path}:{lineno}: {problem}") from None
            yield index, lineno, rec
            index += 1


class _DuplicateKey(Exception):
    """A key given twice in one JSON object (raised by `_unique_keys`, named by `_parse_json`)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook: the object as a dict; _DuplicateKey for a key given twice (json
    keeps the last one silently: {"en": "Hello", "en": ""} would become an empty target).
    The common case costs one dict() and a length compare."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


# One decoder for every record: json.loads(text, object_pairs_hook=...) builds a new one per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _parse_json(text: str, path: Path, lineno: int | None) -> Any:
    """The JSON value of a whole file (`lineno` None) or of its line `lineno`; errors name
    both. A key given twice in one object is an error, not last-one-wins."""
    try:
        if text.startswith("\ufeff"):  # json.loads' own check, which JSONDecoder.decode lacks
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except _DuplicateKey as err:
        where = f"{path}:{lineno}" if lineno is not None else f"{path}"
        raise DataError(f"{where}: key {err.key!r} given twice in one JSON object; expected each key once") from None
    except json.JSONDecodeError as err:
        if lineno is None:
            raise DataError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None
        raise DataError(f"{path}:{lineno}:{err.colno}: malformed JSON line: {err.msg}") from None
    except RecursionError:
        if lineno is None:
            raise DataError(f"{path}: JSON nested too deeply to be a data file") from None
        raise DataError(f"{path}:{lineno}: JSON nested too deeply to be a record") from None


def json_records(path: Path) -> list[Any]:
    """Every record of a JSON array or JSON Lines file; errors name the file and line."""
    return [rec for _, _, rec in _json_records(path)]


def text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (without their "\\n" / "\\r\\n"), read a line at a time;
    errors name the file (and line, for bad bytes: `_streamed_lines`)."""
    return [line for _, line in _streamed_lines(path)]


def _where(path: Path, index: int, lineno: int | None) -> str:
    return f"{path}:{lineno}" if lineno is not None else f"{path}: record {index}"


def _first_record_is_rationale(path: Path) -> bool:
    """Whether the first record of a JSON Lines file is a generation record. Its first
    non-blank line is read whole: a record with its rationale's token ids is longer than
    any fixed-size head (a cut one would not parse, and the file would pass for pairs)."""
    if not path.is_file():  # a FIFO or device: read_text_file says what it is
        return False
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            line = (raw.removeprefix(b"\xef\xbb\xbf") if n == 0 else raw).strip()  # a UTF-8 BOM is not data
            if line:
                break
        else:
            return False
    if not line.startswith(b"{"):
        return False
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError: the reader names the problem
        return False
    return isinstance(rec, dict) and "translation" not in rec and "source" in rec and "reference" in rec


def _read_json_pairs(path: Path) -> tuple[list[_Pair], tuple[str, str] | None]:
    pairs = []
    for index, lineno, rec in _json_records(path):
        where = _where(path, index, lineno)
        if not isinstance(rec, dict) or not isinstance(rec.get("translation"), dict):
            raise DataError(f'{where}: expected a record {{"translation": {{"<lang>": text, ...}}}}, got {str(rec)[:80]}')
        pairs.append((index, lineno, rec["translation"]))
    return pairs, _langs_from_name(path.name)


def _read_text_pair(cfg: SourceConfig) -> tuple[list[_Pair], tuple[str, str] | None]:
    """A line-aligned pair; its languages from the suffixes (train.de-en.de / train.de-en.en)
    or from src_lang/tgt_lang. A language given that contradicts a suffix naming a language
    is an error: the file's lines would be labelled with the wrong language."""
    src_path, tgt_path = Path(cfg.path), Path(cfg.target_path or "")
    if not cfg.target_path:
        raise DataError(f"{src_path}: a line-aligned text source needs target_path (the target-side file)")
    a, b = src_path.suffix.lstrip("."), tgt_path.suffix.lstrip(".")
    langs = (a, b) if is_language_code(a) and is_language_code(b) and a != b else None
    # Shaped like codes is enough to default the languages, but a config that disagrees
    # is only an error for suffixes that surely are languages ("train.src" / "train.tgt"
    # are not): known codes, or the two languages of the name's "xx-yy".
    if langs and (all(c.split("_", 1)[0].lower() in LANGUAGE_NAMES for c in langs)
                  or set(langs) == set(_langs_from_name(src_path.name) or ())):
        for setting, given, path, lang in (("src_lang", cfg.src_lang, src_path, a), ("tgt_lang", cfg.tgt_lang, tgt_path, b)):
            if given and given != lang:
                raise DataError(f"{path}: its suffix says its lines are {lang!r}, but {setting} is {given!r}; "
                                f"expected {setting} {lang!r} (or leave it out)")
    if langs is None and not (cfg.src_lang and cfg.tgt_lang):
        raise DataError(
            f"{src_path} / {tgt_path}: cannot tell the languages from the file suffixes; set src_lang and tgt_lang"
        )
    # both the same (the dicts below then hold one side): _pair_languages raises before use
    src_key, tgt_key = cfg.src_lang or langs[0], cfg.tgt_lang or langs[1]
    src_lines, tgt_lines = text_lines(src_path), text_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise DataError(
            f"line-aligned pair does not align: {src_path} has {len(src_lines)} lines, "
            f"{tgt_path} has {len(tgt_lines)}"
        )
    pairs = [(i, i + 1, {src_key: s, tgt_key: t}) for i, (s, t) in enumerate(zip(src_lines, tgt_lines))]
    return pairs, (src_key, tgt_key)


def _read_tsv(path: Path, cfg: SourceConfig) -> tuple[list[_Pair], tuple[str, str] | None]:
    lines = text_lines(path)
    langs = _langs_from_name(path.name)
    start = 0
    if lines:
        head = lines[0].split("\t")
        if len(head) == 2 and all(is_language_code(h.strip()) for h in head) and head[0].strip() != head[1].strip():
            langs = (head[0].strip(), head[1].strip())
            start = 1
            for given, col in ((cfg.src_lang, langs[0]), (cfg.tgt_lang, langs[1])):
                if given and given not in langs:
                    raise DataError(f"{path}:1: header names languages {langs}, but the config says {given!r}")
    if langs is None:
        if not (cfg.src_lang and cfg.tgt_lang):
            raise DataError(
                f"{path}: no header row naming the languages (e.g. 'de<TAB>en') and none in the file name; "
                "set src_lang and tgt_lang"
            )
        langs = (cfg.src_lang, cfg.tgt_lang)
    pairs = []
    for i, line in enumerate(lines[start:]):
        lineno = start + i + 1
        cols = line.split("\t")
        if len(cols) != 2:
            raise DataError(f"{path}:{lineno}: expected 2 tab-separated columns (source, target), got {len(cols)}")
        pairs.append((i, lineno, {langs[0]: cols[0], langs[1]: cols[1]}))
    return pairs, langs


def _read_hf(cfg: SourceConfig) -> tuple[list[_Pair], tuple[str, str] | None]:
    import datasets

    p = Path(cfg.path)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
    else:
        if not cfg.split:
            raise DataError(f"{cfg.path}: a hub dataset needs `split` (e.g. train)")
        ds = datasets.load_dataset(cfg.path, cfg.hf_config, split=cfg.split)
    if isinstance(ds, datasets.DatasetDict):
        if not cfg.split:
            raise DataError(f"{cfg.path}: a dataset with splits {list(ds)} needs `split`")
        if cfg.split not in ds:
            raise DataError(f"{cfg.path}: no split {cfg.split!r}; it has {list(ds)}")
        ds = ds[cfg.split]
    langs = _langs_from_name(cfg.hf_config) if cfg.hf_config else None
    cols = ds.column_names
    pairs: list[_Pair] = []
    if "translation" in cols:
        for i, rec in enumerate(ds["translation"]):
            if not isinstance(rec, dict):
                raise DataError(f"{cfg.path}: row {i}: 'translation' is not a mapping of language -> text")
            pairs.append((i, None, rec))
        return pairs, langs
    wanted = [cfg.src_lang, cfg.tgt_lang] if cfg.src_lang and cfg.tgt_lang else list(langs or [])
    if len(wanted) != 2 or not all(w in cols for w in wanted):
        raise DataError(
            f"{cfg.path}: no 'translation' column; expected one column per language {wanted or '(set src_lang/tgt_lang)'}, "
            f"found columns {cols}"
        )
    for i, (s, t) in enumerate(zip(ds[wanted[0]], ds[wanted[1]])):
        pairs.append((i, None, {wanted[0]: s, wanted[1]: t}))
    return pairs, (wanted[0], wanted[1])


def _langs_from_name(name: str | None) -> tuple[str, str] | None:
    if not name:
        return None
    m = None
    for m in _PAIR_IN_NAME.finditer(name):
        pass  # the last "xx-yy" in the name wins ("wmt22.de-en.json")
    return (m.group(1), m.group(2)) if m else None


# --------------------------------------------------------------------------- pairs -> examples


def _pair_languages(cfg: SourceConfig, file_langs: tuple[str, str] | None, first: dict[str, Any] | None) -> tuple[str, str]:
    """The (source, target) languages of the pairs as stored.

    src_lang and tgt_lang both given decide. One given: the other is the other language
    of the file's pair (`file_langs`: its name, TSV header or suffixes), else of the two
    keys of the first record. Neither: the file's pair, else (with directions) the first
    record's keys. The same language on both sides is an error: every example would
    have its reference as its source.
    """
    given = cfg.src_lang or cfg.tgt_lang

    def complete(pair: tuple[str, str]) -> tuple[str, str]:
        if cfg.src_lang:
            return cfg.src_lang, pair[1] if cfg.src_lang == pair[0] else pair[0]
        if cfg.tgt_lang:
            return pair[1] if cfg.tgt_lang == pair[0] else pair[0], cfg.tgt_lang
        return pair

    keys = tuple(first) if first is not None and len(first) == 2 else None
    if cfg.src_lang and cfg.tgt_lang:
        langs = (cfg.src_lang, cfg.tgt_lang)
    elif file_langs and (not given or given in file_langs):
        langs = complete(file_langs)
    elif keys and (given in keys or (not given and cfg.directions)):
        langs = complete(keys)  # with no language given order does not matter: directions decide
    elif given and given not in (file_langs or ()) and given not in (first or ()):
        setting = "src_lang" if cfg.src_lang else "tgt_lang"
        found = [f"the file's languages {'-'.join(file_langs)}"] if file_langs else []
        found += [f"the first record's keys {sorted(first)}"] if first else []
        raise DataError(f"{cfg.path}: {setting} is {given!r}, not one of {' or '.join(found) or 'the languages of the pair'}; "
                        "expected one of them (or set both src_lang and tgt_lang)")
    else:
        raise DataError(
            f"{cfg.path}: cannot tell source from target language (keys {list(first) if first else '?'}, "
            "no 'xx-yy' in the file name); set src_lang and tgt_lang, or directions"
        )
    if langs[0] == langs[1]:
        raise DataError(
            f"{cfg.path}: source and target language are both {langs[0]!r} (src_lang {cfg.src_lang!r}, "
            f"tgt_lang {cfg.tgt_lang!r}, file languages {'-'.join(file_langs) if file_langs else 'none'}); "
            "expected two different languages"
        )
    return langs


def _directions(cfg: SourceConfig, langs: tuple[str, str]) -> list[tuple[str, str]]:
    if not cfg.directions:
        return [langs]
    out = []
    for d in cfg.directions:
        parts = d.split("-")
        if len(parts) != 2 or set(parts) != set(langs):
            raise DataError(f"{cfg.path}: direction {d!r} is not one of {langs[0]}-{langs[1]} / {langs[1]}-{langs[0]}")
        out.append((parts[0], parts[1]))
    return out


def _id_prefix(path: Path) -> str:
    name = path.name
    for suffix in (".rationales.jsonl", ".jsonl", ".json", ".tsv"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = path.stem
    parent = path.parent.name
    return f"{parent}/{name}" if parent else name


def _pairs_to_examples(
    cfg: SourceConfig, pairs: list[_Pair], file_langs: tuple[str, str] | None, on_empty: str, stats: SourceStats
) -> list[Example]:
    path = Path(cfg.path)
    langs = _pair_languages(cfg, file_langs, pairs[0][2] if pairs else None)
    directions = _directions(cfg, langs)
    prefix = _id_prefix(path)
    examples: list[Example] = []
    kept = 0
    for index, lineno, rec in pairs:
        if cfg.limit is not None and kept >= cfg.limit:
            break
        where = _where(path, index, lineno)
        texts = {}
        for lang in langs:
            if lang not in rec:
                raise DataError(f"{where}: missing language key {lang!r} (record has {sorted(rec)})")
            value = rec[lang]
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise DataError(f"{where}: {lang!r}: expected a string, got {type(value).__name__}")
            texts[lang] = value
        empty = [lang for lang in langs if not texts[lang].strip()]
        if empty:
            reason = "empty_source" if langs[0] in empty else "empty_target"
            if on_empty == "error":
                raise DataError(f"{where}: empty {'source' if reason == 'empty_source' else 'target'} text ({empty[0]!r})")
            stats.skipped[reason] += 1
            continue
        kept += 1
        for src, tgt in directions:
            examples.append(Example(id=f"{prefix}:{index}:{src}-{tgt}", src_lang=src, tgt_lang=tgt,
                                    source=texts[src], reference=texts[tgt]))
    stats.pairs += kept
    return examples


def rationale_files(root: Path) -> list[Path]:
    """The record files of a generation source: the generator's merged `rationales.jsonl`
    when the directory has one, else every `*.jsonl` shard (not `skipped.jsonl`)."""
    if not root.is_dir():
        return [root]
    if (root / MERGED).is_file():
        return [root / MERGED]
    files = sorted(p for p in root.glob("*.jsonl") if p.name != "skipped.jsonl")
    if not files:
        raise DataError(f"{root}: no {MERGED} and no *.jsonl rationale shards in this directory")
    return files


def teacher_topk_problem(cfg: SourceConfig) -> str | None:
    """Why this source gives no teacher top-k for loss.kd_weight (None: it has one).

    Looks at files only (no tokenising): a plain-pair source, generation records
    without a top-k file beside them, or records of a strategy without rationales.
    """
    cfg = expand_user_paths(cfg)
    try:
        fmt = detect_format(cfg)
    except DataError as err:
        return str(err)
    if fmt != "rationales":
        return f"{cfg.path} holds plain pairs ({fmt}), not generation records"
    files = rationale_files(Path(cfg.path))
    strategy = None
    for path in files:
        for index, lineno, rec in _json_records(path):
            strategy = check_record(rec, _where(path, index, lineno))
            break
        if strategy is not None:
            break
    if strategy is not None and strategy not in RATIONALE_STRATEGIES:
        return f"{cfg.path} holds {strategy} records, which train a target without a rationale"
    if not any(topk_path(f) is not None for f in files):
        return (f"{cfg.path} has no top-k file beside its records (generate them with rationale.topk > 0, "
                "e.g. rationale.topk=20)")
    return None


def _read_rationales(cfg: SourceConfig, on_empty: str, stats: SourceStats) -> tuple[list[Example], int]:
    """Generation records -> (Examples, records read) (radis.data.records.record_to_example).

    Top-k arrays written by the generator beside the records
    (`rationales.topk.safetensors`) are attached to rationale records; radis.data.segments
    aligns them to the rationale tokens. Records read but none kept (`directions`,
    `limit`, empty texts removed them all) is a DataError naming what removed them.
    """
    files = rationale_files(Path(cfg.path))
    wanted = set(cfg.directions)
    examples: list[Example] = []
    seen: set[str] = set()
    shared: dict = {}  # the meta values every record of a run repeats, held once (record_to_example)
    read = 0
    # for the error when none is kept: the directions `directions` left out, and the empties
    other_directions: Counter = Counter()
    empty = 0
    for path in files:
        side = topk_path(path)
        topk = TopkReader(side) if side is not None else None
        for index, lineno, rec in _json_records(path):
            read += 1  # before the limit: a file with records is not "empty" under limit 0
            if cfg.limit is not None and len(examples) >= cfg.limit:
                break
            where = _where(path, index, lineno)
            try:
                strategy = check_record(rec, where)
            except RecordError as err:
                raise DataError(str(err)) from None
            ex_id = rec["id"]
            if ex_id in seen:  # a resumed generator may have written a record twice
                stats.skipped["duplicate_id"] += 1
                continue
            if wanted and f"{rec['src_lang']}-{rec['tgt_lang']}" not in wanted:
                stats.skipped["other_direction"] += 1
                other_directions[f"{rec['src_lang']}-{rec['tgt_lang']}"] += 1
                continue
            # the target a record trains: a seqkd / sdft record's `target` replaces the reference
            target_field = "reference" if strategy in RATIONALE_STRATEGIES else "target"
            if not rec["source"].strip() or not rec[target_field].strip():
                reason = "empty_source" if not rec["source"].strip() else "empty_target"
                if on_empty == "error":
                    field_name = "source" if reason == "empty_source" else target_field
                    raise DataError(f"{where}: empty {reason.split('_')[1]} text ({field_name!r})")
                stats.skipped[reason] += 1
                empty += 1
                continue
            seen.add(ex_id)
            ex = record_to_example(rec, topk.lazy(ex_id) if topk is not None and ex_id in topk else None, shared)
            if ex.meta["strategy"] in RATIONALE_STRATEGIES and ex.rationale is None:
                stats.empty_rationale += 1  # kept as a pair without rationale
            if ex.meta.get("target_from") == "reference":
                stats.reference_kept += 1  # a rejected generated target: the reference trains
            examples.append(ex)
    if read and not examples:
        why = [f"limit is {cfg.limit}"] if cfg.limit == 0 else []
        if other_directions:
            found = ", ".join(f"{n} {d}" for d, n in sorted(other_directions.items()))
            why.append(f"directions {cfg.directions} leave out {found}")
        if empty:
            why.append(f"{empty} have an empty source or reference")
        raise DataError(f"{cfg.path}: keeps none of its records: {'; '.join(why)}; "
                        "expected at least one record to train on")
    stats.pairs += len(examples)
    return examples, read
