"""Learning-rate schedules: linear warmup, then cosine / linear / inverse-sqrt / constant.

The schedule is a multiplier of `train.lr` as a function of the optimizer step `s`
(0-based: the factor used by the s-th update). With W warmup steps and T total steps:

    factor
    1.0 |        ______
        |      /        ``--.._            cosine / linear decay to min_lr_ratio at s = T
        |    /                 ``--..__
        |  /                           ``--  min_lr_ratio
    0.0 |/________________________________
         0        W                       T      s

    warmup      s < W:  (s + 1) / W          (the first update already moves)
    cosine             min + (1 - min) * (1 + cos(pi * p)) / 2,   p = (s - W) / (T - W)
    linear             min + (1 - min) * (1 - p)
    inverse_sqrt       max(min, sqrt(max(W, 1) / (s + 1)))
    constant           1

It is a `torch.optim.lr_scheduler.LambdaLR` so that DeepSpeed steps it after every
optimizer step and saves / restores it with the checkpoint: the state is the step counter,
the base rates (train.lr) and the fields of `LRFactor`. Loading it brings back the values
it was saved with; `retarget_scheduler` then makes it follow the resumed run's own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "linear", "inverse_sqrt", "constant")


@dataclass(frozen=True)
class LRFactor:
    """The multiplier of the peak learning rate at optimizer step `s` (callable)."""

    schedule: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule: expected one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.total_steps < 1:
            raise ValueError(f"total optimizer steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, s: int) -> float:
        w = self.warmup_steps
        if s < w:
            return (s + 1) / w
        if self.schedule == "constant":
            return 1.0
        lo = self.min_lr_ratio
        if self.schedule == "inverse_sqrt":
            return max(lo, math.sqrt(max(w, 1) / (s + 1)))
        p = min(1.0, (s - w) / max(1, self.total_steps - w))
        if self.schedule == "cosine":
            return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
        return lo + (1.0 - lo) * (1.0 - p)  # linear


def resolve_warmup_steps(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """`train.warmup_steps` when set, else ceil(warmup_ratio * total_steps)."""
    if warmup_steps < 0:
        raise ValueError(f"train.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"train.warmup_ratio must be in [0, 1], got {warmup_ratio}")
    if warmup_steps > 0:
        return warmup_steps
    return math.ceil(warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, factor: LRFactor) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `optimizer` (every param group) following `factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def retarget_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, factor: LRFactor, base_lr: float) -> bool:
    """Make a restored LambdaLR follow this run's `factor` and peak rate `base_lr`, at the
    step it stands at. Its state_dict holds the LRFactor's fields and the base rates, so
    loading it brings back the total, warmup, min_lr_ratio and train.lr it was saved with
    (a run resumed with another number of packs per step has another total; one resumed to
    lower the rate after a loss spike has another train.lr); this replaces them and sets
    each group's rate for the current step. Returns False (nothing changed) when the
    schedule is not made of LRFactors."""
    factors = scheduler.lr_lambdas
    if not all(isinstance(f, LRFactor) for f in factors):
        return False
    scheduler.lr_lambdas = [factor] * len(factors)
    scheduler.base_lrs = [base_lr] * len(factors)
    rates = [base_lr * factor(scheduler.last_epoch)] * len(factors)
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["initial_lr"] = base_lr  # what a LambdaLR built afresh on these groups would read
        group["lr"] = lr
    scheduler._last_lr = rates
    return True
