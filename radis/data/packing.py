"""Packing: segments -> bins of at most `max_tokens` -> the tensors a training step eats.

Two jobs, one layout:

1. `pack_segments` decides which segments share a bin: best-fit-decreasing inside
   windows of `pack_window` segments taken in a seeded random order. The window keeps
   packs random (a global sort would put all long examples together) while the
   best-fit inside it, with under-filled bins carried into the next window, fills the
   bins almost completely (efficiency = real tokens / (packs x max_tokens)).
2. `collate_packs` turns a micro-batch of packs into model inputs and loss targets.

`PackedDataset` holds the packed data as flat arrays (what a cache entry stores, read
back through memory maps by radis.data.packed_files, so a rank's resident memory does
not grow with the data set):

    tokens          [N] int32     all segments end to end, segments in pack order
    spans           [N] int8      span label of each token as a target (IGNORE 0 / MT 1 / RD 2)
    seq_offsets     [S+1] int64   segment s = tokens[seq_offsets[s] : seq_offsets[s+1]]
    pack_offsets    [P+1] int64   pack p = segments pack_offsets[p] : pack_offsets[p+1]
    example_ids     [S] str
    teacher top-k (optional), stored only for the R rationale tokens that have one:
    teacher_ids     [R, k] int32, teacher_logprobs [R, k] float32
    teacher_offsets [S+1] int64   segment s owns rows teacher_offsets[s] : teacher_offsets[s+1]
    teacher_start   [S] int32     ... which belong to its tokens teacher_start[s], +1, ...

    e.g. two segments of 6 and 5 tokens, rationale top-k for tokens 3-4 of the first
    and 2-4 of the second (k = 2):
        spans            0 0 1 2 2 2 | 0 1 2 2 2
        teacher rows           r0 r1 |     r2 r3 r4      teacher_ids [5, 2]
        teacher_offsets  [0, 2, 5], teacher_start [3, 2]

At 160 bytes per row (k = 20) the top-k dominates; storing it per rationale token
instead of per token saves the prompt and reference rows (half or more of a
translation example).

One micro-batch of B packs padded to T tokens (here B=2, T=12; three examples a, b, c
and padding p; `·` is -100 in labels and 0 in spans):

    input_ids     a0 a1 a2 a3 a4 b0 b1 b2 b3 b4 b5 p     | c0 c1 c2 c3 c4 c5 c6 c7 p  p  p  p
    spans (in)    0  0  1  1  2  0  0  1  1  1  2  -     | 0  0  0  1  1  2  2  2  -  -  -  -
    labels        ·  a2 a3 a4 ·  ·  b2 b3 b4 b5 ·  ·     | ·  ·  c3 c4 c5 c6 c7 ·  ·  ·  ·  ·
    spans (out)   0  1  1  2  0  0  1  1  1  2  0  0     | 0  0  1  1  2  2  2  0  0  0  0  0
    position_ids  0  1  2  3  4  0  1  2  3  4  5  0     | 0  1  2  3  4  5  6  7  0  1  2  3

    labels[b, t]   = input_ids[b, t+1] when token t+1 belongs to the same example and its
                     span is not IGNORE, else -100 (the last token of each example, the
                     prompt, padding). spans[b, t] is the span of that target token.
    position_ids   restart at 0 for every example; the padding tail counts from 0 too.
    cu_seqlens     int32 boundaries over the flattened B*T tokens, the padding tail of a
                   pack being one extra sequence (flash-attn varlen needs every token
                   covered): [0, 5, 11, 12, 20, 24]; max_seqlen = 8.
    attention_mask (attn = "sdpa" / "eager") float [B, 1, T, T], 0 where query t may see
                   key s (same example, s <= t), finfo(dtype).min elsewhere:

                       a a a a a b b b b b b p
                   a0  0 - - - - - - - - - - -
                   a1  0 0 - - - - - - - - - -
                   ..
                   a4  0 0 0 0 0 - - - - - - -
                   b0  - - - - - 0 - - - - - -
                   b1  - - - - - 0 0 - - - - -       ('-' = finfo(dtype).min)
                   ..
                   p   - - - - - - - - - - - 0

Why the mask (measured with transformers 5.24, tiny Llama, see tests/test_packing.py):
with sdpa / eager, `position_ids` alone isolate packed examples only when the model
runs with `use_cache=False` and no 2D mask; with the default `use_cache=True` (a
cache object is created, which switches off transformers' packed-sequence detection),
or with a 2D all-ones mask, the second example attends to the first (logit error
~0.2). The 4D additive float mask isolates them in every case, for sdpa and eager; a
4D bool mask works for sdpa only. With flash_attention_2, transformers derives varlen
boundaries from position_ids only when B == 1 (and again in every layer); the trainer
passes them explicitly instead (cu_seq_lens_q/k and max_length_q/k, see
`model_forward_kwargs`). flex_attention gets a BlockMask built from the same sequence
ids (`document_block_mask`): the 4D mask's rule without the [T, T] tensor, and a
fused kernel on CUDA where flash-attn is not installed.
"""
from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from radis.data.example import IGNORE, IGNORE_INDEX, MT, RD, Segment

