"""`radis build-data`: sources -> segments -> packed shards, cached on disk.

    radis build-data --config recipes/X.yaml [--split train|valid|all] [--force] [key=value ...]

The trainer calls `load_or_build(cfg, split, tokenizer)`, which returns the cached
`PackedDataset` or builds it. A cache entry is a directory

    <data.cache_dir>/<split>-<key>/     meta.json, stats.json and one .npy file per
                                        array (radis.data.packed_files), opened through
                                        memory maps

`key` hashes everything the packed data depends on: the tokenizer fingerprint
(prompts.tokenizer_fingerprint) and resolved chat template, the data config (sources
of this split, max_tokens, separator, instruction, system prompt, language names,
on_empty, pack_window, seed), loss.method (vanilla builds no rationale spans), and the
(path, size, mtime) of every source file. Change any of them and a new entry is built;
old entries stay until deleted.

Concurrency: an entry is written into a temporary directory and renamed into place,
so a reader never sees half an entry, and a complete one (meta.json present) is read
without taking any lock: a cache directory this process cannot write (read-only, or
shared with lock files of another user) serves every entry it holds. Processes that
build the same entry at once (several ranks, several jobs) serialise on a lock file
where the file system supports flock; where it does not, each builds and the loser of
the rename discards its copy. `force` builds the new entry beside the old one and swaps
it in (radis.data.packed_files.set_aside): a forced build that fails keeps the old one.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radis.config import RadisConfig, SourceConfig, load_config
from radis.data.example import SPAN_NAMES
from radis.data.packed_files import (
    FORMAT_VERSION,
    DataBuildError,
    SegmentSpill,
    read_packed,
    set_aside,
    write_spilled,
)
from radis.data.packing import PackedDataset
from radis.data.records import topk_path
from radis.data.sources import expand_user_paths
from radis.io import exclusive_flock

SEGMENT_CHUNK = 2048  # examples tokenised per build_segments call (progress granularity)
SPLITS = ("train", "valid")


# --------------------------------------------------------------------------- cache key


def source_files(src: SourceConfig) -> list[Path]:
    """The files a source reads (a directory: every file below it; a records file: the
    top-k file beside it too, which the reader attaches when it exists)."""
    src = expand_user_paths(src)  # as the reader expands them: the files hashed are the files read
    out = []
    for p in (src.path, src.target_path):
        if not p:
            continue
        path = Path(p)
        if path.is_dir():
            out += sorted(f for f in path.rglob("*") if f.is_file())
        elif path.exists():
            out.append(path)
            # any X.jsonl, whatever its format (telling would mean reading it): a top-k file
            # beside a plain-pair file only costs a rebuild when it changes
            side = topk_path(path)
            if side is not None:
                out.append(side)
    return out


def cache_key_inputs(cfg: RadisConfig, split: str, fingerprint: str, template: str) -> dict[str, Any]:
    """Everything the packed data of `split` depends on, as plain JSON-able data."""
    d = cfg.data
    sources = _split_sources(cfg, split)
    files = []
    for src in sources:
        for f in source_files(src):
            try:
                st = f.stat()
                files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
            except (OSError, RuntimeError) as err:  # RuntimeError: a symbolic link loop (Path.resolve)
                raise DataBuildError(f"{f}: cannot read ({err})") from None
    return {
        "format_version": FORMAT_VERSION,
        "split": split,
        "tokenizer_fingerprint": fingerprint,
        "chat_template": template,
        "sources": [dataclasses.asdict(s) for s in sources],
        "files": files,
        "data": {
            "max_tokens": d.max_tokens,
            "on_empty": d.on_empty,
            "separator": d.separator,
            "instruction": d.instruction,
            "system_prompt": d.system_prompt,
            "language_names": dict(getattr(d, "language_names", {}) or {}),
            "pack_window": d.pack_window,
            "seed": d.seed,
        },
        "with_rationale": cfg.loss.method == "radis",
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _split_sources(cfg: RadisConfig, split: str) -> list[SourceConfig]:
    if split not in SPLITS:
        raise DataBuildError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    return list(getattr(cfg.data, split))


# --------------------------------------------------------------------------- build


def load_or_build(cfg: RadisConfig, split: str = "train", tokenizer: Any = None, *, force: bool = False,
                  progress: bool = True, log: Callable[[str], None] | None = print) -> PackedDataset:
    """The packed data of `split`: from the cache when an entry matches, else built.

    `tokenizer=None` loads `model.tokenizer or model.name_or_path`. The returned
    dataset's `meta` holds "cache_dir" (the entry), "reused" (bool), "pad_token_id"
    (the tokenizer's pad id, else its eos, else 0: padding never has a loss and is
    masked out, any id works) and "stats" (the summary). Safe to call from several
    processes at once (see the module docstring).
    """
    from radis.data.prompts import ChatFormat

    log = log or (lambda _msg: None)
    sources = _split_sources(cfg, split)
    if not sources:
        raise DataBuildError(f"data.{split}: no sources configured (add a list of {{path: ...}} entries)")
    if tokenizer is None:
        from radis.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.cache_dir)
    fmt = ChatFormat(tokenizer, cfg.data, cfg.model.chat_template)
    inputs = cache_key_inputs(cfg, split, fmt.fingerprint, fmt.template_id)
    key = cache_key(inputs)
    root = Path(os.path.expanduser(cfg.data.cache_dir))
    entry = root / f"{split}-{key}"
    unreadable: DataBuildError | None = None
    if not force and (entry / "meta.json").is_file():
        # entries are renamed in whole: a complete one needs no lock (nor a writable directory)
        try:
            return _reuse(entry, split, log)
        except DataBuildError as err:  # a forced rebuild's swap caught mid-way reads so too: retry under the lock
            unreadable = err
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock_file = open(root / f".{split}-{key}.lock", "a+")  # noqa: SIM115 - closed by the with below
    except OSError as err:  # read-only, or another user's lock file: nothing can be built here
        if unreadable is not None:  # what is wrong with the entry there says more than that
            raise unreadable from None
        raise DataBuildError(f"{root}: cannot build a cache entry there ({err}); expected a directory writable "
                             "by this user, or set data.cache_dir to one") from None
    with lock_file, exclusive_flock(lock_file) as held:
        if held:
            _remove_leftovers(entry, log)
        if not force and (entry / "meta.json").is_file():
            return _reuse(entry, split, log)
        if entry.is_dir() and not (entry / "meta.json").is_file():
            # meta.json is written last and entries are renamed in whole, so this is no build's
            # output: a deletion that was cut short (meta.json may go first) or a hand edit
            if not held:  # unlocked, another builder could rename its whole entry in before ours goes
                raise DataBuildError(f"{entry}: an incomplete cache entry (no meta.json) and no lock to remove "
                                     "it safely; delete the directory")
            log(f"[build-data] removing {entry.name}: an incomplete entry (no meta.json)")
            shutil.rmtree(set_aside(entry, "incomplete"), ignore_errors=True)
        t0 = time.perf_counter()
        _build(cfg, split, fmt, tokenizer, entry, {"key": key, "key_inputs": inputs}, progress=progress, log=log,
               started=t0, replace=force)
    ds = read_packed(entry)
    ds.meta["reused"] = False
    log(f"[build-data] {split}: wrote {entry} ({ds.num_packs} packs) in {ds.meta.get('build_seconds')} s")
    return ds


def _reuse(entry: Path, split: str, log: Callable[[str], None]) -> PackedDataset:
    """The complete cache entry `entry`, opened (DataBuildError where it does not read back whole)."""
    ds = read_packed(entry)
    ds.meta["reused"] = True
    log(f"[build-data] {split}: reusing cached packed data {entry}")
    return ds


def _build(cfg: RadisConfig, split: str, fmt: Any, tokenizer: Any, entry: Path, extra_meta: dict[str, Any],
           progress: bool, log: Callable[[str], None], started: float, replace: bool = False) -> None:
    """Sources -> segments (spilled to disk chunk by chunk) -> packs -> the cache entry
    (`replace`: swapped in for the existing one only once written, see `write_spilled`).

    The segments are not held in memory: each chunk's token ids, spans and teacher rows
    go to raw files beside the entry (radis.data.packed_files.SegmentSpill) and the
    entry is written from them in pack order, so the build's memory grows only with
    what is kept per example (its text and recorded ids), not with its top-k.
    """
    from tqdm.auto import tqdm

    from radis.data.packing import pack_segments
    from radis.data.segments import SegmentStats, build_segments
    from radis.data.sources import read_sources

    d = cfg.data
    log(f"[build-data] {split}: reading {len(_split_sources(cfg, split))} source(s)")
    examples, source_stats = read_sources(_split_sources(cfg, split), d.on_empty)
    if not examples:
        raise DataBuildError(f"data.{split}: the sources gave no examples ({_plain(source_stats)})")
    seg_stats = SegmentStats()
    with_rationale = cfg.loss.method == "radis"
    spill_dir = Path(tempfile.mkdtemp(prefix=f".{entry.name}-segments-", dir=entry.parent))
    try:
        spill = SegmentSpill(spill_dir)
        bar = tqdm(total=len(examples), desc=f"tokenise {split}", unit="ex", disable=not progress, file=sys.stderr)
        for start in range(0, len(examples), SEGMENT_CHUNK):
            chunk = examples[start:start + SEGMENT_CHUNK]
            segs, st = build_segments(fmt, chunk, separator=d.separator, max_tokens=d.max_tokens,
                                      with_rationale=with_rationale)
            spill.add(segs)
            seg_stats.merge(st)
            examples[start:start + SEGMENT_CHUNK] = [None] * len(chunk)  # done with them: let them go
            bar.update(len(chunk))
            del chunk, segs
        bar.close()
        if not len(spill):
            raise DataBuildError(f"data.{split}: no example fits data.max_tokens={d.max_tokens} ({_plain(seg_stats)})")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        packs = pack_segments(spill.lengths, d.max_tokens, d.pack_window, d.seed, spill.example_ids)

        def describe(ds: PackedDataset) -> None:
            ds.meta.update(split=split, pad_token_id=int(pad if pad is not None else 0), chat_template=fmt.template,
                           tokenizer_fingerprint=fmt.fingerprint, **extra_meta,
                           build_seconds=round(time.perf_counter() - started, 2))
            ds.meta["stats"] = summary(ds, _plain(source_stats), _plain(seg_stats))

        write_spilled(spill, packs, entry, d.max_tokens, describe, progress=progress, replace=replace)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)


def summary(ds: PackedDataset, source_stats: dict[str, Any], segment_stats: dict[str, Any]) -> dict[str, Any]:
    """The statistics of one built split (saved as stats.json, printed by `format_summary`)."""
    counts = ds.span_counts()
    span_tokens = {name: counts.get(code, 0) for code, name in SPAN_NAMES.items()}
    targets = ds.pack_stats()
    return {
        "sources": source_stats,
        "segments": segment_stats,
        "packing": {
            "segments": ds.num_segments,
            "packs": ds.num_packs,
            "max_tokens": ds.max_tokens,
            "tokens": ds.num_tokens,
            "tokens_per_span": span_tokens,
            "targets": {"mt": int(targets[:, 1].sum()), "rd": int(targets[:, 2].sum())},
            "efficiency": round(ds.efficiency, 5),
        },
    }


def format_summary(split: str, stats: dict[str, Any]) -> str:
    """The summary as an aligned two-column table."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and not value:
            rows.append((prefix, "none"))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, float):
            rows.append((prefix, f"{value:.2%}" if prefix.endswith("efficiency") else f"{value:g}"))
        else:
            rows.append((prefix, str(value)))

    walk("", stats)
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = "-" * (width + vwidth + 3)
    out = [f"data statistics: {split}", line]
    out += [f"{k:<{width}}   {v:>{vwidth}}" for k, v in rows]
    out.append(line)
    return "\n".join(out)


