"""The record format of self-generated training data: written by `radis generate`, read by training.

One module for both sides, so that the generator (radis.generation, above the data
package) and the data path (radis.data.sources, segments, inspect) agree on every field
without the data package importing from a higher one.

Files of a generation output directory (`rationale.output_dir`):

    rationales.jsonl              one record per line, in example order
    rationales.topk.safetensors   optional top-k of the generator per generated token:
                                  "<id>/ids" [n, k] int32, "<id>/logprobs" [n, k] float32

The names say "rationales" for every strategy: the format began with RaDis rationales
and is the same for the baselines' targets.

A record (one JSON object) always has

    id, src_lang, tgt_lang, direction, source   the pair, as read from data.train
    reference                                   the human reference translation, always
    strategy        "continue" | "ask"            a RaDis rationale after the reference
                    "seqkd" | "sdft"              a generated target that replaces the reference
    generator       the model that generated (model.name_or_path or rationale.generator)
    decoding        the decoding settings; stop_reason "eot" | "max_length"
    prompt_tokens, tokenizer_fingerprint, topk (k recorded, 0 = none), config_hash
    prompt          what the prompt was built from: chat_template, system_prompt,
                    instruction, separator (training reuses recorded ids and top-k only
                    when they match its own)

Rationale strategies (`continue`, `ask`) add

    rationale               decoded continuation (may be empty: the pair trains without one)
    rationale_token_ids     the generated ids, reused by training under the same tokenizer
    rationale_tokens, separator

Target strategies (`seqkd`, `sdft`) add

    target                  the training target: the generated answer, or the reference
                            when the answer was rejected
    target_from             "generated" | "reference"
    rejected                null, or why the answer was rejected ("empty", "max_length",
                            "meta_talk", "low_chrf"; radis.generation.strategies)
    generated               the decoded answer, kept also when rejected
    generated_token_ids, generated_tokens
    chrf                    sentence chrF of the answer against the reference

How training uses a record (`record_to_example`): a rationale record trains reference
(MT span) + separator + rationale (RD span); a target record trains `target` as the MT
span and has no RD span. Both keep every other field in `Example.meta`.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from radis.data.example import Example
from radis.errors import InputError

FORMAT = "radis-rationales/2"
MERGED = "rationales.jsonl"
MERGED_TOPK = "rationales.topk.safetensors"

RATIONALE_STRATEGIES = ("continue", "ask")
TARGET_STRATEGIES = ("seqkd", "sdft")
STRATEGIES = RATIONALE_STRATEGIES + TARGET_STRATEGIES
# Fields every record must have as strings (records of format 1 had no "strategy":
# they are `continue` rationales).
REQUIRED_FIELDS = ("id", "src_lang", "tgt_lang", "source", "reference")
# Written by the generator, never read back as training text.
_TEXT_FIELDS = ("rationale", "target")


class RecordError(InputError):
    """A record that does not have the fields its strategy needs (the message names it)."""


# --------------------------------------------------------------------------- writing


def base_record(example: Example, *, strategy: str, generator: str, decoding: dict[str, Any], stop_reason: str,
                prompt_tokens: int, fingerprint: str, topk: int, config_hash: str,
                prompt: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields every record has (see the module docstring); the strategy adds its own."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    rec: dict[str, Any] = {
        "id": example.id,
        "src_lang": example.src_lang,
        "tgt_lang": example.tgt_lang,
        "direction": example.direction,
        "source": example.source,
        "reference": example.reference,
        "strategy": strategy,
        "generator": generator,
        "decoding": decoding,
        "stop_reason": stop_reason,
        "prompt_tokens": prompt_tokens,
        "tokenizer_fingerprint": fingerprint,
        "topk": topk,
        "config_hash": config_hash,
    }
    if prompt is not None:
        rec["prompt"] = prompt
    if example.meta:
        meta = {k: v for k, v in example.meta.items() if _is_json(v)}
        if meta:
            rec["meta"] = meta
    return rec


def _is_json(value: Any) -> bool:
    import json

    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False  # e.g. arrays: they stay out of the record
    return True


# --------------------------------------------------------------------------- reading


def record_strategy(rec: dict[str, Any], where: str) -> str:
    strategy = rec.get("strategy", "continue")
    if strategy not in STRATEGIES:
        raise RecordError(f"{where}: 'strategy': expected one of {list(STRATEGIES)}, got {strategy!r}")
    return strategy


def check_record(rec: Any, where: str) -> str:
    """Raise RecordError naming `where` unless `rec` is a usable record; returns its strategy."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: expected a generation record (a JSON object), got {str(rec)[:80]}")
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        raise RecordError(f"{where}: rationale record lacks {missing} (needs {list(REQUIRED_FIELDS)})")
    for k in REQUIRED_FIELDS:
        if not isinstance(rec[k], str):
            raise RecordError(f"{where}: {k!r}: expected a string, got {type(rec[k]).__name__}")
    strategy = record_strategy(rec, where)
    if strategy in RATIONALE_STRATEGIES:
        rationale = rec.get("rationale")
        if rationale is not None and not isinstance(rationale, str):
            raise RecordError(f"{where}: 'rationale': expected a string or null, got {type(rationale).__name__}")
    else:
        target = rec.get("target")
        if not isinstance(target, str):
            raise RecordError(f"{where}: a {strategy} record needs 'target' (a string), got {type(target).__name__}")
    ids = rec.get("rationale_token_ids")
    if ids is not None:
        # int exactly: bool is an int too, and a float would be truncated by the int32 copy
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise RecordError(f"{where}: 'rationale_token_ids': expected a list of integers")
        if ids and (min(ids) < 0 or max(ids) >= 2**31):
            raise RecordError(f"{where}: 'rationale_token_ids': token ids are in [0, 2^31), got "
                              f"{min(ids) if min(ids) < 0 else max(ids)}")
    return strategy


