"""Batched decoding with the HF model's KV cache: the project's one decoder.

`radis generate` (rationales and the baselines' targets), the evaluator's translations
and the retention answers all decode here: `generate` (greedy or sampled, below) or,
with `num_beams > 1`, `beam_search` (transformers' beam search on the same
left-padded batch); `decode` chooses between them.

One call decodes a batch of prompts of different lengths. Prompts are LEFT-padded so
that every row's next token is at the same column, and position ids count only real
tokens, so a padded row computes exactly what it would compute alone:

    input_ids       [ pad pad  p0  p1  p2 ]   row 0: prompt of 3 tokens
                    [  q0  q1  q2  q3  q4 ]   row 1: prompt of 5 tokens
    attention_mask  [   0   0   1   1   1 ]
                    [   1   1   1   1   1 ]
    position_ids    [   0   0   0   1   2 ]   (cumsum(mask) - 1, clamped at 0)
                    [   0   1   2   3   4 ]

The prefill and the decode want different batches. The prefill is compute-bound and
pays for every padded position, so it runs in small length-sorted micro-batches
(`prefill_batch_size`, little padding); a decode step reads all the weights once
whatever its number of rows, so the decode wants as many rows as possible. The micro-batches' KV caches are
therefore merged into one decode batch: each is left-padded along the sequence with
zero keys/values under a zero mask, then all are stacked along the batch:

    micro-batch A  (prompts of 5)     K [ k k k k k ]       mask [ 1 1 1 1 1 ]
    micro-batch B  (prompts of 3)     K [ 0 0 k k k ]       mask [ 0 0 1 1 1 ]

Masked columns get no attention weight, and position ids are carried per row, so a
merged row still computes what it would compute alone. A leading run of tokens common
to all prompts of the decode batch (the system prompt, the instruction head) is
computed once for all micro-batches and its cache repeated for every row; a
micro-batch whose prompts share a longer run computes that one (`_prefill_micro_batch`).

After the prefill each step feeds one token per row: the mask grows by a column of
ones and each row's position id is its last one + 1. Rows that have stopped are
dropped from the batch and from the KV cache (`DynamicCache.batch_select_indices`),
so a batch gets cheaper as its rows finish; as a drop copies the cache, it waits until
a quarter of the rows have finished. The cache's layers are preallocated for the
prompt plus `max_new_tokens` (a step writes one column in place instead of copying
the cache with torch.cat).

Per step and row, with `logits` = the model's raw next-token logits [B, V] in fp32:

    top-k record   log_softmax(logits).topk(k)        (optional; before anything below)
    suppression    logits[stop ids] = -inf            while the row has produced fewer
                                                      than its `min_new_tokens`
    greedy         argmax
    sampling       logits / temperature -> softmax -> top-p (nucleus) filter ->
                   one draw from the row's own torch.Generator

Each row's generator is seeded from (seed, request key), so a sampled rationale does
not depend on which rank, batch or resumed run produced it.

The recorded top-k is the generator's own distribution: the log_softmax of the raw
logits, i.e. before end-of-turn suppression, temperature and top-p. Training uses it
as the teacher for token-level distillation; a sampling warper would distort it.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

StopReason = Literal["eot", "max_length"]


@dataclass(frozen=True)
class DecodingSettings:
    """How to decode; mirrors the decoding fields of `RationaleConfig`."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    topk: int = 0  # record this many top log-probs per generated token (0: off)
    num_beams: int = 1  # > 1: beam search (deterministic; no sampling, no top-k record)

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("num_beams > 1 is beam search: it cannot sample (set do_sample=false)")
        if self.num_beams > 1 and self.topk:
            raise ValueError("num_beams > 1: the top-k of the chosen tokens is recorded only by greedy/sampled decoding "
                             "(set topk=0)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.topk < 0:
            raise ValueError(f"topk must be >= 0, got {self.topk}")

    def as_dict(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "topk": self.topk,
            "num_beams": self.num_beams,
        }


@dataclass
class Request:
    """One prompt to continue. `key` (the example id) seeds sampling."""

    key: str
    prompt_ids: list[int]
    # Stop tokens are impossible until this many tokens have been generated.
    min_new_tokens: int = 0


@dataclass
class Generation:
    """What one request produced.

    token_ids      the generated tokens, without the stop token          [n]
    stop_reason    "eot" (a stop token was chosen) or "max_length"
    topk_ids       top-k token ids at each generated token, or None      [n, k] int32
    topk_logprobs  their log-probs (log_softmax of the raw logits)       [n, k] float32

    Row j of the top-k arrays is the distribution that chose token_ids[j] (the
    step that chose the stop token is not kept: training places its own
    end-of-turn tokens after the rationale).
    """

    key: str
    token_ids: list[int]
    stop_reason: StopReason
    prompt_tokens: int
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None


def example_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the run seed and an example id (stable across processes)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def length_sorted_batches(requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
    """Split requests into batches of similar prompt length (longest first).

    Similar lengths mean little left padding; longest first means an out-of-memory
    batch shows up at the start of a run, not after hours.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ordered = sorted(requests, key=lambda r: (-len(r.prompt_ids), r.key))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_token_id(tokenizer: Any) -> int:
    """Any id works for left padding (it is masked out); prefer the tokenizer's own."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _pad_or_stop_id(pad_token_id: int | None, stop_token_ids: Sequence[int]) -> int:
    """The caller's pad id, else the first stop id, else 0: left padding is masked out, so any
    id of the vocabulary works (a tokenizer without a pad token passes None)."""
    if pad_token_id is not None:
        return int(pad_token_id)
    return int(next(iter(stop_token_ids), 0))


def _left_pad(prompts: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] input ids and attention mask with each prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _cache_keyword(model: torch.nn.Module) -> str:
    """transformers 5 names the KV-cache argument `cache`; older ones `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _sample(
    logits: torch.Tensor, settings: DecodingSettings, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Choose one token per row of `logits` [B, V] (fp32, suppression applied)."""
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        # Nucleus: keep the smallest prefix of the sorted distribution whose mass
        # reaches top_p (the first token is always kept).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= settings.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    # One draw per row from the row's own generator: the same example gives the same
    # draws whatever batch it is in.
    return torch.cat([torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(len(generators))])


class _PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values live in a buffer sized for the whole decode.

    DynamicLayer grows by torch.cat, which copies the whole cache at every step; here a
    step writes its column in place and `keys`/`values` are views of the filled part:

        buffer  [B, H, capacity, D]    |<-- filled: keys = buffer[:, :, :length] -->|  free  |

    Only what `generate` uses is overridden (update, batch_select_indices); crop and
    repeat would desynchronise the views.
    """

    def __init__(self, key_buf: torch.Tensor, value_buf: torch.Tensor, length: int):
        super().__init__()
        self._key_buf, self._value_buf, self._length = key_buf, value_buf, length
        self.device, self.is_initialized = key_buf.device, True
        self._views()

    def _views(self) -> None:
        self.keys = self._key_buf[:, :, : self._length]
        self.values = self._value_buf[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._length + key_states.shape[-2]
        if end > self._key_buf.shape[-2]:  # not expected (capacity = prompt + max_new_tokens); grow
            grow = (0, 0, 0, end - self._key_buf.shape[-2])
            self._key_buf = torch.nn.functional.pad(self._key_buf, grow)
            self._value_buf = torch.nn.functional.pad(self._value_buf, grow)
        self._key_buf[:, :, self._length : end] = key_states
        self._value_buf[:, :, self._length : end] = value_states
        self._length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._key_buf, self._value_buf = self._key_buf[indices], self._value_buf[indices]
        self._views()


# Prompts of a micro-batch that share at least this many leading tokens (the system
# prompt and the instruction head) compute them once; shorter prefixes are not worth it.
MIN_SHARED_PREFIX = 8


def _shared_prefix_length(prompts: Sequence[list[int]]) -> int:
    """Leading tokens common to all prompts, leaving every prompt at least one of its own."""
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def _prefix_cache(model: torch.nn.Module, prefix: list[int]):
    """The KV cache of `prefix` (one row), computed once and copied for every micro-batch."""
    device = _model_device(model)
    return _returned_cache(model(input_ids=torch.tensor([prefix], dtype=torch.long, device=device), use_cache=True,
                                 logits_to_keep=1))


def _prefill_micro_batch(model: torch.nn.Module, prompts: Sequence[list[int]], pad_token_id: int,
                         common: tuple[int, Any] | None = None):
    """One forward over a micro-batch of prompts; returns (model output, mask [b, T],
    position ids [b, T]). A long enough shared prefix runs once, its cache is repeated
    for every row and the rest is left-padded after it:

        input   [ s s s s | pad  a0 a1 ]    mask [ 1 1 1 1 | 0 1 1 ]
                [ s s s s |  b0  b1 b2 ]         [ 1 1 1 1 | 1 1 1 ]
                  prefix     suffixes            positions continue after the prefix

    `common` = (length, cache) of a prefix that every prompt of the whole decode batch
    shares, computed once by the caller; a micro-batch whose own shared prefix is longer
    computes that one instead.
    """
    device = _model_device(model)
    shared = _shared_prefix_length(prompts) if len(prompts) > 1 else 0
    if common is not None and common[0] >= shared:
        shared, cache = common[0], copy.deepcopy(common[1])
    elif shared >= MIN_SHARED_PREFIX:
        cache = _prefix_cache(model, prompts[0][:shared])
    else:
        input_ids, mask = _left_pad(prompts, pad_token_id, device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        return out, mask, positions
    cache.batch_repeat_interleave(len(prompts))
    input_ids, suffix_mask = _left_pad([p[shared:] for p in prompts], pad_token_id, device)
    mask = torch.cat([suffix_mask.new_ones((len(prompts), shared)), suffix_mask], dim=1)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions[:, shared:], use_cache=True,
                logits_to_keep=1, **{_cache_keyword(model): cache})
    return out, mask, positions


def _prefill(
    model: torch.nn.Module,
    requests: Sequence[Request],
    pad_token_id: int,
    prefill_batch_size: int | None,
    max_new_tokens: int,
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor, list[int]]:
    """Run the prompts through the model in micro-batches and merge their caches.

    Returns, for the merged decode batch of B = len(requests) rows:
        logits    the next-token logits after each prompt             [B, V] fp32
        cache     a DynamicCache of _PreallocatedLayer, room for T + max_new_tokens
                  positions; keys/values per layer                    [B, H, T, D]
        mask      the attention mask over the cached positions        [B, T]
        next_pos  each row's next position id                         [B]
        active    batch row -> request index (rows are in micro-batch order)
    """
    n = len(requests)
    size = n if prefill_batch_size is None else prefill_batch_size
    order = sorted(range(n), key=lambda i: (-len(requests[i].prompt_ids), requests[i].key))
    # Each micro-batch's keys/values go right-aligned into its rows of one buffer per
    # layer (the zeros on their left are masked out) as soon as it is prefilled, so at
    # most one micro-batch cache exists beside the buffers.
    key_bufs: list[torch.Tensor] = []
    value_bufs: list[torch.Tensor] = []
    logits, masks, next_pos, active = [], [], [], []
    width = 0
    # The system prompt and instruction head that every prompt starts with run once for
    # all micro-batches (when there are several).
    common = None
    if n > size:
        shared = _shared_prefix_length([r.prompt_ids for r in requests])
        if shared >= MIN_SHARED_PREFIX:
            common = (shared, _prefix_cache(model, requests[0].prompt_ids[:shared]))
    for lo in range(0, n, size):
        rows = order[lo : lo + size]
        out, mask, positions = _prefill_micro_batch(model, [requests[i].prompt_ids for i in rows], pad_token_id, common)
        cache = _returned_cache(out)
        if not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
            # Sliding-window or quantised layers keep more state than keys and values:
            # their cache is used as the model made it, which needs a single micro-batch.
            if len(rows) == n:
                return out.logits[:, -1, :].float(), cache, mask, positions[:, -1] + 1, rows
            raise ValueError(f"this model's {type(cache).__name__} (not plain DynamicLayer layers) cannot be merged: "
                             f"set the prefill batch size ({size}) to at least the decode batch ({n})")
        if not key_bufs:
            # Longest prompts first: the first micro-batch is the widest. Uninitialised:
            # each micro-batch fills its columns and zeroes the masked ones on their left
            # (masked, but 0 x garbage could be NaN); later columns are written before use.
            width = mask.shape[1]
            for layer in cache.layers:
                _, heads, _, dim = layer.keys.shape
                key_bufs.append(layer.keys.new_empty((n, heads, width + max_new_tokens, dim)))
                value_bufs.append(layer.values.new_empty((n, heads, width + max_new_tokens, layer.values.shape[-1])))
        t = mask.shape[1]  # = the micro-batch's longest prompt, shared prefix or not
        if t > width:
            raise RuntimeError(f"prefill micro-batch of width {t} after one of width {width}: not length-sorted")
        for key_buf, value_buf, layer in zip(key_bufs, value_bufs, cache.layers):
            key_buf[lo : lo + len(rows), :, : width - t] = 0
            value_buf[lo : lo + len(rows), :, : width - t] = 0
            key_buf[lo : lo + len(rows), :, width - t : width] = layer.keys
            value_buf[lo : lo + len(rows), :, width - t : width] = layer.values
        logits.append(out.logits[:, -1, :].float())
        masks.append(torch.nn.functional.pad(mask, (width - t, 0)))
        next_pos.append(positions[:, -1] + 1)
        active.extend(rows)
        del out, cache

    merged = DynamicCache()
    merged.layers = [_PreallocatedLayer(k, v, width) for k, v in zip(key_bufs, value_bufs)]
    return torch.cat(logits), merged, torch.cat(masks), torch.cat(next_pos), active


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    requests: Sequence[Request],
    settings: DecodingSettings,
    *,
    stop_token_ids: Sequence[int],
    pad_token_id: int | None = None,
    prefill_batch_size: int | None = None,
) -> list[Generation]:
    """Decode one batch of requests with the KV cache; results in request order.

    `model` is an HF causal LM (eval mode, on its device); `stop_token_ids` end a
    row (e.g. the chat template's end-of-turn and the EOS); `pad_token_id` only
    fills the left padding (masked out, so any id works; None: the first stop id). The prompts are prefilled
    in length-sorted micro-batches of `prefill_batch_size` (None: all at once) whose
    caches are merged, so that all requests decode together.
    """
    if prefill_batch_size is not None and prefill_batch_size < 1:
        raise ValueError(f"prefill_batch_size must be >= 1, got {prefill_batch_size}")
    if not requests:
        return []
    for r in requests:
        if not r.prompt_ids:
            raise ValueError(f"request {r.key!r}: empty prompt")
    device = _model_device(model)
    n = len(requests)
    stop_ids = torch.tensor(sorted({int(t) for t in stop_token_ids}), dtype=torch.long, device=device)
    generators: list[torch.Generator | None] = [None] * n
    if settings.do_sample:
        generators = []
        for r in requests:
            g = torch.Generator(device=device)
            g.manual_seed(example_seed(settings.seed, r.key))
            generators.append(g)

    pad_id = _pad_or_stop_id(pad_token_id, stop_token_ids)
    logits, cache, mask, next_pos, active = _prefill(model, requests, pad_id, prefill_batch_size,
                                                     settings.max_new_tokens)
    cache_kw = _cache_keyword(model)
    stop_set = set(stop_ids.tolist())

    tokens: list[list[int]] = [[] for _ in range(n)]
    top_ids: list[list[torch.Tensor]] = [[] for _ in range(n)]
    top_lps: list[list[torch.Tensor]] = [[] for _ in range(n)]
    reasons: list[StopReason | None] = [None] * n
    min_new = torch.tensor([r.min_new_tokens for r in requests], dtype=torch.long, device=device)

    for step in range(settings.max_new_tokens):
        if settings.topk > 0:  # from the raw logits, before suppression and sampling
            lp, ix = torch.log_softmax(logits, dim=-1).topk(min(settings.topk, logits.shape[-1]), dim=-1)
            lp, ix = lp.cpu(), ix.cpu()
        suppress = (min_new[active] > step).nonzero().flatten()
        if suppress.numel() and stop_ids.numel():
            logits[suppress.unsqueeze(1), stop_ids.unsqueeze(0)] = float("-inf")
        chosen = _sample(logits, settings, [generators[req] for req in active]).tolist()

        keep: list[int] = []
        for row, (req, tok) in enumerate(zip(active, chosen)):
            if reasons[req] is not None:  # finished at an earlier step, not yet dropped
                continue
            if tok in stop_set:
                reasons[req] = "eot"
                continue
            tokens[req].append(tok)
            if settings.topk > 0:
                top_lps[req].append(lp[row])
                top_ids[req].append(ix[row])
            if len(tokens[req]) >= settings.max_new_tokens:
                reasons[req] = "max_length"
                continue
            keep.append(row)
        if not keep:
            break
        # Dropping finished rows copies the whole KV cache, so it waits until a quarter
        # of the rows are finished; until then they decode along and are ignored.
        if len(active) - len(keep) >= max(1, len(active) // 4):
            if not hasattr(cache, "batch_select_indices"):
                raise TypeError(f"{type(cache).__name__}: KV cache without batch_select_indices (need a DynamicCache)")
            keep_t = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(keep_t)
            mask, next_pos = mask[keep_t], next_pos[keep_t]
            chosen = [chosen[row] for row in keep]
            active = [active[row] for row in keep]
        step_ids = torch.tensor(chosen, dtype=torch.long, device=device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=next_pos.unsqueeze(1),
            use_cache=True,
            **{cache_kw: cache},
        )
        cache = _returned_cache(out)
        logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1

    results = []
    for i, r in enumerate(requests):
        ids = lps = None
        if settings.topk > 0:
            if top_ids[i]:
                ids = torch.stack(top_ids[i]).to(torch.int32).numpy()
                lps = torch.stack(top_lps[i]).to(torch.float32).numpy()
            else:
                k = min(settings.topk, logits.shape[-1])
                ids, lps = np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
        results.append(
            Generation(
                key=r.key,
                token_ids=tokens[i],
                stop_reason=reasons[i] or "max_length",
                prompt_tokens=len(r.prompt_ids),
                topk_ids=ids,
                topk_logprobs=lps,
            )
        )
    return results


@torch.no_grad()
def beam_search(
    model: torch.nn.Module,
    requests: Sequence[Request],
    settings: DecodingSettings,
    *,
    stop_token_ids: Sequence[int],
    pad_token_id: int | None = None,
) -> list[Generation]:
    """Beam search with `settings.num_beams` beams over one left-padded batch (transformers' own).

    Every request of the batch must have the same `min_new_tokens` (transformers applies
    one value to the batch). The best beam of each row is returned, cut at its first
    stop token.
    """
    if not requests:
        return []
    mins = {r.min_new_tokens for r in requests}
    if len(mins) > 1:
        raise ValueError(f"beam search: one min_new_tokens per batch, got {sorted(mins)}")
    device = _model_device(model)
    pad_id = _pad_or_stop_id(pad_token_id, stop_token_ids)
    ids, mask = _left_pad([r.prompt_ids for r in requests], pad_id, device)
    out = model.generate(
        input_ids=ids, attention_mask=mask, num_beams=settings.num_beams, do_sample=False,
        max_new_tokens=settings.max_new_tokens, min_new_tokens=mins.pop() or None,
        eos_token_id=list(stop_token_ids), pad_token_id=pad_id,
    )
    stops = {int(t) for t in stop_token_ids}
    results = []
    for r, row in zip(requests, out[:, ids.shape[1]:].tolist()):
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        tokens, reason = (row[:cut], "eot") if cut is not None else (row, "max_length")
        results.append(Generation(key=r.key, token_ids=tokens, stop_reason=reason, prompt_tokens=len(r.prompt_ids)))
    return results


def decode(
    model: torch.nn.Module,
    requests: Sequence[Request],
    settings: DecodingSettings,
    *,
    stop_token_ids: Sequence[int],
    pad_token_id: int | None = None,
    prefill_batch_size: int | None = None,
) -> list[Generation]:
    """`generate` (greedy / sampled) or, with settings.num_beams > 1, `beam_search`."""
    if settings.num_beams > 1:
        return beam_search(model, requests, settings, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id)
    return generate(model, requests, settings, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
                    prefill_batch_size=prefill_batch_size)
