"""The `make demo` driver: its stage commands are valid, finished stages are skipped.

The full demo (rationales, two 2-rank ZeRO-3 trainings, export, evaluation of three
SmolLM2 models) takes ~15 minutes and is `make demo`, not a unit test.
"""
from __future__ import annotations

import json
import shlex

from radis.config import load_config
from radis.demo import DEFAULT_CONFIG, build_stages, command_line, demo_data, main


def test_every_stage_command_is_a_valid_config(tmp_path):
    stages = build_stages(DEFAULT_CONFIG, tmp_path)
    assert [s.name for s in stages] == ["rationales", "train-radis", "train-vanilla", "export-radis",
                                        "export-vanilla", "evaluate"]
    train, test = demo_data()
    for s in stages:
        if "--config" not in s.argv:
            continue
        i = s.argv.index("--config")
        overrides = [a for a in s.argv[i + 2:] if "=" in a]
        cfg = load_config(s.argv[i + 1], overrides)  # raises on any unknown key or bad value
        if s.name == "train-radis":
            assert cfg.loss.method == "radis" and cfg.data.train[0].path == str(tmp_path / "rationales" / "rationales.jsonl")
        if s.name == "train-vanilla":
            assert cfg.loss.method == "vanilla" and cfg.data.train[0].path == str(train)
        if s.name == "evaluate":
            assert cfg.eval.models == ["original=smollm2", f"vanilla={tmp_path / 'vanilla' / 'hf'}",
                                       f"radis={tmp_path / 'radis' / 'hf'}"]
            assert cfg.eval.test[0].path == str(test) and cfg.eval.output_dir == str(tmp_path / "eval")
    dist = command_line(stages[1], 2)
    assert "torch.distributed.run" in dist and "--nproc_per_node=2" in dist and dist[-len(stages[1].argv):] == stages[1].argv
    assert "torch.distributed.run" not in command_line(stages[3], 2)


def test_finished_stages_are_skipped_and_the_table_printed(tmp_path, capsys):
    stages = build_stages(DEFAULT_CONFIG, tmp_path)
    for s in stages:
        s.output.parent.mkdir(parents=True, exist_ok=True)
        s.output.touch()
    row = {"model": "radis", "bleu_raw": 2.5, "bleu_cut": 5.7, "chrf_raw": 20.0, "chrf_cut": 24.1, "comet_cut": None,
           "directions": {"de-en": {"n": 40, "bleu_raw": 2.5, "bleu_cut": 5.7, "chrf_raw": 20.0, "chrf_cut": 24.1,
                                    "comet_cut": None}},
           "retention": {"kl": 0.113, "nll_tuned": 0.78, "nll_original": 0.89, "changed": 0.9, "chrf_to_original": 48.3}}
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"models": [row], "signatures": {}}), encoding="utf-8")
    (tmp_path / "stages.json").write_text(json.dumps({s.name: {"done": True, "seconds": 1.0} for s in stages}),
                                          encoding="utf-8")
    assert main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == len(stages)
    assert "24.10" in out and "0.113" in out and "90%" in out


def test_dry_run_and_bad_arguments(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--dry-run", "--nproc", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and all(shlex.split(line.split("] ", 1)[1]) for line in lines)
    assert not (tmp_path / "stages.json").exists()
    assert main(["--out", str(tmp_path), "--redo", "nonsense"]) == 2
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
