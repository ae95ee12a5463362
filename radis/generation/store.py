"""Crash-safe, sharded output of `radis generate`: part files, resume and merge.

Layout of `rationale.output_dir`:

    manifest.json                     hash + description of the generation config
    parts/
      r00000-000000.jsonl             one committed batch of rank 0: one record per line
      r00000-000000.topk.safetensors  that batch's top-k arrays (rationale.topk > 0)
      r00001-000000.jsonl             ... rank 1, and so on
      .tmp-*                          files being written (removed at the next start)
    rationales.jsonl                  merged, in example order (written at the end)
    rationales.topk.safetensors       merged top-k: "<id>/ids" [n, k] int32,
                                      "<id>/logprobs" [n, k] float32 (see decode.py)
    (the record format of both merged files: radis.data.records)
    skipped.jsonl, summary.json       written by the command at the end

Commit protocol of one batch (`GenerationStore.commit`):

    1. top-k  -> parts/.tmp-X, fsync, rename to parts/rR-S.topk.safetensors
    2. records -> parts/.tmp-Y, fsync, rename to parts/rR-S.jsonl      <- commit point
    3. fsync parts/

A part's `.jsonl` appears whole or not at all, so a SIGKILL at any moment loses at
most the batch in flight: never a broken line, never a record twice (a resumed run
skips every id found in a committed part). A top-k file whose `.jsonl` never arrived
is an orphan and is deleted at the next start. Part names carry the rank and a
per-rank sequence number that continues across resumed runs, so nothing is ever
overwritten, even when a run is resumed with a different number of ranks.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radis.data.records import FORMAT, MERGED, MERGED_TOPK, load_topk, save_topk_atomic
from radis.errors import InputError
from radis.io import read_json_object, write_json_atomic, write_jsonl_atomic

MANIFEST = "manifest.json"
PARTS = "parts"
SKIPPED = "skipped.jsonl"
SUMMARY = "summary.json"
_PART_RE = re.compile(r"^r(\d{5})-(\d{6})\.(jsonl|topk\.safetensors)$")


class OutputMismatchError(InputError):
    """The output directory cannot be used as it is: records of another config, a damaged
    part file, not a directory (the message says which and what to do)."""


# --------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- manifest


def config_hash(description: dict) -> str:
    """Stable hash of the generation-relevant config (sorted-key JSON)."""
    text = json.dumps(description, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


# --------------------------------------------------------------------------- the store


@dataclass
class MergeStats:
    written: int  # records in rationales.jsonl
    stale: int  # records in parts for ids outside the current example set (not merged)
    duplicates: int  # extra records for an id already seen (not merged; should be 0)
    missing: list[str]  # ids of the example set with no record


class GenerationStore:
    """One rank's view of the output directory (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike, rank: int = 0):
        self.root = Path(os.path.expanduser(output_dir))  # "~/rationales", as train.output_dir
        self.parts = self.root / PARTS
        self.rank = rank
        self._next_seq: int | None = None

    # ---- set-up, called before generation

    def prepare(self, description: dict, overwrite: bool) -> None:
        """Rank 0, before the other ranks look: check or create the manifest.

        A directory holding records of another config is refused unless
        `overwrite`, which deletes them. Leftover temp files and orphaned top-k files
        of a killed run are removed here, while no rank is writing.
        """
        if self.root.exists() and not self.root.is_dir():
            raise OutputMismatchError(f"rationale.output_dir {self.root}: exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "config_hash": config_hash(description), "config": description}
        old = self._read_manifest()
        has_outputs = (self.parts.is_dir() and any(self.parts.iterdir())) or (self.root / MERGED).exists()
        foreign = has_outputs if old is None else old.get("config_hash") != manifest["config_hash"]
        if foreign:
            if not overwrite:
                what = (
                    "differs in " + "; ".join(_diff(old.get("config", {}), description) or ["its format"])
                    if old is not None
                    else f"has no {MANIFEST}"
                )
                raise OutputMismatchError(
                    f"rationale.output_dir {self.root}: holds records from a different generation config "
                    f"(the stored {MANIFEST} {what}). Set rationale.overwrite=true to delete them and start "
                    "again, or choose another rationale.output_dir."
                )
            shutil.rmtree(self.parts, ignore_errors=True)
            for name in (MERGED, MERGED_TOPK, SKIPPED, SUMMARY, MANIFEST):
                (self.root / name).unlink(missing_ok=True)
            old = None
        if old is None:
            write_json_atomic(self.root / MANIFEST, manifest)
        self.parts.mkdir(exist_ok=True)
        self._clean()

    def verify(self, description: dict) -> None:
        """Ranks > 0, after rank 0's `prepare`: the manifest must be this config's."""
        old = self._read_manifest()
        if old is None or old.get("config_hash") != config_hash(description):
            raise OutputMismatchError(
                f"rationale.output_dir {self.root}: {MANIFEST} does not match rank {self.rank}'s config "
                "(do all ranks run the same command?)"
            )

    def _read_manifest(self) -> dict | None:
        try:
            return read_json_object(self.root / MANIFEST, "delete it or set rationale.overwrite=true")
        except ValueError as err:
            raise OutputMismatchError(str(err)) from None

    def _clean(self) -> None:
        committed = {p.name[: -len(".jsonl")] for p in self.parts.glob("r*.jsonl")}
        for p in self.parts.iterdir():
            if p.name.startswith(".tmp-"):
                p.unlink(missing_ok=True)
            elif p.name.endswith(".topk.safetensors") and p.name[: -len(".topk.safetensors")] not in committed:
                p.unlink(missing_ok=True)  # its batch never committed

    # ---- reading committed records

    def part_files(self) -> list[Path]:
        """Committed record files, in (rank, sequence) order."""
        if not self.parts.is_dir():
            return []
        return sorted(p for p in self.parts.glob("r*.jsonl") if _PART_RE.match(p.name))

    def iter_records(self) -> Iterator[tuple[dict, Path]]:
        for path in self.part_files():
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as err:
                        # Parts are renamed into place whole, so this is damage from outside.
                        raise OutputMismatchError(f"{path}:{lineno}: broken record ({err}); delete this part file to "
                                                  "generate its batch again") from None
                    if not isinstance(rec, dict) or "id" not in rec:
                        raise OutputMismatchError(f"{path}:{lineno}: expected a JSON object with an 'id'")
                    yield rec, path

    def completed_ids(self) -> set[str]:
        return {rec["id"] for rec, _ in self.iter_records()}

    # ---- writing

    def commit(self, records: Sequence[dict], topk: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
        """Atomically add one batch of records (and its top-k arrays) to this rank's parts."""
        if self._next_seq is None:
            seqs = [int(m.group(2)) for p in self.parts.iterdir() if (m := _PART_RE.match(p.name)) and int(m.group(1)) == self.rank]
            self._next_seq = max(seqs, default=-1) + 1
        stem = f"r{self.rank:05d}-{self._next_seq:06d}"
        self._next_seq += 1
        if topk:
            save_topk_atomic(self.parts / f"{stem}.topk.safetensors", topk)
        path = self.parts / f"{stem}.jsonl"
        write_jsonl_atomic(path, records)  # the commit point
        _fsync_dir(self.parts)
        return path

    # ---- merging (rank 0, after every rank has finished)

    def merge(self, order: Sequence[str], with_topk: bool) -> MergeStats:
        """Write rationales.jsonl (+ top-k) holding one record per id of `order`, in that order.

        Records for ids outside `order` (e.g. from a run over more data) stay in the
        parts but are not merged; they are counted as stale.
        """
        wanted = {key: i for i, key in enumerate(order)}
        found: dict[str, tuple[dict, Path]] = {}
        stale = duplicates = 0
        for rec, path in self.iter_records():
            key = rec["id"]
            if key not in wanted:
                stale += 1
            elif key in found:
                duplicates += 1
            else:
                found[key] = (rec, path)
        ordered = [found[key] for key in order if key in found]
        # Everything is read and checked before anything is written: a damaged part fails
        # the merge with the previous merged files intact, never half of them rewritten.
        topk: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if with_topk:
            by_part: dict[Path, list[str]] = {}
            for rec, path in ordered:
                by_part.setdefault(path, []).append(rec["id"])
            for path, keys in by_part.items():
                side = path.with_name(path.name[: -len(".jsonl")] + ".topk.safetensors")
                fix = f"delete {path.name} and {side.name} to generate that batch again"
                if not side.exists():
                    raise OutputMismatchError(f"{side}: the top-k file of committed part {path.name} is missing; {fix}")
                try:
                    part = load_topk(side)
                except Exception as err:  # noqa: BLE001 -- safetensors raises its own plain Exception types
                    raise OutputMismatchError(f"{side}: unreadable top-k file ({type(err).__name__}: {err}); {fix}") from None
                for key in keys:
                    if key not in part:
                        raise OutputMismatchError(f"{side}: no top-k for example {key!r}; {fix}")
                    topk[key] = part[key]
        # the top-k first: the records file is what readers look for
        if with_topk:
            save_topk_atomic(self.root / MERGED_TOPK, {key: topk[key] for key in order if key in topk})
        write_jsonl_atomic(self.root / MERGED, [rec for rec, _ in ordered])
        missing = [key for key in order if key not in found]
        return MergeStats(written=len(ordered), stale=stale, duplicates=duplicates, missing=missing)
