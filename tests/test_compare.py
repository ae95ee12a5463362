"""`radis compare` and the demo: the stage plan of every arm, resume rules, the table, and one
end-to-end comparison of every arm on a tiny model (real commands, 1 rank).

The full demo (SmolLM2, ~15 minutes) is `make demo`, not a unit test.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from radis.compare import (
    ARMS,
    CompareError,
    build_plan,
    command_line,
    compare,
    comparison_table,
    parse_arms,
    run_plan,
)
from radis.config import load_config
from radis.demo import DEFAULT_CONFIG, demo_data, demo_overrides, main

ALL = ["vanilla", "radis", "radis_kd", "radis_ask", "seqkd", "sdft"]


def _cfg_of(stage):
    # parsed by the stage's own command-line parser, as the stage's process will parse it
    import importlib

    from radis.cli import SUBCOMMANDS, parse_subcommand

    module_name, help_text = SUBCOMMANDS[stage.argv[0]]
    args = parse_subcommand(importlib.import_module(module_name), stage.argv[0], help_text, stage.argv[1:])
    return load_config(args.config, args.overrides)


def test_plan_of_every_arm_is_a_set_of_valid_commands(tmp_path):
    plan = build_plan(DEFAULT_CONFIG, tmp_path, ALL, demo_overrides(DEFAULT_CONFIG))
    names = [s.name for s in plan.stages]
    assert names == ["generate-rationales", "generate-rationales-ask", "generate-seqkd", "generate-sdft",
                     *[f"train-{a}" for a in ALL], *[f"export-{a}" for a in ALL], "evaluate"]
    train, test = demo_data()
    cfgs = {s.name: _cfg_of(s) for s in plan.stages if "--config" in s.argv}  # any unknown key would raise
    gen = tmp_path / "generate"
    # one generation of rationales serves radis and radis_kd; it records the top-k for the KD arm
    assert cfgs["generate-rationales"].rationale.topk == 20 and cfgs["generate-rationales"].rationale.strategy == "continue"
    assert cfgs["generate-seqkd"].rationale.topk == 0 and cfgs["generate-sdft"].rationale.strategy == "sdft"
    # a changed generation config replaces the stage's own directory instead of being refused
    assert all(c.rationale.overwrite for n, c in cfgs.items() if n.startswith("generate-"))
    after = {s.name: s.after for s in plan.stages}
    assert after["train-vanilla"] == () and after["train-radis_kd"] == ("generate-rationales",)
    assert after["export-sdft"] == ("train-sdft",) and after["evaluate"] == tuple(f"export-{a}" for a in ALL)
    assert all(c.data.train[0].path == str(train) for n, c in cfgs.items() if n.startswith("generate-"))
    assert cfgs["train-vanilla"].data.train[0].path == str(train) and cfgs["train-vanilla"].loss.method == "vanilla"
    assert cfgs["train-radis"].data.train[0].path == str(gen / "rationales") and cfgs["train-radis"].loss.kd_weight == 0
    assert cfgs["train-radis_kd"].data.train[0].path == str(gen / "rationales") and cfgs["train-radis_kd"].loss.kd_weight == 0.5
    assert cfgs["train-seqkd"].data.train[0].path == str(gen / "seqkd") and cfgs["train-seqkd"].loss.method == "vanilla"
    assert cfgs["train-sdft"].train.output_dir == str(tmp_path / "sdft")
    ev = cfgs["evaluate"]
    assert ev.eval.models == ["original=smollm2"] + [f"{a}={tmp_path / a / 'hf'}" for a in ALL]
    assert ev.eval.test[0].path == str(test) and ev.eval.output_dir == str(tmp_path / "eval")
    dist = command_line(plan.stages[4], 2)
    assert "torch.distributed.run" in dist and "--nproc_per_node=2" in dist and dist[-len(plan.stages[4].argv):] == plan.stages[4].argv
    assert "torch.distributed.run" not in command_line(plan.stages[-2], 2)
    # without radis_kd no top-k is recorded
    plain = build_plan(DEFAULT_CONFIG, tmp_path, ["radis"], demo_overrides(DEFAULT_CONFIG))
    assert _cfg_of(plain.stages[0]).rationale.topk == 0


def test_arm_errors():
    assert parse_arms("vanilla, radis,vanilla") == ["vanilla", "radis"]
    with pytest.raises(CompareError, match=r"unknown arm\(s\) \['distill'\]; the arms are: vanilla"):
        parse_arms("vanilla,distill")
    with pytest.raises(CompareError, match="radis_other needs compare.other_generator"):
        build_plan(DEFAULT_CONFIG, Path("/tmp/x"), ["radis_other"])
    assert set(ARMS) >= {"vanilla", "radis", "radis_kd", "seqkd", "sdft", "radis_other"}


def _fake_finished(plan, tmp_path, monkeypatch):
    """Every stage of `plan` finished (by run_plan over fake stages), and a summary to report."""
    with monkeypatch.context() as m:
        assert _run_fake(m, plan) == (0, [s.name for s in plan.stages], set())
    row = {"model": "radis", "bleu_raw": 2.5, "bleu_cut": 5.7, "chrf_raw": 20.0, "chrf_cut": 24.1, "comet_cut": None,
           "directions": {"de-en": {"n": 40, "bleu_raw": 2.5, "bleu_cut": 5.7, "chrf_raw": 20.0, "chrf_cut": 24.1,
                                    "comet_cut": None}},
           "retention": {"kl": 0.113, "nll_tuned": 0.78, "nll_original": 0.89, "changed": 0.9, "chrf_to_original": 48.3}}
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"models": [row], "signatures": {}}), encoding="utf-8")


def test_finished_stages_are_skipped_and_the_table_printed(tmp_path, capsys, monkeypatch):
    plan = build_plan(DEFAULT_CONFIG.resolve(), tmp_path, ["vanilla", "radis"], demo_overrides(DEFAULT_CONFIG))
    _fake_finished(plan, tmp_path, monkeypatch)
    capsys.readouterr()
    state = json.loads((tmp_path / "stages.json").read_text(encoding="utf-8"))
    assert main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == len(plan.stages)
    assert "24.10" in out and "0.113" in out and "90%" in out
    table = (tmp_path / "comparison.md").read_text()
    assert "| radis | 2.50 | 5.70 | 20.00 | 24.10 | - | 0.113 | 0.780 | 0.890 | 90% | 48.3 | - | - |" in table

    # a stage whose command changed runs again (here it fails at once: its checkpoint is a stub)
    state["export-radis"]["command"] = ["export", "--checkpoint", "elsewhere"]
    (tmp_path / "stages.json").write_text(json.dumps(state), encoding="utf-8")
    assert main(["--out", str(tmp_path), "--nproc", "1"]) != 0
    captured = capsys.readouterr()
    assert "[export-radis] its command or config changed since it ran: running it again" in captured.out
    assert "stage export-radis failed" in captured.err


def test_a_stage_reruns_only_when_a_section_it_reads_changes(tmp_path):
    from radis.compare import stage_identity

    base = build_plan(DEFAULT_CONFIG, tmp_path, ["vanilla", "radis"], demo_overrides(DEFAULT_CONFIG))
    evalchange = build_plan(DEFAULT_CONFIG, tmp_path, ["vanilla", "radis"],
                            [*demo_overrides(DEFAULT_CONFIG), "eval.max_new_tokens=99"])
    losschange = build_plan(DEFAULT_CONFIG, tmp_path, ["vanilla", "radis"],
                            [*demo_overrides(DEFAULT_CONFIG), "train.lr=0.5"])
    h = {name: {s.name: stage_identity(s) for s in p.stages} for name, p in
         (("base", base), ("eval", evalchange), ("train", losschange))}
    assert h["eval"]["evaluate"] != h["base"]["evaluate"] and h["eval"]["train-radis"] == h["base"]["train-radis"]
    assert h["train"]["train-radis"] != h["base"]["train-radis"] and h["train"]["evaluate"] == h["base"]["evaluate"]
    assert h["train"]["generate-rationales"] == h["base"]["generate-rationales"]


def _run_fake(monkeypatch, plan, *, redo=(), fail=None, log=lambda m: None):
    """run_plan with every stage faked: a stage 'runs' by leaving a file in its workdir and
    writing its output (not when it is `fail`, which exits 1 as if killed mid-run).
    Returns (exit status, the stages that ran, those that found their workdir's earlier
    file: not emptied, i.e. resumed)."""
    ran: list[str] = []
    found: set[str] = set()

    def fake_run(cmd, env=None, check=False):
        s = next(s for s in plan.stages if cmd[-len(s.argv):] == s.argv)
        ran.append(s.name)
        mark = s.workdir / "earlier-run"
        if mark.exists():
            found.add(s.name)
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
        if s.name == fail:
            return SimpleNamespace(returncode=1)
        s.output.parent.mkdir(parents=True, exist_ok=True)
        s.output.touch()
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr("radis.compare.subprocess", SimpleNamespace(run=fake_run))
    rc = run_plan(plan, nproc=1, redo=redo, log=log)
    return rc, ran, found


def _plan(tmp_path, *extra):
    return build_plan(DEFAULT_CONFIG.resolve(), tmp_path, ["vanilla", "radis"], [*demo_overrides(DEFAULT_CONFIG), *extra])


# emptied: the stages that found their directory empty (an arm's export writes inside its training's)
@pytest.mark.parametrize("extra, redo, expected, emptied", [
    (["train.lr=3e-4"], (), ["train-vanilla", "train-radis", "export-vanilla", "export-radis", "evaluate"],
     {"train-vanilla", "train-radis", "export-vanilla", "export-radis"}),
    (["rationale.max_new_tokens=64"], (), ["generate-rationales", "train-radis", "export-radis", "evaluate"],
     {"train-radis", "export-radis"}),
    ([], ("train-radis",), ["train-radis", "export-radis", "evaluate"], {"train-radis", "export-radis"}),
    ([], ("generate-rationales",), ["generate-rationales", "train-radis", "export-radis", "evaluate"],
     {"generate-rationales", "train-radis", "export-radis"}),
    (["eval.max_new_tokens=99"], (), ["evaluate"], set()),
    ([], (), [], set()),
], ids=["train-setting", "rationale-setting", "redo-train", "redo-generate", "eval-setting", "nothing"])
def test_a_stage_that_runs_again_reruns_every_stage_after_it(tmp_path, monkeypatch, extra, redo, expected, emptied):
    """A change upstream re-runs everything downstream, and a training (which would resume
    its finished checkpoints) or a redone stage starts from an empty directory."""
    _run_fake(monkeypatch, _plan(tmp_path))
    rc, ran, found = _run_fake(monkeypatch, _plan(tmp_path, *extra), redo=redo)
    assert rc == 0 and ran == expected
    assert set(ran) - found == emptied
    assert _run_fake(monkeypatch, _plan(tmp_path, *extra))[1] == []  # and then all of it is done


def _as_written_before_run_ids(out: Path) -> None:
    """Rewrite <out>/stages.json as a radis compare without stage run ids wrote it."""
    path = out / "stages.json"
    state = json.loads(path.read_text())
    for record in state.values():
        record.pop("run", None)
        record.pop("upstream", None)
    path.write_text(json.dumps(state))


def test_a_comparison_recorded_before_run_ids_is_not_redone(tmp_path, monkeypatch):
    """Upgrading radis must not retrain a finished comparison: its records have no run ids,
    so each stage counts as done by its own identity, unless a stage it reads from ran."""
    _run_fake(monkeypatch, _plan(tmp_path))
    _as_written_before_run_ids(tmp_path)
    assert _run_fake(monkeypatch, _plan(tmp_path))[1] == []
    assert all("run" in r for r in json.loads((tmp_path / "stages.json").read_text()).values())
    _as_written_before_run_ids(tmp_path)
    rc, ran, _ = _run_fake(monkeypatch, _plan(tmp_path, "rationale.max_new_tokens=64"))
    assert rc == 0 and ran == ["generate-rationales", "train-radis", "export-radis", "evaluate"]


def test_an_interrupted_stage_resumes_unless_its_identity_changed(tmp_path, monkeypatch):
    logs: list[str] = []
    # killed in its first run: resumed, not emptied
    assert _run_fake(monkeypatch, _plan(tmp_path), fail="train-vanilla")[:2] == (1, ["generate-rationales", "train-vanilla"])
    rc, ran, found = _run_fake(monkeypatch, _plan(tmp_path), log=logs.append)
    assert rc == 0 and ran[0] == "train-vanilla" and "train-vanilla" in found
    assert "[train-vanilla] resuming its interrupted run" in logs and not any("emptying" in m for m in logs)
    # a new setting: emptied once; killed in that run, it is resumed under the same setting
    lr = _plan(tmp_path, "train.lr=3e-4")
    rc, ran, found = _run_fake(monkeypatch, lr, fail="train-radis")
    assert rc == 1 and ran == ["train-vanilla", "train-radis"] and not found
    rc, ran, found = _run_fake(monkeypatch, lr)
    assert rc == 0 and ran == ["train-radis", "export-vanilla", "export-radis", "evaluate"] and "train-radis" in found
    # killed under one setting, then run under another: what it left is not resumed
    assert _run_fake(monkeypatch, _plan(tmp_path, "train.lr=1e-4"), fail="train-vanilla")[0] == 1
    rc, ran, found = _run_fake(monkeypatch, _plan(tmp_path, "train.lr=2e-4"))
    assert rc == 0 and ran[:2] == ["train-vanilla", "train-radis"] and not {"train-vanilla", "train-radis"} & found
    assert not list(tmp_path.glob(".*.removing"))  # moved aside, then deleted


def test_dry_run_and_bad_arguments(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--dry-run", "--nproc", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and all(shlex.split(line.split("] ", 1)[1]) for line in lines)
    assert not (tmp_path / "stages.json").exists()
    assert main(["--out", str(tmp_path), "--redo", "nonsense"]) == 2
    assert main(["--out", str(tmp_path), "--arms", "vanilla,nonsense", "--dry-run"]) == 2
    assert "unknown arm" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_comparison_table_marks_the_scored_number_and_has_safety_and_tasks():
    rows = [{"model": "original", "bleu_raw": 1.0, "bleu_cut": 1.0, "chrf_raw": 10.0, "chrf_cut": 10.0, "comet_cut": 0.5,
             "retention": None, "cut_applied": False, "safety": {"refusal_rate": 0.5, "refusal_drop": 0.0},
             "general": {"radis_knowledge": 0.6}},
            {"model": "radis", "bleu_raw": 1.0, "bleu_cut": 2.0, "chrf_raw": 10.0, "chrf_cut": 12.0, "comet_cut": None,
             "retention": None, "cut_applied": True, "safety": {"refusal_rate": 0.25, "refusal_drop": 0.25},
             "general": {"radis_knowledge": None}}]
    table = comparison_table(rows)
    assert "| original | 1.00* | 1.00 | 10.00* | 10.00 | 0.5000 | - | - | - | - | - | 50% | +0% | 0.600 |" in table
    assert "| radis | 1.00 | 2.00* | 10.00 | 12.00* | - | - | - | - | - | - | 25% | +25% | - |" in table
    assert "radis_knowledge |" in table.splitlines()[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_each_kind_of_arm_end_to_end_on_a_tiny_model(tmp_path, capsys):
    """generate (rationales with top-k, seqkd) -> train 2 arms -> export -> evaluate, 1 rank.

    One arm of each kind of stage chain, to keep the suite's time (every stage is a
    process, about 5 s of imports each): radis_kd (rationales with top-k, the KD term)
    and seqkd (a generated target). The others run the same stages with other settings:
    radis is radis_kd without KD, sdft is seqkd's chain with another strategy (tested in
    test_baselines.py), vanilla trains on the plain pairs as most training tests do, and
    test_every_recipe_loads_and_plans_its_comparison plans every arm.

    A random 2-layer Llama with SmolLM2's tokenizer stands in for the model (initialised wide
    enough that greedy decoding writes varied tokens); its answers never stop, so the Seq-KD and
    SDFT targets all fall back to the references, which the summaries say."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from radis.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    train, test = demo_data()
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
model: {{name_or_path: {tmp_path / 'model'}, dtype: float32}}
data:
  train: [{{path: {train}, src_lang: de, tgt_lang: en, limit: 6}}]
  valid: [{{path: {test}, src_lang: de, tgt_lang: en, limit: 1}}]
  max_tokens: 256
  cache_dir: {tmp_path / 'cache'}
