"""Testing hooks that SIGKILL the process at a chosen moment (no clean-up, like a node
that dies), for tests/test_train_dist.py and benchmarks/kill_campaign.py. Nothing
happens unless the environment variables are set.

    RADIS_FAULT_KILL_AT_STEP=N [RADIS_FAULT_KILL_RANK=r]   after optimizer step N
    RADIS_FAULT_KILL_IN=phase:step[:micro]                 in the middle of a phase (`fault_point`)
    RADIS_FAULT_DELAY_RANK=r:seconds                       rank r late to plan its resume (`delay_rank`)
    RADIS_FAULT_DISK_FULL=r:step                           rank r cannot write its part of checkpoint `step`
"""
from __future__ import annotations

import errno
import os
import sys
import time

FAULT_PHASES = ("forward", "backward", "optimizer", "checkpoint", "latest")


def kill_now() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), 9)


def fault_injection(step: int, rank: int) -> None:
    """RADIS_FAULT_KILL_AT_STEP=N [RADIS_FAULT_KILL_RANK=r] kills this process after
    optimizer step N (and after its checkpoint, if one was due)."""
    at = os.environ.get("RADIS_FAULT_KILL_AT_STEP")
    if at is None or int(at) != step:
        return
    who = os.environ.get("RADIS_FAULT_KILL_RANK")
    if who is None or int(who) == rank:
        kill_now()


def delay_rank(rank: int) -> None:
    """RADIS_FAULT_DELAY_RANK=r:seconds: rank r sleeps before the resume is planned, as
    a rank on a slower node or file system would be late; the order in which ranks
    read the checkpoint directory is then fixed for a test, not left to chance."""
    spec = os.environ.get("RADIS_FAULT_DELAY_RANK")
    if not spec:
        return
    who, _, seconds = spec.partition(":")
    if int(who) == rank:
        time.sleep(float(seconds))


def disk_full_if(rank: int, step: int) -> None:
    """RADIS_FAULT_DISK_FULL=r:step: rank r fails to write its part of the checkpoint of
    `step` with ENOSPC, as a rank whose disk (or node-local staging) filled up would."""
    spec = os.environ.get("RADIS_FAULT_DISK_FULL")
    if not spec:
        return
    who, _, at = spec.partition(":")
    if (int(who), int(at)) == (rank, step):
        raise OSError(errno.ENOSPC, "No space left on device (RADIS_FAULT_DISK_FULL)")


def fault_point() -> tuple[str, int, int] | None:
    """Testing hook: RADIS_FAULT_KILL_IN=phase:step[:micro] (benchmarks/kill_campaign.py)
    kills the process (SIGKILL) in the middle of `phase` of optimizer step step+1 (steps
    done = step), at micro-batch `micro` (default 0):

        forward    inside the model's forward (a pre-hook on its middle module)
        backward   inside the backward (a backward pre-hook on the same module)
        optimizer  inside the optimizer step, gradients reduced, nothing updated yet
                   (at the last micro-batch of the step; `micro` is ignored)
        checkpoint inside the save of step `step`: DeepSpeed's files written into the
                   temporary tag, the trainer state and the rename not yet
        latest     after that tag's rename, before `latest` names it
    """
    spec = os.environ.get("RADIS_FAULT_KILL_IN")
    if not spec:
        return None
    parts = spec.split(":")
    if parts[0] not in FAULT_PHASES or len(parts) not in (2, 3):
        raise ValueError(f"RADIS_FAULT_KILL_IN={spec!r}: expected phase:step[:micro], phase one of {FAULT_PHASES}")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 0


def kill_if(phase: str, step: int) -> None:
    """The kill of `fault_point` for the checkpoint phases (radis.train.checkpoint)."""
    point = fault_point()
    if point is not None and point[:2] == (phase, step):
        kill_now()
