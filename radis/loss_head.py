"""The fused RaDis loss as the head of a causal LM, correct under DeepSpeed ZeRO-3.

The ZeRO-3 trap: a ZeRO-3 engine keeps every parameter as an empty shard and gathers a
module's own parameters only around that module's forward (a pre/post-forward hook).
A fused loss reads `lm_head.weight` without calling `lm_head.forward`, so it would see
an empty [0] tensor (Liger-Kernel #1048, TRL #3368).

The fix used here: the fused loss runs *as `lm_head`'s forward* (`call_as_forward`), so
the engine's own hooks on that module fire: ZeRO-3 gathers the weight before the call,
releases it after, and gathers it again around the backward of the call's outputs.
The re-gather in backward is not optional even though the fused loss computed every
gradient in its forward: autograd accumulates the full-shape weight gradient into
`weight.grad`, which must match the (then gathered) parameter's shape -- an untied head
left as an empty shard fails there with "size of tensor a (0) must match ...".
(`GatheredParameters` around the call looked cheaper but fails twice: that shape error
for untied heads, and "param in flight" after a forward without backward, when ZeRO-3's
prefetcher already holds the head.) For a tied head (SmolLM2) the weight is the input
embedding's parameter; autograd sums both contributions before the reduce-scatter hook.

    RadisCausalLM(hf_model).forward(input_ids [B, T], labels [B, T], spans [B, T], ...)
        hidden = hf_model.<base_model>(input_ids, position_ids, attention_mask)   [B, T, d]
        -> reshape [B*T, d] -> its target rows -> fused linear loss with lm_head (gathered) -> RadisLossOutput

`RadisCausalLM` is what the trainer passes to `deepspeed.initialize`; its state dict is
the HF model's under the prefix `model.` and `wrapper.model.save_pretrained` exports it.
"""
from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from radis.errors import InputError
from radis.loss import Normalizer, RadisLossOutput, loss_options, radis_linear_loss


def call_as_forward(module: nn.Module, fn, *args: Any) -> Any:
    """Run `fn(module, *args)` through `module.__call__`, so that the module's hooks fire.

    The hooks are what a DeepSpeed ZeRO-3 engine uses to gather the module's parameters
    for the forward and again for the backward of the outputs (see the module docstring);
    without an engine this is a plain call. `fn` must return tensors (a tuple is fine).
    """
    # An instance-level forward may be there already (accelerate's and PEFT's wrappers
    # put theirs on the instance): shadow it for this call and put it back afterwards.
    previous = module.__dict__.get("forward", _ABSENT)
    module.forward = types.MethodType(fn, module)  # shadows the class's forward on this instance
    try:
        return module(*args)
    finally:
        if previous is _ABSENT:
            del module.forward
        else:
            module.forward = previous


_ABSENT = object()

# Config attributes of heads that change the logits after the output projection, which
# the fused loss (logits = hidden @ W^T + b) would silently leave out, and the value that
# means "no change".
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2 / 3: tanh soft-capping of the logits
    "logit_scale": 1.0,  # Cohere: logits * logit_scale
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
    "lm_head_multiplier": 1.0,  # Falcon-H1
    "output_multiplier_scale": 1.0,  # muP-style models
}


class UnsupportedHeadError(InputError):
    """The model's head computes logits the fused loss does not reproduce."""


def check_head(model: nn.Module) -> nn.Module:
    """The model's output projection, if the fused loss reproduces its logits exactly:
    an nn.Linear-like module with a [V, d] weight (and maybe a bias), and no config
    setting that transforms the logits after it. Else UnsupportedHeadError naming why."""
    name = type(model).__name__
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedHeadError(f"model: {name} has no output embeddings (not a causal LM?)")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or len(getattr(weight, "ds_shape", weight.shape)) != 2:
        raise UnsupportedHeadError(f"model: {name}'s output embeddings ({type(head).__name__}) are not a linear "
                                   "layer with a [vocab, hidden] weight; the fused loss needs one")
    config = getattr(model, "config", None)
    for key, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, key, neutral)
        if value is not None and value != neutral:
            raise UnsupportedHeadError(
                f"model: {name} has {key}={value!r}: its logits are transformed after the output projection, "
                "which radis's fused loss does not reproduce (training would optimise another loss); such models "
                "are not supported")
    return head


def fused_head_loss(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    spans: torch.Tensor,
    **loss_kwargs: Any,
) -> RadisLossOutput:
    """`radis_linear_loss` with `lm_head` (an nn.Linear [V, d]), run as lm_head's forward.

    hidden [..., d], targets / spans [...] (any leading shape, flattened to N rows);
    teacher_ids / teacher_logprobs in loss_kwargs [..., k].
    """
    d = hidden.shape[-1]
    for key in ("teacher_ids", "teacher_logprobs"):
        t = loss_kwargs.get(key)
        if t is not None:
            loss_kwargs[key] = t.reshape(-1, t.shape[-1]).contiguous()

    def loss_forward(head: nn.Module, h: torch.Tensor, tgt: torch.Tensor, spn: torch.Tensor) -> tuple:
        out = radis_linear_loss(
            h.reshape(-1, d).contiguous(),
            head.weight,
            tgt.reshape(-1).contiguous(),
            spn.reshape(-1).contiguous(),
            bias=getattr(head, "bias", None),
            **loss_kwargs,
        )
        return tuple(out)  # plain tensors: ZeRO-3's output hooks walk tuples

    return RadisLossOutput(*call_as_forward(lm_head, loss_forward, hidden, targets, spans))


class RadisLossHead(nn.Module):
    """Owns an LM head and computes the fused RaDis loss from hidden states.

    forward(hidden [..., d], targets [...], spans [...], normalizer=None,
            teacher_ids=None, teacher_logprobs=None) -> RadisLossOutput
    """

    def __init__(
        self,
        lm_head: nn.Linear,
        **options: Any,
    ) -> None:
        """options: w_mt, w_rd, mode, kd_weight, impl, chunk_size, validate (radis.loss.loss_options)."""
        super().__init__()
        self.lm_head = lm_head
        self.loss_kwargs = loss_options(**options)

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
        target_rows                [M] flat indices of the target rows (collate_packs'), or None:
                                   only those rows go through the head (found by a sync if None)
        grad_scale                 what the caller multiplies the loss by before backward (fp16's
                                   loss scale x world size; radis.loss, fp16)
        **attention_kwargs         on to the base model: flash varlen boundaries (cu_seq_lens_q/k,
                                   max_length_q/k; radis.data.packing.model_forward_kwargs)
    """

    def __init__(
        self,
        model: nn.Module,
        **options: Any,
    ) -> None:
        """options: w_mt, w_rd, mode, kd_weight, impl, chunk_size, validate (radis.loss.loss_options)."""
        super().__init__()
        self.model = model
        check_head(model)
        self.loss_kwargs = loss_options(**options)

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
        target_rows: torch.Tensor | None = None,
        grad_scale: float = 1.0,
        **attention_kwargs: Any,
    ) -> RadisLossOutput:
        base = getattr(self.model, self.model.base_model_prefix)
        attention_kwargs.pop("use_cache", None)  # never a cache in training
        out = base(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                   **attention_kwargs)
        return fused_head_loss(
            self.model.get_output_embeddings(), out.last_hidden_state, labels, spans, normalizer=normalizer,
            teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs, target_rows=target_rows,
            grad_scale=grad_scale, **self.loss_kwargs,
        )