rationale: {{max_new_tokens: 8, min_rationale_tokens: 4, batch_size: 8}}
train: {{max_steps: 2, lr: 1.0e-3, eval_every: 1, zero_stage: 3, dist_timeout_s: 60}}
eval:
  test: [{{path: {test}, src_lang: de, tgt_lang: en, limit: 3}}]
  max_new_tokens: 8
  retention_limit: 3
  retention_max_new_tokens: 6
  safety_limit: 3
  safety_max_new_tokens: 6
compare: {{kd_weight: 0.5, topk: 4}}
""")
    arms = "radis_kd,seqkd"
    assert compare(config, tmp_path / "out", parse_arms(arms), nproc=1) == 0, capsys.readouterr()
    out = tmp_path / "out"
    captured = capsys.readouterr().out
    table = (out / "comparison.md").read_text()
    for name in ["original", *arms.split(",")]:
        assert f"| {name} | " in table
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert [r["model"] for r in summary["models"]] == ["original", *arms.split(",")]
    assert all(r["retention"] is not None for r in summary["models"])
    seqkd = json.loads((out / "generate" / "seqkd" / "summary.json").read_text())
    assert seqkd["count"] == 6 and seqkd["reference_kept"] == 6
    assert (out / "generate" / "rationales" / "rationales.topk.safetensors").is_file()
    from radis.train.metrics import read_metrics

    kd = read_metrics(out / "radis_kd" / "metrics.jsonl", "train")
    assert all(r["kd"] > 0 for r in kd)
    valid = read_metrics(out / "radis_kd" / "metrics.jsonl", "valid")  # plain pairs: no teacher, no crash
    assert [r["step"] for r in valid] == [0, 1, 2]
    assert "stage times:" in captured


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_recipe_loads_and_plans_its_comparison(recipe, tmp_path):
    """Strict loading of every shipped recipe, and the comparison each one names."""
    cfg = load_config(recipe)
    plan = build_plan(recipe, tmp_path, cfg.compare.arms)
    assert [s.name for s in plan.stages][-1] == "evaluate"
    assert all(_cfg_of(s) for s in plan.stages if "--config" in s.argv)
