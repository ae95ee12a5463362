"""Processes end cleanly: a group left alive is destroyed before the interpreter tears down.

The rare 2-rank abort at exit ("terminate called without an active exception", exit
-6) comes from exiting with a gloo group alive (radis.runtime._leave_before_interpreter_exit
has the mechanism and the measurement). These tests run a rank that exits without
leaving its group, as an escaping exception would.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "exit_with_group.py"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_a_group_left_alive_is_destroyed_at_exit():
    """The atexit hook destroys the group while the interpreter is still whole."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--single", "--report"], capture_output=True, text=True,
                          env=_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                   MASTER_PORT=_free_port()), timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "group left before teardown: True" in proc.stdout


@pytest.mark.distributed
def test_two_ranks_exiting_with_their_group_alive_never_abort():
    """Before the hook, 4 of 30 such 2-rank runs aborted on this machine (exit -6). Two bare
    processes per trial, without torchrun's agent process (its own torch import each time)."""
    for trial in range(6):
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for r in (0, 1)]
        try:
            outs = [p.communicate(timeout=180)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for rank, (p, text) in enumerate(zip(procs, outs)):
            assert p.returncode == 0 and "terminate called" not in text, f"trial {trial}, rank {rank}:\n{text[-3000:]}"
