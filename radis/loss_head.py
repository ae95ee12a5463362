"""The fused RaDis loss as the head of a causal LM, correct under DeepSpeed ZeRO-3.

The ZeRO-3 trap: a ZeRO-3 engine keeps every parameter as an empty shard and gathers a
module's own parameters only around that module's forward (a pre/post-forward hook).
A fused loss reads `lm_head.weight` without calling `lm_head.forward`, so it would see
an empty [0] tensor (Liger-Kernel #1048, TRL #3368).

The fix used here: when the head's parameters are ZeRO-3 parameters (they carry `ds_id`)
the fused loss runs inside `deepspeed.zero.GatheredParameters(params, modifier_rank=None)`
(gather for reading; nothing is broadcast back on exit). That works because the fused
linear loss computes every gradient in its forward (radis.kernels.radis_loss): the
weight is never needed in the backward, so it can be re-partitioned right after. The
gradient for the weight is returned by the backward in full shape and goes through
the parameter's normal ZeRO-3 reduce-scatter hook -- for a tied head that is the same
parameter as the input embedding, and autograd sums both contributions first.
(Routing the call through `lm_head`'s forward hooks would also gather, but would make
ZeRO-3 also gather the weight again for a backward that does not need it.)

    RadisCausalLM(hf_model).forward(input_ids [B, T], labels [B, T], spans [B, T], ...)
        hidden = hf_model.<base_model>(input_ids, position_ids, attention_mask)   [B, T, d]
        -> reshape [B*T, d] -> fused linear loss with lm_head (gathered)       -> RadisLossOutput

`RadisCausalLM` is what the trainer passes to `deepspeed.initialize`; its state dict is
the HF model's under the prefix `model.` and `wrapper.model.save_pretrained` exports it.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from radis.loss import Impl, Mode, Normalizer, RadisLossOutput, radis_linear_loss


def gathered(module: nn.Module):
    """Context in which `module`'s own ZeRO-3 parameters are full (read-only); a no-op otherwise."""
    params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def fused_head_loss(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    spans: torch.Tensor,
    **loss_kwargs: Any,
) -> RadisLossOutput:
    """`radis_linear_loss` with `lm_head` (an nn.Linear [V, d]) gathered when it is ZeRO-3 sharded.

    hidden [..., d], targets / spans [...] (any leading shape, flattened to N rows);
    teacher_ids / teacher_logprobs in loss_kwargs [..., k].
    """
    d = hidden.shape[-1]
    for key in ("teacher_ids", "teacher_logprobs"):
        t = loss_kwargs.get(key)
        if t is not None:
            loss_kwargs[key] = t.reshape(-1, t.shape[-1]).contiguous()
    with gathered(lm_head):
        return radis_linear_loss(
            hidden.reshape(-1, d).contiguous(),
            lm_head.weight,
            targets.reshape(-1).contiguous(),
            spans.reshape(-1).contiguous(),
            bias=getattr(lm_head, "bias", None),
            **loss_kwargs,
        )


class RadisLossHead(nn.Module):
    """Owns an LM head and computes the fused RaDis loss from hidden states.

    forward(hidden [..., d], targets [...], spans [...], normalizer=None,
            teacher_ids=None, teacher_logprobs=None) -> RadisLossOutput
    """

    def __init__(
        self,
        lm_head: nn.Linear,
        *,
        w_mt: float = 1.0,
        w_rd: float = 1.0,
        mode: Mode = "pooled",
        kd_weight: float = 0.0,
        impl: Impl = "auto",
        chunk_size: int = 1024,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.loss_kwargs = {
            "w_mt": w_mt, "w_rd": w_rd, "mode": mode, "kd_weight": kd_weight,
            "impl": impl, "chunk_size": chunk_size, "validate": validate,
        }

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        spans: torch.Tensor,
        normalizer: Normalizer = None,
        teacher_ids: torch.Tensor | None = None,
        teacher_logprobs: torch.Tensor | None = None,
    ) -> RadisLossOutput:
        return fused_head_loss(
            self.lm_head, hidden, targets, spans, normalizer=normalizer,
            teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs, **self.loss_kwargs,
        )


class RadisCausalLM(nn.Module):
    """An HF causal LM whose forward returns the fused RaDis loss instead of logits.

    The base transformer (`model.<base_model_prefix>`, e.g. `model.model` for Llama)
    gives hidden states; the output embeddings (`model.get_output_embeddings()`, tied
    to the input embeddings for SmolLM2) are the head. Inputs are packed micro-batches:

        input_ids, labels, spans   [B, T]   labels already shifted (row i predicts labels[i])
        position_ids               [B, T]   reset per packed sequence (or None)
        attention_mask             whatever the base model accepts (e.g. the packed 4D mask)
        teacher_ids / _logprobs    [B, T, k] or None
        normalizer                 global {mt, rd} token counts of the optimizer step
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        w_mt: float = 1.0,
        w_rd: float = 1.0,
        mode: Mode = "pooled",
        kd_weight: float = 0.0,
        impl: Impl = "auto",
        chunk_size: int = 1024,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        if model.get_output_embeddings() is None:
            raise ValueError(f"model: {type(model).__name__} has no output embeddings (not a causal LM?)")
        self.loss_kwargs = {
            "w_mt": w_mt, "w_rd": w_rd, "mode": mode, "kd_weight": kd_weight,
            "impl": impl, "chunk_size": chunk_size, "validate": validate,
        }

    @classmethod
    def from_config(cls, model: nn.Module, loss_cfg: Any, *, validate: bool = False) -> RadisCausalLM:
        """Build from `radis.config.LossConfig`. method="vanilla" is the MT-only baseline:
        the mean NLL over MT tokens (mode="span", w_rd=0), whatever the RD data holds."""
        if loss_cfg.method == "vanilla":
            return cls(model, w_mt=loss_cfg.w_mt, w_rd=0.0, mode="span", kd_weight=0.0, impl=loss_cfg.impl,
                       chunk_size=loss_cfg.chunk_size, validate=validate)
        return cls(model, w_mt=loss_cfg.w_mt, w_rd=loss_cfg.w_rd, mode=loss_cfg.mode, kd_weight=loss_cfg.kd_weight,
                   impl=loss_cfg.impl, chunk_size=loss_cfg.chunk_size, validate=validate)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        spans: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        normalizer: Normalizer = None,
        teacher_ids: torch.Tensor | None = None,
        teacher_logprobs: torch.Tensor | None = None,
    ) -> RadisLossOutput:
        base = getattr(self.model, self.model.base_model_prefix)
        out = base(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
        return fused_head_loss(
            self.model.get_output_embeddings(), out.last_hidden_state, labels, spans, normalizer=normalizer,
            teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs, **self.loss_kwargs,
        )
