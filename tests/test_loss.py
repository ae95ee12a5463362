"""The fused RaDis loss against an fp64 oracle (F.cross_entropy per span + explicit KL).

Both implementations are checked: impl="torch" (the chunked reference) and impl="triton"
(the kernel; on CPU it runs under TRITON_INTERPRET=1, set by conftest). Shapes are odd
on purpose (37 rows, V=1000 with 256-wide blocks, chunks of 10) so partial blocks and
chunks are exercised. Every gradient (logits, hidden, weight, bias) is compared.
"""
import pytest
import torch
import torch.nn.functional as F
from benchmark_scripts import load_benchmark
from transformers import LlamaConfig, LlamaForCausalLM

from radis.config import LossConfig
from radis.loss import RadisLoss, radis_linear_loss, radis_loss, target_rows_of
from radis.loss_head import RadisCausalLM, RadisLossHead

IMPLS = ["torch", "triton"]
N, V, K, D = 37, 1000, 5, 24
BLOCK = 256


# --------------------------------------------------------------------------- oracle


def oracle(x, targets, spans, *, mode="pooled", w_mt=1.0, w_rd=1.0, normalizer=None,
           teacher_ids=None, teacher_logprobs=None, kd_weight=0.0):
    """The documented formula, spelled out with F.cross_entropy in whatever dtype x has.

    Returns (loss, nll_mt_sum, nll_rd_sum, kl_sum); differentiable w.r.t. x.
    """
    nll_mt = F.cross_entropy(x, torch.where(spans == 1, targets, -100), reduction="none")
    nll_rd = F.cross_entropy(x, torch.where(spans == 2, targets, -100), reduction="none")
    mt = (spans == 1) & (targets != -100)
    rd = (spans == 2) & (targets != -100)
    rd_term = nll_rd
    kl = torch.zeros_like(nll_rd)
    if teacher_ids is not None:
        valid = teacher_logprobs > float("-inf")
        has = valid.any(1) & rd
        lp = torch.where(valid, teacher_logprobs.to(x.dtype), torch.finfo(x.dtype).min)
        q = torch.softmax(lp, 1) * valid  # top-k renormalised to 1
        log_q = torch.log_softmax(lp, 1)
        log_p = torch.log_softmax(x, 1).gather(1, teacher_ids.long())
        kl = torch.where(has, (torch.where(q > 0, q * (log_q - log_p), 0.0)).sum(1), 0.0)
        b = torch.where(has, kd_weight, 0.0).to(x.dtype)
        rd_term = (1 - b) * nll_rd + b * kl
    s_mt, s_rd = nll_mt.sum(), rd_term.sum()
    n_mt, n_rd = (float(mt.sum()), float(rd.sum())) if normalizer is None else (normalizer["mt"], normalizer["rd"])
    if mode == "pooled":
        loss = (w_mt * s_mt + w_rd * s_rd) / max(n_mt + n_rd, 1)
    else:
        loss = w_mt * s_mt / max(n_mt, 1) + w_rd * s_rd / max(n_rd, 1)
    return loss, nll_mt.sum(), nll_rd.sum(), kl.sum()


