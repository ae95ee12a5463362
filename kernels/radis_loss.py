"""The fused RaDis loss kernel: translation NLL + self-distillation, one kernel over the logits.

Three layers share one name (the public API is `radis.loss`):

1. `_radis_loss_kernel` (Triton) and its pure-PyTorch twin `torch_rows`: per row, the
   log-sum-exp over the vocabulary, the NLL of the target, the KL to the teacher's top-k,
   the row's weighted loss and -- when asked -- the row's gradient w.r.t. the logits.
2. `rows_loss_and_grad`: the host launcher (allocate, pick the grid, chunk the torch path).
3. `RadisLossFunction` / `RadisLinearLossFunction`: `torch.autograd.Function`s that compute
   the gradient DURING the forward and only scale it by `grad_output` in the backward.

Layout (the packer already shifted labels: row i of the logits predicts targets[i]):

    logits   [N, V]  bf16 / fp16 / fp32       row i = scores for the token at position i+1
    targets  [N]     int64, -100 = no target
    spans    [N]     0 IGNORE, 1 MT, 2 RD     (radis.data.example)
    scale    [3]     fp32, loss weight per token of span 0 / 1 / 2 (scale[0] = 0)
    t_ids    [N, k]  int, teacher's top-k token ids        (only read on RD rows)
    t_lp     [N, k]  float, teacher's log-probs of t_ids   (-inf = no entry)

Per active row (target != -100 and span in {MT, RD}), with p = softmax(x) and
q = softmax over the k teacher log-probs (the top-k mass renormalised to 1; -inf entries
get q = 0):

    nll  = lse(x) - x[t]
    kl   = sum_j q_j * (log q_j - log p[id_j])                 (0 without a teacher)
    b    = kd_weight if (span == RD and the row has >= 1 finite teacher log-prob) else 0
    loss_row = scale[span] * ((1 - b) * nll + b * kl)
    dloss_row/dx = scale[span] * (p - (1 - b) * onehot(t) - b * sum_j q_j onehot(id_j))

Inactive rows have loss 0 and gradient 0. The gradient is written over the logits
buffer (so a backward is one multiply by grad_output, and no fp32 [N, V] copy ever
exists): the forward DESTROYS the logits it is given. The autograd Functions own that
buffer -- `RadisLossFunction` clones the caller's logits unless `inplace=True`, and the
fused-linear path computes each chunk's logits itself and throws them away.

Two reads of each row (one online log-sum-exp pass, one pass that writes the gradient)
are the minimum: the gradient needs the final log-sum-exp.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # Triton is optional at import time: the torch path works without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a core dependency, but keep CPU use possible
    HAS_TRITON = False


# --------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:

    @triton.jit
    def _round_to_bf16(x):
        """fp32 -> fp32 holding the nearest bf16 (ties to even), so the cast after it is exact.

        The compiled GPU cast already rounds to nearest, but the CPU interpreter truncates;
        rounding by hand gives the same bits on both (x is finite here).
        """
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)

    @triton.jit
    def _radis_loss_kernel(
        x_ptr,  # [N, V] logits in; the gradient is written here when COMPUTE_GRAD
        x_stride,
        targets_ptr,  # [N] int64
        spans_ptr,  # [N] int
        scale_ptr,  # [3] fp32
        tids_ptr,  # [N, K] int (unused unless HAS_TEACHER)
        tids_stride,
        tlp_ptr,  # [N, K] float
        tlp_stride,
        loss_ptr,  # [N] fp32 out: scale * ((1-b) * nll + b * kl)
        nll_ptr,  # [N] fp32 out: raw NLL (0 on inactive rows)
        kl_ptr,  # [N] fp32 out: raw KL (0 without a teacher)
        kd_weight,
        V,
        K,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_TEACHER: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        # int64 before multiplying by the stride: row * V overflows int32 at 7B scale.
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        target = tl.load(targets_ptr + row).to(tl.int64)
        span = tl.load(spans_ptr + row).to(tl.int32)
        # Out-of-range spans (only possible with validate=False) count as IGNORE.
        active = (target != -100) & (span > 0) & (span < 3)
        c = tl.load(scale_ptr + tl.where(active, span, 0))

        if active:
            # Pass 1: online log-sum-exp over vocabulary blocks, fp32 accumulation.
            m = tl.full((), float("-inf"), tl.float32)
            s = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))
                # A block of only -inf (masked ids) leaves m_new at -inf, and -inf - -inf is
                # NaN: shift by 0 then, which adds exp(-inf) = 0 to s as it should.
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - m_shift) + tl.sum(tl.exp(x - m_shift), 0)
                m = m_new
            lse = m + tl.log(s)
            nll = lse - tl.load(x_row + target).to(tl.float32)

            kl = tl.zeros((), tl.float32)
            b = tl.zeros((), tl.float32)
            if HAS_TEACHER:
                koffs = tl.arange(0, BLOCK_K)
                kmask = koffs < K
                lp = tl.load(tlp_ptr + row * tlp_stride + koffs, mask=kmask, other=float("-inf")).to(tl.float32)
                valid = lp > float("-inf")
                has_t = (tl.sum(valid.to(tl.int32), 0) > 0) & (span == 2)
                ids = tl.load(tids_ptr + row * tids_stride + koffs, mask=kmask, other=0).to(tl.int64)
                ids = tl.where(valid, ids, 0)
                lp_max = tl.max(tl.where(valid, lp, float("-inf")), 0)
                lp_max = tl.where(has_t, lp_max, 0.0)
                e = tl.where(valid, tl.exp(lp - lp_max), 0.0)
                z = tl.sum(e, 0)
                z = tl.where(has_t, z, 1.0)
                q = tl.where(valid & has_t, e / z, 0.0)
                log_q = tl.where(valid, lp, 0.0) - lp_max - tl.log(z)  # finite even on padding
                x_ids = tl.load(x_row + ids, mask=valid, other=0.0).to(tl.float32)
                kl = tl.sum(tl.where(q > 0, q * (log_q - (x_ids - lse)), 0.0), 0)
                b = tl.where(has_t, kd_weight, 0.0)

            tl.store(nll_ptr + row, nll)
            tl.store(kl_ptr + row, kl)
            tl.store(loss_ptr + row, c * ((1.0 - b) * nll + b * kl))

            if COMPUTE_GRAD:
                # Pass 2: g = c * (p - (1-b) onehot(t) - b * sum_j q_j onehot(id_j)), in place.
                for start in range(0, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    vmask = offs < V
                    x = tl.load(x_row + offs, mask=vmask, other=0.0).to(tl.float32)
                    g = tl.exp(x - lse) - tl.where(offs == target, 1.0 - b, 0.0)
                    if HAS_TEACHER:
                        hit = offs[:, None] == ids[None, :]
                        g -= b * tl.sum(tl.where(hit, q[None, :], 0.0), 1)
                    g = c * g
                    if OUT_BF16:
                        g = _round_to_bf16(g)
                    tl.store(x_row + offs, g.to(x_ptr.dtype.element_ty), mask=vmask)
        else:
            zero = tl.zeros((), tl.float32)
            tl.store(nll_ptr + row, zero)
            tl.store(kl_ptr + row, zero)
            tl.store(loss_ptr + row, zero)
            if COMPUTE_GRAD:
                for start in range(0, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    tl.store(
                        x_row + offs, tl.zeros((BLOCK_V,), tl.float32).to(x_ptr.dtype.element_ty), mask=offs < V
                    )


def _triton_rows(x, targets, spans, scale, t_ids, t_lp, kd_weight, compute_grad, block_v):
    """Launch one program per row; returns (loss_row, nll, kl) and overwrites x with the gradient."""
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package")
    if not x.is_cuda and not _interpreting():
        raise RuntimeError(
            "impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported; use impl='torch'"
        )
    n, v = x.shape
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    nll = torch.empty_like(loss)
    kl = torch.empty_like(loss)
    if n == 0:
        return loss, nll, kl
    has_teacher = t_ids is not None
    k = t_ids.shape[1] if has_teacher else 1
    cfg = launch_config(v, k if has_teacher else None, block_v)
    dummy = targets  # any valid pointer; never read when HAS_TEACHER is False
    _radis_loss_kernel[(n,)](
        x,
        x.stride(0),
        targets,
        spans,
        scale,
        t_ids if has_teacher else dummy,
        t_ids.stride(0) if has_teacher else 0,
        t_lp if has_teacher else dummy,
        t_lp.stride(0) if has_teacher else 0,
        loss,
        nll,
        kl,
        float(kd_weight),
        v,
        k,
        BLOCK_V=cfg.block_v,
        BLOCK_K=cfg.block_k,
        HAS_TEACHER=has_teacher,
        COMPUTE_GRAD=compute_grad,
        OUT_BF16=x.dtype == torch.bfloat16,
        num_warps=cfg.num_warps,
    )
    return loss, nll, kl


@dataclass(frozen=True)
class LaunchConfig:
    """The block sizes and warps of one launch (constexprs: each makes its own binary)."""

    block_v: int
    block_k: int
    num_warps: int


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch_config(v: int, k: int | None, block_v: int | None = None) -> LaunchConfig:
    """What the launcher picks for vocabulary `v` and top-k `k` (None: no teacher).

    BLOCK_V: the vocabulary tile, up to 4096. With a teacher, pass 2 compares a
    [BLOCK_V, BLOCK_K] tile against the teacher ids: the tile is kept at <= 16k elements
    so that it stays in registers (64 per thread at 8 warps); a [4096, 32] tile spills
    14 KB on sm_90 (radis.kernels.compile_check). 8 warps from BLOCK_V 2048 up, and for
    BLOCK_K 64 (k 33-64): at 4 warps triton 3.6 (the GPU image's) gives that [256, 64]
    tile 255 registers and spills 580 B on sm_90, where 3.9 needs 167; at 8 warps it is
    234 / 100 registers and no spill on either. Else 4 warps.
    An explicit `block_v` (tests) is used as given.
    """
    block_k = max(_next_power_of_2(k if k else 1), 2)
    if block_v is None:
        block_v = min(_next_power_of_2(v), 4096)
        if k:
            block_v = max(min(block_v, 16384 // block_k), 64)
    return LaunchConfig(block_v, block_k, 8 if block_v >= 2048 or block_k >= 64 else 4)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- PyTorch twin


def torch_rows(x, targets, spans, scale, t_ids, t_lp, kd_weight, out=None):
    """The same per-row computation in PyTorch (fp32), for one chunk of rows.

    Returns (loss_row [n], nll [n], kl [n]); with `out` (x itself or a buffer of x's
    shape and dtype) the gradient is written into it. No autograd: the gradient is the
    closed form from the module docstring. With `out`, the softmax is built in place in
    one fp32 [n, V] buffer (`out` itself for fp32, the private upcast of a bf16/fp16
    chunk otherwise), so a chunk costs no further [n, V] temporaries.
    """
    xf = x.float()  # x itself when x is fp32
    active = (targets != -100) & (spans > 0) & (spans < 3)
    t = torch.where(active, targets, 0).unsqueeze(1)
    x_t = xf.gather(1, t).squeeze(1)  # gathers first: the buffer is overwritten below
    ids = x_ids = None
    if t_ids is not None:
        valid = t_lp > float("-inf")
        ids = torch.where(valid, t_ids.long(), 0)
        x_ids = xf.gather(1, ids)
    if out is None:
        lse = torch.logsumexp(xf, dim=1)
    else:
        g = out if out.dtype == torch.float32 else xf
        m = xf.amax(1, keepdim=True)
        torch.sub(xf, m, out=g).exp_()
        z = g.sum(1, keepdim=True)
        lse = (m + z.log()).squeeze(1)
        g.div_(z)  # g = softmax(x)
    nll = torch.where(active, lse - x_t, 0.0)
    c = scale[torch.where(active, spans.long(), 0)] * active
    kl = torch.zeros_like(nll)
    b = torch.zeros_like(nll)
    q = None
    if t_ids is not None:
        has_t = valid.any(1) & (spans == 2) & active
        lp = torch.where(valid & has_t.unsqueeze(1), t_lp.float(), float("-inf"))
        lp = torch.where(has_t.unsqueeze(1), lp, 0.0)  # keep log_softmax finite on rows without teacher
        log_q = torch.log_softmax(lp, dim=1)
        q = torch.where(valid & has_t.unsqueeze(1), log_q.exp(), 0.0)
        log_p = x_ids - lse.unsqueeze(1)
        kl = torch.where(q > 0, q * (log_q - log_p), 0.0).sum(1)
        b = torch.where(has_t, kd_weight, 0.0)
    loss = c * ((1.0 - b) * nll + b * kl)
    if out is not None:
        g.scatter_add_(1, t, -(1.0 - b).unsqueeze(1))
        if q is not None:
            g.scatter_add_(1, ids, -b.unsqueeze(1) * q)
        # c is 0 on inactive rows, but 0 * NaN is NaN: a masked-out row whose logits are
        # not finite (padding after an fp16 overflow) must still get a zero gradient
        g.mul_(c.unsqueeze(1))
        inactive = ~active
        if g.is_cuda:  # a whole pass, but no host sync (the CUDA paths must not wait on the device)
            g.masked_fill_(inactive.unsqueeze(1), 0.0)
        elif inactive.any():  # on the CPU only those rows (the trainer gives target rows only: none)
            g[inactive] = 0.0
        if g is not out:
            out.copy_(g)
    return loss, nll, kl


# --------------------------------------------------------------------------- host launcher


def rows_loss_and_grad(x, targets, spans, scale, t_ids, t_lp, kd_weight, *, impl, compute_grad, chunk_rows=1024, block_v=None):
    """Per-row loss / NLL / KL for all N rows; with `compute_grad`, x is overwritten by dloss/dx.

    `impl="torch"` processes `chunk_rows` rows at a time so its fp32 temporaries are
    O(chunk_rows x V); `impl="triton"` runs one program per row.
    """
    if impl == "triton":
        return _triton_rows(x, targets, spans, scale, t_ids, t_lp, kd_weight, compute_grad, block_v)
    n = x.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    nll = torch.empty_like(loss)
    kl = torch.empty_like(loss)
    # `.data`: writing the gradient must not bump the autograd version counter of a
    # buffer the Function owns (the Triton kernel's writes do not either).
    out = x.data
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        tc = None if t_ids is None else t_ids[s:e]
        lc = None if t_lp is None else t_lp[s:e]
        loss[s:e], nll[s:e], kl[s:e] = torch_rows(
            out[s:e], targets[s:e], spans[s:e], scale, tc, lc, kd_weight, out[s:e] if compute_grad else None
        )
    return loss, nll, kl


# --------------------------------------------------------------------------- autograd


class RadisLossFunction(torch.autograd.Function):
    """Loss from logits; the gradient is computed in the forward (see module docstring).

    Returns (loss: fp32 scalar = sum of the rows' weighted losses, nll [N], kl [N]); only
    the loss is differentiable (nll / kl are per-row logging values).
    """

    @staticmethod
    def forward(ctx, logits, targets, spans, scale, t_ids, t_lp, kd_weight, impl, inplace, chunk_rows, block_v,
                grad_scale):
        # (grad mode is off inside Function.forward; needs_input_grad says what autograd wants)
        compute_grad = ctx.needs_input_grad[0]
        buf = logits if (inplace or not compute_grad) else logits.detach().clone()
        loss, nll, kl = rows_loss_and_grad(
            buf, targets, spans, scale * grad_scale, t_ids, t_lp, kd_weight,
            impl=impl, compute_grad=compute_grad, chunk_rows=chunk_rows, block_v=block_v,
        )
        ctx.grad_logits = buf if compute_grad else None
        ctx.grad_scale = grad_scale
        ctx.mark_non_differentiable(nll, kl)
        return loss.sum() / grad_scale, nll, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_kl):
        g = ctx.grad_logits
        if g is None:
            raise RuntimeError("radis loss: backward called twice (the saved gradient is scaled in place)")
        ctx.grad_logits = None
        # One multiply by the scalar grad_output, in place: no second [N, V] buffer.
        g.data.mul_(unfold_factor(grad_loss, ctx.grad_scale, g.dtype))
        return g, None, None, None, None, None, None, None, None, None, None, None


def unfold_factor(grad_loss: torch.Tensor, grad_scale, dtype: torch.dtype) -> torch.Tensor:
    """What the forward's gradient, computed `grad_scale` times too large, is multiplied by.

    Under fp16, DeepSpeed multiplies the loss by its loss scale (2^16 at first) before
    backward. A gradient written in the forward already divided by the global token count
    would underflow in fp16 (99.9% of the logit gradients flush to zero at V = 32000 and
    65536 tokens), and the scale itself is inf in fp16. So the caller passes the scale it
    will apply as `grad_scale`: the forward writes gradient x grad_scale (what fp16 needs
    to stay in range), and backward multiplies by grad_loss / grad_scale, computed in fp32
    (1.0 when the caller applied exactly that scale).
    """
    return (grad_loss.float() / grad_scale).to(dtype)


class RadisLinearLossFunction(torch.autograd.Function):
    """Loss from hidden states and the LM head, chunk by chunk over tokens.

        for each chunk of rows [s, e):
            logits_c  = hidden[s:e] @ weight.T (+ bias)        [c, V]   the only O(V) buffer (reused)
            rows_loss_and_grad(logits_c)                        logits_c <- dloss/dlogits_c
            grad_hidden[s:e]  = logits_c @ weight               [c, d]
            grad_weight      += logits_c.T @ hidden[s:e]        [V, d]   (in weight.dtype)
            grad_bias        += logits_c.sum(0)

    Gradients are computed in the forward (like Liger-Kernel's fused linear cross
    entropy) rather than recomputing the logits in the backward: it saves one [N, d] x
    [d, V] matmul, and the LM-head weight is not needed after the forward -- which is what
    makes the ZeRO-3 head (radis.loss_head) simple: the weight is gathered only for the
    forward. Cost: grad_hidden [N, d] and grad_weight [V, d] live from forward to backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spans, scale, t_ids, t_lp, kd_weight, impl, chunk_size, block_v,
                grad_scale):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        compute_grad = need_h or need_w or need_b
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        nll = torch.empty_like(loss)
        kl = torch.empty_like(loss)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        h_all, w = hidden.detach(), weight.detach()
        scale = scale * grad_scale  # the gradients, grad_scale times too large (see unfold_factor)
        # One [chunk, V] buffer serves every chunk: a fresh one per chunk costs an
        # allocation (on a CPU, page faults on hundreds of MB) for no gain.
        buf = torch.empty(min(chunk_size, n), weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = h_all[s:e]
            logits = buf[: e - s]
            if bias is not None:
                torch.addmm(bias.detach(), h, w.t(), out=logits)
            else:
                torch.mm(h, w.t(), out=logits)
            tc = None if t_ids is None else t_ids[s:e]
            lc = None if t_lp is None else t_lp[s:e]
            loss[s:e], nll[s:e], kl[s:e] = rows_loss_and_grad(
                logits, targets[s:e], spans[s:e], scale, tc, lc, kd_weight,
                impl=impl, compute_grad=compute_grad, chunk_rows=chunk_size, block_v=block_v,
            )
            if need_h:
                torch.mm(logits, w, out=grad_h[s:e])
            if need_w:
                grad_w.addmm_(logits.t(), h)
            if need_b:
                grad_b += logits.float().sum(0)
        del buf
        ctx.grads = (grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype))
        ctx.grad_scale = grad_scale
        ctx.mark_non_differentiable(nll, kl)
        return loss.sum() / grad_scale, nll, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_kl):
        if ctx.grads is None:
            raise RuntimeError("radis linear loss: backward called twice (the saved gradients are scaled in place)")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        for t in (grad_h, grad_w, grad_b):
            if t is not None:
                t.mul_(unfold_factor(grad_loss, ctx.grad_scale, t.dtype))
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None
