"""Packing: bin assignment, the collated layout, and isolation of packed examples."""
from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radis.data.example import IGNORE_INDEX, Segment
from radis.data.packing import (
    Pack,
    PackedDataset,
    best_fit_decreasing,
    collate_packs,
    model_forward_kwargs,
    pack_segments,
)
from radis.loss_head import RadisCausalLM


def seg(eid: str, ids: list[int], spans: list[int], k: int = 0) -> Segment:
    s = Segment(example_id=eid, input_ids=ids, spans=spans)
    if k:  # like radis.data.segments: rows only for the (contiguous) rationale tokens
        rd = [t for t, sp in zip(ids, spans) if sp == 2]
        s.teacher_start = spans.index(2)
        s.teacher_ids = np.array([[t * 10 + j for j in range(k)] for t in rd], dtype=np.int32)
        s.teacher_logprobs = -np.array([[t + j / 10 for j in range(k)] for t in rd], dtype=np.float32)
    return s


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=0, max_size=80), st.integers(50, 120))
def test_best_fit_decreasing_is_a_partition_within_capacity(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Best fit never leaves two bins that could be merged... at least it uses no more
    # bins than twice the lower bound (first/best-fit guarantee is far tighter).
    if lengths:
        assert len(bins) <= 2 * -(-sum(lengths) // capacity)


def test_pack_segments_seeded_and_windowed():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=500)
    a = pack_segments(lengths, 512, window=64, seed=7)
    b = pack_segments(lengths, 512, window=64, seed=7)
    c = pack_segments(lengths, 512, window=64, seed=8)
    assert a == b and a != c
    assert sorted(i for p in a for i in p) == list(range(500))
    assert all(lengths[p].sum() <= 512 for p in a)
    # packs stay local: a pack mixes segments of one window, or of the next windows
    # when an under-filled bin was carried over
    order = np.random.default_rng(7).permutation(500)
    window_of = np.empty(500, dtype=int)
    window_of[order] = np.arange(500) // 64
    spread = [max(window_of[p]) - min(window_of[p]) for p in a]
    assert np.mean(np.array(spread) == 0) > 0.5 and max(spread) <= 5, spread
    eff = lengths.sum() / (len(a) * 512)
    assert eff > 0.985, eff  # windows without carrying: 0.963 here


def test_pack_segments_rejects_too_long_segment_by_id():
    with pytest.raises(ValueError, match=r"segment ex-2 has 600 tokens.*max_tokens=512"):
        pack_segments([10, 20, 600], 512, window=8, seed=0, example_ids=["ex-0", "ex-1", "ex-2"])


def test_collate_layout_matches_the_drawing():
    # The module docstring's example: packs [a(5), b(6)] and [c(8)], T = 12.
    a = seg("a", [10, 11, 12, 13, 14], [0, 0, 1, 1, 2])
    b = seg("b", [20, 21, 22, 23, 24, 25], [0, 0, 1, 1, 1, 2])
    c = seg("c", [30, 31, 32, 33, 34, 35, 36, 37], [0, 0, 0, 1, 1, 2, 2, 2])
    packs = [Pack(np.array(a.input_ids + b.input_ids), np.array(a.spans + b.spans), [5, 6], ["a", "b"]),
             Pack(np.array(c.input_ids), np.array(c.spans), [8], ["c"])]
    batch = collate_packs(packs, pad_token_id=0, attn="sdpa", dtype=torch.float32, pad_to=12)
    X = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [
        [10, 11, 12, 13, 14, 20, 21, 22, 23, 24, 25, 0],
        [30, 31, 32, 33, 34, 35, 36, 37, 0, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [X, 12, 13, 14, X, X, 22, 23, 24, 25, X, X],
        [X, X, 33, 34, 35, 36, 37, X, X, X, X, X],
    ]
    assert batch["spans"].tolist() == [[0, 1, 1, 2, 0, 0, 1, 1, 1, 2, 0, 0], [0, 0, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]]
    assert batch["cu_seqlens"].tolist() == [0, 5, 11, 12, 20, 24] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 8
    assert batch["num_targets"] == {"mt": 7, "rd": 5, "total": 12}
    # the rows the loss head computes: flat over B*T, row b*12+t where labels[b, t] is a target
    assert batch["target_rows"].tolist() == [1, 2, 3, 6, 7, 8, 9, 14, 15, 16, 17, 18]
    assert batch["target_rows"].dtype == torch.int64
    assert batch["example_ids"] == [["a", "b"], ["c"]]
    m = batch["attention_mask"]
    assert m.shape == (2, 1, 12, 12) and m.dtype == torch.float32
    visible = m[0, 0] == 0
    assert visible[6, 5] and visible[6, 6] and not visible[6, 4] and not visible[5, 6]  # b1 sees b0, not a4
    assert visible[11, 11] and not visible[11, 10]  # padding only sees itself
    # flash: no dense mask, boundaries for varlen instead
    flash = collate_packs(packs, pad_token_id=0, attn="flash_attention_2", pad_to=12)
    assert "attention_mask" not in flash
    kw = model_forward_kwargs(flash)
    assert kw["cu_seq_lens_q"] is flash["cu_seqlens"] and kw["max_length_k"] == 8
    # per-pack counts from the flat arrays agree with the collated labels
    ds = PackedDataset.from_segments([a, b, c], max_tokens=12, window=8, seed=0)
    assert ds.num_packs == 2 and ds.efficiency == 19 / 24
    stats = ds.pack_stats()
    assert stats[:, 0].sum() == 19 and stats[:, 1].sum() == 7 and stats[:, 2].sum() == 5
    again = collate_packs([ds.pack(p) for p in range(ds.num_packs)], 0, pad_to=12)
    assert sorted(again["labels"][again["labels"] != X].tolist()) == sorted(batch["labels"][batch["labels"] != X].tolist())


def test_teacher_topk_shifted_like_labels():
    s = seg("t", [5, 6, 7, 8], [0, 1, 2, 2], k=2)
    plain = seg("p", [9, 9, 9], [0, 1, 1])
    ds = PackedDataset.from_segments([s, plain], max_tokens=8, window=4, seed=0)
    batch = collate_packs([ds.pack(p) for p in range(ds.num_packs)], pad_token_id=0, pad_to=8)
    mask = batch["teacher_mask"]
    labels = batch["labels"]
    # where the mask is set, the top-k row belongs to the label token (recorded at it)
    assert mask.sum() == 2  # the two RD targets of "t"; its MT target has no top-k
    assert torch.isfinite(batch["teacher_logprobs"]).all()
    assert torch.equal(batch["teacher_ids"][mask][:, 0], labels[mask] * 10)
    assert torch.allclose(batch["teacher_logprobs"][mask][:, 1], -(labels[mask].float() + 0.1))
    # the segment without a top-k is never marked
    assert not (mask & (labels == 9)).any()


def test_empty_pack_is_all_padding():
    empty = Pack(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int8), [], [])
    batch = collate_packs([empty], pad_token_id=3, attn="eager", pad_to=4)
    assert batch["input_ids"].tolist() == [[3, 3, 3, 3]]
    assert (batch["labels"] == IGNORE_INDEX).all() and batch["num_targets"]["total"] == 0
    assert batch["cu_seqlens"].tolist() == [0, 4]


def test_collate_rejects_bad_arguments():
    p = PackedDataset.from_segments([seg("a", [1, 2, 3], [0, 1, 1])], 4, 4, 0).pack(0)
    with pytest.raises(ValueError, match="attn: expected one of"):
        collate_packs([p], 0, attn="flex")
    with pytest.raises(ValueError, match="pad_to=2 is shorter"):
        collate_packs([p], 0, pad_to=2)


# --------------------------------------------------------------------------- isolation


def tiny_llama(attn: str, device: str = "cpu", dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=dtype).to(device).eval()


def random_segments(n: int, seed: int) -> list[Segment]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(3, 14))
        out.append(seg(f"s{i}", rng.integers(1, 96, size=L).tolist(), [0] * 2 + [1] * (L - 2)))
    return out