def record_to_example(rec: dict[str, Any], teacher: Any = None, shared: dict[Any, Any] | None = None) -> Example:
    """The Example training uses for a checked record (see the module docstring).

    `teacher` (the record's top-k arrays, or a function that reads them: see
    `TopkReader.lazy`) is attached to a rationale record as meta["teacher_topk_ids"] /
    ["teacher_topk_logprobs"] ([n_rationale_tokens, k]), or as meta["teacher_topk"] when
    lazy; radis.data.segments aligns them to the rationale tokens (`example_teacher`
    reads either).

    A build holds every Example of a split at once, so the meta is kept compact:
    "rationale_token_ids" becomes an int32 array [n] (4 bytes a token, not a Python
    int's 28 + 8), and with `shared` (one dict per file read) the meta keys and the
    values of REPEATED_META, the same in every record of a run, are one object for all
    of them (`_shared_value`; json makes new ones for every record). Only those: a value
    unique to its record would only add its key to `shared`. Meta is read, never mutated.
    """
    strategy = rec.get("strategy", "continue")
    meta = {_shared_value(k, shared): _shared_value(v, shared) if k in REPEATED_META else v
            for k, v in rec.items() if k not in REQUIRED_FIELDS and k not in _TEXT_FIELDS}
    if meta.get("rationale_token_ids") is not None:  # checked ints in [0, 2^31) (check_record)
        meta["rationale_token_ids"] = np.asarray(meta["rationale_token_ids"], dtype=np.int32)
    meta["strategy"] = strategy
    if strategy in TARGET_STRATEGIES:
        meta["human_reference"] = rec["reference"]
        return Example(id=rec["id"], src_lang=rec["src_lang"], tgt_lang=rec["tgt_lang"], source=rec["source"],
                       reference=rec["target"], rationale=None, meta=meta)
    rationale = rec.get("rationale")
    if not (rationale or "").strip():
        rationale = None
    if teacher is not None and rationale is not None:
        if callable(teacher):  # read when the segment is built, not held by every example
            meta["teacher_topk"] = teacher
        else:
            meta["teacher_topk_ids"], meta["teacher_topk_logprobs"] = teacher
    return Example(id=rec["id"], src_lang=rec["src_lang"], tgt_lang=rec["tgt_lang"], source=rec["source"],
                   reference=rec["reference"], rationale=rationale, meta=meta)


