"""Trainer pieces that need no process group: schedule, checkpoint bookkeeping, metrics,
pre-flight errors, export argument checks."""
from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

from radis.cli import main
from radis.data.packing import Pack, collate_packs
from radis.train import checkpoint as ckpt
from radis.train.export import ExportError, match_keys, resolve_checkpoint
from radis.train.metrics import (
    MetricsWriter,
    count_matmul_params,
    read_metrics,
    step_flops,
    sum_sq_lengths,
)
from radis.train.recipe import _example_lengths
from radis.train.schedule import LRFactor, resolve_warmup_steps

# --------------------------------------------------------------------------- schedule


def test_warmup_then_cosine_linear_inverse_sqrt_constant():
    cos = LRFactor("cosine", total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [cos(s) for s in range(2)] == [0.5, 1.0]  # the first update already moves
    assert cos(2) == pytest.approx(1.0)
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert cos(10) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)
    lin = LRFactor("linear", total_steps=10, warmup_steps=0)
    assert [lin(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    inv = LRFactor("inverse_sqrt", total_steps=100, warmup_steps=4)
    assert inv(3) == 1.0 and inv(15) == pytest.approx(math.sqrt(4 / 16))
    assert LRFactor("constant", total_steps=5, warmup_steps=1)(4) == 1.0
    values = [cos(s) for s in range(2, 11)]
    assert values == sorted(values, reverse=True)  # monotone decay


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="train.schedule"):
        LRFactor("step", total_steps=3)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        LRFactor("cosine", total_steps=3, min_lr_ratio=2.0)
    assert resolve_warmup_steps(0, 0.1, 95) == 10 and resolve_warmup_steps(7, 0.5, 95) == 7
    with pytest.raises(ValueError, match="warmup_ratio"):
        resolve_warmup_steps(0, 1.5, 10)


def test_lambda_lr_state_round_trips():
    from radis.train.schedule import build_scheduler

    def sched():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, build_scheduler(opt, LRFactor("cosine", total_steps=8, warmup_steps=2))

    opt, s = sched()
    for _ in range(5):
        opt.step()
        s.step()
    _opt2, s2 = sched()
    s2.load_state_dict(s.state_dict())
    assert s2.get_last_lr() == s.get_last_lr()


def test_a_restored_schedule_follows_a_new_total_rate_and_floor():
    from radis.train.schedule import build_scheduler, retarget_scheduler

    def sched(total, lr=0.1, floor=0.0):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        return opt, build_scheduler(opt, LRFactor("cosine", total_steps=total, warmup_steps=2, min_lr_ratio=floor))

    opt, s = sched(8)
    for _ in range(5):
        opt.step()
        s.step()
    opt2, s2 = sched(12, lr=0.05, floor=0.2)
    s2.load_state_dict(s.state_dict())
    # loading brings the saved total, floor and peak rate back
    assert s2.lr_lambdas[0].total_steps == 8 and s2.lr_lambdas[0].min_lr_ratio == 0.0 and s2.base_lrs == [0.1]
    assert retarget_scheduler(s2, LRFactor("cosine", total_steps=12, warmup_steps=2, min_lr_ratio=0.2), 0.05)
    opt3, straight = sched(12, lr=0.05, floor=0.2)  # a run that had these settings from the start
    for _ in range(5):
        opt3.step()
        straight.step()
    assert s2.get_last_lr() == straight.get_last_lr() and opt2.param_groups[0]["lr"] == opt3.param_groups[0]["lr"]
    opt2.step()
    s2.step()
    opt3.step()
    straight.step()
    assert s2.get_last_lr() == straight.get_last_lr()
    assert s2.state_dict()["base_lrs"] == [0.05]  # and it is saved so at the next checkpoint


# --------------------------------------------------------------------------- checkpoint bookkeeping


def _fake_tag(root, tag):
    (root / tag).mkdir(parents=True)
    (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")


def test_latest_prune_and_partial_removal(tmp_path):
    assert ckpt.latest_tag(tmp_path) is None and ckpt.list_tags(tmp_path / "none") == []
    for s in (5, 10, 15, 20):
        _fake_tag(tmp_path, ckpt.tag_for_step(s))
    (tmp_path / ".tmp-global_step25").mkdir()  # a save killed half way
    ckpt.write_text_atomic(tmp_path / "latest", "global_step15")
    assert ckpt.latest_tag(tmp_path) == "global_step15"
    assert ckpt.list_tags(tmp_path) == ["global_step5", "global_step10", "global_step15", "global_step20"]
    # keep the last 1 -- but never delete what `latest` names
    assert ckpt.prune(tmp_path, keep_last=1) == ["global_step5", "global_step10"]
    assert ckpt.list_tags(tmp_path) == ["global_step15", "global_step20"]
    assert ckpt.remove_partial(tmp_path) == [".tmp-global_step25"]
    assert ckpt.prune(tmp_path, keep_last=0) == []  # 0 keeps everything
    ckpt.write_text_atomic(tmp_path / "latest", "global_step99")  # names a missing directory
    assert ckpt.latest_tag(tmp_path) is None
    assert not list(tmp_path.glob(".latest.tmp*"))


def test_resume_point_is_the_newest_complete_checkpoint_and_says_why(tmp_path):
    """latest may name a deleted tag, lag behind a newer complete one, or be missing: the
    newest complete checkpoint is resumed with a note, never a silent start at step 0."""
    assert ckpt.resume_point(tmp_path) == (None, None)
    for s in (2, 4):
        _fake_tag(tmp_path, ckpt.tag_for_step(s))
    (tmp_path / ".tmp-global_step6").mkdir()  # incomplete: never chosen
    tag, note = ckpt.resume_point(tmp_path)
    assert tag == "global_step4" and "no `latest` file" in note
    ckpt.write_text_atomic(tmp_path / "latest", "global_step4")
    assert ckpt.resume_point(tmp_path) == ("global_step4", None)
    ckpt.write_text_atomic(tmp_path / "latest", "global_step2")  # killed after the rename of step 4
    tag, note = ckpt.resume_point(tmp_path)
    assert tag == "global_step4" and "global_step4 is newer and complete" in note
    ckpt.write_text_atomic(tmp_path / "latest", "global_step9")  # names a missing directory
    tag, note = ckpt.resume_point(tmp_path)
    assert tag == "global_step4" and "'global_step9', which does not exist" in note
    empty = tmp_path / "empty"
    empty.mkdir()
    ckpt.write_text_atomic(empty / "latest", "global_step9")
    with pytest.raises(ckpt.CheckpointStateError, match="no complete checkpoint to resume from; delete"):
        ckpt.resume_point(empty)


def test_rng_state_round_trip():
    import random

    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item()) == a


def test_trainer_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    path = tmp_path / "trainer_state_rank0.pt"
    np.random.randn()  # numpy's cached gaussian is part of its state
    torch.save({"loader": {"epoch": 1, "position": 3, "shuffle": True}, "rng": ckpt.rng_state()}, path)
    a = (random.random(), np.random.randn(), torch.rand(1).item())
    state = ckpt.load_weights_only(path, map_location="cpu")
    ckpt.set_rng_state(state["rng"])
    assert (random.random(), np.random.randn(), torch.rand(1).item()) == a and state["loader"]["position"] == 3


class _Payload:
    """A pickle that writes a file when it is loaded: what must never run on resume or export."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_in_a_checkpoint_never_runs(tmp_path, capsys):
    """A payload placed as trainer state or as DeepSpeed's model states file is refused
    by name, on resume and on export, and its code does not run."""
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "trainer_state_rank0.pt"
    torch.save({"loader": _Payload(marker)}, evil)
    with pytest.raises(ckpt.CheckpointStateError, match=r"trainer_state_rank0.pt: holds pickled Python objects"):
        ckpt.load_weights_only(evil)
    with ckpt.weights_only_loading(), pytest.raises(ckpt.CheckpointStateError):
        torch.load(evil, weights_only=False)  # what DeepSpeed's own loaders ask for
    assert torch.load is ckpt._TORCH_LOAD  # restored after the block
    tag = tmp_path / "checkpoints" / "global_step1"
    (tag / "hf").mkdir(parents=True)
    (tag / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 16, "hidden_size": 8,
                                                         "intermediate_size": 8, "num_hidden_layers": 1,
                                                         "num_attention_heads": 1}))
    torch.save({"module": _Payload(marker)}, tag / "mp_rank_00_model_states.pt")
    assert main(["export", "--checkpoint", str(tag), "--out", str(tmp_path / "hf")]) == 2
    assert "holds pickled Python objects" in capsys.readouterr().err
    assert not marker.exists()


# --------------------------------------------------------------------------- metrics


def _batch():
    packs = [Pack(np.arange(3, 8, dtype=np.int32), np.array([0, 1, 1, 2, 2], dtype=np.int8), [3, 2], ["a", "b"]),
             Pack(np.arange(3, 11, dtype=np.int32), np.array([0] * 3 + [1] * 5, dtype=np.int8), [8], ["c"])]
    return collate_packs(packs, pad_token_id=0, attn="sdpa", pad_to=8)


def test_attention_flops_count_examples_not_packs():
    b = _batch()
    # row 0: examples of 3 and 2 tokens + a 3-token padding tail; row 1: one example of 8
    assert b["cu_seqlens"].tolist() == [0, 3, 5, 8, 16]
    lens = _example_lengths(b)
    assert lens.tolist() == [3, 2, 8]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    assert sum_sq_lengths(cu) == 9 + 4 + 64
    assert step_flops(100, n_layers=2, hidden=8, tokens=13, sum_sq=77) == 6 * 100 * 13 + 12 * 2 * 8 * 77


def test_bench_train_gives_the_hf_side_radis_trains_deepspeed_json(tmp_path):
    """The HF Trainer side gets the ZeRO bucket sizes radis train derives from the model's
    hidden size (it ran on DeepSpeed's defaults, 5e8 / 5e7 / 1e5), and no train_batch_size;
    each side's table row prints on its own as that side ends."""
    from transformers import LlamaConfig

    from radis.config import load_config

    LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64).save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.name_or_path={tmp_path}", "train.zero_stage=3"])
    ds = load_benchmark("bench_train").hf_ds_config(cfg, world=2, dtype=torch.float32, cuda=False)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 96 * 96
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 96 * 96) and zero["stage3_param_persistence_threshold"] == 960
    assert "train_batch_size" not in ds
    rows = load_benchmark("bench_train")._table({"radis train": {"tokens_per_s": 900.4, "mfu": 0.4512, "peak_mem_gb": 1.5}},
                                 {"HF Trainer": "exit status 137"}, only="radis train")
    assert rows[2:] == ["| radis train | 900 | 45.12% | 1.50 |"]


