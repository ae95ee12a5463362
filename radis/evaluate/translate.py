"""Translate test sets with a model: batched, length-sorted, sharded over ranks.

    examples (one test set, original order)
        -> rank r keeps examples[r::world]
        -> prompts (the training prompt format) -> length-sorted batches
        -> radis.generation.decode: greedy (left-padded, KV cache, finished rows dropped)
           or beam search (transformers' `generate(num_beams=...)` on the same batch)
        -> decoded answer ("raw") and the answer cut at the first separator ("hypothesis")
        -> all_gather over ranks -> original order on every rank

Translation reuses the generator's decoder rather than a second decoding loop.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from radis.data.example import Example
from radis.evaluate.metrics import cut_at_separator
from radis.generation.decode import (
    DecodingSettings,
    Request,
    decode,
    length_sorted_batches,
)
from radis.runtime import dist_info, gather_objects


class PromptFormat(Protocol):
    """What translation needs from a prompt format (radis.data.prompts.ChatFormat has it)."""

    stop_token_ids: Sequence[int]

    def prompt_ids(self, example: Example) -> list[int]: ...

    def decode_answer(self, ids: Sequence[int]) -> str: ...


@dataclass
class Translation:
    """One translated test sentence. `reference` is None for a test set without references."""

    id: str
    direction: str
    source: str
    reference: str | None
    raw: str  # the decoded answer as generated (a RaDis model appends a rationale)
    cut: str  # `raw` cut at the first separator
    hypothesis: str  # the scored output: `cut` for a model scored cut, else `raw`
    prompt_tokens: int
    new_tokens: int
    stop_reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- decoding


def decode_batch(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    keys: Sequence[str],
    *,
    stop_token_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    num_beams: int = 1,
) -> list[tuple[list[int], str]]:
    """Generated token ids (stop token excluded) and stop reason per prompt of one batch
    (radis.generation.decode: greedy with the KV-cache loop, or beam search)."""
    requests = [Request(key=k, prompt_ids=list(p)) for k, p in zip(keys, prompts)]
    gens = decode(model, requests, DecodingSettings(max_new_tokens=max_new_tokens, num_beams=num_beams),
                  stop_token_ids=stop_token_ids, pad_token_id=pad_id)
    return [(g.token_ids, g.stop_reason) for g in gens]


def translate(
    model: torch.nn.Module,
    fmt: PromptFormat,
    examples: Sequence[Example],
    *,
    pad_id: int,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    num_beams: int = 1,
    separator: str = "\n\n",
    cut: bool = True,
    progress: bool = False,
) -> list[Translation]:
    """Translate `examples`; every rank gets the full list back in the input order.

    Each rank decodes its shard `examples[rank::world]`; examples whose reference is
    empty or missing (`meta["has_reference"] is False`) are translated like any other.
    """
    rank, world = dist_info()
    model.eval()
    mine = list(range(rank, len(examples), world))
    # One batched tokenizer call where the format offers it (ChatFormat does).
    if hasattr(fmt, "prompt_ids_batch"):
        prompts = dict(zip(mine, fmt.prompt_ids_batch([examples[i] for i in mine])))
    else:
        prompts = {i: fmt.prompt_ids(examples[i]) for i in mine}
    requests = [Request(key=str(i), prompt_ids=prompts[i]) for i in mine]
    batches = length_sorted_batches(requests, batch_size)
    local: list[tuple[int, Translation]] = []
    for b, batch in enumerate(batches):
        outs = decode_batch(
            model, [r.prompt_ids for r in batch], [r.key for r in batch], stop_token_ids=fmt.stop_token_ids,
            pad_id=pad_id, max_new_tokens=max_new_tokens, num_beams=num_beams,
        )
        for req, (ids, reason) in zip(batch, outs):
            i = int(req.key)
            ex = examples[i]
            raw = fmt.decode_answer(ids).strip()
            has_ref = ex.meta.get("has_reference", True)
            local.append((i, Translation(
                id=ex.id, direction=ex.direction, source=ex.source, reference=ex.reference if has_ref else None,
                raw=raw, cut=cut_at_separator(raw, separator), hypothesis=cut_at_separator(raw, separator) if cut else raw,
                prompt_tokens=len(req.prompt_ids), new_tokens=len(ids), stop_reason=reason,
            )))
        if progress and rank == 0:
            print(f"  translated batch {b + 1}/{len(batches)} (rank 0 of {world})", flush=True)
    merged = dict(item for part in gather_objects(local) for item in part)
    return [merged[i] for i in range(len(examples))]