def packed_vs_alone(model, attn: str, device: str = "cpu", dtype=torch.float32, mask: bool = True):
    """Max |logit difference| between each example in a packed batch and the example alone."""
    ds = PackedDataset.from_segments(random_segments(9, seed=1), max_tokens=32, window=16, seed=0)
    packs = [ds.pack(p) for p in range(ds.num_packs)]
    assert len(packs) >= 2 and max(len(p.seq_lens) for p in packs) >= 2
    batch = collate_packs(packs, pad_token_id=0, attn=attn, dtype=dtype, pad_to=32)
    kw = model_forward_kwargs(batch, device)
    if not mask:  # the common mistake: position_ids only, default cache behaviour
        kw.pop("attention_mask", None)
        kw.pop("use_cache")
    with torch.no_grad():
        logits = model(**kw).logits.float().cpu()
    worst = 0.0
    for b, p in enumerate(packs):
        start = 0
        for ln in p.seq_lens:
            ids = torch.as_tensor(p.input_ids[start:start + ln], dtype=torch.long, device=device)[None]
            with torch.no_grad():
                alone = model(input_ids=ids).logits.float().cpu()[0]
            worst = max(worst, (logits[b, start:start + ln] - alone).abs().max().item())
            start += ln
    return worst


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked_with_4d_mask(attn):
    model = tiny_llama(attn)
    assert packed_vs_alone(model, attn) < 1e-5
    # without the mask the later examples of a pack attend to the earlier ones
    assert packed_vs_alone(model, attn, mask=False) > 1e-2