def test_bench_train_gives_both_sides_one_cpu_peak(monkeypatch):
    """benchmarks/bench_train.py measures the CPU peak once and hands the same value to the
    ranks of both trainers, so their MFU columns are in the ratio of their tokens/s; a
    peak the user set is passed through untouched."""
    import argparse

    from radis.train.metrics import peak_flops_per_rank

    bench = load_benchmark("bench_train")
    monkeypatch.delenv("RADIS_PEAK_TFLOPS", raising=False)
    cpu = argparse.Namespace(gpu=False)
    ours, hf = bench.rank_env(cpu), bench.rank_env(cpu)
    assert ours["RADIS_PEAK_TFLOPS"] == hf["RADIS_PEAK_TFLOPS"] and float(ours["RADIS_PEAK_TFLOPS"]) > 0
    assert ours["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("RADIS_PEAK_TFLOPS", ours["RADIS_PEAK_TFLOPS"])
    assert peak_flops_per_rank(torch.device("cpu")) == pytest.approx(float(ours["RADIS_PEAK_TFLOPS"]) * 1e12)
    monkeypatch.setenv("RADIS_PEAK_TFLOPS", "12.5")
    assert bench.rank_env(cpu)["RADIS_PEAK_TFLOPS"] == "12.5"
    monkeypatch.delenv("RADIS_PEAK_TFLOPS")
    assert "RADIS_PEAK_TFLOPS" not in bench.rank_env(argparse.Namespace(gpu=True))  # the card's datasheet peak


def test_matmul_params_leave_out_the_input_embedding():
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2}
    untied = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **kw))
    tied = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **kw))
    total = sum(p.numel() for p in untied.parameters())
    assert count_matmul_params(untied) == total - 50 * 16  # the head stays, the lookup table goes
    assert count_matmul_params(tied) == sum(p.numel() for p in tied.parameters())  # shared: counted once