# the meta fields radis generate writes with one value for a whole run (radis.generation)
REPEATED_META = frozenset({"direction", "strategy", "generator", "decoding", "stop_reason", "tokenizer_fingerprint",
                           "config_hash", "separator", "prompt", "topk"})


def _shared_value(value: Any, shared: dict[Any, Any] | None) -> Any:
    """`value`, or the equal value seen before in `shared`: strings by value, dicts and
    lists by their JSON text. Numbers are left alone (small ints are shared by Python)."""
    if shared is None:
        return value
    if isinstance(value, str):
        return shared.setdefault(value, value)
    if isinstance(value, (dict, list)) and value:
        try:
            key = ("json", json.dumps(value, sort_keys=True))
        except (TypeError, ValueError):
            return value
        return shared.setdefault(key, value)
    return value


def example_teacher(meta: dict[str, Any] | None) -> tuple[Any, Any] | None:
    """The (ids, log-probs) top-k an example's meta carries, read now if it is lazy; None without."""
    meta = meta or {}
    lazy = meta.get("teacher_topk")
    if lazy is not None:
        return lazy()
    if meta.get("teacher_topk_ids") is not None and meta.get("teacher_topk_logprobs") is not None:
        return meta["teacher_topk_ids"], meta["teacher_topk_logprobs"]
    return None


def has_teacher(meta: dict[str, Any] | None) -> bool:
    """Whether an example's meta carries a top-k (without reading a lazy one)."""
    meta = meta or {}
    return meta.get("teacher_topk") is not None or meta.get("teacher_topk_ids") is not None


def training_target(example: Example) -> str:
    """What an example trains on and where it came from, in words (radis inspect-data)."""
    meta = example.meta or {}
    strategy = meta.get("strategy")
    generator = meta.get("generator", "?")
    if strategy is None:
        return "target: the human reference"
    if strategy in TARGET_STRATEGIES:
        decoding = meta.get("decoding") or {}
        how = f"beam {decoding['num_beams']}" if decoding.get("num_beams", 1) > 1 else (
            "sampled" if decoding.get("do_sample") else "greedy")
        if meta.get("target_from") == "reference":
            return (f"target: the human reference ({strategy} answer of {generator} rejected: "
                    f"{meta.get('rejected')})")
        return f"target: {strategy} answer of {generator} ({how}), replacing the human reference"
    if example.rationale:
        return f"target: the human reference + a {strategy} rationale by {generator}"
    return f"target: the human reference (the {strategy} rationale of {generator} is empty)"


# --------------------------------------------------------------------------- top-k files


