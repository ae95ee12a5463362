"""Crash-safe DeepSpeed checkpoints: save to a temporary tag, rename, then move `latest`.

Layout under `<train.output_dir>/checkpoints`:

    checkpoints/
      latest                      text: the tag of the newest COMPLETE checkpoint
      zero_to_fp32.py             (copied by DeepSpeed)
      global_step10/              one DeepSpeed tag directory per saved step
        mp_rank_00_model_states.pt            module (ZeRO-3: placeholders) + client_state
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt   rank r's optimizer / fp32 shard
        trainer_state_rank{r}.pt              rank r's loader position and RNG states
        hf/                                   config.json, generation config, tokenizer
      global_step20/
      .tmp-global_step30/         a save in progress (or one killed mid-way)
      universal/global_step20/    DeepSpeed's universal form of global_step20, written
                                  once when a run resumes it on another number of ranks

A save writes everything into `.tmp-<tag>`, waits for all ranks, renames the directory to
`<tag>` (atomic on one file system), then replaces `latest` atomically (tmp file +
os.replace) and only then prunes old tags. A crash at any point leaves `latest` naming a
complete checkpoint; leftover `.tmp-*` directories are removed at the next start. The
`latest` file has DeepSpeed's format, so `zero_to_fp32.py` and `load_checkpoint` read it.
Multi-node runs need `output_dir` on a file system shared by all nodes.

Resuming on another world size: a ZeRO checkpoint holds one optimizer shard per rank
of the run that saved it. `to_universal` converts the tag with DeepSpeed's own
converter (deepspeed.checkpoint.ds_to_universal: one file per parameter and state,
unsharded), and the engine, built with `checkpoint.load_universal`, re-shards it for
the ranks it has now. The loader re-plans the rest of the epoch (radis.data.loader).
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from radis.errors import InputError
from radis.io import cut_torch_file, write_text_atomic
from radis.runtime import on_every_rank, on_rank0, use_cuda
from radis.train import faults

LATEST = "latest"
TMP_PREFIX = ".tmp-"
HF_SUBDIR = "hf"
UNIVERSAL_SUBDIR = "universal"
_TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def step_of_tag(tag: str) -> int | None:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    """The tag named by `<ckpt_dir>/latest` if that checkpoint directory exists, else None."""
    p = Path(ckpt_dir) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text(encoding="utf-8").strip()
    if not tag or not (Path(ckpt_dir) / tag).is_dir():
        return None
    return tag


class CheckpointStateError(InputError):
    """The checkpoints directory is in a state that no resume rule covers (the message says what to do)."""


def resume_point(ckpt_dir: str | os.PathLike) -> tuple[str | None, str | None]:
    """(tag to resume from, a note to print or None); (None, None) for a fresh start.

    The newest COMPLETE checkpoint wins (a tag directory exists only once every rank's
    files are in it), whatever `latest` says, and a disagreement is said out loud:

    - `latest` names a checkpoint that exists, and no newer one exists: that one;
    - a newer complete checkpoint exists (killed after the rename, before `latest` moved):
      the newer one, with a note;
    - `latest` names a missing checkpoint (deleted, or a copy that lost it): the newest
      complete one, with a note; none at all: CheckpointStateError, never a silent
      start at step 0 that would then prune the directory;
    - no `latest` but complete checkpoints: the newest, with a note.
    """
    root = Path(ckpt_dir)
    tags = list_tags(root)
    newest = tags[-1] if tags else None
    named = (root / LATEST).read_text(encoding="utf-8").strip() if (root / LATEST).is_file() else None
    if named is None:
        return newest, (f"{root}: no `{LATEST}` file; resuming from the newest complete checkpoint {newest}"
                        if newest else None)
    if named in tags:
        if newest != named:
            return newest, f"{root}: `{LATEST}` names {named}, but {newest} is newer and complete; resuming from it"
        return named, None
    missing = f"names {named!r}, which does not exist" if named else "is empty"  # an empty one names no tag
    if newest is None:
        raise CheckpointStateError(
            f"{root}: `{LATEST}` {missing}, and there is no complete checkpoint to "
            f"resume from; delete {root / LATEST} to start afresh" + (f", or restore {root / named}" if named else ""))
    return newest, f"{root}: `{LATEST}` {missing}; resuming from the newest complete checkpoint {newest}"


def list_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """Complete step tags in `ckpt_dir`, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    tags = [d.name for d in root.iterdir() if d.is_dir() and step_of_tag(d.name) is not None]
    return sorted(tags, key=lambda t: step_of_tag(t))


def remove_partial(ckpt_dir: str | os.PathLike) -> list[str]:
    """Delete `.tmp-*` directories left by a save that did not finish (call on rank 0)."""
    root = Path(ckpt_dir)
    removed = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith(TMP_PREFIX):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
    return removed