@pytest.fixture
def eager_flex(monkeypatch):
    """transformers' flex_attention without torch.compile: the same mask semantics through
    PyTorch's unfused reference path, so that a CPU test needs no minute-long compile.
    transformers also compiles the block mask of every unpacked run (one inductor build
    per sequence length: 28 s of a cold test); built eagerly, it is the same mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from transformers import masking_utils
    from transformers.integrations import flex_attention as hf_flex

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", lambda q, k, v, training=False, **kw:
                        flex_attention(q, k, v, **kw))
    monkeypatch.setattr(masking_utils, "create_block_mask", lambda *a, _compile=False, **kw: create_block_mask(*a, **kw))


def test_packed_logits_equal_unpacked_with_flex_block_mask(eager_flex):
    from torch.nn.attention.flex_attention import BlockMask

    batch = collate_packs([PackedDataset.from_segments(random_segments(3, seed=2), 32, 4, 0).pack(0)], 0,
                          attn="flex_attention", pad_to=32)
    assert "attention_mask" not in batch and batch["sequence_ids"].dtype == torch.int32
    assert isinstance(model_forward_kwargs(batch)["attention_mask"], BlockMask)
    model = tiny_llama("flex_attention")
    assert packed_vs_alone(model, "flex_attention") < 1e-5


def test_auto_picks_flex_only_where_transformers_has_it(tmp_path):
    """attn "auto" may pick flex_attention on CUDA: only for an architecture whose
    transformers class implements it (Llama / Mistral do, GPT-2 does not)."""
    from transformers import GPT2Config, LlamaConfig

    from radis.models import default_attn_implementation, supports_flex_attention

    LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "l")
    GPT2Config(vocab_size=10, n_embd=8, n_layer=1, n_head=2).save_pretrained(tmp_path / "g")
    assert supports_flex_attention(str(tmp_path / "l")) and not supports_flex_attention(str(tmp_path / "g"))
    # generation and evaluation never use it; an explicit choice is kept for training
    assert default_attn_implementation("flex_attention", packed=False) == "sdpa"
    assert default_attn_implementation("flex_attention") == "flex_attention"
    if not torch.cuda.is_available():
        assert default_attn_implementation("auto") == "sdpa"


def _loss_and_grads(attn: str, batch: dict, device: str = "cpu", dtype=torch.float32, grads: bool = True):
    """The trainer's route: model_forward_kwargs -> RadisCausalLM -> loss (and every gradient)."""
    model = tiny_llama(attn, device, dtype).train()
    wrapper = RadisCausalLM(model, impl="torch", mode="span", w_rd=0.5)
    with torch.set_grad_enabled(grads):
        out = wrapper(labels=batch["labels"].to(device), spans=batch["spans"].to(device),
                      target_rows=batch["target_rows"].to(device), **model_forward_kwargs(batch, device))
    if not grads:
        return out.loss, {}
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}


