"""benchmarks/kill_campaign.py, reduced: one SIGKILL in each phase of training (inside the
forward, the backward, the optimizer step, the checkpoint write, between the rename and
`latest`); after each the run resumes, and the end equals an uninterrupted run's bit for
bit. (Kills at random wall-clock moments and in generation: the full campaign, recorded
in benchmarks/RESULTS.md, and tests/test_generation_resume.py.)"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_a_kill_in_every_phase_loses_nothing(tmp_path):
    from radis.models import ModelNotFoundError, resolve_model_path

    try:
        resolve_model_path("smollm2")
    except ModelNotFoundError as err:
        pytest.skip(str(err))
    proc = subprocess.run(
        [sys.executable, "benchmarks/kill_campaign.py", "--seed", "3", "--generate-kills", "0", "--train-kills", "5",
         "--cycle", "--max-steps", "6", "--dir", str(tmp_path / "campaign")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for phase in ("forward of step", "backward of step", "optimizer of step", "checkpoint of step", "latest of step"):
        assert phase in out, (phase, out)
    assert "5 of 5 kills survived, nothing lost" in out, out
