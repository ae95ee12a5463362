"""The DeepSpeed JSON of a training run, derived from `RadisConfig` (or checked against it).

Two ways in, one dict out:

1. `train.deepspeed_config` unset: `derive_ds_config` writes the JSON from the config.
2. `train.deepspeed_config: my.json`: `resolve_ds_config` reads the user's file. Values
   written as "auto" (the Hugging Face Trainer convention) are filled from the config;
   a concrete value that contradicts the config is an error naming the key and both
   values, never a silent pick.

Who owns what (the choice documented once, here):

- **Optimizer and LR schedule belong to the trainer** unless the user's JSON has an
  `optimizer` / `scheduler` section. The trainer passes AdamW as a client optimizer
  (`torch.optim.AdamW`; `DeepSpeedCPUAdam` under ZeRO-Offload, which DeepSpeed requires
  there) and a `LambdaLR` from `radis.train.schedule`; DeepSpeed steps both. A derived
  JSON therefore has no `optimizer` / `scheduler` section. A user JSON that has them keeps
  them, DeepSpeed builds them, and their "auto" params are filled from `train.*`.
- **Precision** follows `model.dtype` (radis.models.default_dtype): bf16 on CUDA, fp32 on
  CPU ("auto"); fp16 turns on dynamic loss scaling.
- **Batch shape**: one micro-batch is `data.packs_per_micro_batch` packed sequences of
  `data.max_tokens` tokens; DeepSpeed's `train_batch_size` counts packs per optimizer
  step over all ranks:

      train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size

- **Logging** is the trainer's (radis.train.metrics); DeepSpeed's periodic print is off.

ZeRO sizes that depend on the model (filled when `hidden_size` is known, as the HF
integration does): reduce_bucket_size = hidden², stage3_prefetch_bucket_size =
0.9·hidden², stage3_param_persistence_threshold = 10·hidden.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radis.config import ConfigError, RadisConfig

# DeepSpeed prints a line every `steps_per_print` steps; the trainer logs itself.
_QUIET_STEPS_PER_PRINT = 2**31 - 1


class DeepSpeedConfigError(ConfigError):
    """The DeepSpeed JSON cannot be read, has an unresolvable "auto", or contradicts the config."""


@dataclass(frozen=True)
class RunShape:
    """Numbers of a run that are not config fields but enter the DeepSpeed JSON.

    world_size:    number of ranks (data-parallel degree).
    precision:     "float32" | "bfloat16" | "float16" (the resolved `model.dtype`).
    hidden_size:   the model's hidden size (None: ZeRO bucket sizes keep DeepSpeed's defaults).
    total_steps:   optimizer steps of the whole run (for scheduler "auto" values; None:
                   not known yet, e.g. before the data is built).
    warmup_steps:  warmup optimizer steps (resolved from warmup_steps / warmup_ratio; None:
                   not known yet).
    cuda:          whether ranks run on CUDA (pinned memory for offload, comm overlap).
    """

    world_size: int
    precision: str = "float32"
    hidden_size: int | None = None
    total_steps: int | None = None
    warmup_steps: int | None = 0
    cuda: bool = False


# --------------------------------------------------------------------------- derive


def derive_ds_config(cfg: RadisConfig, shape: RunShape) -> dict[str, Any]:
    """The DeepSpeed JSON for `cfg` when the user gives none.

    >>> from radis.config import load_config
    >>> ds = derive_ds_config(load_config(None, ["train.zero_stage=2"]), RunShape(world_size=2))
    >>> ds["train_batch_size"], ds["zero_optimization"]["stage"], ds["bf16"]["enabled"]
    (2, 2, False)
    """
    t = cfg.train
    _check_shape(cfg, shape)
    micro = cfg.data.packs_per_micro_batch
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": micro * t.gradient_accumulation_steps * shape.world_size,
        "gradient_clipping": t.max_grad_norm,
        "steps_per_print": _QUIET_STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        # Our client optimizer is torch.optim.AdamW, which ZeRO calls "untested".
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": shape.precision == "bfloat16"},
        "fp16": _fp16_section(shape.precision == "float16"),
        "zero_optimization": _zero_section(t.zero_stage, t.offload, shape),
    }
    return ds


def _fp16_section(enabled: bool) -> dict[str, Any]:
    if not enabled:
        return {"enabled": False}
    # loss_scale 0 = dynamic loss scaling, starting at 2**16.
    return {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
            "hysteresis": 2, "min_loss_scale": 1}


def _zero_section(stage: int, offload: bool, shape: RunShape) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return zero
    zero["contiguous_gradients"] = True
    # Overlapping reduction with backward pays on GPUs (separate streams); gloo on CPU
    # gains nothing and uses more memory.
    zero["overlap_comm"] = shape.cuda
    if shape.hidden_size is not None:
        zero.update(_hidden_sizes(stage, shape.hidden_size))
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": shape.cuda}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": shape.cuda}
    if stage == 3:
        # `save_16bit_model` / HF export from a live engine need the gathered weights.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return zero


def _hidden_sizes(stage: int, hidden: int) -> dict[str, int]:
    sizes = {"reduce_bucket_size": hidden * hidden}
    if stage == 3:
        sizes["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
        sizes["stage3_param_persistence_threshold"] = 10 * hidden
    return sizes


def _check_shape(cfg: RadisConfig, shape: RunShape) -> None:
    if shape.world_size < 1:
        raise DeepSpeedConfigError(f"world_size must be >= 1, got {shape.world_size}")
    if shape.precision not in ("float32", "bfloat16", "float16"):
        raise DeepSpeedConfigError(f"precision must be float32/bfloat16/float16, got {shape.precision!r}")
    if cfg.data.packs_per_micro_batch < 1:
        raise DeepSpeedConfigError(f"data.packs_per_micro_batch must be >= 1, got {cfg.data.packs_per_micro_batch}")
    if cfg.train.gradient_accumulation_steps < 1:
        raise DeepSpeedConfigError(
            f"train.gradient_accumulation_steps must be >= 1, got {cfg.train.gradient_accumulation_steps}")
    if cfg.train.offload and cfg.train.zero_stage < 2:
        raise DeepSpeedConfigError(
            f"train.offload=true needs train.zero_stage 2 or 3, got {cfg.train.zero_stage}")


# --------------------------------------------------------------------------- resolve a user's JSON


def read_ds_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a DeepSpeed JSON file; errors name the file (and line for bad JSON)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise DeepSpeedConfigError(f"train.deepspeed_config: {p}: file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(
            f"train.deepspeed_config: {p}: line {err.lineno} column {err.colno}: invalid JSON: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DeepSpeedConfigError(f"train.deepspeed_config: {p}: not UTF-8 text ({err.reason} at byte "
                                   f"{err.start})") from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"train.deepspeed_config: {p}: expected a JSON object, got {type(data).__name__}")
    return data


def resolve_ds_config(user: dict[str, Any], cfg: RadisConfig, shape: RunShape, source: str = "<json>",
                      check_only: bool = False) -> dict[str, Any]:
    """Fill the "auto" values of a user's DeepSpeed JSON from `cfg`; check the others.

    Every key that the config determines is either "auto" (filled), absent (filled for
    the batch, precision and ZeRO-stage keys that DeepSpeed needs), or equal to the
    config's value; anything else raises `DeepSpeedConfigError` naming the key, the
    file's value and the config's value. An "auto" this function has no rule for is an
    error too. The input dict is not modified.

    `check_only=True` (the trainer's pre-flight, before the model and data are loaded):
    values that need what `shape` does not know yet (hidden size, step counts) are
    neither checked nor filled; everything else is.
    """
    _check_shape(cfg, shape)
    ds = copy.deepcopy(user)
    t = cfg.train
    micro = cfg.data.packs_per_micro_batch
    checker = _Checker(ds, source)

    # Batch shape: all three are filled when absent so that DeepSpeed sees one shape.
    checker.match("train_micro_batch_size_per_gpu", micro, "data.packs_per_micro_batch", fill_missing=True)
    checker.match("gradient_accumulation_steps", t.gradient_accumulation_steps, "train.gradient_accumulation_steps",
                  fill_missing=True)
    checker.match("train_batch_size", micro * t.gradient_accumulation_steps * shape.world_size,
                  "data.packs_per_micro_batch * train.gradient_accumulation_steps * world_size", fill_missing=True)
    checker.match("gradient_clipping", t.max_grad_norm, "train.max_grad_norm", fill_missing=True)

    # Precision.
    checker.match("bf16.enabled", shape.precision == "bfloat16", "model.dtype", fill_missing=True)
    checker.match("fp16.enabled", shape.precision == "float16", "model.dtype", fill_missing=True)

    # Optimizer / scheduler sections are optional; their "auto" params come from train.*.
    if "optimizer" in ds:
        checker.match("optimizer.params.lr", t.lr, "train.lr")
        checker.match("optimizer.params.betas", [t.adam_beta1, t.adam_beta2], "train.adam_beta1/adam_beta2")
        checker.match("optimizer.params.eps", t.adam_eps, "train.adam_eps")
        checker.match("optimizer.params.weight_decay", t.weight_decay, "train.weight_decay")
    if "scheduler" in ds:
        checker.match("scheduler.params.warmup_max_lr", t.lr, "train.lr")
        checker.match("scheduler.params.warmup_num_steps", shape.warmup_steps, "train.warmup_steps/warmup_ratio")
        checker.match("scheduler.params.total_num_steps", shape.total_steps, "train.max_steps/epochs")
        checker.match("scheduler.params.cos_min_ratio", t.min_lr_ratio, "train.min_lr_ratio")
        # Not config fields: "auto" means the schedule starts from zero.
        checker.fill_auto("scheduler.params.warmup_min_lr", 0.0)
        checker.fill_auto("scheduler.params.warmup_min_ratio", 0.0)

    # ZeRO: the stage and offload must agree with the config (the trainer's model loading
    # and checkpoint export depend on them).
    checker.match("zero_optimization.stage", t.zero_stage, "train.zero_stage", fill_missing=True)
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DeepSpeedConfigError(f"{source}: zero_optimization: expected an object, got {zero!r}")
    file_offload = _offload_device(zero.get("offload_optimizer")) not in (None, "none")
    if file_offload != t.offload:
        raise DeepSpeedConfigError(
            f"{source}: zero_optimization.offload_optimizer is {zero.get('offload_optimizer')!r} "
            f"but train.offload is {t.offload}")
    checker.fill_auto("zero_optimization.stage3_gather_16bit_weights_on_model_save", True)

    # Model-size-dependent buckets ("auto" only; a concrete value is a tuning choice).
    hidden_keys = {"zero_optimization.reduce_bucket_size": lambda h: h * h,
                   "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                   "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h}
    for key, rule in hidden_keys.items():
        if checker.get(key) == "auto":
            if shape.hidden_size is None:
                checker.deferred.append(key)
                if not check_only:
                    raise DeepSpeedConfigError(f"{source}: {key} is \"auto\" but the model's hidden size is unknown")
            else:
                checker.set(key, rule(shape.hidden_size))

    if checker.deferred and not check_only:
        raise DeepSpeedConfigError(f"{source}: cannot resolve {', '.join(checker.deferred)} (value not known)")
    left = sorted(set(_find_auto(ds)) - set(checker.deferred))
    if left:
        raise DeepSpeedConfigError(
            f"{source}: no rule to resolve \"auto\" for {', '.join(left)}; write a concrete value")
    ds.setdefault("steps_per_print", _QUIET_STEPS_PER_PRINT)
    if "optimizer" not in ds:
        ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def load_ds_config(cfg: RadisConfig, shape: RunShape, check_only: bool = False) -> dict[str, Any]:
    """The run's DeepSpeed JSON: the user's file resolved, or one derived from `cfg`."""
    if cfg.train.deepspeed_config:
        path = cfg.train.deepspeed_config
        return resolve_ds_config(read_ds_json(path), cfg, shape, source=str(path), check_only=check_only)
    return derive_ds_config(cfg, shape)


# --------------------------------------------------------------------------- internals


class _Checker:
    """Dotted-key access into the JSON, with "auto" filling and contradiction errors."""

    def __init__(self, ds: dict[str, Any], source: str):
        self.ds = ds
        self.source = source
        self.deferred: list[str] = []  # keys whose value needs what RunShape does not know yet

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.ds
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def set(self, key: str, value: Any) -> None:
        node = self.ds
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise DeepSpeedConfigError(f"{self.source}: {part}: expected an object, got {child!r}")
            node = child
        node[parts[-1]] = value

    def fill_auto(self, key: str, value: Any) -> None:
        if self.get(key) == "auto":
            self.set(key, value)

    def match(self, key: str, ours: Any, ours_name: str, fill_missing: bool = False) -> None:
        missing = object()
        theirs = self.get(key, missing)
        if ours is None:  # not known yet (check_only): nothing to fill or compare
            if theirs is missing or theirs == "auto":
                self.deferred.append(key)
            return
        if theirs is missing:
            if fill_missing:
                self.set(key, ours)
            return
        if theirs == "auto":
            self.set(key, ours)
            return
        if not _same(theirs, ours):
            raise DeepSpeedConfigError(
                f"{self.source}: {key} is {theirs!r} but {ours_name} gives {ours!r}; "
                f"write \"auto\" or change one of them")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _offload_device(section: Any) -> str | None:
    if section is None:
        return None
    if isinstance(section, dict):
        return section.get("device")
    return str(section)


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            out += _find_auto(v, f"{prefix}{k}.")
        return out
    return [prefix[:-1]] if node == "auto" else []