def _plain(obj: Any) -> dict[str, Any]:
    """A stats object (dataclass, object with to_dict, or dict) as JSON-able data."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    elif dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def _remove_leftovers(entry: Path, log: Callable[[str], None]) -> None:
    """Remove what a killed build of `entry` left beside it: its segment spill
    (`.<entry>-segments-*`) and its unfinished copy (`.<entry>-*`, radis.data.packed_files).

    Called only while holding the entry's lock: every builder of the entry holds it for
    its whole build, so any such directory then belongs to a build that is gone.
    """
    for leftover in sorted(entry.parent.glob(f".{entry.name}-*")):
        if leftover.is_dir():
            log(f"[build-data] removing {leftover.name}, left by an interrupted build")
            shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from radis.runtime import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--split", choices=["train", "valid", "all"], default="all",
                        help="which split to build (all: train, and valid when it has sources)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a cache entry matches")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from radis.data.prompts import ChatFormatError
    from radis.data.sources import DataError

    cfg = load_config(args.config, args.overrides)
    splits = [args.split] if args.split != "all" else [s for s in SPLITS if getattr(cfg.data, s) or s == "train"]
    tokenizer = None
    for split in splits:
        if tokenizer is None:
            from radis.models import load_tokenizer

            tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.cache_dir)
        try:
            ds = load_or_build(cfg, split, tokenizer, force=args.force, progress=not args.no_progress)
        except (DataBuildError, DataError, ChatFormatError) as err:  # bad input: say what, no traceback
            print(f"radis build-data: {err}", file=sys.stderr)
            return 2
        print(format_summary(split, ds.meta["stats"]))
        print(f"statistics: {Path(ds.meta['cache_dir']) / 'stats.json'}")
    return 0
