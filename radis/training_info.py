"""What a model directory says about how radis trained it: `radis_training.json`.

The trainer writes the file into every checkpoint's `hf/` directory and `radis export`
copies it into the exported model; `radis evaluate` reads it to decide whether a model's
output is cut at the separator (only a model trained on reference + separator +
rationale writes a rationale after its translation; cutting any other model's output
would cut a preamble such as "Here is the translation:" off from its translation).

    {"format": "radis-training/1",
     "method": "radis" | "vanilla",
     "trained_with_rationales": true,     # RD target tokens were trained (method radis)
     "separator": "\\n\\n",                 # what joined reference and rationale
     "rd_target_tokens": 123456, "mt_target_tokens": 654321,
     "train_sources": ["outputs/rationales"], "base_model": "meta-llama/Llama-2-7b-chat-hf"}
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FILENAME = "radis_training.json"
FORMAT = "radis-training/1"


def training_info(cfg: Any, target_tokens: dict[str, int]) -> dict[str, Any]:
    """The record for a run of `cfg` whose training data has `target_tokens` {"mt", "rd"}."""
    rd = int(target_tokens.get("rd", 0))
    return {
        "format": FORMAT,
        "method": cfg.loss.method,
        "trained_with_rationales": cfg.loss.method == "radis" and rd > 0,
        "separator": cfg.data.separator,
        "rd_target_tokens": rd,
        "mt_target_tokens": int(target_tokens.get("mt", 0)),
        "train_sources": [s.path for s in cfg.data.train],
        "base_model": cfg.model.name_or_path,
    }


def write_training_info(directory: str | os.PathLike, info: dict[str, Any]) -> None:
    from radis.io import write_json_atomic

    write_json_atomic(Path(directory) / FILENAME, info)


def read_training_info(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The record of a model directory, None when it has none (not trained by radis)."""
    from radis.io import read_json_object

    path = Path(directory) / FILENAME
    info = read_json_object(path, "delete it: the model is then treated as not trained by radis")
    if info is not None and info.get("format") != FORMAT:
        raise ValueError(f"{path}: expected a {FORMAT} record, got format {info.get('format')!r}")
    return info
