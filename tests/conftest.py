"""Test set-up shared by the whole suite.

TRITON_INTERPRET must be set before anything imports triton, so it happens here at
the top of conftest (pytest imports conftest before any test module).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 ranks on 2 cores must not oversubscribe

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

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
def shared_data() -> Path:
    """../shared/data next to the checkout; tests that need it skip where it is absent."""
    if not (SHARED_DATA / "alma").is_dir():
        pytest.skip(f"real parallel data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA
