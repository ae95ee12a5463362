"""`radis export`: a training checkpoint -> a consolidated Hugging Face model directory.

    radis export --checkpoint outputs/train/checkpoints [--tag global_step200] --out model/ [--dtype bfloat16]

`--checkpoint` is either the checkpoints root (the tag comes from `--tag` or the
`latest` file) or one tag directory. ZeRO-1/2/3 shards are merged into one fp32 state
dict (DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`, no process group and no
accelerator needed); a ZeRO-0 checkpoint holds the full module already. The model is
rebuilt from the `hf/` config saved in the checkpoint, the weights loaded strictly, and
written with `save_pretrained` (safetensors), next to the tokenizer, the generation
config and `radis_training.json` (how it was trained: radis.training_info). The output directory appears complete or not at all (written to a temporary
sibling, then renamed).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from radis.errors import InputError
from radis.models import DTYPES
from radis.train.checkpoint import (
    HF_SUBDIR,
    LATEST,
    damaged_file,
    earlier_tag,
    list_tags,
)
from radis.training_info import FILENAME as TRAINING_INFO

_DTYPES = DTYPES


class ExportError(InputError):
    """The checkpoint cannot be exported (missing files, keys that do not match the model)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoints root (with a `latest` file) or one tag directory (global_stepN)")
    parser.add_argument("--tag", default=None, help="tag inside the checkpoints root (default: the `latest` file)")
    parser.add_argument("--out", required=True, help="output HF model directory (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                        help="dtype of the saved weights (training keeps fp32 master weights; default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    try:
        out = export_checkpoint(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype, overwrite=args.overwrite)
    except (ExportError, FileNotFoundError) as err:
        print(f"radis export: {err}", file=sys.stderr)
        return 2
    print(f"radis export: wrote {out}")
    return 0


def resolve_checkpoint(checkpoint: str | os.PathLike, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints root, tag) for a root (+ optional tag) or a tag directory."""
    p = Path(os.path.expanduser(str(checkpoint)))
    if not p.is_dir():
        raise ExportError(f"--checkpoint {p}: no such directory")
    if tag is not None:
        if not (p / tag).is_dir():
            raise ExportError(f"--checkpoint {p} --tag {tag}: no directory {p / tag}")
        return p, tag
    if (p / LATEST).is_file():
        t = (p / LATEST).read_text(encoding="utf-8").strip()
        if not t:  # else p / "" is p itself, and the error would be about a missing hf/ there
            tags = list_tags(p)
            raise ExportError(f"--checkpoint {p}: its `{LATEST}` file {p / LATEST} is empty; expected the tag of a "
                              "checkpoint" + (f" (e.g. {tags[-1]}); give --tag {tags[-1]}" if tags else
                                              f"; {p} holds no complete checkpoint"))
        if not (p / t).is_dir():
            raise ExportError(f"--checkpoint {p}: `latest` names {t!r} but {p / t} does not exist")
        return p, t
    if list(p.glob("*model_states.pt")):
        return p.parent, p.name
    raise ExportError(f"--checkpoint {p}: neither a checkpoints root with a `latest` file nor a tag directory "
                      f"holding *model_states.pt")


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the trained module (keys as in the DeepSpeed module)."""
    from radis.train.checkpoint import load_weights_only, weights_only_loading

    tag_dir = root / tag
    if list(tag_dir.glob("*optim_states.pt")) and list(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        with weights_only_loading():  # DeepSpeed's reader, without unpickling
            return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise ExportError(f"{tag_dir}: no DeepSpeed model states file (mp_rank_*_model_states.pt)")
    sd = load_weights_only(states[0], map_location="cpu")["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def match_keys(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip the prefix a training wrapper adds (e.g. "model."), chosen so keys match `expected`."""
    if set(sd) & expected:
        return sd
    candidates = {k[: k.index(e)] for k in sd for e in expected if k.endswith(e) and k != e}
    for prefix in sorted(candidates, key=len):
        stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if set(stripped) & expected:
            return stripped
    raise ExportError("checkpoint keys do not match the model's parameter names "
                      f"(e.g. checkpoint {sorted(sd)[:3]}, model {sorted(expected)[:3]})")


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, tag: str | None = None,
                      dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a consolidated HF model directory for a checkpoint; return its path."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    root, tag = resolve_checkpoint(checkpoint, tag)
    hf_dir = root / tag / HF_SUBDIR
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir}: no config.json (the trainer saves the model config and tokenizer there)")
    out = Path(os.path.expanduser(str(out)))
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out}: already exists (use --overwrite)")
    bad = damaged_file(root, tag)
    if bad is not None:  # before DeepSpeed's reader meets it (torch's error names no file)
        instead = earlier_tag(root, tag)
        raise ExportError(f"{bad[0]}: {bad[1]}; checkpoint {root / tag} cannot be exported"
                          + (f"; export the one before it with --checkpoint {root} --tag {instead}" if instead else ""))

    config = AutoConfig.from_pretrained(str(hf_dir))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = set(skeleton.state_dict())
    sd = match_keys(consolidated_state_dict(root, tag), expected)

    # Cast tensor by tensor before building the model in the target dtype, so that host
    # memory peaks near one fp32 copy (the consolidated state) instead of two (7B: ~28 GB).
    target = _DTYPES[dtype]
    for key in list(sd):
        sd[key] = sd[key].to(target) if sd[key].is_floating_point() else sd[key]
    model = AutoModelForCausalLM.from_config(config, dtype=target)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ExportError(f"{root / tag}: state dict does not fit {config.model_type}: "
                          f"missing {missing[:5]} unexpected {list(unexpected)[:5]}")
    model.tie_weights()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(str(tmp))
        try:
            GenerationConfig.from_pretrained(str(hf_dir)).save_pretrained(str(tmp))
        except OSError:  # the model had no generation_config.json: save_pretrained wrote a default
            pass
        if (hf_dir / TRAINING_INFO).is_file():  # how it was trained (radis evaluate reads it)
            shutil.copy2(hf_dir / TRAINING_INFO, tmp / TRAINING_INFO)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with another parameter (e.g. a tied lm_head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied
