"""The fused RaDis head inside a 2-rank DeepSpeed ZeRO-3 engine (CPU, gloo).

The script (tests/dist_scripts/zero3_loss.py) asserts that lm_head.weight really is an
empty shard outside the forward, then compares the engine's loss on each rank and the
full gradient of the tied head/embedding weight (and of an attention weight) with an
unfused fp64 reference: HF logits -> F.cross_entropy per span, global normaliser.
"""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "zero3_loss.py"


def _free_port() -> int:
    # torchrun's --master_port 0 hangs here (ranks never meet): ask the OS for a port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_zero3_fused_head_matches_unfused_reference(tmp_path):
    pytest.importorskip("deepspeed")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RADIS_TEST_MODE="span")
    env.pop("TRITON_INTERPRET", None)  # the script uses impl="torch"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(SCRIPT)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    # The ranks share one stdout pipe: their lines can interleave, so find the reports
    # by pattern rather than by line.
    report = re.findall(r"rank \d+: loss .*? q_proj grad \S+?e[-+]\d+", proc.stdout)
    assert proc.returncode == 0, f"2-rank ZeRO-3 run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert len(report) == 2, proc.stdout[-3000:]
