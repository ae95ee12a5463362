"""A rank that joins the process group through radis and exits without leaving it.

What an exception escaping a command before its cleanup does. Without radis's atexit
net this aborts now and then at interpreter teardown ("terminate called without an
active exception", exit -6; radis.runtime._leave_before_interpreter_exit).

    python exit_with_group.py [--report]   (under torchrun, or alone with --single)
"""
import atexit
import sys

import torch
import torch.distributed as dist

from radis.runtime import join_process_group


def report() -> None:  # registered before radis's hook, so it runs after it (atexit is LIFO)
    print(f"group left before teardown: {not dist.is_initialized()}", flush=True)


def main() -> int:
    if "--report" in sys.argv:
        atexit.register(report)
    assert join_process_group("gloo", single="--single" in sys.argv)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = [None] * world
    for _ in range(3):
        dist.all_gather_object(out, {"rank": rank, "pad": "x" * 1000})
        t = torch.ones(1000)
        dist.all_reduce(t)
    assert t[0].item() == world
    return 0  # no destroy_process_group: the hook's job


if __name__ == "__main__":
    sys.exit(main())
