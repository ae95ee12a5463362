"""General ability in `radis evaluate`: real lm-evaluation-harness runs on radis's own tasks, the
offline rules, the refusal rate in the results, and the fair cut at the separator.

The harness runs for real (no mock) on the two tasks the project ships
(radis/resources/lm_eval_tasks: radis_knowledge, multiple choice; radis_arithmetic,
generate-until), on a tiny random Llama with SmolLM2's tokenizer and on SmolLM2 itself.
"""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_evaluate import _save_tiny

from radis.config import SourceConfig, load_config

pytest.importorskip("lm_eval", reason="lm-eval (the `general` extra) is not installed")

ROOT = Path(__file__).resolve().parents[1]
OWN = ["radis_knowledge", "radis_arithmetic"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_general")
    return _save_tiny(root / "base", seed=0), _save_tiny(root / "tuned", seed=1, perturb_from=root / "base")


def _cfg(tmp_path: Path, base: Path, models: list[str], *extra: str):
    cfg = load_config(None, [f"model.name_or_path={base}", f"eval.output_dir={tmp_path / 'eval'}",
                             "eval.max_new_tokens=6", "eval.retention=false", "eval.safety=false", "eval.batch_size=4",
                             *extra])
    cfg.eval.models = models
    return cfg


# --------------------------------------------------------------------------- lm-eval


def test_own_tasks_through_lm_eval_on_a_tiny_model(tiny, tmp_path):
    """Both of radis's tasks run offline; multiple choice as plain text, generation in the
    chat template (auto); every metric with its stderr in results.json and the summary."""
    from radis.evaluate.command import evaluate
    from radis.evaluate.general import GeneralSuite

    base, _ = tiny
    cfg = _cfg(tmp_path, base, [f"base={base}"], f"eval.general_tasks={json.dumps(OWN)}", "eval.general_limit=4")
    suite = GeneralSuite.from_config(cfg)
    assert suite.runnable == {"radis_knowledge": {"multiple_choice"}, "radis_arithmetic": {"generate_until"}}
    assert not suite.uses_chat_template("radis_knowledge") and suite.uses_chat_template("radis_arithmetic")
    summary = evaluate(cfg)
    general = json.loads((tmp_path / "eval" / "base" / "results.json").read_text())["general"]
    mc, gen = general["radis_knowledge"], general["radis_arithmetic"]
    assert set(mc["metrics"]) == {"acc,none", "acc_norm,none"} and mc["headline"] == "acc,none"
    assert 0.0 <= mc["metrics"]["acc,none"]["value"] <= 1.0 and mc["metrics"]["acc,none"]["stderr"] is not None
    assert mc["n"] == 4 and mc["chat_template"] is False and mc["output_type"] == ["multiple_choice"]
    assert set(gen["metrics"]) == {"exact_match,last_number"} and gen["chat_template"] is True
    row = summary["models"][0]
    assert row["general"] == {"radis_knowledge": mc["metrics"]["acc,none"]["value"],
                              "radis_arithmetic": gen["metrics"]["exact_match,last_number"]["value"]}


def test_adding_a_task_reuses_the_other_parts(tiny, tmp_path):
    """Each part of results.json has its own key: a new general task runs only that part."""
    from radis.evaluate.command import evaluate

    base, _ = tiny
    test_file = tmp_path / "t.de-en.jsonl"
    test_file.write_text(json.dumps({"translation": {"de": "Guten Morgen.", "en": "Good morning."}}) + "\n")
    cfg = _cfg(tmp_path, base, [f"base={base}"], "eval.general_tasks=[radis_knowledge]", "eval.general_limit=3")
    cfg.eval.test = [SourceConfig(path=str(test_file))]
    evaluate(cfg)
    translations = tmp_path / "eval" / "base" / "translations.json"
    stamp = translations.stat().st_mtime_ns
    cfg.eval.general_tasks = OWN
    summary = evaluate(cfg)
    assert translations.stat().st_mtime_ns == stamp  # not translated again
    assert set(summary["models"][0]["general"]) == set(OWN)


def test_unknown_or_offline_tasks_are_named_before_any_model_loads(tiny, tmp_path):
    from radis.evaluate.general import GeneralSuite, GeneralTaskError

    base, _ = tiny
    with pytest.raises(GeneralTaskError, match="'no_such_task_xyz' is not a task or group that lm-eval knows"):
        GeneralSuite.from_config(_cfg(tmp_path, base, [], "eval.general_tasks=[no_such_task_xyz]"))
    tasks = str(ROOT / "tests" / "data" / "lm_eval_tasks")
    hub = _cfg(tmp_path, base, [], "eval.general_tasks=[radis_test_hub, radis_knowledge]",
               f"eval.general_task_paths=[{tasks}]")
    with pytest.raises(GeneralTaskError, match=r"task 'radis_test_hub': its data is not in the local datasets cache "
                                               r"and this machine is offline .*eval.general_missing=skip"):
        GeneralSuite.from_config(hub)
    hub.eval.general_missing = "skip"
    suite = GeneralSuite.from_config(hub)
    assert list(suite.runnable) == ["radis_knowledge"] and "offline" in suite.skipped["radis_test_hub"]
    with pytest.raises(GeneralTaskError, match=r"eval.general_task_paths\[0\]: .*: no such directory"):
        GeneralSuite.from_config(_cfg(tmp_path, base, [], "eval.general_tasks=[radis_knowledge]",
                                      f"eval.general_task_paths=[{tmp_path / 'nope'}]"))


def test_a_task_file_lm_eval_cannot_read_is_named(tiny, tmp_path):
    """lm-eval's index skips a YAML it cannot parse without a word, and its task is then
    only "unknown": the file and the parse error are named instead."""
    from radis.evaluate.general import GeneralSuite, GeneralTaskError

    base, _ = tiny
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mine = tasks / "my_task.yaml"
    own = (ROOT / "radis" / "resources" / "lm_eval_tasks" / "radis_knowledge.yaml").read_text()
    mine.write_text(own.replace("task: radis_knowledge", "task: my_task")
                    .replace("output_type: multiple_choice", "output_type: multiple_choice\n  bad_indent: true"))
    with pytest.raises(GeneralTaskError, match=rf"'my_task' is not a task or group that lm-eval knows; {mine} cannot be "
                                               r"read, so lm-eval skipped it: \w+Error: .*line \d+"):
        GeneralSuite.from_config(_cfg(tmp_path, base, [], "eval.general_tasks=[my_task]",
                                      f"eval.general_task_paths=[{tasks}]"))


def test_every_rank_runs_the_same_tasks(tiny, tmp_path, monkeypatch):
    """Each rank resolves the tasks against its own datasets cache. A task another rank
    had to skip is skipped here too, with that rank's reason (a rank running it alone
    would wait in lm-eval's collectives), and another rank's error is raised here. The
    other rank's view stands in for the gather; the real 2-rank run is the test below."""
    import radis.runtime
    from radis.evaluate.general import GeneralSuite, GeneralTaskError

    base, _ = tiny
    cfg = _cfg(tmp_path, base, [], "eval.general_tasks=[radis_knowledge, radis_arithmetic]",
               "eval.general_missing=skip")
    other = {"radis_arithmetic": "its data is not in the local datasets cache (rank 1)"}
    monkeypatch.setattr(radis.runtime, "gather_objects", lambda local, group=None: [local, (other, None)])
    suite = GeneralSuite.from_config(cfg)
    assert list(suite.runnable) == ["radis_knowledge"] and suite.skipped == other
    monkeypatch.setattr(radis.runtime, "gather_objects",
                        lambda local, group=None: [local, ({}, "eval.general_tasks: task 'x' (rank 1)")])
    with pytest.raises(GeneralTaskError, match=r"task 'x' \(rank 1\)"):
        GeneralSuite.from_config(cfg)


def test_own_tasks_on_smollm2(tmp_path, one_thread):
    """The real chat model answers the project's own questions better than chance would
    on the easy multiple-choice task, and writes numbers on the arithmetic one."""
    from radis.evaluate.general import GeneralSuite, headline
    from radis.models import resolve_model_path

    cfg = load_config(None, [f"eval.general_tasks={json.dumps(OWN)}", "eval.general_limit=12", "eval.batch_size=12"])
    out = GeneralSuite.from_config(cfg).evaluate(resolve_model_path("smollm2"))
    assert headline(out["radis_knowledge"]) > 0.25 + 0.1  # 4 options
    assert 0.0 <= headline(out["radis_arithmetic"]) <= 1.0


@pytest.mark.distributed
def test_lm_eval_on_two_ranks_equals_one(tiny, tmp_path):
    """torchrun, 2 CPU ranks, against one rank in this process: the harness shards the
    requests, rank 0 gets the same scores; two models with every part (translation,
    retention, safety, lm-eval), so that the collectives after a harness run still pair
    up across the ranks."""
    import os
    import subprocess
    import sys

    base, tuned = tiny
    test_file = tmp_path / "t.de-en.jsonl"
    test_file.write_text("".join(json.dumps({"translation": {"de": f"Satz {i}.", "en": f"Sentence {i}."}}) + "\n"
                                 for i in range(3)))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model: {{name_or_path: '{base}'}}\neval:\n  models: ['base={base}', 'tuned={tuned}']\n"
                        f"  test: [{{path: '{test_file}'}}]\n  max_new_tokens: 4\n  retention_limit: 3\n"
                        f"  retention_max_new_tokens: 4\n  safety_limit: 3\n  safety_max_new_tokens: 4\n"
                        f"  general_tasks: [radis_knowledge, radis_arithmetic]\n  general_limit: 6\n  batch_size: 3\n")
    from radis.evaluate.command import evaluate

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--module",
           "radis.cli", "evaluate", "--config", str(cfg_file), f"eval.output_dir={tmp_path / 'eval2'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    evaluate(load_config(cfg_file, [f"eval.output_dir={tmp_path / 'eval1'}"]))  # one rank, in this process
    one, two = (json.loads((tmp_path / f"eval{n}" / "tuned" / "results.json").read_text())["general"] for n in (1, 2))
    rows = [json.loads((tmp_path / f"eval{n}" / "summary.json").read_text())["models"] for n in (1, 2)]
    for a, b in zip(*rows):
        assert a["chrf_raw"] == pytest.approx(b["chrf_raw"]) and a["safety"] == b["safety"]
        assert a["retention"]["kl"] == pytest.approx(b["retention"]["kl"], rel=1e-4, abs=1e-6)
    for task in OWN:
        for metric, value in one[task]["metrics"].items():
            assert two[task]["metrics"][metric]["value"] == pytest.approx(value["value"], abs=1e-6), (task, metric)
        assert two[task]["n"] == one[task]["n"] == 6