def save_topk_atomic(path: str | os.PathLike, topk: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Save {id: (ids [n, k] int32, logprobs [n, k] float32)} as one safetensors file."""
    from safetensors.numpy import save

    from radis.io import write_bytes_atomic

    tensors: dict[str, np.ndarray] = {}
    for key, (ids, lps) in topk.items():
        tensors[f"{key}/ids"] = np.ascontiguousarray(ids, dtype=np.int32)
        tensors[f"{key}/logprobs"] = np.ascontiguousarray(lps, dtype=np.float32)
    write_bytes_atomic(path, save(tensors, metadata={"format": FORMAT}))


def load_topk(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a top-k file back into {id: (ids, logprobs)}."""
    from safetensors.numpy import load_file

    _check_topk_file(path)
    try:
        flat = load_file(str(path))
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own plain Exception types
        raise RecordError(f"{path}: unreadable top-k file ({type(err).__name__}: {err})") from None
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in flat:
        key, _, kind = name.rpartition("/")
        if kind == "ids":
            if f"{key}/logprobs" not in flat:
                raise RecordError(f"{path}: example {key!r} has ids but no logprobs")
            out[key] = (flat[name], flat[f"{key}/logprobs"])
    return out


def _check_topk_file(path: str | os.PathLike) -> None:
    p = Path(path)
    if p.is_dir():
        raise RecordError(f"{p}: is a directory, expected a top-k .safetensors file")
    if not p.is_file():
        raise RecordError(f"{p}: no such top-k file")


class TopkReader:
    """Lazy access to one example's top-k in a (merged) top-k file.

    >>> reader = TopkReader("outputs/rationales/rationales.topk.safetensors")   # doctest: +SKIP
    >>> ids, logprobs = reader.get("deen/train:17:de-en")                        # doctest: +SKIP

    The safetensors header (8-byte length, then JSON: name -> dtype, shape, byte range)
    is parsed here and checked against the file's size; each `get` reads its two
    tensors with one positioned read each (os.pread). No memory map: a build that reads
    every example's top-k leaves the file in the page cache, not in the process's
    resident memory (a map's touched pages count there until it is closed).
    """

    _DTYPES: ClassVar[dict[str, Any]] = {"I32": np.int32, "F32": np.float32}

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        _check_topk_file(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 -- read from for the reader's life
            size = os.fstat(self._file.fileno()).st_size
            head = self._file.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= size - 8:
                raise ValueError(f"a header of {n} bytes does not fit the file's {size}")
            header = json.loads(self._file.read(n).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")  # noqa: TRY004 -- a bad file, reported below
            self._tensors = {name: self._entry(name, info, 8 + n, size)
                             for name, info in header.items() if name != "__metadata__"}
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise RecordError(f"{path}: unreadable top-k file ({type(err).__name__}: {err})") from None
        self._keys = {name.rpartition("/")[0] for name in self._tensors}

    def _entry(self, name: str, info: Any, base: int, size: int) -> tuple[Any, tuple[int, ...], int, int]:
        """(dtype, shape, first byte, end byte) of one tensor, checked against the file."""
        if not isinstance(info, dict) or info.get("dtype") not in self._DTYPES:
            raise ValueError(f"tensor {name!r}: expected dtype I32 or F32, got {info!r:.80}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"tensor {name!r}: bad shape {shape!r} or data_offsets {offsets!r}")
        dtype = self._DTYPES[info["dtype"]]
        start, end = base + offsets[0], base + offsets[1]
        if not base <= start <= end <= size or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"tensor {name!r}: bytes {offsets} do not hold a {shape} {info['dtype']} array "
                             f"inside the file's {size} bytes")
        return dtype, tuple(shape), start, end

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def _read(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._tensors[name]
        data = bytearray(os.pread(self._file.fileno(), end - start, start))
        if len(data) != end - start:
            raise RecordError(f"{self.path}: truncated while reading {name!r}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def get(self, example_id: str) -> tuple[np.ndarray, np.ndarray]:
        if example_id not in self._keys:
            raise KeyError(f"{self.path}: no top-k for example {example_id!r}")
        return self._read(f"{example_id}/ids"), self._read(f"{example_id}/logprobs")

    def lazy(self, example_id: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """A function that reads one example's top-k when called (building its segment):
        a data set's top-k is then never in memory all at once."""
        if example_id not in self._keys:
            raise KeyError(f"{self.path}: no top-k for example {example_id!r}")
        return functools.partial(self.get, example_id)


def topk_path(records_file: Path) -> Path | None:
    """The top-k file beside a record file (`X.jsonl` -> `X.topk.safetensors`), if it exists."""
    name = records_file.name
    if not name.endswith(".jsonl"):
        return None
    side = records_file.with_name(name[: -len(".jsonl")] + ".topk.safetensors")
    return side if side.is_file() else None
