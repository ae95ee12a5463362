"""`radis inspect-data`: show examples as the model will see them, spans marked.

    radis inspect-data --config recipes/X.yaml [--num 3] [--split train] [--color auto|always|never] [key=value ...]

Each example is built exactly as `radis build-data` builds it (same ChatFormat, same
segments) and printed as decoded text with its spans marked:

    ==== deen/train.de-en:0:de-en  (de-en)  tokens: prompt 61 | MT 14 | RD 37 | total 112
    from outputs/rationales/rationales.jsonl; target: the human reference + a continue rationale by smollm2
    <|im_start|>user\nTranslate the following text from German into English. ...
    ⟦MT The goods cost less than 20 euros.⟧⟦RD \n\nThe word "Ware" ... <|im_end|>\n⟧

The second line says which target the example trains on and where it came from
(radis.data.records.training_target): the human reference, a rationale after it, or a
Seq-KD / SDFT answer that replaces it (or the reference kept because the answer was
rejected, and why).

Without a TTY (or with --color never) the markers are ⟦MT …⟧ and ⟦RD …⟧; on a
terminal MT text is green, RD text cyan and the prompt dim, markers included. The
prompt's token count is shown, and its text unless --no-prompt.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from radis.config import load_config
from radis.data.example import IGNORE, MT, RD, Segment

COLORS = {IGNORE: "\033[2m", MT: "\033[32m", RD: "\033[36m"}
RESET = "\033[0m"
MARK = {MT: "MT", RD: "RD"}


def span_runs(spans: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of one span label: [(label, start, end)], end exclusive."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(spans) + 1):
        if i == len(spans) or spans[i] != spans[start]:
            runs.append((int(spans[start]), start, i))
            start = i
    return runs


def render_segment(seg: Segment, tokenizer: Any, *, color: bool = False, show_prompt: bool = True,
                   direction: str = "", origin: str = "") -> str:
    """One segment as a header line, an `origin` line (when given), and its decoded text
    with the spans marked."""
    counts = {IGNORE: 0, MT: 0, RD: 0}
    for s in seg.spans:
        counts[int(s)] = counts.get(int(s), 0) + 1
    head = (f"==== {seg.example_id}" + (f"  ({direction})" if direction else "")
            + f"  tokens: prompt {counts[IGNORE]} | MT {counts[MT]} | RD {counts[RD]} | total {len(seg)}")
    parts = []
    for label, a, b in span_runs(seg.spans):
        # Special tokens are kept: the chat template's own tokens are part of what the
        # model sees and of what it learns to produce (the end-of-turn).
        text = tokenizer.decode(seg.input_ids[a:b], skip_special_tokens=False)
        if label == IGNORE:
            if not show_prompt:
                text = f"[prompt: {b - a} tokens]"
            parts.append(f"{COLORS[IGNORE]}{text}{RESET}" if color else text)
        else:
            marked = f"⟦{MARK[label]} {text}⟧"
            parts.append(f"{COLORS[label]}{marked}{RESET}" if color else marked)
    return head + "\n" + (f"{origin}\n" if origin else "") + "".join(parts)


def inspect_examples(cfg: Any, split: str = "train", num: int = 3, tokenizer: Any = None, *,
                     color: bool = False, show_prompt: bool = True, out: TextIO | None = None) -> int:
    """Print the first `num` examples of `split` to `out` (default: the current sys.stdout);
    returns how many were printed."""
    out = out if out is not None else sys.stdout
    from radis.data.prompts import ChatFormat
    from radis.data.records import training_target
    from radis.data.segments import build_segments
    from radis.data.sources import read_source

    sources = getattr(cfg.data, split)
    if not sources:
        raise ValueError(f"data.{split}: no sources configured")
    if tokenizer is None:
        from radis.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.cache_dir)
    fmt = ChatFormat(tokenizer, cfg.data, cfg.model.chat_template)
    examples, origin = [], {}  # the first `num` examples, read source by source
    for src in sources:
        for ex in read_source(src, cfg.data.on_empty)[:num - len(examples)]:
            examples.append(ex)
            origin[ex.id] = src.path
        if len(examples) >= num:
            break
    with_rationale = cfg.loss.method == "radis"
    segments, stats = build_segments(fmt, examples, separator=cfg.data.separator, max_tokens=cfg.data.max_tokens,
                                     with_rationale=with_rationale)
    by_id = {ex.id: ex for ex in examples}
    for seg in segments:
        ex = by_id[seg.example_id]
        target = training_target(ex)
        if ex.rationale and not with_rationale:
            target = "target: the human reference (loss.method=vanilla leaves the rationale out)"
        print(render_segment(seg, tokenizer, color=color, show_prompt=show_prompt, direction=ex.direction,
                             origin=f"from {origin[ex.id]}; {target}"), file=out)
        print(file=out)
    if stats.dropped_too_long:
        print(f"({stats.dropped_too_long} of the first {len(examples)} examples exceed data.max_tokens="
              f"{cfg.data.max_tokens} and are dropped)", file=out)
    return len(segments)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from radis.runtime import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--num", "-n", type=int, default=3, help="how many examples to show (default 3)")
    parser.add_argument("--split", choices=["train", "valid"], default="train")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                        help="colour the spans (auto: when stdout is a terminal)")
    parser.add_argument("--no-prompt", action="store_true", help="show only the prompt's token count")


def run(args: argparse.Namespace) -> int:
    from radis.data.prompts import ChatFormatError
    from radis.data.sources import DataError

    if args.num < 1:
        print(f"radis inspect-data: --num must be >= 1, got {args.num}", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    try:
        inspect_examples(cfg, args.split, args.num, color=color, show_prompt=not args.no_prompt)
    except (DataError, ChatFormatError, ValueError) as err:
        print(f"radis inspect-data: {err}", file=sys.stderr)
        return 2
    return 0