# --------------------------------------------------------------------------- the fair cut


def scripted_llama(tokenizer, text: str, out: Path, after: int) -> Path:
    """A real (tiny) LlamaForCausalLM whose greedy continuation of any prompt ending in
    token `after` is `text` then the end of turn: each token's embedding predicts the next
    through an untied head (attention and MLP write zeros to the residual stream)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = tokenizer(text, add_special_tokens=False).input_ids
    chain = [after, *ids, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain)) == len(chain), "a scripted text needs distinct tokens"
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        head = model.lm_head.weight
        head.zero_()
        for a, b in itertools.pairwise(chain):
            head[b] = 10.0 * emb[a] / emb[a].norm()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_only_models_trained_with_rationales_are_cut(smol_tokenizer, tmp_path):
    """A model that answers "Here is the translation: >> Good morning." (separator " >>"):
    scored raw when nothing says it was trained with rationales (cutting would leave the
    preamble), scored cut when its radis_training.json says so; eval.cut_models and
    eval.cut_at_separator override; raw and cut are reported for both."""
    from radis.evaluate.command import evaluate
    from radis.training_info import FILENAME, training_info, write_training_info

    prompt_end = smol_tokenizer("\n", add_special_tokens=False).input_ids[-1]  # ChatML: "assistant\n"
    plain = scripted_llama(smol_tokenizer, "Here is the translation: >> Good morning.", tmp_path / "plain", prompt_end)
    rationale = tmp_path / "rationale"
    shutil.copytree(plain, rationale)
    cfg_r = load_config(None, ["loss.method=radis", "data.separator=' >>'"])
    write_training_info(rationale, training_info(cfg_r, {"mt": 10, "rd": 5}))
    test_file = tmp_path / "t.de-en.jsonl"
    test_file.write_text(json.dumps({"translation": {"de": "Guten Morgen.", "en": "Good morning."}}) + "\n")
    cfg = _cfg(tmp_path, plain, [f"plain={plain}", f"rationale={rationale}"], "data.separator=' >>'",
               "eval.max_new_tokens=16")
    cfg.eval.test = [SourceConfig(path=str(test_file))]
    rows = {r["model"]: r for r in evaluate(cfg)["models"]}
    translations = json.loads((tmp_path / "eval" / "plain" / "translations.json").read_text())
    assert translations[0]["raw"] == "Here is the translation: >> Good morning."
    assert translations[0]["cut"] == "Here is the translation:" and translations[0]["hypothesis"] == translations[0]["raw"]
    assert not rows["plain"]["cut_applied"] and rows["plain"]["chrf"] == rows["plain"]["chrf_raw"]
    assert rows["rationale"]["cut_applied"] and rows["rationale"]["chrf"] == rows["rationale"]["chrf_cut"]
    assert "trained with rationales" in rows["rationale"]["cut_reason"]
    assert rows["plain"]["chrf_raw"] > rows["plain"]["chrf_cut"]  # cutting the preamble model would bias against it
    # Overrides, per model and for all.
    cfg.eval.cut_models = {"plain": True}
    rows = {r["model"]: r for r in evaluate(cfg)["models"]}
    assert rows["plain"]["cut_applied"] and rows["plain"]["cut_reason"] == "eval.cut_models.plain"
    cfg.eval.cut_models, cfg.eval.cut_at_separator = {}, "never"
    rows = {r["model"]: r for r in evaluate(cfg)["models"]}
    assert not rows["rationale"]["cut_applied"]
    assert json.loads((rationale / FILENAME).read_text())["separator"] == " >>"
