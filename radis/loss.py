"""The RaDis loss: translation NLL (MT span) + self-distillation (RD span), fused.

Public API (three layers, one name, like Liger-Kernel):

- `radis_loss(logits, targets, spans, ...)`: from logits [N, V];
- `radis_linear_loss(hidden, weight, targets, spans, ...)`: from hidden states [N, d]
  and the LM-head weight [V, d], chunked over tokens so the full [N, V] logits never exist;
- `RadisLoss(nn.Module)`: a thin module over both;
- the ZeRO-3-safe head and the model wrapper the trainer uses live in `radis.loss_head`.

Layout (radis.data.example; the packer has already shifted labels):

    position    i:   0     1     2     3     4     5     6
    logits[i]        predicts targets[i]
    targets     :  -100  -100   812   97    4051  13    -100
    spans       :    0     0     1     1     2     2     0        0 IGNORE, 1 MT, 2 RD

A token is a *target* of span s when spans[i] == s (s in {MT, RD}) and targets[i] != -100.

Formula. With S_MT / S_RD the sums of the per-token RD/MT terms over this call's target
tokens, and N_MT / N_RD the token counts of the normaliser (default: this call's counts;
the trainer passes GLOBAL counts of the whole optimizer step, all micro-batches and ranks):

    mode="pooled" (the paper):  loss = (w_mt * S_MT + w_rd * S_RD) / max(N_MT + N_RD, 1)
    mode="span":                loss = w_mt * S_MT / max(N_MT, 1) + w_rd * S_RD / max(N_RD, 1)

(an empty span contributes 0 in both). The per-token terms:

    MT token:  nll = -log p(target)
    RD token:  (1 - kd_weight) * nll + kd_weight * KL(q || p)   if the token has a teacher
               nll                                             otherwise
    KL(q || p) = sum_j q_j * (log q_j - log p(id_j)),  q = softmax(teacher_logprobs[i, :])

i.e. the teacher's top-k probabilities are renormalised to sum to 1 over its k ids
(-inf entries are padding and get q = 0; a row whose entries are all -inf "has no
teacher"). Teacher rows outside RD spans are never read. A call without teacher arrays
(teacher_ids=None) has no KD term whatever kd_weight says: every RD token is plain NLL.
That is what a micro-batch without a teacher needs (validation on plain pairs, the
all-padding micro-batches that even out ranks, a skipped NaN batch).

No host synchronisation happens in the op itself (no .item(), no data-dependent Python
branch) when `validate=False` (for `radis_linear_loss`: and `target_rows` given, or
`skip_ignored=False`). `validate=True` (the default) additionally checks value
ranges (targets in [0, V) or -100, spans in {0, 1, 2}, teacher ids in [0, V)), which
needs one sync; the trainer switches it off. Shape / dtype / device / contiguity checks
are free and always run. With validate=False, a target >= V reads out of bounds on the
Triton path; an out-of-range span counts as IGNORE.

fp16: the gradient is written in the forward, in the logits' dtype, already divided by
the normaliser (often the token count of a whole step), before any loss scale is
applied; in fp16 most of it would flush to zero. A caller that multiplies the loss by a
scale S before backward (DeepSpeed's fp16 loss scale, times the world size the trainer
multiplies by) passes `grad_scale=S`: the forward then writes S x the gradient, in range,
and the backward multiplies by (grad_output / S), computed in fp32. The returned loss
is unchanged. The trainer does this on every micro-batch (radis.train.recipe).

Memory: `radis_loss` computes the gradient during the forward and writes it over a copy
of the logits (or over the logits themselves with `inplace=True`: the caller's tensor is
then destroyed -- only do that when nothing else needs it, e.g. logits straight out of a
matmul, whose backward does not read its output). No fp32 copy of [N, V] is made.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from radis.kernels.radis_loss import (
    HAS_TRITON,
    RadisLinearLossFunction,
    RadisLossFunction,
)

IGNORE_INDEX = -100
Mode = Literal["pooled", "span"]
Impl = Literal["auto", "torch", "triton"]
Normalizer = Mapping[str, "int | float | torch.Tensor"] | torch.Tensor | None


class RadisLossOutput(NamedTuple):
    """The loss and its parts for logging (all tensors on the input's device, no sync).

    The sums are raw (unweighted, unnormalised) so that logging can aggregate them
    across micro-batches and ranks and divide once.
    """

    loss: torch.Tensor  # fp32 scalar, differentiable
    nll_mt: torch.Tensor  # fp32 scalar: sum of NLL over MT target tokens
    nll_rd: torch.Tensor  # fp32 scalar: sum of NLL over RD target tokens
    kd_rd: torch.Tensor  # fp32 scalar: sum of KL(teacher || student) over RD tokens with a teacher
    n_mt: torch.Tensor  # int64 scalar: MT target tokens in this call
    n_rd: torch.Tensor  # int64 scalar: RD target tokens in this call
    n_kd: torch.Tensor  # int64 scalar: RD target tokens that have a teacher


# --------------------------------------------------------------------------- functional


def radis_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    spans: torch.Tensor,
    *,
    w_mt: float = 1.0,
    w_rd: float = 1.0,
    mode: Mode = "pooled",
    normalizer: Normalizer = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    kd_weight: float = 0.0,
    impl: Impl = "auto",
    inplace: bool = False,
    validate: bool = True,
    chunk_size: int = 1024,
    block_v: int | None = None,
    grad_scale: float = 1.0,
) -> RadisLossOutput:
    """RaDis loss from logits [N, V] (bf16 / fp16 / fp32); see the module docstring.

    `chunk_size`: rows per chunk of the torch path (its fp32 temporaries are
    O(chunk_size x V)). `block_v`: vocabulary block of the Triton kernel (default
    min(next_pow2(V), 4096)). `inplace=True` lets the op overwrite `logits` with its
    gradient instead of cloning it.
    """
    _check_common(logits, "logits", targets, spans, teacher_ids, teacher_logprobs, mode, kd_weight, chunk_size)
    vocab = logits.shape[1]
    if validate:
        _check_values(targets, spans, teacher_ids, vocab)
    impl = _resolve_impl(impl, logits)
    scale, counts = _scales(targets, spans, teacher_ids, teacher_logprobs, w_mt, w_rd, mode, normalizer)
    t_ids, t_lp, kd_weight = _teacher(teacher_ids, teacher_logprobs, kd_weight)
    (logits,) = _without_grad_unless_enabled(logits)
    loss, nll, kl = RadisLossFunction.apply(
        logits, targets, spans, scale, t_ids, t_lp, kd_weight, impl, inplace, chunk_size, block_v,
        _grad_scale(grad_scale),
    )
    return _output(loss, nll, kl, spans, counts)


def radis_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    spans: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    w_mt: float = 1.0,
    w_rd: float = 1.0,
    mode: Mode = "pooled",
    normalizer: Normalizer = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    kd_weight: float = 0.0,
    impl: Impl = "auto",
    validate: bool = True,
    chunk_size: int = 1024,
    block_v: int | None = None,
    skip_ignored: bool = True,
    target_rows: torch.Tensor | None = None,
    grad_scale: float = 1.0,
) -> RadisLossOutput:
    """RaDis loss from hidden states [N, d] and the LM head (weight [V, d], bias [V] or None).

    The logits exist one chunk of `chunk_size` tokens at a time (memory O(chunk_size x V)
    in the hidden dtype); gradients for hidden, weight and bias are computed chunk by
    chunk during the forward (see RadisLinearLossFunction). grad_weight is accumulated
    in weight.dtype (one rounding per chunk in bf16, as Liger-Kernel does): an fp32
    accumulator would cost 4 * V * d bytes more at 7B scale.

    Rows without a target (template, system prompt, instruction, source, padding: 30 to
    60% of translation fine-tuning tokens) contribute nothing, so with `skip_ignored`
    (the default) only the M target rows go through the head:

        hidden [N, d] --index_select(target_rows)--> [M, d] -> logits [M, V] chunk by chunk
        grad hidden [N, d] = zeros, with the M computed rows scattered back (index_select's backward)

    `target_rows` [M] int64 (sorted row indices of the targets: targets != -100, span MT
    or RD) is what the collator computes on the host (radis.data.packing.collate_packs);
    without it the rows are found with a nonzero(), one host sync. The result is the
    same as `skip_ignored=False` up to float summation order.
    """
    _check_common(hidden, "hidden", targets, spans, teacher_ids, teacher_logprobs, mode, kd_weight, chunk_size)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected [V, {hidden.shape[1]}] (hidden is {list(hidden.shape)}), got {list(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device}, hidden on {hidden.device}")
    if not weight.is_contiguous():
        raise ValueError("weight: must be contiguous")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias: expected [{weight.shape[0]}] {weight.dtype}, got {list(bias.shape)} {bias.dtype}")
    vocab = weight.shape[0]
    if target_rows is not None:
        _check_rows(target_rows, hidden)
    if validate:
        _check_values(targets, spans, teacher_ids, vocab, target_rows)
    impl = _resolve_impl(impl, hidden)
    if skip_ignored:
        rows = target_rows if target_rows is not None else target_rows_of(targets, spans)
        if rows.shape[0] < hidden.shape[0]:  # shape only: no sync
            hidden, targets, spans = hidden.index_select(0, rows), targets.index_select(0, rows), spans.index_select(0, rows)
            if teacher_ids is not None:
                teacher_ids, teacher_logprobs = teacher_ids.index_select(0, rows), teacher_logprobs.index_select(0, rows)
    scale, counts = _scales(targets, spans, teacher_ids, teacher_logprobs, w_mt, w_rd, mode, normalizer)
    t_ids, t_lp, kd_weight = _teacher(teacher_ids, teacher_logprobs, kd_weight)
    hidden, weight, bias = _without_grad_unless_enabled(hidden, weight, bias)
    loss, nll, kl = RadisLinearLossFunction.apply(
        hidden, weight, bias, targets, spans, scale, t_ids, t_lp, kd_weight, impl, chunk_size, block_v,
        _grad_scale(grad_scale),
    )
    return _output(loss, nll, kl, spans, counts)


# --------------------------------------------------------------------------- module


def loss_options(
    *,
    w_mt: float = 1.0,
    w_rd: float = 1.0,
    mode: Mode = "pooled",
    kd_weight: float = 0.0,
    impl: Impl = "auto",
    chunk_size: int = 1024,
    validate: bool = True,
) -> dict[str, Any]:
    """The loss hyper-parameters a module fixes at construction, checked once.

    Shared by `RadisLoss` and the modules of radis.loss_head; the dict is passed on as
    keyword arguments of `radis_loss` / `radis_linear_loss`.
    """
    if mode not in ("pooled", "span"):
        raise ValueError(f"mode: expected 'pooled' or 'span', got {mode!r}")
    return {
        "w_mt": w_mt, "w_rd": w_rd, "mode": mode, "kd_weight": kd_weight,
        "impl": impl, "chunk_size": chunk_size, "validate": validate,
    }


class RadisLoss(nn.Module):
    """`radis_loss` / `radis_linear_loss` with the hyper-parameters fixed at construction.

    forward(logits, targets, spans, ...) or, with `weight=`, forward(hidden, targets,
    spans, weight=lm_head.weight, bias=...). Under DeepSpeed ZeRO-3 use
    radis.loss_head.RadisLossHead instead (it gathers the sharded head weight).
    """

    def __init__(self, **options: Any) -> None:
        """options: w_mt, w_rd, mode, kd_weight, impl, chunk_size, validate (`loss_options`)."""
        super().__init__()
        self.kwargs = loss_options(**options)

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor,
        spans: torch.Tensor,
        *,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        normalizer: Normalizer = None,
        teacher_ids: torch.Tensor | None = None,
        teacher_logprobs: torch.Tensor | None = None,
    ) -> RadisLossOutput:
        extra = {"normalizer": normalizer, "teacher_ids": teacher_ids, "teacher_logprobs": teacher_logprobs}
        if weight is None:
            return radis_loss(x, targets, spans, **extra, **self.kwargs)
        return radis_linear_loss(x, weight, targets, spans, bias=bias, **extra, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


# --------------------------------------------------------------------------- internals


def _resolve_impl(impl: str, x: torch.Tensor) -> str:
    if impl == "auto":
        return "triton" if (x.is_cuda and HAS_TRITON) else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl: expected 'auto', 'torch' or 'triton', got {impl!r}")
    return impl


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_common(x, name, targets, spans, teacher_ids, teacher_logprobs, mode, kd_weight, chunk_size) -> None:
    """Shape / dtype / device / contiguity checks: metadata only, no host sync."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [N, {'V' if name == 'logits' else 'd'}], got "
                         f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name}: dtype must be float32, bfloat16 or float16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous())")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: last dimension is empty")
    n = x.shape[0]
    for arg, t in (("targets", targets), ("spans", spans)):
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{arg}: expected shape [{n}] (one per row of {name}), got {got}")
        if t.device != x.device:
            raise ValueError(f"{arg}: on {t.device}, {name} on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{arg}: must be contiguous")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets: dtype must be int64, got {targets.dtype}")
    if spans.dtype not in _INTS:
        raise ValueError(f"spans: dtype must be an integer type, got {spans.dtype}")
    if (teacher_ids is None) != (teacher_logprobs is None):
        raise ValueError("teacher_ids / teacher_logprobs: give both or neither")
    if teacher_ids is not None:
        if teacher_ids.dim() != 2 or teacher_ids.shape[0] != n or teacher_ids.shape[1] == 0:
            raise ValueError(f"teacher_ids: expected [{n}, k] with k >= 1, got {list(teacher_ids.shape)}")
        if teacher_logprobs.shape != teacher_ids.shape:
            raise ValueError(f"teacher_logprobs: expected {list(teacher_ids.shape)} like teacher_ids, got "
                             f"{list(teacher_logprobs.shape)}")
        if teacher_ids.dtype not in _INTS:
            raise ValueError(f"teacher_ids: dtype must be an integer type, got {teacher_ids.dtype}")
        if teacher_logprobs.dtype not in _FLOATS:
            raise ValueError(f"teacher_logprobs: dtype must be a float type, got {teacher_logprobs.dtype}")
        for arg, t in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
            if t.device != x.device:
                raise ValueError(f"{arg}: on {t.device}, {name} on {x.device}")
            if not t.is_contiguous():
                raise ValueError(f"{arg}: must be contiguous")
    if mode not in ("pooled", "span"):
        raise ValueError(f"mode: expected 'pooled' or 'span', got {mode!r}")
    if not 0.0 <= float(kd_weight) <= 1.0:
        raise ValueError(f"kd_weight: expected a value in [0, 1], got {kd_weight}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")