def test_metrics_writer_jsonl_tensorboard_and_truncate_on_resume(tmp_path):
    w = MetricsWriter(tmp_path, active=True)
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step, "lr": 0.1})
    w.write(3, {"loss": 0.5}, kind="valid")
    w.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # a line cut by a crash
    w2 = MetricsWriter(tmp_path, active=True, tensorboard=False, resume_step=2)
    w2.write(3, {"loss": 0.3})
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl", kind=None)] == [
        ("train", 1), ("train", 2), ("train", 3)]
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"] == 0.3
    MetricsWriter(tmp_path / "other", active=False).write(1, {"loss": 1.0})  # non-zero ranks write nothing
    assert not (tmp_path / "other").exists()


def _tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows them (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_fresh_run_starts_clean_metrics_and_a_resumed_one_keeps_its_own(tmp_path):
    # a run that crashed before its first checkpoint logged steps 0..2
    w = MetricsWriter(tmp_path, active=True)
    w.write(0, {"loss": 2.0}, kind="valid")
    for step in (1, 2):
        w.write(step, {"loss": 1.0 / step})
    w.close()
    # started again with no checkpoint to resume: a fresh run, whose steps 0.. are all trained again
    w = MetricsWriter(tmp_path, active=True)
    w.write(0, {"loss": 1.5}, kind="valid")
    w.write(1, {"loss": 0.9})
    w.close()
    assert [(r["kind"], r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl", kind=None)] == [
        ("valid", 0, 1.5), ("train", 1, 0.9)]
    assert _tensorboard_scalars(tmp_path / "tensorboard") == {"valid/loss": [(0, 1.5)], "train/loss": [(1, 0.9)]}
    # resumed from a checkpoint of step 1 (even one of step 0): the records up to it stay
    w = MetricsWriter(tmp_path, active=True, resume_step=1)
    w.write(2, {"loss": 0.8})
    w.close()
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl", kind=None)] == [
        ("valid", 0), ("train", 1), ("train", 2)]
    assert _tensorboard_scalars(tmp_path / "tensorboard") == {"valid/loss": [(0, 1.5)],
                                                              "train/loss": [(1, 0.9), (2, 0.8)]}
    MetricsWriter(tmp_path, active=True, tensorboard=False, resume_step=0).close()
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl", kind=None)] == [("valid", 0)]


# --------------------------------------------------------------------------- pre-flight (no process group)


def _config(tmp_path, body: str):
    p = tmp_path / "c.yaml"
    p.write_text(body)
    return str(p)


def test_preflight_errors_name_the_field_before_any_process_group(tmp_path, capsys, sp_tokenizer):
    import torch.distributed as dist

    from radis.runtime import cpu_supports_float16

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text("")
    cases = [
        (f"model: {{name_or_path: {tmp_path / 'nope'}}}\ndata: {{train: [{{path: {data}}}]}}\n",
         "model.name_or_path:"),
        (f"model: {{name_or_path: {model}}}\ndata: {{train: [{{path: {tmp_path / 'missing.jsonl'}}}]}}\n",
         f"data.train[0].path: {tmp_path / 'missing.jsonl'}: no such file"),
        ((f"model: {{name_or_path: {model}}}\ndata: {{train: [{{path: {data}}}], valid: [{{path: {data}, "
         f"target_path: {tmp_path / 'x.en'}}}]}}\n"), "data.valid[0].target_path"),
        (f"model: {{name_or_path: {model}}}\n", "data.train: no training sources"),
        ((f"model: {{name_or_path: {model}}}\ndata: {{train: [{{path: {data}}}]}}\n"
         f"train: {{deepspeed_config: {tmp_path / 'ds.json'}}}\n"), "ds.json: file not found"),
        ((f"model: {{name_or_path: {model}}}\ndata: {{train: [{{path: {data}}}]}}\nloss: {{method: vanilla, "
         "kd_weight: 0.5}\n"), "loss.kd_weight > 0 needs loss.method=radis"),
    ]
    cases.append(((f"model: {{name_or_path: {model}, dtype: float16}}\ndata: {{train: [{{path: {data}}}]}}\n"
                   "train: {zero_stage: 0}\n"), "model.dtype=float16 needs train.zero_stage >= 1"))
    if not torch.cuda.is_available() and not cpu_supports_float16():
        cases.append(((f"model: {{name_or_path: {model}, dtype: float16}}\ndata: {{train: [{{path: {data}}}]}}\n"),
                      "model.dtype=float16: DeepSpeed trains in float16 on a CPU only where oneDNN has fp16"))
    if not torch.cuda.is_available():
        cases.append(((f"model: {{name_or_path: {model}, attn_implementation: flex_attention}}\n"
                       f"data: {{train: [{{path: {data}}}]}}\n"),
                      "model.attn_implementation=flex_attention: PyTorch's flex_attention has no backward pass"))
    (tmp_path / "bad_ds.json").write_text(json.dumps({"gradient_accumulation_steps": 3}))
    cases.append(((f"model: {{name_or_path: {model}}}\ndata: {{train: [{{path: {data}}}]}}\n"
                  f"train: {{deepspeed_config: {tmp_path / 'bad_ds.json'}}}\n"),
                  "gradient_accumulation_steps is 3 but train.gradient_accumulation_steps gives 1"))
    (tmp_path / "out" / "checkpoints" / "global_step4").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "latest").write_text("global_step4")
    cases.append(((f"model: {{name_or_path: {model}}}\ndata: {{train: [{{path: {data}}}]}}\n"
                  f"train: {{output_dir: {tmp_path / 'out'}, resume: never}}\n"),
                  "already holds checkpoints (latest global_step4); use train.resume=auto"))
    (tmp_path / "lost" / "checkpoints").mkdir(parents=True)
    (tmp_path / "lost" / "checkpoints" / "latest").write_text("global_step2")
    cases.append(((f"model: {{name_or_path: {model}}}\ndata: {{train: [{{path: {data}}}]}}\n"
                  f"train: {{output_dir: {tmp_path / 'lost'}}}\n"),
                  "names 'global_step2', which does not exist, and there is no complete checkpoint"))
    for body, expected in cases:
        assert main(["train", "--config", _config(tmp_path, body)]) == 2
        err = capsys.readouterr().err
        assert "radis train: config error:" in err and expected in err, (expected, err)
    assert not dist.is_initialized()