MASKED_ATTN = ("sdpa", "eager")
VARLEN_ATTN = ("flash_attention_2", "flash_attention_3")
FLEX_ATTN = ("flex_attention",)
# A bin of a packing window with more than this share of free slots is carried over.
CARRY_SLACK = 0.01
# Bytes of an array read at a time when a whole data set is scanned (hash, counts).
HASH_SLICE_BYTES = 16 * 2**20
PACK_STATS_SLICE = 1024  # packs per slice of compute_pack_stats


# --------------------------------------------------------------------------- bin packing


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to <= capacity (best-fit-decreasing).

    Items are taken longest first (ties in input order); each goes into the open bin
    whose free space is the smallest that still fits it, or a new bin.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin index), sorted; full bins leave it
    for i in order.tolist():
        need = int(lengths[i])
        j = bisect.bisect_left(free, (need, -1))
        if j == len(free):
            bins.append([i])
            left, b = capacity - need, len(bins) - 1
        else:
            left, b = free.pop(j)
            bins[b].append(i)
            left -= need
        if left > 0:
            bisect.insort(free, (left, b))
    return bins


def pack_segments(lengths: Sequence[int], max_tokens: int, window: int, seed: int,
                  example_ids: Sequence[str] | None = None) -> list[list[int]]:
    """Group segment indices into packs of at most `max_tokens` tokens.

    The segments are put in a random order drawn from `seed`, cut into windows of
    `window` segments, and each window is packed by best-fit-decreasing. Bins left
    more than CARRY_SLACK (1%) empty are dissolved and their segments carried into the
    next window (at most `window` carried segments; the last window keeps all its
    bins): windows alone leave a few half-empty bins each (96% on uniform lengths at
    512 tokens), carrying brings that to 99%. Same inputs -> same packs.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    if window < 1:
        raise ValueError(f"data.pack_window must be >= 1, got {window}")
    lengths = np.asarray(lengths, dtype=np.int64)
    bad = np.flatnonzero((lengths > max_tokens) | (lengths < 1))
    if bad.size:
        i = int(bad[0])
        name = example_ids[i] if example_ids is not None else f"#{i}"
        raise ValueError(
            f"segment {name} has {int(lengths[i])} tokens; packing needs 1..max_tokens={max_tokens} "
            f"({bad.size} such segments; segments must be truncated or dropped before packing)"
        )
    order = np.random.default_rng(seed).permutation(len(lengths)).tolist()
    slack = int(max_tokens * CARRY_SLACK)
    packs: list[list[int]] = []
    carry: list[int] = []
    for start in range(0, len(order), window):
        idx = carry + order[start:start + window]
        last_window = start + window >= len(order)
        carry = []
        for b in best_fit_decreasing(lengths[idx], max_tokens):
            members = [idx[k] for k in b]
            free = max_tokens - int(lengths[members].sum())
            # An under-filled bin of this window is dissolved: its segments go on to the
            # next window, whose new segments can fill it up (bounded to one window).
            if not last_window and free > slack and len(carry) + len(members) <= window:
                carry.extend(members)
            else:
                packs.append(members)
    return packs


# --------------------------------------------------------------------------- packed data


@dataclass
class Pack:
    """One bin, ready to collate: its segments end to end (n <= max_tokens tokens)."""

    input_ids: np.ndarray  # [n] integer
    spans: np.ndarray  # [n] int8, span of each token as a target
    seq_lens: list[int]
    example_ids: list[str]
    teacher_ids: np.ndarray | None = None  # [n, k] int32
    teacher_logprobs: np.ndarray | None = None  # [n, k] float32
    teacher_valid: np.ndarray | None = None  # [n] bool: rows that carry a real top-k

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class PackedDataset:
    """Packed segments as flat arrays (layout in the module docstring).

    The arrays may be memory maps (radis.data.packed_files.read_packed): `pack` and
    `segment` copy what they return and then call `release_pages`, which tells the
    kernel that this process no longer needs the mapped pages (they stay in the page
    cache, shared by the ranks of a node), so reading a whole epoch does not grow the
    resident memory of the process.
    """

    tokens: np.ndarray
    spans: np.ndarray
    seq_offsets: np.ndarray
    pack_offsets: np.ndarray
    example_ids: Sequence[str]
    max_tokens: int
    teacher_ids: np.ndarray | None = None
    teacher_logprobs: np.ndarray | None = None
    teacher_offsets: np.ndarray | None = None
    teacher_start: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # [P, 3] per-pack counts saved with the data (computed from the arrays when None)
    stored_pack_stats: np.ndarray | None = None
    # Called after each read of mapped arrays (radis.data.packed_files.MappedArrays.release).
    release_pages: Callable[[], None] = field(default=lambda: None, repr=False)

    def __post_init__(self) -> None:
        n, S = len(self.tokens), len(self.seq_offsets) - 1
        if int(self.seq_offsets[-1]) != n or len(self.spans) != n:
            raise ValueError("PackedDataset: seq_offsets / spans do not match tokens")
        if int(self.pack_offsets[-1]) != S or len(self.example_ids) != S:
            raise ValueError("PackedDataset: pack_offsets / example_ids do not match seq_offsets")
        teacher = (self.teacher_ids, self.teacher_logprobs, self.teacher_offsets, self.teacher_start)
        if any(a is None for a in teacher) != all(a is None for a in teacher):
            raise ValueError("PackedDataset: teacher_ids, teacher_logprobs, teacher_offsets and teacher_start "
                             "come together or not at all")
        if self.teacher_ids is not None:
            R = len(self.teacher_ids)
            if (self.teacher_logprobs.shape != self.teacher_ids.shape or len(self.teacher_offsets) != S + 1
                    or int(self.teacher_offsets[-1]) != R or len(self.teacher_start) != S):
                raise ValueError(f"PackedDataset: teacher arrays ids {self.teacher_ids.shape}, logprobs "
                                 f"{self.teacher_logprobs.shape}, offsets {self.teacher_offsets.shape}, start "
                                 f"{self.teacher_start.shape} do not fit {S} segments")
        self._pack_stats: np.ndarray | None = self.stored_pack_stats

    # -- sizes
    @property
    def num_packs(self) -> int:
        return len(self.pack_offsets) - 1

    @property
    def num_segments(self) -> int:
        return len(self.seq_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_teacher_rows(self) -> int:
        """Tokens that carry a recorded teacher top-k (0 without teacher data)."""
        return 0 if self.teacher_ids is None else len(self.teacher_ids)

    @property
    def top_k(self) -> int:
        return 0 if self.teacher_ids is None else int(self.teacher_ids.shape[1])

    def content_hash(self) -> str:
        """A hash of what is trained: tokens, spans, the example and pack boundaries, the
        example ids and the teacher arrays (not paths or file times, so a moved or copied
        data set hashes the same). Reads every array once (through the page cache when
        they are mapped; the cache entry stores it in meta.json)."""
        import hashlib

        h = hashlib.sha1()
        arrays = [self.tokens, self.spans, self.seq_offsets, self.pack_offsets, self.teacher_ids,
                  self.teacher_logprobs, self.teacher_offsets, self.teacher_start]
        for a in arrays:
            if a is None:
                h.update(b"-")
                continue
            # a slice at a time, pages dropped after each: the same bytes in the same order
            # (the same hash), without making a mapped entry resident all at once
            step = max(1, HASH_SLICE_BYTES // max(1, a[:1].nbytes))
            for i in range(0, len(a), step):
                h.update(memoryview(np.ascontiguousarray(a[i:i + step])).cast("B"))
                self.release_pages()
        for eid in self.example_ids:
            h.update(eid.encode("utf-8") + b"\n")
        self.release_pages()
        return h.hexdigest()[:16]

    def span_counts(self) -> dict[int, int]:
        """{span code: tokens}, counted a slice at a time (pages dropped after each)."""
        counts = np.zeros(256, dtype=np.int64)
        step = HASH_SLICE_BYTES
        for i in range(0, len(self.spans), step):
            counts += np.bincount(np.asarray(self.spans[i:i + step], dtype=np.uint8), minlength=256)
            self.release_pages()
        return {code: int(n) for code, n in enumerate(counts) if n}

    def __len__(self) -> int:
        return self.num_packs

    @property
    def efficiency(self) -> float:
        """Real tokens / (packs x max_tokens)."""
        return self.num_tokens / max(1, self.num_packs * self.max_tokens)

    def pack_stats(self) -> np.ndarray:
        """[P, 3] int64 per pack: tokens, MT targets, RD targets (targets as in `labels`)."""
        if self._pack_stats is None:
            self._pack_stats = compute_pack_stats(self.spans, self.seq_offsets, self.pack_offsets, self.release_pages)
        return self._pack_stats

    def _teacher_rows(self, s0: int, s1: int, t0: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segments s0..s1-1 (tokens t0..t0+n-1) -> dense [n, k] ids, [n, k] log-probs, [n] valid."""
        k = self.top_k
        ids = np.zeros((n, k), dtype=np.int32)
        lp = np.zeros((n, k), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        offsets = np.asarray(self.teacher_offsets[s0:s1 + 1])
        starts = np.asarray(self.teacher_start[s0:s1])
        seq = np.asarray(self.seq_offsets[s0:s1])
        for j in range(s1 - s0):
            r0, r1 = int(offsets[j]), int(offsets[j + 1])
            if r1 > r0:
                at = int(seq[j]) - t0 + int(starts[j])
                ids[at:at + r1 - r0] = self.teacher_ids[r0:r1]
                lp[at:at + r1 - r0] = self.teacher_logprobs[r0:r1]
                # a recorded row that is all -inf (the generator's padding) carries nothing
                valid[at:at + r1 - r0] = np.isfinite(lp[at:at + r1 - r0]).any(axis=1)
        return ids, lp, valid

    def pack(self, p: int) -> Pack:
        """Pack `p`, copied out of the (possibly mapped) arrays."""
        s0, s1 = int(self.pack_offsets[p]), int(self.pack_offsets[p + 1])
        t0, t1 = int(self.seq_offsets[s0]), int(self.seq_offsets[s1])
        out = Pack(input_ids=np.array(self.tokens[t0:t1]), spans=np.array(self.spans[t0:t1]),
                   seq_lens=np.diff(self.seq_offsets[s0:s1 + 1]).tolist(), example_ids=list(self.example_ids[s0:s1]))
        if self.teacher_ids is not None:
            out.teacher_ids, out.teacher_logprobs, out.teacher_valid = self._teacher_rows(s0, s1, t0, t1 - t0)
        self.release_pages()
        return out

    def segment(self, s: int) -> Segment:
        t0, t1 = int(self.seq_offsets[s]), int(self.seq_offsets[s + 1])
        seg = Segment(example_id=self.example_ids[s], input_ids=self.tokens[t0:t1].tolist(),
                      spans=self.spans[t0:t1].tolist())
        if self.teacher_ids is not None and self.teacher_offsets[s + 1] > self.teacher_offsets[s]:
            r0, r1 = int(self.teacher_offsets[s]), int(self.teacher_offsets[s + 1])
            seg.teacher_ids = np.array(self.teacher_ids[r0:r1])
            seg.teacher_logprobs = np.array(self.teacher_logprobs[r0:r1])
            seg.teacher_start = int(self.teacher_start[s])
        self.release_pages()
        return seg

    @classmethod
    def from_segments(cls, segments: Sequence[Segment], max_tokens: int, window: int, seed: int,
                      meta: dict[str, Any] | None = None) -> PackedDataset:
        """Pack `segments` (see `pack_segments`) and lay them out flat."""
        k = 0
        for seg in segments:
            k = check_segment(seg, k)
        packs = pack_segments([len(s) for s in segments], max_tokens, window, seed, [s.example_id for s in segments])
        ordered = [segments[i] for p in packs for i in p]
        lens = np.array([len(s) for s in ordered], dtype=np.int64)
        seq_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        pack_offsets = np.concatenate([[0], np.cumsum([len(p) for p in packs])]).astype(np.int64)
        n = int(seq_offsets[-1])
        tokens = np.fromiter((t for s in ordered for t in s.input_ids), dtype=np.int32, count=n)
        spans = np.fromiter((t for s in ordered for t in s.spans), dtype=np.int8, count=n)
        teacher: dict[str, np.ndarray] = {}
        with_teacher = [s for s in ordered if s.teacher_ids is not None]
        if with_teacher:
            rows = np.array([0 if s.teacher_ids is None else len(s.teacher_ids) for s in ordered], dtype=np.int64)
            teacher = {
                "teacher_ids": np.concatenate([np.asarray(s.teacher_ids, dtype=np.int32) for s in with_teacher]),
                "teacher_logprobs": np.concatenate([np.asarray(s.teacher_logprobs, dtype=np.float32)
                                                    for s in with_teacher]),
                "teacher_offsets": np.concatenate([[0], np.cumsum(rows)]).astype(np.int64),
                "teacher_start": np.array([s.teacher_start if s.teacher_ids is not None else 0 for s in ordered],
                                          dtype=np.int32),
            }
        return cls(tokens=tokens, spans=spans, seq_offsets=seq_offsets, pack_offsets=pack_offsets,
                   example_ids=[s.example_id for s in ordered], max_tokens=max_tokens, meta=dict(meta or {}), **teacher)


def check_segment(seg: Segment, k: int = 0) -> int:
    """Check one segment's arrays before it is laid out: a span per token, and teacher rows
    [rows, k] like the other segments' (`k`; 0 = none seen yet) that lie inside its tokens
    from `teacher_start`. Returns the top-k width so far. ValueError naming the segment."""
    n = len(seg.input_ids)
    if len(seg.spans) != n:
        raise ValueError(f"segment {seg.example_id}: {n} input_ids but {len(seg.spans)} spans")
    if seg.teacher_ids is None:
        return k
    ids, lp = np.asarray(seg.teacher_ids), np.asarray(seg.teacher_logprobs)
    rows = len(ids)
    k = k or (int(ids.shape[1]) if ids.ndim == 2 else -1)
    if ids.shape != (rows, k) or lp.shape != (rows, k) or not 0 <= seg.teacher_start <= n - rows:
        raise ValueError(
            f"segment {seg.example_id}: teacher_ids {ids.shape} / teacher_logprobs {lp.shape} from token "
            f"{seg.teacher_start}, expected [rows, {k}] like the other segments, inside its {n} tokens")
    return k


def compute_pack_stats(spans: np.ndarray, seq_offsets: np.ndarray, pack_offsets: np.ndarray,
                       release: Callable[[], None] = lambda: None) -> np.ndarray:
    """[P, 3] int64 per pack: tokens, MT targets, RD targets (targets as in `labels`).

    A token is a target when its span is not IGNORE and it is not the first token of
    its segment (nothing before it in the same example predicts it). Computed
    `PACK_STATS_SLICE` packs at a time (`release()` after each), so the temporaries are
    those of one slice, not of the data set.
    """
    P = len(pack_offsets) - 1
    bounds = np.asarray(seq_offsets)[np.asarray(pack_offsets)]  # token offset of each pack
    out = np.zeros((P, 3), dtype=np.int64)
    out[:, 0] = np.diff(bounds)
    for p0 in range(0, P, PACK_STATS_SLICE):
        p1 = min(P, p0 + PACK_STATS_SLICE)
        t0, t1 = int(bounds[p0]), int(bounds[p1])
        sp = np.asarray(spans[t0:t1])
        first = np.asarray(seq_offsets[int(pack_offsets[p0]):int(pack_offsets[p1])]) - t0
        local = bounds[p0:p1 + 1] - t0
        for col, code in ((1, MT), (2, RD)):
            hit = sp == code
            hit[first] = False
            c = np.concatenate([[0], np.cumsum(hit, dtype=np.int64)])
            out[p0:p1, col] = c[local[1:]] - c[local[:-1]]
        release()
    return out


# --------------------------------------------------------------------------- collation


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] sequence index per token -> [B, 1, T, T] additive mask (0 visible, finfo.min not).

    Built on `seq_ids.device`: a [1, 4096, 4096] fp32 mask takes ~50 ms on one CPU core,
    next to nothing on a GPU (pass `mask_device` to `collate_packs`).
    """
    pos = torch.arange(seq_ids.shape[1], device=seq_ids.device)
    allowed = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (pos[:, None] >= pos[None, :])
    visible = torch.zeros((), dtype=dtype, device=seq_ids.device)
    # torch.full, not torch.tensor: no host-to-device copy (a sync per batch on CUDA)
    hidden = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=seq_ids.device)
    return torch.where(allowed, visible, hidden)[:, None]


def collate_packs(packs: Sequence[Pack], pad_token_id: int, attn: str = "sdpa", dtype: torch.dtype = torch.float32,
                  pad_to: int | None = None, mask_device: torch.device | str | None = None) -> dict[str, Any]:
    """Collate B packs into one micro-batch (layout in the module docstring).

    Returns a dict of
        input_ids, labels, spans, position_ids   [B, T] int64
        target_rows [M] int64                     flat indices (over B*T) where labels != -100
        cu_seqlens [n_seqs + 1] int32, max_seqlen int   (over the flattened B*T tokens)
        attention_mask [B, 1, T, T] `dtype`      only for attn "sdpa" / "eager"
        sequence_ids [B, T] int32                 only for attn "flex_attention": the example
                                                  index of each token (the padding tail its own)
        teacher_ids [B, T, k] int64, teacher_logprobs [B, T, k] float32,
        teacher_mask [B, T] bool                  only when a pack carries a top-k
        example_ids list[list[str]] per pack, num_seqs int (real examples),
        num_tokens int (real tokens), num_targets {"mt", "rd", "total"} ints
    T = `pad_to` (>= the longest pack) or the longest pack. An empty pack (no
    segments) is all padding: it lets a rank without data still run a step. The 4D
    mask is built on `mask_device` (default CPU; the GPU builds it far faster), all
    other tensors on the CPU.
    """
    if attn not in MASKED_ATTN + VARLEN_ATTN + FLEX_ATTN:
        raise ValueError(f"attn: expected one of {list(MASKED_ATTN + VARLEN_ATTN + FLEX_ATTN)}, got {attn!r}")
    if not packs:
        raise ValueError("collate_packs: no packs")
    longest = max(len(p) for p in packs)
    T = longest if pad_to is None else pad_to
    if T < longest:
        raise ValueError(f"collate_packs: pad_to={pad_to} is shorter than the longest pack ({longest} tokens)")
    T = max(T, 1)
    B = len(packs)
    input_ids = np.full((B, T), pad_token_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    spans = np.zeros((B, T), dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    seq_ids = np.zeros((B, T), dtype=np.int64)
    with_teacher = [p for p in packs if p.teacher_ids is not None]
    k = int(with_teacher[0].teacher_ids.shape[1]) if with_teacher else 0
    if with_teacher:
        t_ids = np.zeros((B, T, k), dtype=np.int64)
        t_lp = np.zeros((B, T, k), dtype=np.float32)
        t_mask = np.zeros((B, T), dtype=bool)
    cu = [0]
    max_seqlen = 0
    for b, p in enumerate(packs):
        n = len(p)
        x = np.asarray(p.input_ids, dtype=np.int64)
        s = np.asarray(p.spans, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(p.seq_lens)[:-1]]).astype(np.int64) if p.seq_lens else np.zeros(0, np.int64)
        if sum(p.seq_lens) != n:
            raise ValueError(f"pack of {p.example_ids}: seq_lens sum to {sum(p.seq_lens)}, pack has {n} tokens")
        input_ids[b, :n] = x
        # position t predicts token t+1; it is a target unless t+1 starts a new example
        # (or lies past the pack) or its span is IGNORE.
        nxt_is_start = np.zeros(n, dtype=bool)
        nxt_is_start[starts[1:] - 1] = True
        nxt_is_start[n - 1:] = True
        target = np.zeros(n, dtype=bool)
        target[:n - 1] = s[1:] != IGNORE
        target &= ~nxt_is_start
        lab = np.full(n, IGNORE_INDEX, dtype=np.int64)
        lab[:n - 1] = np.where(target[:n - 1], x[1:], IGNORE_INDEX)
        labels[b, :n] = lab
        sp = np.zeros(n, dtype=np.int64)
        sp[:n - 1] = np.where(target[:n - 1], s[1:], 0)
        spans[b, :n] = sp
        # position ids and sequence ids: restart per example; the padding tail is one
        # more sequence of its own.
        seq_of_tok = np.repeat(np.arange(len(p.seq_lens)), p.seq_lens)
        position_ids[b, :n] = np.arange(n) - starts[seq_of_tok] if n else position_ids[b, :n]
        seq_ids[b, :n] = seq_of_tok
        lens = list(p.seq_lens)
        if T > n:
            position_ids[b, n:] = np.arange(T - n)
            seq_ids[b, n:] = len(p.seq_lens)
            lens.append(T - n)
        for ln in lens:
            cu.append(cu[-1] + ln)
        max_seqlen = max(max_seqlen, max(lens))
        if p.teacher_ids is not None:
            if p.teacher_ids.shape[1] != k:
                raise ValueError(f"pack of {p.example_ids}: teacher top-k {p.teacher_ids.shape[1]}, expected {k}")
            valid = p.teacher_valid if p.teacher_valid is not None else np.ones(n, dtype=bool)
            t_ids[b, :n - 1] = p.teacher_ids[1:]
            t_lp[b, :n - 1] = p.teacher_logprobs[1:]
            t_mask[b, :n - 1] = valid[1:] & target[:n - 1]
    out: dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "spans": torch.from_numpy(spans),
        "position_ids": torch.from_numpy(position_ids),
        # the rows the loss head computes (radis_linear_loss's target_rows): found here on
        # the host, so the step needs no nonzero() sync on the device
        "target_rows": torch.from_numpy(np.flatnonzero(labels.reshape(-1) != IGNORE_INDEX).astype(np.int64)),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "max_seqlen": int(max_seqlen),
        "example_ids": [list(p.example_ids) for p in packs],
        "num_seqs": sum(len(p.seq_lens) for p in packs),
        "num_tokens": sum(len(p) for p in packs),
    }
    n_mt = int((spans == MT).sum())
    n_rd = int((spans == RD).sum())
    out["num_targets"] = {"mt": n_mt, "rd": n_rd, "total": n_mt + n_rd}
    if attn in MASKED_ATTN:
        out["attention_mask"] = block_causal_mask(torch.from_numpy(seq_ids).to(mask_device or "cpu"), dtype)
    if attn in FLEX_ATTN:  # the block mask is built where the model runs (model_forward_kwargs)
        out["sequence_ids"] = torch.from_numpy(seq_ids.astype(np.int32))
    if with_teacher:
        out["teacher_ids"] = torch.from_numpy(t_ids)
        out["teacher_logprobs"] = torch.from_numpy(t_lp)
        out["teacher_mask"] = torch.from_numpy(t_mask)
    return out


def document_block_mask(sequence_ids: torch.Tensor) -> Any:
    """[B, T] example index per token -> flex_attention's BlockMask of the packed layout:
    query q sees key k when both belong to the same example and k <= q (the 4D mask's
    rule, kept as a predicate; the attention kernel skips 128 x 128 blocks that no query
    may see). Built on `sequence_ids.device`. On CUDA the mask builder is compiled, so no
    dense [B, T, T] tensor is made (eager, it makes one per call: 128 MiB at B = 8,
    T = 4096); on a CPU it runs eagerly (tests' small shapes, no compile wait).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = sequence_ids.shape

    def same_example_causal(b, h, q, k):
        return (sequence_ids[b, q] == sequence_ids[b, k]) & (q >= k)

    build = _compiled_block_mask() if sequence_ids.is_cuda else create_block_mask
    return build(same_example_causal, B, None, T, T, device=sequence_ids.device)


@functools.cache
def _compiled_block_mask() -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)  # compiled once per process


def model_forward_kwargs(batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """The attention inputs of a transformers causal-LM forward for a collated batch, on
    `device`: what the trainer (radis.train.recipe) gives the model.

    sdpa / eager: input_ids, position_ids, attention_mask (the 4D float mask).
    flex_attention: input_ids, position_ids, attention_mask = the document BlockMask.
    flash_attention_2: input_ids, position_ids and the varlen boundaries (cu_seq_lens_q/k,
    max_length_q/k), which transformers hands to flash_attn_varlen_func for any B: without
    them it rebuilds the boundaries from position_ids in every layer (a host sync each),
    and only when B == 1.
    `use_cache=False` always: training has no use for a cache.
    """
    to = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
    kw: dict[str, Any] = {"input_ids": to(batch["input_ids"]), "position_ids": to(batch["position_ids"]),
                          "use_cache": False}
    if "attention_mask" in batch:
        kw["attention_mask"] = to(batch["attention_mask"])
    elif "sequence_ids" in batch:
        kw["attention_mask"] = document_block_mask(to(batch["sequence_ids"]))
    else:
        cu = to(batch["cu_seqlens"])
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"])
    return kw
