"""2-rank DeepSpeed ZeRO-3 check of the fused RaDis head (launched by tests/test_loss_zero3.py).

    torchrun --nproc_per_node 2 tests/dist_scripts/zero3_loss.py

Each rank trains on its own micro-batch with the GLOBAL token counts as normaliser. The
engine's loss must equal the unfused reference (HF logits -> F.cross_entropy per span)
on every rank, and the full gradient of the tied LM-head / embedding weight
(deepspeed.utils.safe_get_full_grad) must equal the reference gradient averaged over
ranks (DeepSpeed averages gradients across data-parallel ranks).
"""
import copy
import os
import sys

import deepspeed
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from radis.loss import radis_linear_loss
from radis.loss_head import RadisCausalLM

W_MT, W_RD, MODE = 1.0, 0.5, os.environ.get("RADIS_TEST_MODE", "span")


def make_batches(vocab, n_ranks=2, b=2, t=13):
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(n_ranks):
        ids = torch.randint(0, vocab, (b, t), generator=g)
        spans = torch.zeros(b, t, dtype=torch.int8)
        spans[:, 4:8] = 1
        spans[:, 8:12] = 2
        labels = torch.full((b, t), -100, dtype=torch.int64)
        labels[:, :-1] = ids[:, 1:]  # shifted: row i predicts token i+1
        labels[spans == 0] = -100
        labels[0, 5] = -100  # an ignored target inside a span
        pos = torch.arange(t).expand(b, t).contiguous()
        batches.append({"input_ids": ids, "labels": labels, "spans": spans, "position_ids": pos})
    return batches


def reference_loss(model, batch, n_mt, n_rd):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.double()
    logits = logits.reshape(-1, logits.shape[-1])
    labels, spans = batch["labels"].reshape(-1), batch["spans"].reshape(-1)
    s_mt = F.cross_entropy(logits, torch.where(spans == 1, labels, -100), reduction="sum")
    s_rd = F.cross_entropy(logits, torch.where(spans == 2, labels, -100), reduction="sum")
    if MODE == "pooled":
        return (W_MT * s_mt + W_RD * s_rd) / (n_mt + n_rd)
    return W_MT * s_mt / n_mt + W_RD * s_rd / n_rd


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float()
    assert model.lm_head.weight is model.model.embed_tokens.weight, "expected a tied head"
    ref = copy.deepcopy(model).double()

    batches = make_batches(cfg.vocab_size, world)
    n_mt = sum(int(((b["spans"] == 1) & (b["labels"] != -100)).sum()) for b in batches)
    n_rd = sum(int(((b["spans"] == 2) & (b["labels"] != -100)).sum()) for b in batches)

    wrapper = RadisCausalLM(model, w_mt=W_MT, w_rd=W_RD, mode=MODE, impl="torch", chunk_size=7)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=wrapper, optimizer=torch.optim.AdamW(wrapper.parameters(), lr=1e-3), config=ds_config
    )
    head = engine.module.model.lm_head.weight
    # The trap is real: outside a forward the head weight is an empty shard.
    assert hasattr(head, "ds_id") and head.numel() == 0, f"lm_head.weight not partitioned: {head.shape}"
    try:  # ... and an ungathered fused loss is refused, not silently wrong
        radis_linear_loss(torch.zeros(3, cfg.hidden_size), head, torch.zeros(3, dtype=torch.long),
                          torch.ones(3, dtype=torch.long))
        raise AssertionError("radis_linear_loss accepted an empty ZeRO-3 shard")
    except ValueError as err:
        assert "weight" in str(err), err

    out = engine(**batches[rank], normalizer={"mt": n_mt, "rd": n_rd})
    engine.backward(out.loss)
    full_grad = deepspeed.utils.safe_get_full_grad(head)
    q_grad = deepspeed.utils.safe_get_full_grad(engine.module.model.model.layers[0].self_attn.q_proj.weight)

    ref_losses = [reference_loss(ref, b, n_mt, n_rd) for b in batches]
    sum(ref_losses).backward()
    want_head = ref.lm_head.weight.grad / world
    want_q = ref.model.layers[0].self_attn.q_proj.weight.grad / world

    err_loss = abs(out.loss.item() - ref_losses[rank].item())
    err_head = (full_grad.double() - want_head).abs().max().item() / want_head.abs().max().item()
    err_q = (q_grad.double() - want_q).abs().max().item() / want_q.abs().max().item()
    print(f"rank {rank}: loss {out.loss.item():.6f} ref {ref_losses[rank].item():.6f} "
          f"rel err head grad {err_head:.2e} q_proj grad {err_q:.2e}", flush=True)
    ok = err_loss < 1e-5 and err_head < 1e-4 and err_q < 1e-4 and full_grad.abs().max() > 0
    ok = ok and int(out.n_mt) + int(out.n_rd) > 0
    engine.step()  # the optimizer step runs with these gradients
    torch.distributed.barrier()
    # a process that exits with its gloo group alive aborts now and then at interpreter
    # teardown (radis.runtime._leave_before_interpreter_exit)
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
