"""radis.runtime.on_rank0 and on_every_rank on 2 CPU ranks (gloo): what rank 0 does alone
(the packed-data build, a universal conversion, the choice of the checkpoint to resume)
is waited for beyond the default group's timeout, and an error of rank 0's reaches every
rank; so does an error of any rank in what every rank does alone (its part of a checkpoint)."""
from __future__ import annotations

import datetime
import json
import socket
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

DEFAULT_TIMEOUT_S = 2  # the default group's (train.dist_timeout_s); rank 0's slow work takes longer


def _outcome(fn) -> list:
    try:
        return ["ok", fn()]
    except Exception as err:  # noqa: BLE001 -- the test compares what each rank saw
        return [type(err).__name__, str(err)]


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from radis.data.sources import DataError
    from radis.runtime import new_group, on_every_rank, on_rank0

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
    slow = new_group(datetime.timedelta(seconds=60))

    def slow_work():
        time.sleep(DEFAULT_TIMEOUT_S + 2)
        return {"tag": "global_step5"}

    def bad_data():
        raise DataError("train.jsonl line 3: expected a JSON object")

    def bug():
        raise ValueError("boom")

    def rank1_disk_full():
        if rank == 1:
            raise OSError(28, "No space left on device")
        return rank

    seen = {
        "shared": _outcome(lambda: on_rank0("choosing", slow_work, slow, share=True)),
        "kept": _outcome(lambda: on_rank0("building", lambda: 7, slow)),
        "bad_data": _outcome(lambda: on_rank0("building the packed data", bad_data, slow)),
        "bug": _outcome(lambda: on_rank0("converting", bug, slow)),
        "every_ok": _outcome(lambda: on_every_rank("writing", lambda: rank * 10, slow)),
        "every_disk": _outcome(lambda: on_every_rank("writing its state", rank1_disk_full, slow)),
    }
    dist.barrier()  # the group still works after the errors
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_rank0_work_outlasts_the_default_timeout_and_its_errors_reach_every_rank(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["shared"] == r1["shared"] == ["ok", {"tag": "global_step5"}]
    assert r0["kept"] == ["ok", 7] and r1["kept"] == ["ok", None]
    # bad input: rank 0 raises its own error, the others an InputError with its message
    assert r0["bad_data"] == ["DataError", "train.jsonl line 3: expected a JSON object"]
    assert r1["bad_data"] == ["InputError", "train.jsonl line 3: expected a JSON object"]
    assert r0["bug"] == ["ValueError", "boom"]
    assert r1["bug"] == ["RankWorkError", "rank 0 failed converting (ValueError: boom)"]
    # every rank's own work: each keeps its result; one rank's error stops both
    assert r0["every_ok"] == ["ok", 0] and r1["every_ok"] == ["ok", 10]
    assert r1["every_disk"] == ["OSError", "[Errno 28] No space left on device"]
    assert r0["every_disk"] == ["RankWorkError",
                                "rank 1 failed writing its state (OSError: [Errno 28] No space left on device)"]
