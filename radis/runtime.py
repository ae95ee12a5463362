"""What every `radis` command needs from where it runs: its arguments, its rank, its group.

    add_config_arguments(parser)      --config FILE and trailing key=value overrides
    Ranks.from_env()                  RANK / WORLD_SIZE / LOCAL_RANK as torchrun or deepspeed set them
    join_process_group(...)           the default torch.distributed group (only when WORLD_SIZE > 1)
    dist_info(), barrier(), gather_objects()
    on_rank0(...), on_every_rank(...)   work on one or every rank whose error stops them all

The commands (build-data, inspect-data, generate, train, evaluate, compare) sit above
this module and import it; it imports only radis.errors and nothing heavy at module
level, so `radis --help` stays fast.

Backends: "auto" is nccl when CUDA is present (each rank on the GPU of its LOCAL_RANK),
else gloo. Generation asks for gloo even on GPU machines: it exchanges only Python
objects and barriers, never a GPU tensor. Training lets DeepSpeed wrap the group made
here (`deepspeed.init_distributed` adopts an initialised default group).
"""
from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from radis.errors import InputError

Backend = Literal["auto", "gloo", "nccl"]


class RankEnvironmentError(InputError):
    """RANK / WORLD_SIZE / LOCAL_RANK are missing pieces or not integers."""


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The `--config FILE` option and trailing `key=value` overrides shared by subcommands."""
    parser.add_argument("--config", "-c", required=required, help="YAML configuration file (see README: Configuration)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override a config value, e.g. train.lr=1e-5 data.max_tokens=4096"
    )


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a launch (0 of 1 without a launcher)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        def read(name: str, default: int) -> int:
            text = os.environ.get(name)
            if text is None or text == "":
                return default
            try:
                return int(text)
            except ValueError:
                raise RankEnvironmentError(f"environment variable {name}={text!r}: expected an integer") from None

        r = cls(read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0))
        if r.world_size < 1 or not 0 <= r.rank < r.world_size:
            raise RankEnvironmentError(f"RANK={r.rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={r.world_size})")
        return r

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _DropMessages:
    """A logging filter that drops records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        self.prefixes = prefixes

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_known_warnings() -> None:
    """Silence the known, harmless messages that would bury a run's progress and errors.

    - torch.distributed's FutureWarnings for the collectives DeepSpeed still calls
      (`all_gather_into_tensor`, `reduce_scatter_tensor`, ...): one per call, tens of
      thousands in a short CPU run;
    - DeepSpeed's "Setting accelerator to CPU ..." on every rank of a CPU run.

    Called by `radis.cli.main` before a subcommand imports anything heavy; every other
    warning and log line is left alone.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))


def use_cuda() -> bool:
    """Whether radis runs on CUDA: a GPU torch can use, unless DeepSpeed was told to run on
    the CPU (DS_ACCELERATOR=cpu, which launch/common.sh sets for RADIS_CPU=1). Asked in one
    place because emptying CUDA_VISIBLE_DEVICES does not survive the DeepSpeed launcher,
    which sets it afresh for every rank: without this, a CPU run on a GPU node would choose
    NCCL and CUDA while DeepSpeed runs its CPU accelerator."""
    import torch

    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "").lower() != "cpu"


def cpu_supports_float16() -> bool:
    """Whether DeepSpeed's CPU accelerator takes float16 here: it asks oneDNN for fp16
    kernels (CPUs with AVX512-FP16 or AMX-FP16), and its engine refuses fp16 without them."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_backend(backend: Backend) -> str:
    if backend == "auto":
        return "nccl" if use_cuda() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected auto, gloo or nccl, got {backend!r}")
    return backend


def join_process_group(backend: Backend = "auto", timeout: datetime.timedelta | None = None, *,
                       single: bool = False) -> bool:
    """Join the default process group when launched with WORLD_SIZE > 1 and none exists yet.

    Returns whether this call created it (the caller then destroys it with
    `leave_process_group`). `timeout` bounds every collective (a dead rank makes the
    others fail within it instead of waiting forever); None keeps torch's default.
    With nccl, the rank's GPU is selected first. `single=True` makes a group of one
    rank too (DeepSpeed needs one; MASTER_ADDR / MASTER_PORT must then be set).
    """
    import torch

    ranks = Ranks.from_env()
    if (ranks.world_size == 1 and not single) or not torch.distributed.is_available() \
            or torch.distributed.is_initialized():
        return False
    name = resolve_backend(backend)
    if name == "nccl":
        torch.cuda.set_device(ranks.local_rank)
    kwargs: dict[str, Any] = {"backend": name, "rank": ranks.rank, "world_size": ranks.world_size}
    if timeout is not None:
        kwargs["timeout"] = timeout
    torch.distributed.init_process_group(**kwargs)
    _leave_before_interpreter_exit()
    return True


_EXIT_HOOK = False