def prune(ckpt_dir: str | os.PathLike, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` tags; never the one `latest` names."""
    if keep_last <= 0:
        return []
    keep = latest_tag(ckpt_dir)
    tags = list_tags(ckpt_dir)
    removed = []
    for tag in tags[:-keep_last]:
        if tag != keep:
            shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)
            shutil.rmtree(Path(ckpt_dir) / UNIVERSAL_SUBDIR / tag, ignore_errors=True)
            removed.append(tag)
    return removed


def damaged_file(ckpt_dir: str | os.PathLike, tag: str) -> tuple[Path, str] | None:
    """(file, what is wrong) for the first torch file of checkpoint `tag` that is not
    whole (a copy or a save cut short by a full disk or a kill); None when all are.

    A `torch.save` file (torch >= 1.6, as DeepSpeed writes them) is a zip archive whose
    directory is at its end: a truncated one has none, and reading it fails inside torch with "PytorchStreamReader failed
    reading zip archive", naming no file. Only the directories are read here (a few
    KB a file), so every shard is checked before a resume or an export loads any.
    """
    import zipfile

    for path in sorted((Path(ckpt_dir) / tag).glob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return path, f"truncated or damaged: not a whole torch file ({path.stat().st_size} bytes; {err})"
    return None


def earlier_tag(ckpt_dir: str | os.PathLike, tag: str) -> str | None:
    """The newest complete checkpoint saved before `tag` (None: there is none)."""
    step = step_of_tag(tag)
    older = [t for t in list_tags(ckpt_dir) if step is not None and step_of_tag(t) < step]
    return older[-1] if older else None


def check_resumable(ckpt_dir: str | os.PathLike, tag: str) -> None:
    """CheckpointStateError naming a damaged file of checkpoint `tag` (`damaged_file`)
    and the checkpoint to resume from instead, before any rank loads it."""
    bad = damaged_file(ckpt_dir, tag)
    if bad is None:
        return
    root, tag_dir = Path(ckpt_dir), Path(ckpt_dir) / tag
    instead = earlier_tag(ckpt_dir, tag)
    what_to_do = (f"move {tag_dir} out of {root} and run the same command again to resume from {instead}, the newest "
                  "complete checkpoint before it" if instead else
                  "there is no earlier checkpoint: restore the file, or start afresh in another train.output_dir")
    raise CheckpointStateError(f"{bad[0]}: {bad[1]}; checkpoint {tag_dir} cannot be resumed: {what_to_do}")


def saved_trainer_state(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, Any]:
    """Rank 0's trainer state saved with `tag`: {"loader", "rng", "data_hash", "schedule"} (every
    rank's loader stood at the same position)."""
    path = Path(ckpt_dir) / tag / "trainer_state_rank0.pt"
    state = load_weights_only(path, map_location="cpu") if path.is_file() else None
    if not isinstance(state, dict) or not isinstance(state.get("loader"), dict):
        raise CheckpointStateError(f"{path}: missing or without a loader state; {Path(ckpt_dir) / tag} is not a "
                                   "checkpoint this radis wrote")
    return state


def to_universal(ckpt_dir: str | os.PathLike, tag: str, log: Any = print) -> Path:
    """Convert checkpoint `tag` to DeepSpeed's universal format, once (call on rank 0).

    Returns the directory to give `load_checkpoint` as `load_dir` (the converted tag
    is `<ckpt_dir>/universal/<tag>`). The conversion writes into a temporary directory
    renamed into place, so a conversion killed half-way is redone, never half used.
    DeepSpeed's own loads inside it are weights_only like every other load.
    """
    import io
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    root = Path(ckpt_dir) / UNIVERSAL_SUBDIR
    final = root / tag
    if final.is_dir():
        return root
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (TMP_PREFIX + tag)
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"converting {Path(ckpt_dir) / tag} to DeepSpeed's universal checkpoint format in {final}")
    # One worker: the conversion runs in this process (under the weights_only loads),
    # forks nothing next to the live process group. The converter's chatter goes to a log file.
    args = Namespace(input_folder=str(Path(ckpt_dir) / tag), output_folder=str(tmp), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    chatter = io.StringIO()
    try:
        with weights_only_loading(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as err:
        (root / f"{tag}.conversion.log").write_text(chatter.getvalue(), encoding="utf-8")
        raise CheckpointStateError(
            f"{Path(ckpt_dir) / tag}: DeepSpeed could not convert it to a universal checkpoint "
            f"({type(err).__name__}: {err}); its output is in {root / (tag + '.conversion.log')}. Resume with the "
            "number of ranks that saved it instead.") from err
    (tmp / "conversion.log").write_text(chatter.getvalue(), encoding="utf-8")
    os.replace(tmp, final)
    write_text_atomic(root / "latest_universal", tag)  # the converter named the temporary directory
    return root


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers only, so that the file they
    are saved in loads with torch.load(weights_only=True) (no pickled objects)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if use_cuda():  # not on a CPU run of a GPU node: that would open a CUDA context
        # this rank's own device only: get_rng_state_all() would open a context on every
        # visible GPU in every rank (memory on all of them), and a resume on a node that
        # shows fewer GPUs could not set them back
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and use_cuda():
        device = torch.cuda.current_device()
        saved = state["cuda"]
        if isinstance(saved, (list, tuple)):  # written before: every visible GPU's state
            saved = saved[device] if device < len(saved) else None
        if saved is not None:
            torch.cuda.set_rng_state(saved, device)


# --------------------------------------------------------------------------- loading without unpickling


def _deepspeed_safe_globals() -> list[Any]:
    """The few DeepSpeed classes its own checkpoint files hold (enums, the loss scaler):
    allowed by name, so that every load can be weights_only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def load_weights_only(path: str | os.PathLike, **kwargs: Any) -> Any:
    """torch.load with weights_only=True: tensors, numbers, strings, containers and the
    allowed DeepSpeed classes; a file holding any other pickled object (which could run
    code while it loads) is a CheckpointStateError naming it."""
    import pickle

    kwargs["weights_only"] = True
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return _TORCH_LOAD(path, **kwargs)
    except (RuntimeError, EOFError) as err:
        cut = cut_torch_file(err)
        if cut is None:
            raise
        raise CheckpointStateError(f"{path}: truncated or damaged: not a whole torch file ({cut})") from None
    except pickle.UnpicklingError as err:
        raise CheckpointStateError(
            f"{path}: holds pickled Python objects that radis does not load (a file not written by this radis, "
            f"or one that someone placed there); checkpoints load only as plain tensors and numbers "
            f"({str(err).splitlines()[-1][:200] if str(err) else 'weights_only'})") from None


_TORCH_LOAD = torch.load


@contextlib.contextmanager
def weights_only_loading():
    """Every torch.load inside the block (DeepSpeed's own, in load_checkpoint and
    zero_to_fp32, included) runs as `load_weights_only`: nothing is unpickled."""
    def load(f, *args: Any, **kwargs: Any) -> Any:
        if args:  # torch.load(f, map_location) positional form
            kwargs.setdefault("map_location", args[0])
        kwargs.pop("weights_only", None)
        return load_weights_only(f, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


# --------------------------------------------------------------------------- save / load


def save_checkpoint(engine, ckpt_dir: str | os.PathLike, step: int, client_state: dict[str, Any],
                    rank_state: dict[str, Any], keep_last: int, hf_files=None, wait_group: Any = None) -> str:
    """Save a complete checkpoint of `step` (all ranks call this); returns its tag.

    `client_state` (same on every rank) goes into DeepSpeed's model-states file;
    `rank_state` (this rank's loader position, RNG) into `trainer_state_rank{r}.pt`.
    `hf_files(dir)`, called on rank 0, writes the HF config/tokenizer next to it.
    Each rank's own files (`radis.runtime.on_every_rank`) and rank 0's part at the end
    (rename, `latest`, pruning; `radis.runtime.on_rank0`) are waited for in
    `wait_group`, and an error of any rank's there is raised on every rank.
    """
    root = Path(ckpt_dir)
    tag = tag_for_step(step)
    tmp_tag = TMP_PREFIX + tag
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    faults.kill_if("checkpoint", step)

    def write_own_part() -> None:
        faults.disk_full_if(rank, step)
        torch.save(rank_state, root / tmp_tag / f"trainer_state_rank{rank}.pt")
        if rank == 0 and hf_files is not None:
            hf_files(root / tmp_tag / HF_SUBDIR)

    # Every rank's files are on disk after this (it is the barrier). One rank failing its
    # part (a full disk) stops every rank here, naming it, instead of leaving the others
    # in the next collective until the group's timeout. The temporary tag stays; the
    # next start removes it (remove_partial), and `latest` still names the last one.
    on_every_rank(f"writing its part of checkpoint {root / tmp_tag}", write_own_part, wait_group)

    def finish() -> None:
        final = root / tag
        if final.exists():
            # Only a checkpoint that `latest` does not name can be in the way (a
            # re-run of the same step after a crash past this point); replace it.
            if latest_tag(root) == tag:
                shutil.rmtree(root / tmp_tag, ignore_errors=True)
            else:
                shutil.rmtree(final)
        if not final.exists():
            os.replace(root / tmp_tag, final)
        faults.kill_if("latest", step)
        write_text_atomic(root / LATEST, tag)
        prune(root, keep_last)

    on_rank0(f"finishing checkpoint {tag}", finish, wait_group)
    return tag


def load_checkpoint(engine, load_dir: str | os.PathLike, tag: str,
                    state_dir: str | os.PathLike | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore model, optimizer and LR scheduler from `<load_dir>/<tag>`; return
    (client_state, rank_state).

    `state_dir` holds the trainer state files (default `<load_dir>/<tag>`; a universal
    checkpoint's are next to the original). rank_state is None when this rank has no
    state file (the run was saved with fewer ranks).
    """
    root = Path(load_dir)
    with weights_only_loading():
        load_path, client_state = engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    state_dir = Path(state_dir) if state_dir is not None else root / tag
    rank_file = state_dir / f"trainer_state_rank{dist.get_rank()}.pt"
    rank_state = load_weights_only(rank_file, map_location="cpu") if rank_file.is_file() else None
    return client_state or {}, rank_state
