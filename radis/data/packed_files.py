"""A packed data set on disk: one `.npy` file per array, read back through memory maps.

A cache entry (radis.data.build) is a directory

    meta.json                 format version, sizes, pad id, content hash (written last:
                              its presence marks a complete entry)
    stats.json                the build statistics
    tokens.npy [N] int32      spans.npy [N] int8
    seq_offsets.npy [S+1]     pack_offsets.npy [P+1]     pack_stats.npy [P, 3]   int64
    example_ids.npy [bytes] uint8, example_id_offsets.npy [S+1] int64
                              the ids UTF-8 encoded end to end: id s =
                              bytes[offsets[s] : offsets[s+1]]
    teacher_ids.npy [R, k] int32, teacher_logprobs.npy [R, k] float32,
    teacher_offsets.npy [S+1] int64, teacher_start.npy [S] int32     (with a teacher)

(layout of the arrays: radis.data.packing). Plain `.npy` files, no pickles, no zip:
`read_packed` maps each one read-only, so opening an entry costs no memory, the ranks
of a node share one copy in the page cache, and a rank reads only the packs it trains
on. After each read the dataset calls `MappedArrays.release`, which drops the mapped
pages from the process (`madvise(MADV_DONTNEED)`; the page cache keeps them), so the
resident memory of a rank stays flat over an epoch whatever the size of the data
(measured by benchmarks/bench_memory.py).
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, overload

import numpy as np

from radis.data.packing import PackedDataset, check_segment
from radis.errors import InputError

FORMAT_VERSION = 2
ARRAYS = ("tokens", "spans", "seq_offsets", "pack_offsets", "pack_stats")
TEACHER_ARRAYS = ("teacher_ids", "teacher_logprobs", "teacher_offsets", "teacher_start")


class DataBuildError(InputError):
    """The data of a split cannot be built or a cache entry cannot be read."""


# --------------------------------------------------------------------------- mapped arrays


class MappedArrays:
    """Read-only memory maps of `.npy` files, and the means to let go of their pages."""

    def __init__(self) -> None:
        self._maps: list[mmap.mmap] = []

    def open(self, path: Path) -> np.ndarray:
        """The array stored in `path`, as a read-only view of a memory map of the file."""
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(f)
                offset = f.tell()
                size = os.fstat(f.fileno()).st_size
                if dtype.hasobject or fortran_order:
                    raise ValueError(f"holds {'objects' if dtype.hasobject else 'a Fortran-order array'}, "
                                     "not a plain array")
                count = int(np.prod(shape, dtype=np.int64))
                need = offset + count * dtype.itemsize
                if size < need:
                    raise ValueError(f"truncated: {size} bytes, the header promises {need}")
                if count == 0:
                    return np.zeros(shape, dtype=dtype)
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError, EOFError) as err:
            raise DataBuildError(f"{path}: unreadable ({err}); delete {path.parent} to rebuild it") from None
        self._maps.append(mapped)
        return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)

    def release(self) -> None:
        """Drop the mapped pages from this process's resident memory (they stay cached).

        For a read-only file mapping MADV_DONTNEED only unmaps the pages: the next read
        faults them back in from the page cache, so the data never changes. A no-op
        where the platform has no madvise.
        """
        drop_pages(self._maps)


def drop_pages(maps: Sequence[mmap.mmap]) -> None:
    """madvise(MADV_DONTNEED) on each map: its pages leave this process's resident memory
    (a file mapping's data stays in the file and the page cache). No-op without madvise."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is not None:
        for m in maps:
            m.madvise(advice)


class ExampleIds(Sequence[str]):
    """The example ids of a mapped entry: [S] strings over a UTF-8 byte array.

        blob    [bytes] uint8    "ex-0ex-1ex-17..."
        offsets [S+1] int64      id s = blob[offsets[s] : offsets[s+1]].decode()
    """

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            if stop <= start:
                return []
            o = np.asarray(self.offsets[start:stop + 1]) - int(self.offsets[start])
            raw = bytes(self.blob[int(self.offsets[start]):int(self.offsets[stop])])
            return [raw[a:b].decode("utf-8") for a, b in zip(o[:-1].tolist(), o[1:].tolist())]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example id {i}: there are {n}")
        i %= n
        return bytes(self.blob[int(self.offsets[i]):int(self.offsets[i + 1])]).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), 4096):
            yield from self[start:start + 4096]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequence: no hash, like list


def encode_ids(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """[S] strings -> (blob [bytes] uint8, offsets [S+1] int64), the layout of ExampleIds."""
    encoded = [s.encode("utf-8") for s in ids]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded], dtype=np.int64)]).astype(np.int64)
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


# --------------------------------------------------------------------------- write / read


