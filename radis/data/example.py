"""The unit that flows through the data path, and the per-token span labels."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Span label of every token of a segment (one int8 per token).
IGNORE = 0  # system prompt, instruction, source, chat-template tokens: no loss
MT = 1  # the reference translation: translation loss
RD = 2  # the rationale (and the separator before it): self-distillation loss
SPAN_NAMES = {IGNORE: "ignore", MT: "mt", RD: "rd"}

# Label value ignored by the losses (as in torch.nn.functional.cross_entropy).
IGNORE_INDEX = -100


@dataclass
class Example:
    """One translation pair in one direction, optionally with its rationale.

    `id` is stable across runs (derived from the source file and record index) so that
    rationale generation can resume and rationales can be joined back to pairs.
    `teacher` optionally carries the generator's top-k ids/log-probs per rationale
    token (see radis.generation) for the token-level distillation loss.
    """

    id: str
    src_lang: str
    tgt_lang: str
    source: str
    reference: str
    rationale: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return f"{self.src_lang}-{self.tgt_lang}"


@dataclass
class Segment:
    """One example as token ids with a span label per token (built by radis.data.segments).

        input_ids: [ system / user turn: instruction + source | reference | sep + rationale | eot ]
        spans:     [ 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 | 1 1 1 1 1 | 2 2 2 2 2 2 2 2 2 | 2 2 ]
                                                                                (eot joins the last span present)

    `spans[i]` labels token i as a *target*: the loss on predicting token i from
    tokens < i is the span's loss. Packing shifts this into per-position `labels`.
    `teacher_ids` / `teacher_logprobs` ([n, k]) carry the generator's recorded top-k for
    token-level distillation, for the n rationale tokens that have one: row j belongs to
    token `teacher_start + j` (only those rows are stored, see radis.data.packing).
    """

    example_id: str
    input_ids: list[int]
    spans: list[int]
    teacher_ids: Any = None  # np.ndarray [n, k] int32 or None
    teacher_logprobs: Any = None  # np.ndarray [n, k] float32 or None
    teacher_start: int = 0  # index of the token that row 0 belongs to

    def __len__(self) -> int:
        return len(self.input_ids)