def make_inputs(n=N, v=V, k=K, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * scale
    targets = torch.randint(0, v, (n,), generator=g)
    spans = torch.randint(0, 3, (n,), generator=g, dtype=torch.int8)
    targets[::7] = -100  # ignored targets, some inside MT / RD spans
    t_ids = torch.randint(0, v, (n, k), generator=g)
    t_lp = torch.log_softmax(torch.randn(n, k, generator=g), 1) - 0.3  # top-k mass < 1
    t_lp[1::4] = float("-inf")  # rows without a teacher
    t_lp[2::4, 3:] = float("-inf")  # padded top-k
    return logits, targets, spans, t_ids, t_lp


def check_parts(out, ref, atol=1e-4, rtol=1e-5):
    loss, nll_mt, nll_rd, kl = ref
    for got, want in ((out.loss, loss), (out.nll_mt, nll_mt), (out.nll_rd, nll_rd), (out.kd_rd, kl)):
        torch.testing.assert_close(got.double(), want.double().detach(), atol=atol, rtol=rtol)


CASES = {
    "pooled": {"mode": "pooled"},
    "span-weighted": {"mode": "span", "w_mt": 0.7, "w_rd": 1.3},
    "pooled-kd": {"mode": "pooled", "kd_weight": 0.5, "teacher": True},
    "span-kd1": {"mode": "span", "w_rd": 0.5, "kd_weight": 1.0, "teacher": True},
}


# --------------------------------------------------------------------------- logits path


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_fp32_matches_oracle(impl, case):
    kw = dict(CASES[case])
    teacher = kw.pop("teacher", False)
    x, t, s, tid, tlp = make_inputs()
    tk = {"teacher_ids": tid, "teacher_logprobs": tlp} if teacher else {}
    xx = x.clone().requires_grad_()
    out = radis_loss(xx, t, s, impl=impl, block_v=BLOCK, chunk_size=10, **tk, **kw)
    (2.5 * out.loss).backward()  # grad_output != 1 must scale the saved gradient
    assert torch.equal(x, xx.detach()), "inplace=False must leave the logits intact"
    x64 = x.double().requires_grad_()
    ref = oracle(x64, t, s, **tk, **kw)
    (2.5 * ref[0]).backward()
    check_parts(out, ref)
    torch.testing.assert_close(xx.grad.double(), x64.grad, atol=1e-7, rtol=1e-5)
    active = t != -100
    assert int(out.n_mt) == int(((s == 1) & active).sum()) and int(out.n_rd) == int(((s == 2) & active).sum())
    if teacher:
        assert int(out.n_kd) == int(((s == 2) & active & (tlp > float("-inf")).any(1)).sum()) > 0
        assert float(out.kd_rd) > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_low_precision_error_within_reference_error(impl, dtype):
    """bf16 / fp16 in: the fused op accumulates in fp32, so its error must not exceed that
    of the reference computed in that dtype (F.cross_entropy on the low-precision
    logits), measured against fp64 on the same inputs."""
    x, t, s, tid, tlp = make_inputs()
    tk = {"teacher_ids": tid, "teacher_logprobs": tlp, "kd_weight": 0.5}
    xb = x.to(dtype)
    exact = xb.double().requires_grad_()
    ref = oracle(exact, t, s, **tk)
    ref[0].backward()
    low = xb.clone().requires_grad_()
    ref_low = oracle(low, t, s, **tk)
    ref_low[0].backward()
    ours = xb.clone().requires_grad_()
    out = radis_loss(ours, t, s, impl=impl, block_v=BLOCK, **tk)
    out.loss.backward()
    assert ours.grad.dtype == dtype
    loss_err = abs(out.loss.item() - ref[0].item())
    ref_loss_err = abs(ref_low[0].item() - ref[0].item())
    assert loss_err <= max(ref_loss_err, 1e-5), (loss_err, ref_loss_err)
    err = (ours.grad.double() - exact.grad).abs()
    ref_grad_err = (low.grad.double() - exact.grad).abs().max()
    assert err.max() <= ref_grad_err, (err.max(), ref_grad_err)
    # fp32 accumulation then one rounding: every element within half an ulp (bf16: 2^-8
    # relative; fp16: 2^-11 relative, and half the smallest subnormal, 2^-25, near 0)
    half_ulp, floor = (2.0**-8, 1e-12) if dtype == torch.bfloat16 else (2.0**-11, 2.0**-25)
    assert (err <= exact.grad.abs() * half_ulp * 1.01 + floor).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_large_vocab_few_rows(impl):
    """V = 32000 (not a multiple of the 4096 block), 3 rows, default block size."""
    x, t, s, tid, tlp = make_inputs(n=3, v=32000, seed=3)
    s = torch.tensor([1, 2, 2], dtype=torch.int8)
    t[:] = torch.tensor([5, 31999, 17])
    tk = {"teacher_ids": tid, "teacher_logprobs": tlp, "kd_weight": 0.25}
    xx = x.clone().requires_grad_()
    out = radis_loss(xx, t, s, impl=impl, **tk)
    out.loss.backward()
    x64 = x.double().requires_grad_()
    ref = oracle(x64, t, s, **tk)
    ref[0].backward()
    check_parts(out, ref)
    torch.testing.assert_close(xx.grad.double(), x64.grad, atol=1e-7, rtol=1e-5)


EDGES = {
    "all-ignore-spans": lambda t, s: (t, torch.zeros_like(s)),
    "no-target-at-all": lambda t, s: (torch.full_like(t, -100), s),
    "no-rd": lambda t, s: (t, torch.where(s == 2, 1, s).to(s.dtype)),
    "no-mt": lambda t, s: (t, torch.where(s == 1, 2, s).to(s.dtype)),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("edge", list(EDGES))
@pytest.mark.parametrize("mode", ["pooled", "span"])
def test_edge_cases(impl, edge, mode):
    x, t, s, tid, tlp = make_inputs(n=11, v=300)
    t, s = EDGES[edge](t, s)
    tk = {"teacher_ids": tid, "teacher_logprobs": tlp, "kd_weight": 0.5}
    xx = x.clone().requires_grad_()
    out = radis_loss(xx, t, s, mode=mode, w_rd=0.5, impl=impl, block_v=128, **tk)
    out.loss.backward()
    assert torch.isfinite(xx.grad).all() and torch.isfinite(out.loss)
    x64 = x.double().requires_grad_()
    ref = oracle(x64, t, s, mode=mode, w_rd=0.5, **tk)
    ref[0].backward()
    check_parts(out, ref)
    torch.testing.assert_close(xx.grad.double(), x64.grad, atol=1e-7, rtol=1e-5)
    if edge in ("all-ignore-spans", "no-target-at-all"):
        assert out.loss.item() == 0.0 and not xx.grad.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_logits(impl):
    x, t, s, tid, tlp = make_inputs(n=9, v=300)
    x[:, ::3] = 1e4
    x[:, 1::3] = -1e4
    t[:3] = torch.tensor([0, 1, 2])  # targets on +1e4, -1e4 and ordinary logits
    s[:3] = torch.tensor([1, 1, 2])
    tk = {"teacher_ids": tid, "teacher_logprobs": tlp, "kd_weight": 0.5}
    xx = x.clone().requires_grad_()
    out = radis_loss(xx, t, s, impl=impl, block_v=128, **tk)
    out.loss.backward()
    x64 = x.double().requires_grad_()
    ref = oracle(x64, t, s, **tk)
    ref[0].backward()
    assert torch.isfinite(xx.grad).all()
    check_parts(out, ref, atol=1e-2, rtol=1e-6)  # NLL ~ 2e4: fp32 spacing there is ~2e-3
    torch.testing.assert_close(xx.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_ids_at_minus_inf_and_non_finite_ignored_rows(impl):
    """Logits of masked ids are -inf; here a whole vocabulary block of them (ids 0-127, one
    block of 128), which the online log-sum-exp must skip without a NaN. An ignored row may
    hold anything (padding after an fp16 overflow): its loss and gradient stay 0."""
    x, t, s, _, _ = make_inputs(n=9, v=300)
    x[:, :128] = float("-inf")
    t = torch.where(t == -100, t, 128 + t % 172)  # targets past the masked block
    s[:7] = torch.tensor([1, 2, 1, 2, 1, 2, 2], dtype=s.dtype)
    t[7], s[7] = -100, 1  # ignored target inside an MT span
    t[8], s[8] = 5, 0  # a target outside any span
    x[7, 200], x[7, 201], x[8, 250] = float("inf"), float("nan"), float("nan")
    xx = x.clone().requires_grad_()
    out = radis_loss(xx, t, s, impl=impl, block_v=128)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(xx.grad).all()
    assert not xx.grad[7:].any() and not xx.grad[:, :128].any()
    x64 = x[:7].double().requires_grad_()
    ref = oracle(x64, t[:7], s[:7])  # rows 7 and 8 are inactive: the same token count
    ref[0].backward()
    check_parts(out, ref)
    torch.testing.assert_close(xx.grad[:7].double(), x64.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_overwrites_logits_with_gradient(impl):
    x, t, s, _, _ = make_inputs(n=7, v=200)
    xx = x.clone().requires_grad_()
    out = radis_loss(xx, t, s, impl=impl, inplace=True, block_v=128)
    out.loss.backward()
    assert not torch.equal(xx.detach(), x)  # documented: the buffer now holds the gradient
    x64 = x.double().requires_grad_()
    oracle(x64, t, s)[0].backward()
    torch.testing.assert_close(xx.grad.double(), x64.grad, atol=1e-7, rtol=1e-5)


def test_no_grad_path_and_empty_input():
    x, t, s, _, _ = make_inputs(n=7, v=200)
    with torch.no_grad():
        out = radis_loss(x, t, s, impl="torch")
    torch.testing.assert_close(out.loss.double(), oracle(x.double(), t, s)[0], rtol=1e-5, atol=1e-6)
    empty = torch.zeros(0, 50, requires_grad=True)
    out = radis_loss(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    out.loss.backward()
    assert out.loss.item() == 0.0 and empty.grad.shape == (0, 50)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_validation_under_no_grad_computes_no_head_gradient(impl, monkeypatch):
    """Under torch.no_grad() (validation) autograd still reports the head's Parameter as
    needing its gradient; the fused head must not compute one (a [V, d] buffer, the
    gradient pass)."""
    import radis.kernels.radis_loss as kernel

    asked = []
    forward = kernel.RadisLinearLossFunction.forward

    def recording(ctx, *args):
        asked.append(tuple(ctx.needs_input_grad[:3]))
        return forward(ctx, *args)

    monkeypatch.setattr(kernel.RadisLinearLossFunction, "forward", staticmethod(recording))
    h = torch.randn(12, 8)
    head = torch.nn.Parameter(torch.randn(40, 8))
    t, s = torch.randint(0, 40, (12,)), torch.full((12,), 2)
    with torch.no_grad():
        quiet = radis_linear_loss(h, head, t, s, impl=impl).loss
    loud = radis_linear_loss(h, head, t, s, impl=impl).loss
    assert asked == [(False, False, False), (False, True, False)]
    torch.testing.assert_close(quiet, loud.detach())


# --------------------------------------------------------------------------- normaliser


@pytest.mark.parametrize("mode", ["pooled", "span"])
def test_global_normalizer_makes_micro_batches_add_up(mode):
    """Split one batch in two calls with the GLOBAL counts: losses and gradients add up."""
    x, t, s, tid, tlp = make_inputs()
    tk = {"teacher_ids": tid, "teacher_logprobs": tlp, "kd_weight": 0.3}
    full = x.clone().requires_grad_()
    whole = radis_loss(full, t, s, mode=mode, **tk)
    whole.loss.backward()
    norm = {"mt": whole.n_mt, "rd": whole.n_rd}
    parts = x.clone().requires_grad_()
    total = 0
    for sl, norm_arg in ((slice(0, 20), norm), (slice(20, N), torch.stack([whole.n_mt, whole.n_rd]))):
        out = radis_loss(parts[sl], t[sl], s[sl], mode=mode, normalizer=norm_arg,
                         teacher_ids=tid[sl], teacher_logprobs=tlp[sl], kd_weight=0.3)
        total = total + out.loss
    total.backward()
    torch.testing.assert_close(total, whole.loss)
    torch.testing.assert_close(parts.grad, full.grad)
    ref = oracle(x.double(), t, s, mode=mode, normalizer={"mt": 100.0, "rd": 50.0}, **tk)
    out = radis_loss(x, t, s, mode=mode, normalizer={"mt": 100, "rd": 50}, **tk)
    check_parts(out, ref)


# --------------------------------------------------------------------------- fused linear


ROWS = {  # how radis_linear_loss picks the rows that go through the head
    "all": {"skip_ignored": False},  # every row, IGNORE rows computed and zeroed
    "found": {},  # the default: target rows found with a nonzero()
    "given": "target_rows",  # target rows given, as the collator computes them
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", list(ROWS))
def test_linear_matches_oracle(impl, with_bias, rows):
    _x, t, s, tid, tlp = make_inputs()
    assert 0 < int((t == -100).sum()) < N  # some rows are skipped, some are not
    g = torch.Generator().manual_seed(5)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.3
    b = torch.randn(V, generator=g) if with_bias else None
    tk = {"teacher_ids": tid, "teacher_logprobs": tlp, "kd_weight": 0.4}
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = b.clone().requires_grad_() if with_bias else None
    pick = {"target_rows": target_rows_of(t, s)} if ROWS[rows] == "target_rows" else ROWS[rows]
    out = radis_linear_loss(hh, ww, t, s, bias=bb, mode="span", w_rd=0.6, impl=impl, chunk_size=10,
                            block_v=BLOCK, **pick, **tk)
    (3.0 * out.loss).backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if with_bias else None
    logits = h64 @ w64.T + (b64 if with_bias else 0)
    ref = oracle(logits, t, s, mode="span", w_rd=0.6, **tk)
    (3.0 * ref[0]).backward()
    check_parts(out, ref)
    torch.testing.assert_close(hh.grad.double(), h64.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ww.grad.double(), w64.grad, atol=1e-6, rtol=1e-5)
    if with_bias:
        torch.testing.assert_close(bb.grad.double(), b64.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_bf16_error_within_reference_error(impl):
    """bf16 hidden / weight: compare with an HF-style bf16 step (bf16 matmul, then
    F.cross_entropy on the bf16 logits), both measured against fp64 on the same inputs."""
    _x, t, s, _, _ = make_inputs()
    g = torch.Generator().manual_seed(6)
    h = torch.randn(N, D, generator=g).bfloat16()
    w = (torch.randn(V, D, generator=g) * 0.3).bfloat16()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = oracle(h64 @ w64.T, t, s)
    ref[0].backward()
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    oracle(hl @ wl.T, t, s)[0].backward()
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = radis_linear_loss(hh, ww, t, s, impl=impl, chunk_size=10, block_v=BLOCK)
    out.loss.backward()
    assert abs(out.loss.item() - ref[0].item()) <= 2e-2 * ref[0].item()
    for ours, low, exact in ((hh.grad, hl.grad, h64.grad), (ww.grad, wl.grad, w64.grad)):
        assert ours.dtype == torch.bfloat16
        err = (ours.double() - exact).abs().max()
        ref_err = (low.double() - exact).abs().max()
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)


# --------------------------------------------------------------------------- modules


def _tiny_llama(tied=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).float()


def test_causal_lm_wrapper_matches_hf_logits_and_reaches_tied_weight():
    model = _tiny_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(1)
    b, seq, k = 2, 11, 3
    ids = torch.randint(0, 97, (b, seq), generator=g)
    labels = torch.full((b, seq), -100)
    labels[:, :-1] = ids[:, 1:]
    spans = torch.zeros(b, seq, dtype=torch.int8)
    spans[:, 3:6], spans[:, 6:10] = 1, 2
    t_ids = torch.randint(0, 97, (b, seq, k), generator=g)
    t_lp = torch.log_softmax(torch.randn(b, seq, k, generator=g), -1)
    wrapper = RadisCausalLM(model, mode="span", w_rd=0.5, kd_weight=0.5, impl="torch", chunk_size=5)
    out = wrapper(input_ids=ids, labels=labels, spans=spans, teacher_ids=t_ids, teacher_logprobs=t_lp)
    out.loss.backward()
    got = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=ids).logits.reshape(b * seq, -1)
    ref = oracle(logits, labels.reshape(-1), spans.reshape(-1), mode="span", w_rd=0.5,
                 teacher_ids=t_ids.reshape(-1, k), teacher_logprobs=t_lp.reshape(-1, k), kd_weight=0.5)
    ref[0].backward()
    check_parts(out, ref, atol=1e-5, rtol=1e-5)
    # the tied weight receives both the head's and the embedding's gradient
    assert got.abs().max() > 0
    torch.testing.assert_close(got, model.lm_head.weight.grad, atol=1e-6, rtol=1e-4)


def test_modules_and_from_config():
    _x, t, s, _, _ = make_inputs(n=9, v=97)
    model = _tiny_llama(tied=False)
    h = torch.randn(9, 32)
    head = RadisLossHead(model.lm_head, mode="span", impl="torch")
    out = head(h, t.clamp(max=96), s)
    ref = oracle(h.double() @ model.lm_head.weight.double().T, t.clamp(max=96), s, mode="span")
    check_parts(out, ref)
    mod = RadisLoss(mode="span", impl="torch")
    check_parts(mod(h, t.clamp(max=96), s, weight=model.lm_head.weight), ref)
    check_parts(mod(h @ model.lm_head.weight.T, t.clamp(max=96), s), ref)
    vanilla = RadisCausalLM.from_config(model, LossConfig(method="vanilla", w_rd=1.0))
    assert vanilla.loss_kwargs["w_rd"] == 0.0 and vanilla.loss_kwargs["mode"] == "span"


@pytest.mark.parametrize("key,value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.0625),
                                       ("logits_scaling", 8.0)])
def test_a_head_whose_logits_are_transformed_is_refused(key, value):
    """Gemma's soft-capping, Cohere's logit scale, Granite's scaling: the fused loss would
    optimise logits the model never produces; refused, naming the setting."""
    from radis.errors import InputError
    from radis.loss_head import UnsupportedHeadError

    model = _tiny_llama()
    RadisCausalLM(model)  # a plain head is fine
    setattr(model.config, key, value)
    with pytest.raises(UnsupportedHeadError, match=rf"LlamaForCausalLM has {key}={value!r}: its logits are "):
        RadisCausalLM(model)
    assert issubclass(UnsupportedHeadError, InputError)  # the CLI reports it without a traceback


def test_call_as_forward_puts_an_instance_forward_back():
    """accelerate and PEFT put a forward on the instance: the fused head's call shadows it
    for one call and restores it (it used to delete it)."""
    from radis.loss_head import call_as_forward

    head = torch.nn.Linear(4, 3)
    seen = []

    def wrapped(x):
        seen.append("wrapper")
        return torch.nn.Linear.forward(head, x)

    head.forward = wrapped
    out = call_as_forward(head, lambda mod, x: (x.sum(),), torch.ones(2, 4))
    assert out[0].item() == 8.0 and head.forward is wrapped
    head(torch.ones(1, 4))
    assert seen == ["wrapper"]
    plain = torch.nn.Linear(4, 3)
    call_as_forward(plain, lambda mod, x: (x.sum(),), torch.ones(2, 4))
    assert "forward" not in plain.__dict__


# --------------------------------------------------------------------------- bad input


def _bad(**change):
    x, t, s, _tid, _tlp = make_inputs(n=5, v=50)
    args = {"logits": x, "targets": t, "spans": s}
    kw = {}
    for key, val in change.items():
        (args if key in args else kw)[key] = val
    return args, kw


BAD = {
    "targets-shape": ({"targets": torch.zeros(4, dtype=torch.long)}, "targets"),
    "target-too-large": ({"targets": torch.tensor([0, 1, 50, 2, 3])}, "targets"),
    "target-negative": ({"targets": torch.tensor([0, 1, -5, 2, 3])}, "targets"),
    "span-out-of-range": ({"spans": torch.tensor([0, 1, 3, 2, 1])}, "spans"),
    "logits-int": ({"logits": torch.zeros(5, 50, dtype=torch.long)}, "logits"),
    "targets-int32": ({"targets": torch.zeros(5, dtype=torch.int32)}, "targets"),
    "logits-non-contiguous": ({"logits": torch.zeros(50, 5).t()}, "logits"),
    "spans-float": ({"spans": torch.zeros(5)}, "spans"),
    "teacher-shape": ({"teacher_ids": torch.zeros(5, 3, dtype=torch.long), "teacher_logprobs": torch.zeros(5, 2)},
                      "teacher_logprobs"),
    "teacher-id-range": ({"teacher_ids": torch.full((5, 2), 50), "teacher_logprobs": torch.zeros(5, 2)}, "teacher_ids"),
    "kd-out-of-range": ({"kd_weight": 1.5}, "kd_weight"),
    "mode": ({"mode": "mean"}, "mode"),
    "normalizer-keys": ({"normalizer": {"mt": 3}}, "normalizer"),
    "impl": ({"impl": "cuda"}, "impl"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_the_argument(name):
    change, arg = BAD[name]
    args, kw = _bad(**change)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        radis_loss(args["logits"], args["targets"], args["spans"], **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_weight_without_teacher_is_plain_nll(impl):
    """A micro-batch without teacher arrays (validation on plain pairs, padding, a skipped
    batch) has no KD term: kd_weight > 0 then gives exactly the loss and gradients of
    kd_weight = 0, from logits and from hidden states."""
    x, t, s, _, _ = make_inputs()
    outs = []
    for kd in (0.0, 0.7):
        xx = x.clone().requires_grad_()
        out = radis_loss(xx, t, s, impl=impl, block_v=BLOCK, kd_weight=kd)
        out.loss.backward()
        outs.append((out, xx.grad))
    (a, ga), (b, gb) = outs
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)
    assert float(b.kd_rd) == 0.0 and int(b.n_kd) == 0 and float(b.nll_rd) > 0
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    grads = []
    for kd in (0.0, 0.7):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        radis_linear_loss(hh, ww, t, s, impl=impl, chunk_size=10, block_v=BLOCK, kd_weight=kd).loss.backward()
        grads.append((hh.grad, ww.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("linear", [False, True])
def test_fp16_gradient_keeps_its_range_with_the_loss_scale_folded_in(impl, linear):
    """fp16 under a loss scale S = 2^16 (DeepSpeed's first) with a step-wide normaliser of
    65536 tokens: the forward's gradient (p / 65536 ~ 4e-9 here) is below fp16's smallest
    subnormal, and S itself is inf in fp16. With grad_scale=S the forward writes S x the
    gradient and backward unfolds it in fp32: the result matches fp32 within fp16 rounding."""
    g = torch.Generator().manual_seed(3)
    n, v, d, S = 16, 4096, 32, 2.0**16
    norm = {"mt": 30000, "rd": 35536}
    t = torch.randint(0, v, (n,), generator=g)
    s = torch.randint(1, 3, (n,), generator=g)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3

    def grads(dtype, grad_scale, loss_scale):
        hh, ww = h.to(dtype, copy=True).requires_grad_(), w.to(dtype, copy=True).requires_grad_()
        if linear:
            out = radis_linear_loss(hh, ww, t, s, impl=impl, normalizer=norm, block_v=BLOCK, grad_scale=grad_scale)
            (out.loss * loss_scale).backward()
            return out.loss, hh.grad.double() / loss_scale, ww.grad.double() / loss_scale
        x = (hh @ ww.t()).detach().requires_grad_()
        out = radis_loss(x, t, s, impl=impl, normalizer=norm, block_v=BLOCK, grad_scale=grad_scale)
        (out.loss * loss_scale).backward()
        return out.loss, x.grad.double() / loss_scale

    ref = grads(torch.float32, 1.0, 1.0)
    folded = grads(torch.float16, S, S)
    torch.testing.assert_close(folded[0], ref[0], rtol=2e-3, atol=0)  # the loss is not scaled
    for got, want in zip(folded[1:], ref[1:]):
        assert torch.isfinite(got).all()
        assert (got - want).norm() / want.norm() < 5e-3
    unfolded = grads(torch.float16, 1.0, S)  # what fp16 did before: inf (S in fp16) or all zero
    assert not all(torch.isfinite(u).all() and (u - r).norm() / r.norm() < 0.5 for u, r in zip(unfolded[1:], ref[1:]))
    with pytest.raises(ValueError, match="^grad_scale:"):
        radis_loss(torch.zeros(2, 5), t[:2] % 5, s[:2], grad_scale=0.0)


def test_bad_linear_input_names_the_argument():
    h, t, s = torch.zeros(5, 8), torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)
    with pytest.raises(ValueError, match="^weight:"):
        radis_linear_loss(h, torch.zeros(0), t, s)  # e.g. an ungathered ZeRO-3 shard
    with pytest.raises(ValueError, match="^weight:"):
        radis_linear_loss(h, torch.zeros(10, 8, dtype=torch.float64), t, s)
    with pytest.raises(ValueError, match="^bias:"):
        radis_linear_loss(h, torch.zeros(10, 8), t, s, bias=torch.zeros(9))
    w = torch.zeros(10, 8)
    with pytest.raises(ValueError, match="^target_rows: expected a 1-D int64"):
        radis_linear_loss(h, w, t, s, target_rows=torch.arange(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="^target_rows: 6 rows"):
        radis_linear_loss(h, w, t, s, target_rows=torch.arange(6))
    # rows that are not exactly the targets (validate=True) would drop or repeat loss terms
    for rows in ([0, 1, 2, 3], [0, 0, 1, 2, 3], [1, 0, 2, 3, 4], [0, 1, 2, 3, 5]):
        with pytest.raises(ValueError, match="^target_rows: expected the sorted indices"):
            radis_linear_loss(h, w, t, s, target_rows=torch.tensor(rows))


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_cuda_linear_loss_with_given_rows_has_no_host_sync():
    _x, t, s, tid, tlp = (a.cuda() for a in make_inputs(n=67, v=5000))
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(67, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(5000, 64, device="cuda", generator=g) * 0.1).bfloat16().requires_grad_()
    rows = target_rows_of(t, s)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        # the trainer's call: the step's global counts as Python ints (no host-to-device copy)
        out = radis_linear_loss(h, w, t, s, impl="triton", validate=False, target_rows=rows,
                                teacher_ids=tid, teacher_logprobs=tlp, kd_weight=0.5, normalizer={"mt": 7, "rd": 30})
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss) and h.grad[t == -100].abs().max() == 0


@pytest.mark.gpu
def test_cuda_kernel_past_two_to_the_31_logit_entries():
    """N * V > 2^31 (a 7B step's logits easily are): rows past that offset must be read and
    written at int64 offsets. The last rows' gradients equal the torch path's on those rows."""
    v = 32000
    n = 2**31 // v + 257
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=g)  # 4.4 GB
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    s = torch.full((n,), 2, device="cuda", dtype=torch.int8)
    norm = {"mt": 0, "rd": 1}  # weight 1 per row: gradients ~ p, far above bf16's rounding floor
    tail = slice(n - 256, n)
    ref = x[tail].clone().requires_grad_()
    radis_loss(ref, t[tail], s[tail], impl="torch", normalizer=norm).loss.backward()
    xx = x.requires_grad_()
    out = radis_loss(xx, t, s, impl="triton", normalizer=norm, validate=False)
    out.loss.backward()
    assert int(out.n_rd) == n and torch.isfinite(out.loss)
    torch.testing.assert_close(xx.grad[tail].float(), ref.grad.float(), atol=1e-6, rtol=2e-2)
    assert xx.grad[tail].abs().max() > 0


@pytest.mark.gpu
def test_cuda_triton_matches_torch_without_host_sync():
    x, t, s, tid, tlp = (a.cuda() for a in make_inputs(n=67, v=5000))
    tk = {"teacher_ids": tid, "teacher_logprobs": tlp, "kd_weight": 0.5}
    outs, grads = [], []
    for impl in IMPLS:
        xx = x.bfloat16().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any .item() / host sync in the op raises
        try:
            out = radis_loss(xx, t, s, impl=impl, validate=False, **tk)
            out.loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        outs.append(out)
        grads.append(xx.grad.float())
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=2e-2)


# --------------------------------------------------------------------------- benchmark


def test_benchmark_variants_run_and_agree():
    """benchmarks/bench_loss.py's CPU variants compute the same loss (tiny shapes), and its
    loss check names a variant that does not."""
    bench = load_benchmark("bench_loss")
    h, w, t, s = bench.make_inputs(40, 300, 16, torch.float32, "cpu")
    losses = [bench.step_fn(v, chunk=16)(h, w, t, s).item() for v in bench.CPU_VARIANTS if v != "matmuls"]
    assert len(losses) == 4 and all(x == pytest.approx(losses[0], rel=1e-5) for x in losses)
    hh = h.detach().clone().requires_grad_()
    bench.step_fn("matmuls", chunk=16)(hh, w, t, s).backward()  # the floor: only target rows get a gradient
    assert (hh.grad[t == -100] == 0).all() and (hh.grad[t != -100] != 0).any()
    row = bench.measure("radis_linear_torch", 40, 300, 16, torch.float32, "cpu", chunk=16, repeats=1)
    assert row["time_s"] > 0 and row["grads_mib"] > 0 and row["loss"] == pytest.approx(losses[0], rel=1e-5)
    naive = dict(row, variant="naive")
    floor = dict(row, variant="matmuls", loss=123.0)  # not a loss: never compared
    assert bench.loss_check([naive, row, floor]) == []
    for wrong in (row["loss"] * 1.01, float("nan")):
        (line,) = bench.loss_check([naive, dict(row, loss=wrong)])
        assert line.startswith("N=40: radis_linear_torch loss") and "not the same loss" in line
    assert f"| radis_linear_torch | {row['loss']:.5f} |" in bench.table([naive, row])


def test_benchmark_names_a_failing_variant_and_still_tables_the_others(monkeypatch, capsys):
    bench = load_benchmark("bench_loss")

    def worker(args, variant, n):
        if variant == "radis_torch":
            raise RuntimeError("worker radis_torch N=64 failed: out of memory")
        return {"variant": variant, "n": n, "v": args.v, "d": args.d, "dtype": "float32", "device": "cpu",
                "loss": 5.0, "time_s": 1.0, "peak_extra_mib": 2.0, "grads_mib": 1.0, "spans": "-"}

    monkeypatch.setattr(bench, "run_cpu_worker", worker)
    assert bench.main(["--device", "cpu", "--n", "64", "--variants", "naive", "radis_torch", "radis_linear_torch"]) == 1
    out = capsys.readouterr().out
    assert "| naive | 5.00000 |" in out and "| radis_linear_torch | 5.00000 |" in out
    assert "N=64: radis_torch failed: RuntimeError: worker radis_torch N=64 failed: out of memory" in out


def test_benchmark_prints_each_row_as_it_is_measured(monkeypatch, capsys):
    """A run stopped part way (gpu-check's time limit kills it) has already printed the
    table's head and the rows measured so far."""
    bench = load_benchmark("bench_loss")

    def worker(args, variant, n):
        if variant == "radis_linear_torch":
            raise SystemExit("killed")  # as if stopped here: nothing after this runs
        return {"variant": variant, "n": n, "v": args.v, "d": args.d, "dtype": "float32", "device": "cpu",
                "loss": 5.0, "time_s": 1.0, "peak_extra_mib": 2.0, "grads_mib": 1.0, "spans": "-"}

    monkeypatch.setattr(bench, "run_cpu_worker", worker)
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--n", "64", "--variants", "naive", "radis_torch", "radis_linear_torch"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| N | V | d |") and out[1].startswith("|---|")
    assert [ln.split(" | ")[5] for ln in out[2:]] == ["naive", "radis_torch"]


@pytest.mark.parametrize("peer", ["liger_flce", "cce"])
def test_benchmark_peers_compute_the_same_loss_and_gradients(peer):
    """The GPU rows compare radis_linear_triton's time with Liger-Kernel's and
    cut-cross-entropy's: the calls that bench_loss makes of them must compute the pooled
    loss (CE over the MT and RD targets) and its gradients, or the comparison is of
    another computation. Liger runs its own Triton kernel here (TRITON_INTERPRET=1); cce's
    kernel cannot run in the interpreter, so its torch.compile path checks the call."""
    bench = load_benchmark("bench_loss")
    module = bench.OPTIONAL[peer]
    pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[dev]')")
    h, w, t, s = bench.make_inputs(48, 320, 16, torch.float32, "cpu")
    grads = []
    for variant in ("naive", peer):
        h.grad = w.grad = None
        loss = bench.step_fn(variant, chunk=16)(h, w, t, s)
        loss.backward()
        grads.append((loss.item(), h.grad.clone(), w.grad.clone()))
    (ref, ref_h, ref_w), (got, got_h, got_w) = grads
    assert got == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-4, atol=1e-6)