# --------------------------------------------------------------------------- export arguments


def test_export_checkpoint_resolution_errors(tmp_path):
    with pytest.raises(ExportError, match="no such directory"):
        resolve_checkpoint(tmp_path / "none")
    with pytest.raises(ExportError, match="neither a checkpoints root"):
        resolve_checkpoint(tmp_path)
    _fake_tag(tmp_path, "global_step3")
    assert resolve_checkpoint(tmp_path / "global_step3") == (tmp_path, "global_step3")
    (tmp_path / "latest").write_text("global_step9")
    with pytest.raises(ExportError, match="`latest` names 'global_step9'"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("global_step3")
    assert resolve_checkpoint(tmp_path) == (tmp_path, "global_step3")
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2  # no hf/ config


def test_wrapper_prefix_is_stripped_to_match_the_model():
    sd = {"model.lm_head.weight": 1, "model.model.embed_tokens.weight": 2}
    assert match_keys(sd, {"lm_head.weight", "model.embed_tokens.weight"}) == {
        "lm_head.weight": 1, "model.embed_tokens.weight": 2}
    with pytest.raises(ExportError, match="do not match"):
        match_keys({"x.y": 1}, {"lm_head.weight"})


@pytest.mark.parametrize("name", ["llama2_7b_chat", "mistral_7b_instruct", "smollm2_cpu"])
def test_recipes_load_and_derive_a_deepspeed_config(name):
    from pathlib import Path

    from radis.config import load_config
    from radis.ds_config import RunShape, derive_ds_config

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml"
    header = path.read_text().split("\n\n")[0]
    assert "launch/" in header or "torchrun" in header  # the header comment gives the launch command
    cfg = load_config(path)
    ds = derive_ds_config(cfg, RunShape(world_size=8, precision="bfloat16", hidden_size=4096, cuda=True))
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == cfg.data.packs_per_micro_batch * cfg.train.gradient_accumulation_steps * 8


# --------------------------------------------------------------------------- launchers


def _launcher(tmp_path, script: str, *args: str, **env: str) -> tuple[int, list[str], str]:
    """Run launch/<script> with a fake `deepspeed` first on PATH that writes its arguments
    one per line (to tmp_path/argv) and the env file DS_ENV_FILE names, if any (to
    tmp_path/ds_env); returns (exit status, those arguments, stderr)."""
    import os
    import subprocess
    from pathlib import Path

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    argv, ds_env = tmp_path / "argv", tmp_path / "ds_env"
    fake = bin_dir / "deepspeed"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {argv}\n'
                    f'if [[ -n "${{DS_ENV_FILE:-}}" ]]; then cp "$DS_ENV_FILE" {ds_env}; fi\n')
    fake.chmod(0o755)
    argv.unlink(missing_ok=True)
    ds_env.unlink(missing_ok=True)
    clean = {k: v for k, v in os.environ.items()
             if k not in {"CUDA_VISIBLE_DEVICES", "NUM_GPUS", "RADIS_CPU", "DS_ACCELERATOR", "OMP_NUM_THREADS"}}
    clean.update(PATH=f"{bin_dir}:{clean.get('PATH', '')}", **env)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", f"launch/{script}", *args], cwd=root, env=clean,
                          capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, argv.read_text().splitlines() if argv.exists() else [], proc.stderr