def write_packed(ds: PackedDataset, entry: Path, progress: bool = False) -> None:
    """Write `ds` (arrays in memory) as a cache entry at `entry`, atomically (see `_write_entry`)."""
    from tqdm.auto import tqdm

    def fill(tmp: Path) -> PackedDataset:
        blob, id_offsets = encode_ids(ds.example_ids)
        arrays = {"tokens": ds.tokens, "spans": ds.spans, "seq_offsets": ds.seq_offsets,
                  "pack_offsets": ds.pack_offsets, "pack_stats": ds.pack_stats(),
                  "example_ids": blob, "example_id_offsets": id_offsets}
        if ds.teacher_ids is not None:
            arrays.update({name: getattr(ds, name) for name in TEACHER_ARRAYS})
        bar = tqdm(arrays.items(), desc="write packed data", disable=not progress, file=sys.stderr, leave=False)
        for name, array in bar:
            _write_synced(tmp / f"{name}.npy", lambda f, a=array: np.save(f, np.ascontiguousarray(a),
                                                                           allow_pickle=False))
        return ds

    _write_entry(Path(entry), fill)


def set_aside(entry: Path, why: str) -> Path:
    """Rename `entry` out of the way to `.<entry>-<why>-<random>` beside it and return that.

    A rename, unlike a deletion, is atomic: `entry` is whole or gone, never half removed.
    The new name is one the next build of the entry removes as a leftover
    (radis.data.build._remove_leftovers), should this process die before deleting it.
    """
    aside = entry.parent / f".{entry.name}-{why}-{uuid.uuid4().hex[:8]}"
    os.rename(entry, aside)
    return aside


