"""Data loaders of radis's own lm-evaluation-harness tasks (referenced as `!function utils.load`).

lm-eval resolves `!function` against the YAML's directory, so the data files are found
beside this module wherever the package is installed and whatever the working directory.
Each JSONL line is one document with a "split" field ("train": few-shot examples,
"test": the evaluated ones).
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    import datasets

    from radis.io import iter_jsonl_objects

    path = HERE / name
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    for lineno, doc in iter_jsonl_objects(path, "a task document"):
        split = doc.pop("split", "test")
        if split not in rows:
            raise ValueError(f"{path}:{lineno}: split {split!r}, expected train or test")
        rows[split].append(doc)
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})


def load_knowledge(**kwargs):
    return _load("radis_knowledge.jsonl")


def load_arithmetic(**kwargs):
    return _load("radis_arithmetic.jsonl")
