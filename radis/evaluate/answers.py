"""Answers of a model to chat prompts, generated on every rank and kept as they finish.

The judged benchmarks (MT-Bench, AlpacaEval) need long answers (up to 1024 tokens) to
hundreds of prompts: a run killed after an hour must not start over. The prompts are
decoded in rounds:

    pending requests (not in the store), sorted by decoding settings, then longest first
        -> round k: the next batch_size * world requests; rank r decodes round[r::world]
           (radis.generation.decode: KV cache, seeded per request when sampling)
        -> all_gather -> rank 0 appends the round's answers to the store (JSONL, fsynced)

so a restart (with any number of ranks) decodes only what no finished round holds. A
request's `key` names it in the store and seeds its sampling (example_seed(seed, key)),
so an answer does not depend on which batch or rank it fell into.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from radis.generation.decode import DecodingSettings, Request, decode
from radis.io import AppendOnlyJsonl
from radis.runtime import dist_info, gather_objects, on_every_rank, on_rank0


@dataclass
class AnswerRequest:
    key: str
    prompt_ids: list[int]
    settings: DecodingSettings


def _settings_order(s: DecodingSettings) -> tuple:
    return (s.do_sample, s.temperature, s.top_p, s.seed, s.max_new_tokens)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    requests: Sequence[AnswerRequest],
    store: AppendOnlyJsonl,
    *,
    stop_token_ids: Sequence[int],
    pad_id: int,
    batch_size: int,
    wait_group: Any = None,
    log: Callable[[str], None] = lambda m: None,
    what: str = "answers",
) -> dict[str, dict[str, Any]]:
    """{key: {"key", "token_ids", "stop_reason"}} for every request, on every rank:
    those already in `store` are read back, the rest decoded and appended to it."""
    rank, world = dist_info()
    wanted = {r.key for r in requests}
    stored = on_rank0(f"reading {store.path}", lambda: [r for r in store.read() if r.get("key") in wanted],
                      wait_group, share=True)
    done: dict[str, dict[str, Any]] = {r["key"]: r for r in stored}
    pending = sorted((r for r in requests if r.key not in done),
                     key=lambda r: (_settings_order(r.settings), -len(r.prompt_ids)))
    if not pending:
        return done
    log(f"{what}: {len(pending)} to generate on {world} rank(s)" + (f", {len(done)} kept from {store.path}" if done else ""))
    model.eval()
    t0, step = time.time(), batch_size * world
    for start in range(0, len(pending), step):
        mine = pending[start:start + step][rank::world]

        def decode_mine(mine: list[AnswerRequest] = mine) -> list[dict[str, Any]]:
            local = []
            for group in _by_settings(mine):
                gens = decode(model, [Request(key=r.key, prompt_ids=r.prompt_ids) for r in group], group[0].settings,
                              stop_token_ids=stop_token_ids, pad_token_id=pad_id)
                local += [{"key": g.key, "token_ids": g.token_ids, "stop_reason": g.stop_reason} for g in gens]
            return local

        # a rank that fails (out of memory on the longest prompts) stops every rank with
        # its error, instead of leaving them in the gather until the group's timeout
        local = on_every_rank(f"decoding {what}", decode_mine)
        merged = [rec for part in gather_objects(local) for rec in part]
        on_rank0(f"writing {store.path}", lambda merged=merged: store.append(merged), wait_group)
        done.update((rec["key"], rec) for rec in merged)
        finished = min(start + step, len(pending))
        log(f"{what}: {finished}/{len(pending)} ({time.time() - t0:.0f} s)")
    return done


def _by_settings(requests: Sequence[AnswerRequest]) -> list[list[AnswerRequest]]:
    groups: dict[DecodingSettings, list[AnswerRequest]] = {}
    for r in requests:
        groups.setdefault(r.settings, []).append(r)
    return list(groups.values())