def _same_loss_and_grads(attn: str, device: str = "cpu", dtype=torch.float32, grads: bool = True, tol: float = 1e-6,
                         layout: str | None = None):
    """`attn` (its batches collated for `layout`, default attn) through the trainer's route
    against sdpa with the packed 4D mask."""
    ds = PackedDataset.from_segments(random_segments(9, seed=1), max_tokens=32, window=16, seed=0)
    packs = [ds.pack(p) for p in range(ds.num_packs)]
    ref = _loss_and_grads("sdpa", collate_packs(packs, 0, attn="sdpa", dtype=dtype, pad_to=32), device, dtype, grads)
    got = _loss_and_grads(attn, collate_packs(packs, 0, attn=layout or attn, dtype=dtype, pad_to=32), device, dtype,
                          grads)
    torch.testing.assert_close(got[0], ref[0], atol=tol, rtol=tol)
    assert ref[1].keys() == got[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], atol=tol, rtol=max(tol, 1e-5), msg=name)


def test_flex_and_sdpa_give_the_same_loss(eager_flex):
    """flex_attention's block mask trains what sdpa with the 4D mask does (the loss; PyTorch
    has no flex_attention backward on a CPU: the gradients are the GPU test's)."""
    _same_loss_and_grads("flex_attention", grads=False)


@pytest.mark.gpu
def test_flex_and_sdpa_give_the_same_loss_and_gradients_on_cuda():
    """Compiled flex_attention (transformers compiles it) against sdpa, loss and gradients, bf16."""
    _same_loss_and_grads("flex_attention", device="cuda", dtype=torch.bfloat16, tol=2e-2)


def _reference_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A varlen attention in plain PyTorch, registered like flash_attention_2 would be: it
    reads the boundaries the caller passed (cu_seq_lens_q over the flattened B*T tokens)
    and attends within each sequence only. Without them a row is one sequence."""
    import torch.nn.functional as F

    B, H, T, D = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    _VARLEN_CALLS.append(cu is not None and kwargs.get("max_length_q") is not None)
    key = key.repeat_interleave(H // key.shape[1], dim=1)
    value = value.repeat_interleave(H // value.shape[1], dim=1)
    flat = [x.transpose(1, 2).reshape(B * T, H, D) for x in (query, key, value)]
    bounds = cu.tolist() if cu is not None else list(range(0, B * T + 1, T))
    out = torch.empty_like(flat[0])
    for s, e in itertools.pairwise(bounds):
        q, k, v = (x[s:e].transpose(0, 1)[None] for x in flat)
        out[s:e] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)[0].transpose(0, 1)
    return out.reshape(B, T, H, D), None


_VARLEN_CALLS: list[bool] = []


def test_varlen_boundaries_reach_every_attention_layer():
    """The flash path's route on a CPU: a varlen attention registered under its own name gets
    cu_seq_lens / max_length from model_forward_kwargs in every layer (no rebuilding from
    position_ids), and the packed loss and gradients equal sdpa's with the 4D mask."""
    from transformers import AttentionInterface

    AttentionInterface.register("radis_reference_varlen", _reference_varlen_attention)
    ds = PackedDataset.from_segments(random_segments(9, seed=1), max_tokens=32, window=16, seed=0)
    packs = [ds.pack(p) for p in range(ds.num_packs)]
    batch = collate_packs(packs, 0, attn="flash_attention_2", pad_to=32)
    kw = model_forward_kwargs(batch)
    assert kw["cu_seq_lens_q"] is kw["cu_seq_lens_k"] and kw["max_length_q"] == batch["max_seqlen"]
    _VARLEN_CALLS.clear()
    _loss_and_grads("radis_reference_varlen", batch)
    assert _VARLEN_CALLS == [True, True]  # 2 layers, each with the boundaries
    _same_loss_and_grads("radis_reference_varlen", layout="flash_attention_2")


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_packed_logits_equal_unpacked_flash_attention_2():
    model = tiny_llama("flash_attention_2", device="cuda", dtype=torch.bfloat16)
    # bf16 kernels: packed and alone differ only by rounding (same math, other tiling)
    assert packed_vs_alone(model, "flash_attention_2", device="cuda", dtype=torch.bfloat16) < 5e-2
    # the trainer's route (explicit varlen boundaries) against sdpa: loss and gradients
    _same_loss_and_grads("flash_attention_2", device="cuda", dtype=torch.bfloat16, tol=2e-2)


@pytest.mark.gpu
def test_packed_logits_equal_unpacked_compiled_flex_attention():
    model = tiny_llama("flex_attention", device="cuda", dtype=torch.bfloat16)
    assert packed_vs_alone(model, "flex_attention", device="cuda", dtype=torch.bfloat16) < 5e-2