def _single_node(tmp_path, **env: str) -> tuple[int, list[str], str]:
    return _launcher(tmp_path, "single_node.sh", "x.yaml", "train.lr=1e-5", **env)


def test_multi_node_launcher_carries_the_environment_pdsh_would_drop(tmp_path):
    """pdsh starts every rank over ssh with only what DeepSpeed exports (PYTHON*, NCCL*, the
    lines of its env file): CPU mode, offline hub and radis' own variables travel in an env
    file of the run, after the user's ~/.deepspeed_env, which DS_ENV_FILE would hide."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("NCCL_IB_DISABLE=1\nHF_HUB_OFFLINE=0\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    rc, argv, err = _launcher(tmp_path, "multi_node.sh", "x.yaml", "train.lr=1e-5", HOME=str(home),
                              HOSTFILE=str(hostfile), RADIS_CPU="1", HF_HUB_OFFLINE="1", RADIS_FAULT_KILL_AT_STEP="3")
    assert rc == 0, err
    assert argv[argv.index("--master_addr") + 1] == "node0" and argv[-4:] == ["train", "--config", "x.yaml",
                                                                             "train.lr=1e-5"]
    lines = (tmp_path / "ds_env").read_text().splitlines()
    assert lines[:2] == ["NCCL_IB_DISABLE=1", "HF_HUB_OFFLINE=0"]  # the user's first, then this run's (they win)
    carried = dict(line.split("=", 1) for line in lines[2:])
    assert carried["DS_ACCELERATOR"] == "cpu" and carried["OMP_NUM_THREADS"] == "1"
    assert carried["HF_HUB_OFFLINE"] == "1" and carried["RADIS_CPU"] == "1" and carried["RADIS_FAULT_KILL_AT_STEP"] == "3"


def test_cpu_mode_wins_over_a_visible_gpu(monkeypatch):
    """The DeepSpeed launcher sets CUDA_VISIBLE_DEVICES afresh for every rank, so RADIS_CPU's
    empty one does not reach the ranks: radis itself reads DS_ACCELERATOR=cpu."""
    import torch

    from radis.models import default_dtype
    from radis.runtime import default_device, resolve_backend, use_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert use_cuda() and resolve_backend("auto") == "nccl"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert not use_cuda() and resolve_backend("auto") == "gloo"
    assert default_device() == torch.device("cpu") and default_dtype("auto") == torch.float32
    from radis.train.checkpoint import rng_state

    assert "cuda" not in rng_state()  # no CUDA context opened on every GPU at each checkpoint


def test_single_node_launcher_keeps_the_gpus_of_cuda_visible_devices(tmp_path):
    # --num_gpus would make DeepSpeed drop CUDA_VISIBLE_DEVICES and train on GPUs 0..N-1
    rc, argv, err = _single_node(tmp_path, CUDA_VISIBLE_DEVICES="2,3")
    assert rc == 0, err
    assert argv[:2] == ["--include", "localhost:2,3"] and "--num_gpus" not in argv
    assert argv[-5:] == ["radis.cli", "train", "--config", "x.yaml", "train.lr=1e-5"]
    rc, argv, err = _single_node(tmp_path, CUDA_VISIBLE_DEVICES="5,2,7", NUM_GPUS="2")  # the first 2 of them
    assert rc == 0 and argv[:2] == ["--include", "localhost:5,2"], err
    rc, argv, err = _single_node(tmp_path, CUDA_VISIBLE_DEVICES="2,3", NUM_GPUS="3")
    assert rc == 2 and not argv and "NUM_GPUS=3: expected 1 to 2, the GPUs in CUDA_VISIBLE_DEVICES=2,3" in err
    rc, argv, err = _single_node(tmp_path, CUDA_VISIBLE_DEVICES="GPU-1a2b")
    assert rc == 2 and not argv and "expected GPU indices" in err
    # without CUDA_VISIBLE_DEVICES (and with RADIS_CPU=1, which hides CUDA) the count stays
    rc, argv, err = _single_node(tmp_path, NUM_GPUS="4")
    assert rc == 0 and argv[:2] == ["--num_gpus", "4"], err
    rc, argv, err = _single_node(tmp_path, RADIS_CPU="1", CUDA_VISIBLE_DEVICES="1")
    assert rc == 0 and argv[:2] == ["--num_gpus", "2"], err


# --------------------------------------------------------------------------- heartbeats


def test_heartbeats_name_the_rank_that_stopped(monkeypatch):
    """Three ranks beat into a real TCPStore; rank 2 stops: rank 0's diagnosis names it,
    with its last step; with every rank beating it says so; a store that went away is
    reported as such."""
    import socket

    import torch.distributed as dist

    from radis.train.heartbeat import Heartbeat, is_collective_failure

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    beats = [Heartbeat.connect(r, 3, interval=0.2) for r in range(3)]
    try:
        assert all(b is not None for b in beats) and Heartbeat.connect(0, 1) is None  # one rank: no heartbeat
        for b in beats:
            b.step = 7
        time.sleep(0.5)
        assert beats[0].lost_ranks(wait=0.3).lost == []
        assert "every rank is still beating" in beats[0].lost_ranks(wait=0.1).describe("x")
        beats[2].step = 9
        time.sleep(0.3)
        beats[2].stop()  # rank 2 dies
        d = beats[0].lost_ranks()
        assert d.lost == [2] and d.steps == {2: 9} and d.ages[2] > 0.5
        assert re.fullmatch(r"lost rank 2 \(last heard \d+ s ago, after step 9\)", d.describe("127.0.0.1:1"))
    finally:
        for b in beats[:2]:
            b.stop()
    del server
    gone = beats[0].lost_ranks(wait=0.1)
    assert gone.store_gone and "cannot be reached" in gone.describe("127.0.0.1:1")
    assert is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"))
    # seen on the two-host cluster, a host cut off under torchrun (tests/test_cluster.py)
    assert is_collective_failure(RuntimeError("Application timeout caused pair closure"))
    assert not is_collective_failure(ValueError("bad"))
