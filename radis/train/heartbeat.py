"""Which rank was lost: a heartbeat per rank in the launcher's key-value store.

When a rank (or a whole node) dies, the others learn it from a failed collective:
gloo says "Connection reset by peer" with an address, NCCL times out after
`train.dist_timeout_s`; neither says which rank. Each rank therefore runs a small
thread that writes the time and its step into the rendezvous store every
`interval` seconds:

    <store at MASTER_ADDR:MASTER_PORT>
      radis/heartbeat/0  "1733051123.52 17"     (wall time, optimizer step)
      radis/heartbeat/1  "1733051123.61 17"

After a collective fails, `lost_ranks` reads them back: a rank whose beat is older
than `stale` seconds (or that never beat) is lost. The store lives with rank 0 for
bare processes and the DeepSpeed launcher, and in the torchrun agent of node 0 under
torchrun; when it cannot be reached, the node that hosts it is the one gone, which the
diagnosis says instead. The thread only talks to the store (never to the process
group) and is stopped before the process group goes (radis.train.recipe cleanup).
"""
from __future__ import annotations

import datetime
import os
import threading
import time
from dataclasses import dataclass

PREFIX = "radis/heartbeat/"
STORE_REPLY_S = 5.0  # how long a read of the store may take before it counts as unreachable


@dataclass
class Diagnosis:
    """What the heartbeats say after a failed collective."""

    lost: list[int]  # ranks whose heartbeat stopped (empty: none did)
    ages: dict[int, float]  # seconds since each lost rank's last beat (inf: never beat)
    steps: dict[int, int]  # the step each lost rank last reported
    store_gone: bool = False  # the store itself could not be reached

    def describe(self, store_address: str) -> str:
        if self.store_gone:
            return (f"the rendezvous store at {store_address} cannot be reached: the node of rank 0 (or the "
                    "launcher that hosts the store) is gone or cut off from this one")
        if not self.lost:
            return "every rank is still beating: the failure is in the network or the collective itself"
        parts = [f"rank {r} (" + ("never started beating" if self.ages[r] == float("inf") else
                                  f"last heard {self.ages[r]:.0f} s ago, after step {self.steps[r]}") + ")"
                 for r in self.lost]
        return "lost " + ", ".join(parts)


class Heartbeat:
    """A daemon thread beating for `rank` in the store at host:port.

        hb = Heartbeat.connect(rank, world_size)   # MASTER_ADDR / MASTER_PORT from the launcher
        hb.step = 12                                # what the beats report
        diagnosis = hb.lost_ranks()                 # after a collective failed
        hb.stop()
    """

    def __init__(self, store, rank: int, world_size: int, interval: float = 1.0, address: str = "?"):
        self.store, self.rank, self.world_size, self.interval = store, rank, world_size, interval
        self.address = address
        self._step = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # a new step: beat now (from the thread, not the caller)
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"radis-heartbeat-{rank}", daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, rank: int, world_size: int, interval: float = 1.0) -> Heartbeat | None:
        """A heartbeat in the store at MASTER_ADDR:MASTER_PORT; None when there is none
        (one rank without a launcher) or it cannot be reached (the run goes on without)."""
        import torch.distributed as dist

        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world_size < 2 or not host or not port:
            return None
        try:
            client = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10),
                                   wait_for_workers=False)
        except (RuntimeError, ValueError):
            return None
        return cls(dist.PrefixStore(PREFIX, client), rank, world_size, interval, address=f"{host}:{port}")

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        """The step the beats report; a new one is beaten at once (by the thread)."""
        self._step = value
        self._wake.set()

    def _beat(self) -> None:
        self.store.set(str(self.rank), f"{time.time():.3f} {self._step}")

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._beat()
            except (RuntimeError, OSError):  # the store is gone: nothing left to beat into
                return

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def read(self) -> dict[int, tuple[float, int] | None]:
        """{rank: (seconds since its last beat, its step) or None (never beat)}."""
        now, out = time.time(), {}
        for r in range(self.world_size):
            key = str(r)
            if not self.store.check([key]):
                out[r] = None
                continue
            stamp, step = self.store.get(key).decode().split()
            out[r] = (now - float(stamp), int(step))
        return out

    def _read_within(self, seconds: float) -> dict[int, tuple[float, int] | None]:
        """read(), or TimeoutError after `seconds`: a store behind a network cut does not
        answer, and its client waits on the socket far longer than the store's own timeout
        (seen: over a minute), which would leave this rank hanging after its collective
        failed. The reading thread is a daemon and is left behind."""
        result: dict = {}

        def target() -> None:
            try:
                result["beats"] = self.read()
            except Exception as err:  # noqa: BLE001 -- handed to the caller, who raises it
                result["error"] = err

        reader = threading.Thread(target=target, name=f"radis-heartbeat-read-{self.rank}", daemon=True)
        reader.start()
        reader.join(seconds)
        if reader.is_alive():
            raise TimeoutError(f"the store at {self.address} did not answer in {seconds:.0f} s")
        if "error" in result:
            raise result["error"]
        return result["beats"]

    def lost_ranks(self, wait: float | None = None, stale: float | None = None) -> Diagnosis:
        """The ranks that stopped beating, waiting up to `wait` seconds (default 4
        intervals) for a just-dead rank's last beat to grow older than `stale`
        (default 2.5 intervals)."""
        stale = 2.5 * self.interval if stale is None else stale
        deadline = time.monotonic() + (4 * self.interval if wait is None else wait)
        while True:
            try:
                beats = self._read_within(max(deadline - time.monotonic(), 0) + STORE_REPLY_S)
            except (RuntimeError, OSError, ValueError):  # DistStoreError is a RuntimeError
                return Diagnosis([], {}, {}, store_gone=True)
            lost = [r for r, b in beats.items() if r != self.rank and (b is None or b[0] > stale)]
            if lost or time.monotonic() > deadline:
                return Diagnosis(lost, {r: float("inf") if beats[r] is None else beats[r][0] for r in lost},
                                 {r: -1 if beats[r] is None else beats[r][1] for r in lost})
            time.sleep(self.interval / 4)


def is_collective_failure(err: BaseException) -> bool:
    """Whether `err` is what a collective raises when a peer is gone or hangs."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in (
        "Connection reset by peer", "Connection closed by peer", "gloo", "NCCL", "Timed out", "timed out",
        "failed to recv", "Socket Timeout",
        # gloo, when the peer is cut off (not dead) and the group's timeout passes mid-recv
        "Application timeout caused pair closure"))