def _write_entry(entry: Path, fill: Any, replace: bool = False) -> None:
    """Write a cache entry atomically: `fill(tmp)` writes the arrays into a temporary
    directory beside `entry` and returns the PackedDataset they hold (its meta has the
    build's statistics and descriptive fields); then stats.json, then meta.json (with
    the sizes and the content hash), then the rename.

    Every file is fsynced before meta.json is written, and meta.json before the
    rename, so a crash leaves either no entry or a whole one. A concurrent writer that
    loses the rename discards its copy. `replace=True` (a forced rebuild) swaps the new
    copy in for an existing entry only once the copy is whole: the old entry is renamed
    aside, the new one renamed in, then the old one deleted, so a build that fails
    leaves the old entry as it was.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    old: Path | None = None  # the entry a forced rebuild replaces, once renamed aside
    try:
        ds = fill(tmp)
        meta = {k: v for k, v in ds.meta.items() if k not in ("stats", "reused", "cache_dir")}
        meta.update(format_version=FORMAT_VERSION, max_tokens=ds.max_tokens, packs=ds.num_packs,
                    segments=ds.num_segments, tokens=ds.num_tokens, teacher_rows=ds.num_teacher_rows,
                    top_k=ds.top_k, content_hash=ds.content_hash())
        stats = json.dumps(ds.meta.get("stats", {}), indent=2) + "\n"
        _write_synced(tmp / "stats.json", lambda f: f.write(stats.encode("utf-8")))
        text = json.dumps(meta, indent=2, default=str) + "\n"
        _write_synced(tmp / "meta.json", lambda f: f.write(text.encode("utf-8")))
        if replace and entry.is_dir():
            old = set_aside(entry, "replaced")
        try:
            os.rename(tmp, entry)
        except OSError as err:
            if old is not None:  # the swap failed half-way: put the old entry back
                os.rename(old, entry)
                old = None
            elif (entry / "meta.json").is_file():  # a concurrent writer won the rename: theirs is as good
                return
            raise DataBuildError(f"{entry}: cannot move the new entry into place ({err}); expected no directory "
                                 "there, or a complete entry (one with meta.json)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # if killed first: a leftover the next build removes


# --------------------------------------------------------------------------- building without holding the data


class SegmentSpill:
    """The segments of a split on disk while it is built, so that the build's memory does
    not grow with the data set (measured by benchmarks/bench_build_memory.py).

        spill = SegmentSpill(directory)
        spill.add(segments)          # per chunk: token ids, spans, teacher rows appended to raw
                                     # files in build order; per segment only its length, teacher
                                     # rows and start, and id stay in memory
        write_spilled(spill, packs, entry, max_tokens, describe)   # the entry, in pack order

    The raw files are (build order, S segments, N tokens, R teacher rows, k top-k):
        tokens.bin [N] int32, spans.bin [N] int8, teacher_ids.bin [R, k] int32,
        teacher_logprobs.bin [R, k] float32
    """

    RAW: ClassVar[dict[str, Any]] = {"tokens": np.int32, "spans": np.int8, "teacher_ids": np.int32,
                                     "teacher_logprobs": np.float32}

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        # open for the spill's life, closed by `close` (write_spilled calls it)
        self._files = {name: open(self.dir / f"{name}.bin", "wb") for name in self.RAW}  # noqa: SIM115
        self.lengths: list[int] = []
        self.teacher_rows: list[int] = []
        self.teacher_start: list[int] = []
        self.example_ids: list[str] = []
        self.k = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, segments: Sequence[Any]) -> None:
        """Append `segments` (radis.data.example.Segment) in order, each checked by
        radis.data.packing.check_segment (as from_segments checks them)."""
        for seg in segments:
            self.k = check_segment(seg, self.k)
            rows = 0 if seg.teacher_ids is None else len(seg.teacher_ids)
            if rows:
                self._files["teacher_ids"].write(np.ascontiguousarray(seg.teacher_ids, dtype=np.int32).tobytes())
                self._files["teacher_logprobs"].write(
                    np.ascontiguousarray(seg.teacher_logprobs, dtype=np.float32).tobytes())
            self._files["tokens"].write(np.asarray(seg.input_ids, dtype=np.int32).tobytes())
            self._files["spans"].write(np.asarray(seg.spans, dtype=np.int8).tobytes())
            self.lengths.append(len(seg.input_ids))
            self.teacher_rows.append(rows)
            self.teacher_start.append(int(seg.teacher_start) if rows else 0)
            self.example_ids.append(seg.example_id)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def path(self, name: str) -> Path:
        """The raw file of one array ([N] or [R, k] rows of RAW[name], no header)."""
        return self.dir / f"{name}.bin"


# segments copied between progress updates when an entry is written from a spill
_SLICE_SEGMENTS = 4096


def write_spilled(spill: SegmentSpill, packs: Sequence[Sequence[int]], entry: Path, max_tokens: int,
                  describe: Any, progress: bool = False, replace: bool = False) -> None:
    """Write the cache entry of a spilled split, segments in pack order, atomically
    (`replace`: swap it in for an existing entry, see `_write_entry`).

    `packs` lists segment indices (build order) per pack (radis.data.packing.pack_segments);
    `describe(ds)` gets the PackedDataset the written arrays hold (memory-mapped) and
    sets its meta (pad id, template, statistics: radis.data.build) before meta.json.
    """
    from tqdm.auto import tqdm

    spill.close()
    order = np.fromiter((i for p in packs for i in p), dtype=np.int64, count=sum(len(p) for p in packs))
    lengths = np.asarray(spill.lengths, dtype=np.int64)
    rows = np.asarray(spill.teacher_rows, dtype=np.int64)
    src_tok = np.concatenate([[0], np.cumsum(lengths)])  # where segment i starts in the raw files
    src_row = np.concatenate([[0], np.cumsum(rows)])
    seq_offsets = np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64)
    pack_offsets = np.concatenate([[0], np.cumsum([len(p) for p in packs])]).astype(np.int64)
    with_teacher = bool(rows.sum())

    def fill(tmp: Path) -> PackedDataset:
        n = (int(seq_offsets[-1]),)
        copies = [("tokens", src_tok, seq_offsets, n), ("spans", src_tok, seq_offsets, n)]
        if with_teacher:
            t_offsets = np.concatenate([[0], np.cumsum(rows[order])]).astype(np.int64)
            copies += [(name, src_row, t_offsets, (int(t_offsets[-1]), spill.k))
                       for name in ("teacher_ids", "teacher_logprobs")]
        bar = tqdm(total=len(copies) * len(order), desc="write packed data", unit="seg", disable=not progress,
                   file=sys.stderr, leave=False)
        for name, src_offsets, dst_offsets, shape in copies:
            _copy_in_order(spill.path(name), tmp / f"{name}.npy", np.dtype(spill.RAW[name]), shape, order,
                           src_offsets, dst_offsets, bar)
        bar.close()
        blob, id_offsets = encode_ids([spill.example_ids[i] for i in order])
        small = {"seq_offsets": seq_offsets, "pack_offsets": pack_offsets, "example_ids": blob,
                 "example_id_offsets": id_offsets}
        if with_teacher:
            small.update(teacher_offsets=t_offsets,
                         teacher_start=np.asarray(spill.teacher_start, dtype=np.int32)[order])
        for name, array in small.items():
            _write_synced(tmp / f"{name}.npy", lambda f, a=array: np.save(f, a, allow_pickle=False))
        maps = MappedArrays()
        names = ("tokens", "spans") + (("teacher_ids", "teacher_logprobs") if with_teacher else ())
        mapped = {name: maps.open(tmp / f"{name}.npy") for name in names}
        teacher = {} if not with_teacher else {
            "teacher_ids": mapped["teacher_ids"], "teacher_logprobs": mapped["teacher_logprobs"],
            "teacher_offsets": small["teacher_offsets"], "teacher_start": small["teacher_start"]}
        ds = PackedDataset(tokens=mapped["tokens"], spans=mapped["spans"], seq_offsets=seq_offsets,
                           pack_offsets=pack_offsets, example_ids=ExampleIds(blob, id_offsets), max_tokens=max_tokens,
                           release_pages=maps.release, **teacher)
        stats = ds.pack_stats()
        maps.release()
        _write_synced(tmp / "pack_stats.npy", lambda f: np.save(f, stats, allow_pickle=False))
        describe(ds)
        return ds

    _write_entry(Path(entry), fill, replace)


def _copy_in_order(src: Path, path: Path, dtype: np.dtype, shape: tuple[int, ...], order: np.ndarray,
                   src_offsets: np.ndarray, dst_offsets: np.ndarray, bar: Any) -> None:
    """dst[dst_offsets[j] : dst_offsets[j+1]] = src[src_offsets[order[j]] : ...] for every j:
    the raw file `src` ([N] or [R, k] rows of `dtype`) copied in `order` into a new .npy
    of `shape` at `path` (fsynced); the progress bar moves a slice of segments at a time.

    By positioned reads and sequential writes, not memory maps: pack order visits the
    spill's segments scattered over it, and each fault of a map of a cached file brings
    up to 64 KiB around it into this process's resident memory (fault-around), which
    dropping the pages after each slice did not hold down: 148 MiB more resident at 32k
    examples while the teacher arrays were copied. Read and written bytes stay in the
    page cache, not in the process.
    """
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with open(src, "rb") as fin, open(path, "wb") as fout:
        np.lib.format.write_array_header_1_0(fout, header)  # what np.save writes
        start = fout.tell()
        for j0 in range(0, len(order), _SLICE_SEGMENTS):
            for i in order[j0:j0 + _SLICE_SEGMENTS]:
                offset, size = int(src_offsets[i]) * row_bytes, int(src_offsets[i + 1] - src_offsets[i]) * row_bytes
                data = os.pread(fin.fileno(), size, offset)
                if len(data) != size:
                    raise DataBuildError(f"{src}: segment spill ends early ({offset + len(data)} of {offset + size} "
                                         "bytes); the disk may be full: build again")
                fout.write(data)  # buffered: one segment's bytes at a time
            bar.update(min(_SLICE_SEGMENTS, len(order) - j0))
        written = fout.tell() - start
        if written != int(dst_offsets[-1]) * row_bytes:  # the offsets and the lengths disagree: a bug
            raise AssertionError(f"{path}: wrote {written} bytes, expected {int(dst_offsets[-1]) * row_bytes}")
        fout.flush()
        os.fsync(fout.fileno())


def _write_synced(path: Path, write: Any) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def read_packed(entry: Path) -> PackedDataset:
    """Open a cache entry written by `write_packed`, every array memory-mapped."""
    entry = Path(entry)
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataBuildError(f"{entry / 'meta.json'}: unreadable cache entry ({err}); delete the directory") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataBuildError(f"{entry}: cache format {meta.get('format_version')}, expected {FORMAT_VERSION}; delete it")
    maps = MappedArrays()
    names = ARRAYS + ("example_ids", "example_id_offsets") + (TEACHER_ARRAYS if meta.get("top_k") else ())
    arrays = {name: maps.open(entry / f"{name}.npy") for name in names}
    stats_path = entry / "stats.json"
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else {}
    ids = ExampleIds(arrays.pop("example_ids"), arrays.pop("example_id_offsets"))
    try:
        ds = PackedDataset(example_ids=ids, max_tokens=int(meta["max_tokens"]), stored_pack_stats=arrays.pop("pack_stats"),
                           meta={**meta, "stats": stats, "cache_dir": str(entry)}, release_pages=maps.release, **arrays)
    except ValueError as err:
        raise DataBuildError(f"{entry}: inconsistent arrays ({err}); delete it to rebuild") from None
    if (ds.num_packs, ds.num_tokens, ds.num_teacher_rows) != (meta["packs"], meta["tokens"], meta.get("teacher_rows", 0)):
        raise DataBuildError(f"{entry}: the arrays hold {ds.num_packs} packs / {ds.num_tokens} tokens / "
                             f"{ds.num_teacher_rows} teacher rows, meta.json says {meta['packs']} / {meta['tokens']} / "
                             f"{meta.get('teacher_rows', 0)}; delete it to rebuild")
    if len(ds.pack_stats()) != ds.num_packs:
        raise DataBuildError(f"{entry}: pack_stats.npy has {len(ds.pack_stats())} rows for {ds.num_packs} packs; "
                             "delete it to rebuild")
    maps.release()
    return ds