def _is_target(targets: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """[N] bool: the row is a target (targets != -100, span MT or RD)."""
    return (targets != IGNORE_INDEX) & ((spans == 1) | (spans == 2))


def target_rows_of(targets: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """[M] int64, sorted: the rows that are targets (`_is_target`). One host sync."""
    return _is_target(targets, spans).nonzero().squeeze(1)


def _check_rows(rows, x) -> None:
    """Metadata checks of `target_rows` (no sync)."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype != torch.int64:
        got = f"{list(rows.shape)} {rows.dtype}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"target_rows: expected a 1-D int64 tensor of row indices, got {got}")
    if rows.device != x.device:
        raise ValueError(f"target_rows: on {rows.device}, hidden on {x.device}")
    if rows.shape[0] > x.shape[0]:
        raise ValueError(f"target_rows: {rows.shape[0]} rows, hidden has only {x.shape[0]}")


def _check_values(targets, spans, teacher_ids, vocab: int, target_rows=None) -> None:
    """Value-range checks: one host sync (validate=True only)."""
    bad_t = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= vocab)
    bad_s = (spans < 0) | (spans > 2)
    flags = [bad_t.any(), bad_s.any()]
    if teacher_ids is not None:
        flags.append(((teacher_ids < 0) | (teacher_ids >= vocab)).any())
    if target_rows is not None:
        # exactly the target rows, each once, in order: anything else drops or repeats loss terms
        is_target = _is_target(targets, spans)
        in_range = ((target_rows >= 0) & (target_rows < targets.shape[0])).all()
        picked = is_target[target_rows.clamp(0, max(targets.shape[0] - 1, 0))].all() if targets.shape[0] else in_range
        ordered = (target_rows[1:] > target_rows[:-1]).all()
        flags.append(~(in_range & picked & ordered & (is_target.sum() == target_rows.shape[0])))
    flags = torch.stack(flags).tolist()  # the one sync
    if target_rows is not None and flags.pop():
        raise ValueError("target_rows: expected the sorted indices of exactly the target rows (targets != -100, "
                         "span 1 or 2), each once")
    if flags[0]:
        i = int(bad_t.nonzero()[0, 0])
        raise ValueError(f"targets: row {i} has {int(targets[i])}; expected -100 or a token id in [0, {vocab})")
    if flags[1]:
        i = int(bad_s.nonzero()[0, 0])
        raise ValueError(f"spans: row {i} has {int(spans[i])}; expected 0 (IGNORE), 1 (MT) or 2 (RD)")
    if len(flags) > 2 and flags[2]:
        raise ValueError(f"teacher_ids: ids outside [0, {vocab}) (pad with any valid id and log-prob -inf)")


def _grad_scale(value) -> float:
    """`grad_scale` as a float > 0 (see the module docstring, fp16)."""
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"grad_scale: expected a finite value > 0 (the loss scale applied before backward), got {value}")
    return value


def _teacher(teacher_ids, teacher_logprobs, kd_weight):
    """(ids, log-probs, kd weight) for the op: without teacher arrays there is no KD term."""
    if teacher_ids is None:
        return None, None, 0.0
    return teacher_ids, teacher_logprobs, float(kd_weight)


def _without_grad_unless_enabled(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors, detached under torch.no_grad(). Autograd's needs_input_grad ignores
    grad mode: a Parameter (the LM head's weight) is reported as needing its gradient even
    in validation, and the fused Functions would then compute it (a [V, d] buffer and the
    gradient pass for nothing)."""
    if torch.is_grad_enabled():
        return tensors
    return tuple(None if t is None else t.detach() for t in tensors)


def _count_on(value: Any, device: torch.device) -> torch.Tensor:
    """A token count (a Python number or a tensor) as a float32 scalar on `device`.
    A Python number goes through torch.full, a fill kernel: torch.as_tensor(x, device=cuda)
    would copy from the host with a blocking copy, a sync per forward."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(value), dtype=torch.float32, device=device)


def _scales(targets, spans, teacher_ids, teacher_logprobs, w_mt, w_rd, mode, normalizer):
    """Per-span token weights scale[3] = [0, w_mt / D_MT, w_rd / D_RD] and this call's counts."""
    valid = targets != IGNORE_INDEX
    n_mt = ((spans == 1) & valid).sum()
    n_rd = ((spans == 2) & valid).sum()
    if teacher_ids is not None:
        has_t = (teacher_logprobs > float("-inf")).any(1)
        n_kd = ((spans == 2) & valid & has_t).sum()
    else:
        n_kd = torch.zeros((), dtype=torch.int64, device=targets.device)
    if normalizer is None:
        d_mt, d_rd = n_mt.float(), n_rd.float()
    elif isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 2:
            raise ValueError(f"normalizer: expected a tensor of 2 counts [mt, rd], got shape {list(normalizer.shape)}")
        norm = normalizer.reshape(2).to(device=targets.device, dtype=torch.float32)
        d_mt, d_rd = norm[0], norm[1]
    elif isinstance(normalizer, Mapping):
        if set(normalizer) != {"mt", "rd"}:
            raise ValueError(f"normalizer: expected keys {{'mt', 'rd'}}, got {sorted(normalizer)}")
        d_mt, d_rd = (_count_on(normalizer[k], targets.device) for k in ("mt", "rd"))
    else:
        raise ValueError(f"normalizer: expected None, a dict {{'mt', 'rd'}} or a tensor [2], got {type(normalizer).__name__}")
    one = torch.ones((), dtype=torch.float32, device=targets.device)
    if mode == "pooled":
        d_mt = d_rd = torch.maximum(d_mt + d_rd, one)
    else:
        d_mt, d_rd = torch.maximum(d_mt, one), torch.maximum(d_rd, one)
    scale = torch.stack([torch.zeros_like(one), float(w_mt) / d_mt, float(w_rd) / d_rd]).contiguous()
    return scale, (n_mt, n_rd, n_kd)


def _output(loss, nll, kl, spans, counts) -> RadisLossOutput:
    n_mt, n_rd, n_kd = counts
    nll_mt = torch.where(spans == 1, nll, 0.0).sum()
    nll_rd = torch.where(spans == 2, nll, 0.0).sum()
    return RadisLossOutput(loss, nll_mt, nll_rd, kl.sum(), n_mt, n_rd, n_kd)
