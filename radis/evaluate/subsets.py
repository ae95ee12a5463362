"""Category-balanced subsets of prompt sets (retention prompts, harmful requests)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def category_balanced(items: Sequence[T], limit: int | None, what: str = "prompt") -> list[T]:
    """The first `limit` items taken round-robin over their categories (`item.category`),
    in file order, so that a small subset still mixes every category; all of them when
    `limit` is None or not smaller than the set."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"{what} limit must be >= 1, got {limit}")
    by_cat: dict[str, list[T]] = {}
    for item in items:
        by_cat.setdefault(item.category, []).append(item)
    chosen: list[T] = []
    depth = 0
    while len(chosen) < limit:
        for group in by_cat.values():
            if depth < len(group) and len(chosen) < limit:
                chosen.append(group[depth])
        depth += 1
    return chosen
