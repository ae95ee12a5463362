"""`radis train`: RaDis (MT + RD) or vanilla (MT only) fine-tuning on DeepSpeed.

    radis train --config recipes/smollm2_cpu.yaml [key=value ...]                 # one rank
    torchrun --nproc_per_node 2 -m radis.cli train --config X.yaml [key=value ...]
    deepspeed --num_gpus 8 --no_local_rank --module radis.cli train --config X.yaml
    launch/single_node.sh recipes/llama2_7b_chat.yaml [key=value ...]           # prints, then runs

Configuration errors (missing model or data file, a DeepSpeed JSON that contradicts the
config) are reported on every rank before any process group starts; exit status 2.
A non-finite loss beyond `train.max_bad_batches` stops the run with exit status 1,
naming the step and the example ids of the batch. A lost rank or node makes the others
stop (within `train.dist_timeout_s` at most) with exit status 1 and a message naming the
lost rank and the checkpoint to resume from (radis.train.heartbeat).
"""
from __future__ import annotations

import argparse
import sys

from radis.runtime import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    # Accepted for launchers that append it (deepspeed without --no_local_rank); the
    # rank is read from the LOCAL_RANK environment variable.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from radis.config import load_config
    from radis.train.heartbeat import is_collective_failure
    from radis.train.recipe import RadisRecipe, TrainingError, preflight

    cfg = load_config(args.config, args.overrides)
    preflight(cfg)  # ConfigError -> `radis train: config error: ...`, exit 2 (radis.cli)
    recipe = RadisRecipe(cfg)
    ok = False
    try:
        recipe.setup()
        recipe.train()
        ok = True
    except TrainingError as err:
        print(f"radis train: {err}", file=sys.stderr, flush=True)
        return 1
    except Exception as err:
        if recipe.heartbeat is None or not is_collective_failure(err):
            raise
        # a peer is gone: say which, and where to resume, instead of a collective's traceback
        print(lost_rank_message(recipe, err), file=sys.stderr, flush=True)
        return 1
    finally:
        recipe.cleanup(ok)  # also after an error: the group and the environment are left clean
    return 0


def lost_rank_message(recipe, err: BaseException) -> str:
    """`radis train: error: rank 0: a collective failed at step 5 (...); lost rank 1 (...). ...`"""
    from radis.train import checkpoint as ckpt

    hb = recipe.heartbeat
    what = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
    latest = ckpt.latest_tag(recipe.ckpt_dir)
    resume = (f"the last complete checkpoint is {recipe.ckpt_dir / latest}; the same command resumes from it"
              if latest else "no checkpoint was saved yet")
    return (f"radis train: error: rank {recipe.rank}: a collective failed at step {recipe.step} ({what}); "
            f"{hb.lost_ranks().describe(hb.address)}. {resume}.")
