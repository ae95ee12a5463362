"""DeepSpeed JSON derivation and HF-style "auto" resolution (no process group needed)."""
import json
from pathlib import Path

import pytest

from radis.config import ConfigError, load_config
from radis.ds_config import (
    DeepSpeedConfigError,
    RunShape,
    derive_ds_config,
    load_ds_config,
    read_ds_json,
    resolve_ds_config,
)

ROOT = Path(__file__).resolve().parents[1]


def cfg_with(*overrides):
    return load_config(None, list(overrides))


def test_derived_zero3_batch_and_precision():
    cfg = cfg_with("data.packs_per_micro_batch=2", "train.gradient_accumulation_steps=4", "train.max_grad_norm=0.5")
    ds = derive_ds_config(cfg, RunShape(world_size=8, precision="bfloat16", hidden_size=64, cuda=True))
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 2 * 4 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_gather_16bit_weights_on_model_save"] is True
    assert z["reduce_bucket_size"] == 64 * 64
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert z["stage3_param_persistence_threshold"] == 640
    assert "offload_optimizer" not in z and "optimizer" not in ds and "scheduler" not in ds


def test_derived_cpu_fp32_offload_and_stage0():
    ds = derive_ds_config(cfg_with("train.offload=true"), RunShape(world_size=2))
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    z = ds["zero_optimization"]
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert z["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert "reduce_bucket_size" not in z  # hidden size unknown: DeepSpeed's defaults
    ds0 = derive_ds_config(cfg_with("train.zero_stage=0"), RunShape(world_size=1))
    assert ds0["zero_optimization"] == {"stage": 0}
    fp16 = derive_ds_config(cfg_with(), RunShape(world_size=1, precision="float16"))
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0
    with pytest.raises(DeepSpeedConfigError, match="train.offload=true needs train.zero_stage 2 or 3"):
        derive_ds_config(cfg_with("train.offload=true", "train.zero_stage=1"), RunShape(world_size=1))


HF_STYLE = {
    "fp16": {"enabled": "auto"},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def test_hf_style_auto_values_are_resolved():
    cfg = cfg_with("train.lr=3e-5", "train.adam_beta2=0.95", "train.weight_decay=0.1", "train.gradient_accumulation_steps=2",
                   "data.packs_per_micro_batch=3")
    shape = RunShape(world_size=4, precision="bfloat16", hidden_size=100, total_steps=500, warmup_steps=10)
    ds = resolve_ds_config(HF_STYLE, cfg, shape, source="hf.json")
    assert HF_STYLE["optimizer"]["params"]["lr"] == "auto"  # input untouched
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"] == {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    assert ds["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-5, "warmup_num_steps": 10,
                                         "total_num_steps": 500}
    z = ds["zero_optimization"]
    assert z["reduce_bucket_size"] == 10000 and z["stage3_prefetch_bucket_size"] == 9000
    assert z["stage3_param_persistence_threshold"] == 1000
    assert "auto" not in json.dumps(ds)


def test_missing_keys_are_filled_and_matching_values_accepted():
    cfg = cfg_with("train.zero_stage=2", "train.lr=1e-5")
    user = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1.0e-05}},
            "gradient_clipping": 1}
    ds = resolve_ds_config(user, cfg, RunShape(world_size=2), source="u.json")
    assert ds["train_batch_size"] == 2 and ds["gradient_accumulation_steps"] == 1
    assert ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["params"]["lr"] == 1e-5


@pytest.mark.parametrize("user, key, theirs, ours", [
    ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps", "8", "1"),
    ({"train_batch_size": 16}, "train_batch_size", "16", "2"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "optimizer.params.lr", "0.0001", "2e-05"),
    ({"bf16": {"enabled": True}}, "bf16.enabled", "True", "False"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage", "2", "3"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}}}, "scheduler.params.warmup_num_steps",
     "100", "0"),
])
def test_contradiction_names_key_and_both_values(user, key, theirs, ours):
    with pytest.raises(DeepSpeedConfigError) as err:
        resolve_ds_config(user, cfg_with(), RunShape(world_size=2), source="mine.json")
    msg = str(err.value)
    assert msg.startswith(f"mine.json: {key} is {theirs}") and f"gives {ours}" in msg


def test_offload_mismatch_unknown_auto_and_unknown_hidden():
    with pytest.raises(DeepSpeedConfigError, match="offload_optimizer .* but train.offload is False"):
        resolve_ds_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, cfg_with(),
                          RunShape(world_size=1))
    with pytest.raises(DeepSpeedConfigError, match="no rule to resolve \"auto\" for zero_optimization.sub_group_size"):
        resolve_ds_config({"zero_optimization": {"sub_group_size": "auto"}}, cfg_with(), RunShape(world_size=1))
    with pytest.raises(DeepSpeedConfigError, match="reduce_bucket_size is \"auto\" but the model's hidden size"):
        resolve_ds_config({"zero_optimization": {"reduce_bucket_size": "auto"}}, cfg_with(), RunShape(world_size=1))


def test_read_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": 8,\n  oops\n}\n')
    with pytest.raises(DeepSpeedConfigError, match=r"bad.json: line 3 column 3: invalid JSON"):
        read_ds_json(bad)
    with pytest.raises(DeepSpeedConfigError, match="nope.json: file not found"):
        load_ds_config(cfg_with(f"train.deepspeed_config={tmp_path / 'nope.json'}"), RunShape(world_size=1))
    assert issubclass(DeepSpeedConfigError, ConfigError)  # the CLI reports it as a config error


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_shipped_ds_configs_resolve(name):
    """The shipped JSONs (all "auto" where the config decides) resolve for a matching config."""
    overrides = {"zero3.json": [], "zero3_offload.json": ["train.offload=true"], "zero2.json": ["train.zero_stage=2"]}[name]
    cfg = cfg_with(f"train.deepspeed_config={ROOT / 'ds_configs' / name}", *overrides)
    ds = load_ds_config(cfg, RunShape(world_size=2, hidden_size=32, total_steps=10))
    assert ds["zero_optimization"]["stage"] == cfg.train.zero_stage
    assert "auto" not in json.dumps(ds)


def test_check_only_defers_what_is_not_known_yet():
    """The trainer's pre-flight: no hidden size or step counts yet, contradictions still caught."""
    user = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"},
            "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 999, "warmup_num_steps": "auto"}}}
    ds = resolve_ds_config(user, cfg_with(), RunShape(world_size=2, total_steps=None, warmup_steps=None),
                           check_only=True)
    assert ds["zero_optimization"]["reduce_bucket_size"] == "auto"
    with pytest.raises(DeepSpeedConfigError, match="cannot resolve scheduler.params.warmup_num_steps"):
        resolve_ds_config(user, cfg_with(), RunShape(world_size=2, hidden_size=8, total_steps=999, warmup_steps=None))
    with pytest.raises(DeepSpeedConfigError, match="gradient_accumulation_steps is 4"):
        resolve_ds_config({"gradient_accumulation_steps": 4}, cfg_with(), RunShape(world_size=1, warmup_steps=None),
                          check_only=True)