def _leave_before_interpreter_exit() -> None:
    """Destroy whatever process groups are left when the interpreter exits, while it is alive.

    A process that ends with a gloo group still alive aborts now and then with
    "terminate called without an active exception" (exit -6): at interpreter teardown a
    gloo worker thread can still hold a finished collective whose tensors belong to
    Python objects, and releasing them needs the GIL, which a finalizing interpreter
    refuses by ending the thread from inside C++ code that may not be unwound (std::terminate). Measured on
    this machine: 4 of 30 two-rank runs that exit after a few collectives without
    destroy_process_group aborted, 0 of 30 that destroy it. The commands destroy their
    groups themselves; this atexit hook is the net for any path that does not (an
    exception escaping before the command's cleanup, a script using radis as a library).
    atexit runs before the interpreter tears down, so the destroy is safe there.
    """
    global _EXIT_HOOK
    if _EXIT_HOOK:
        return
    import atexit

    def leave() -> None:
        import torch

        dist = torch.distributed
        # gloo only: the abort is gloo's, and an NCCL group whose peer died can block in
        # destroy (the commands' own cleanup handles NCCL)
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()

    atexit.register(leave)
    _EXIT_HOOK = True


def leave_process_group(created: bool) -> None:
    """Destroy the default group if `join_process_group` created it (and it still exists)."""
    import torch

    if created and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def new_group(timeout: datetime.timedelta, backend: str = "gloo") -> Any:
    """A second group over all ranks with its own timeout (None without a process group).

    Generation uses one for its final barrier: a rank may finish hours before the
    slowest one, far beyond the join timeout of the default group.
    """
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return torch.distributed.new_group(backend=backend, timeout=timeout)


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier(group: Any = None) -> None:
    """A barrier over the group (a no-op without a process group)."""
    import torch

    if dist_info()[1] > 1:
        torch.distributed.barrier(group=group)


def gather_objects(local: Any, group: Any = None) -> list[Any]:
    """Every rank's `local` (picklable), indexed by rank (just `[local]` without a group)."""
    import torch

    world = dist_info()[1]
    if world == 1:
        return [local]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, local, group=group)
    return out


# The timeout of a group in which ranks wait for rank 0's lone work (`on_rank0`): a
# packed-data build, a checkpoint conversion or an export at the paper's scale takes far
# longer than the default group's, which is there to notice a dead rank in minutes.
RANK0_WORK_TIMEOUT = datetime.timedelta(hours=24)


class RankWorkError(RuntimeError):
    """Work that another rank did failed there (`on_rank0`, `on_every_rank`); the message
    names that rank, the work and its error. That rank shows its own traceback."""


def _problem(err: Exception) -> tuple[bool, str, str]:
    """What the other ranks need of an error: (is bad input, message, `Type: message`)."""
    return isinstance(err, InputError), str(err), f"{type(err).__name__}: {err}"


def _remote_error(problem: tuple[bool, str, str], who: str, what: str) -> Exception:
    """Another rank's error, to raise here: bad input keeps its message (the user fixes
    the same thing whichever rank read it), anything else names the rank and the work."""
    is_input, message, described = problem
    return InputError(message) if is_input else RankWorkError(f"{who} failed {what} ({described})")


def on_rank0(what: str, work: Callable[[], Any], group: Any = None, share: bool = False) -> Any:
    """`work()` on rank 0 while the other ranks wait in `group`; its result on rank 0, and
    on the others too with `share` (broadcast: keep it small and picklable), else None there.

    Give a `group` of a timeout longer than the work can take (`new_group`): the default
    group's is there to notice a dead rank in minutes, and a data build or a checkpoint
    conversion at the paper's scale takes longer. An error of rank 0's is raised on every
    rank, so that all of them exit naming it instead of waiting for a collective that
    never comes: rank 0 raises its own; the others raise bad input (an InputError) as an
    InputError with rank 0's message, anything else as a RankWorkError naming `what`.
    """
    import torch

    rank, world = dist_info()
    result, failure = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 -- shared with the other ranks, then raised
            failure = err
    if world > 1:
        shared = [None if failure is None else _problem(failure), result if share and failure is None else None]
        torch.distributed.broadcast_object_list(shared, src=0, group=group)
        if rank != 0:
            if shared[0] is not None:
                raise _remote_error(shared[0], "rank 0", what)
            result = shared[1]
    if failure is not None:
        raise failure
    return result


def on_every_rank(what: str, work: Callable[[], Any], group: Any = None) -> Any:
    """`work()` on every rank, then one verdict for all of them; returns this rank's result.

    For work each rank does alone between two collectives (writing its own part of a
    checkpoint): a rank that failed and exited would leave the others waiting in the
    next collective until the group's timeout, and then they would report a lost rank,
    not the error. Here every rank raises when any failed: a failed rank its own error,
    the others the lowest failed rank's, as `on_rank0` raises rank 0's.
    """
    result, failure = None, None
    try:
        result = work()
    except Exception as err:  # noqa: BLE001 -- shared with the other ranks, then raised
        failure = err
    problems = gather_objects(None if failure is None else _problem(failure), group)
    if failure is not None:
        raise failure
    for rank, problem in enumerate(problems):
        if problem is not None:
            raise _remote_error(problem, f"rank {rank}", what)
    return result


def default_device() -> Any:
    """cuda:LOCAL_RANK where CUDA exists, else the CPU."""
    import torch

    if use_cuda():
        return torch.device("cuda", Ranks.from_env().local_rank)
    return torch.device("cpu")
