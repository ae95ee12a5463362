"""The summary of an evaluation: one row per model, the printed tables, the sacreBLEU signatures.

A summary row (summary.json "models", also what `radis compare` tabulates):

    model                     the eval.models name
    bleu_raw / bleu_cut       averaged over directions: the output as generated / cut at
    chrf_raw / chrf_cut       the first separator (both always reported)
    comet_cut                 COMET of the cut output, where installed
    cut_applied, cut_reason   whether this model is scored cut (radis.evaluate.command.cut_decision)
    bleu / chrf / comet       the scored numbers: cut when cut_applied, else raw
    directions                the same per direction
    retention                 the retention proxies (radis.evaluate.retention) or None
    safety                    {"refusal_rate", "refusal_drop", "prompts"} or None
    general                   {task: headline value} of the lm-eval tasks (None when skipped)
    mt_bench                  MT-Bench's overall score (1-10, both turns; None: off or not judged)
    mt_bench_unparsed         judge replies without a score (left out of the mean)
    alpaca_eval_wr            AlpacaEval win rate (%) against the reference outputs
    alpaca_eval_lc            its length-controlled win rate (%; None without df_gamed.csv)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from radis.evaluate.general import headline


def _get(r: dict[str, Any], kind: str, metric: str) -> float | None:
    s = r.get(kind)
    if s is None:
        return None
    return s.get(metric) if isinstance(s, dict) else getattr(s, metric)


def summary_row(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The row of one model from its results.json content."""
    raw, cut = result["average"]["raw"], result["average"]["cut"]
    applied = bool(result.get("cut", {}).get("applied"))
    scored = cut if applied else raw
    safety = result.get("safety")
    general = result.get("general") or {}
    return {
        "model": name,
        "bleu_raw": raw.get("bleu"), "bleu_cut": cut.get("bleu"),
        "chrf_raw": raw.get("chrf"), "chrf_cut": cut.get("chrf"),
        "comet_cut": cut.get("comet"),
        "cut_applied": applied, "cut_reason": result.get("cut", {}).get("reason"),
        "bleu": scored.get("bleu"), "chrf": scored.get("chrf"), "comet": scored.get("comet"),
        "directions": {d: {"n": r["n"], "bleu_raw": _get(r, "raw", "bleu"), "bleu_cut": _get(r, "cut", "bleu"),
                           "chrf_raw": _get(r, "raw", "chrf"), "chrf_cut": _get(r, "cut", "chrf"),
                           "comet_cut": _get(r, "cut", "comet")}
                       for d, r in result["directions"].items()},
        "retention": result.get("retention"),
        "safety": None if safety is None else {k: safety.get(k) for k in ("refusal_rate", "refusal_drop", "prompts")},
        "general": {task: headline(res) for task, res in general.items()},
        **judged_columns(result),
    }


def judged_columns(result: dict[str, Any]) -> dict[str, Any]:
    """The summary row's MT-Bench and AlpacaEval numbers (None where off or not judged)."""
    mt, ae = result.get("mt_bench") or {}, result.get("alpaca_eval") or {}
    return {"mt_bench": mt.get("overall"), "mt_bench_unparsed": mt.get("unparsed"),
            "alpaca_eval_wr": ae.get("win_rate"), "alpaca_eval_lc": ae.get("length_controlled_winrate")}


def signatures(out_root: Path, names: list[str]) -> dict[str, str]:
    """The sacreBLEU signatures of every score written under out_root (one per kind)."""
    sigs: dict[str, str] = {}
    for name in names:
        p = out_root / name / "results.json"
        if not p.is_file():
            continue
        for r in json.loads(p.read_text(encoding="utf-8"))["directions"].values():
            for kind in ("cut", "raw"):
                if r.get(kind):
                    sigs[f"BLEU {r['bleu_tokenizer']}"] = "BLEU " + r[kind]["bleu_signature"]
                    sigs["chrF"] = "chrF " + r[kind]["chrf_signature"]
    return sigs


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Translation scores per model and direction, the retention proxies, then general
    ability (refusal rate and the lm-eval tasks). The last column says which of raw and
    cut is the model's scored number (radis.evaluate.command.cut_decision)."""
    head = (f"{'model':<14}{'direction':<10}{'n':>5}{'BLEU raw':>10}{'BLEU cut':>10}{'chrF raw':>10}{'chrF cut':>10}"
            f"{'COMET':>8}  scored")
    lines = [head] if any(r["directions"] for r in rows) else []
    for r in rows:
        mark = "cut" if r.get("cut_applied") else "raw"
        for d, s in r["directions"].items():
            lines.append(f"{r['model']:<14}{d:<10}{s['n']:>5}{_fmt(s['bleu_raw']):>10}{_fmt(s['bleu_cut']):>10}"
                         f"{_fmt(s['chrf_raw']):>10}{_fmt(s['chrf_cut']):>10}{_fmt(s['comet_cut']):>8}  {mark}")
        if len(r["directions"]) > 1:
            lines.append(f"{r['model']:<14}{'average':<10}{'':>5}{_fmt(r['bleu_raw']):>10}{_fmt(r['bleu_cut']):>10}"
                         f"{_fmt(r['chrf_raw']):>10}{_fmt(r['chrf_cut']):>10}{_fmt(r['comet_cut']):>8}  {mark}")
    if any(r.get("retention") for r in rows):
        lines.append("")
        lines.append(f"{'model':<14}{'KL(orig||m)':>12}{'NLL m':>8}{'NLL orig':>10}{'changed':>9}{'chrF->orig':>12}")
        for r in rows:
            k = r.get("retention")
            if k:
                lines.append(f"{r['model']:<14}{_fmt(k['kl'], 3):>12}{_fmt(k['nll_tuned'], 3):>8}"
                             f"{_fmt(k['nll_original'], 3):>10}{k['changed'] * 100:>8.0f}%{_fmt(k['chrf_to_original'], 1):>12}")
    tasks = list(dict.fromkeys(t for r in rows for t in (r.get("general") or {})))
    if tasks or any(r.get("safety") for r in rows):
        lines.append("")
        head = f"{'model':<14}{'refusals':>10}{'drop':>8}" + "".join(f"{t[:18]:>20}" for t in tasks)
        lines.append(head)
        for r in rows:
            s = r.get("safety") or {}
            rate, drop = s.get("refusal_rate"), s.get("refusal_drop")
            cells = [f"{r['model']:<14}", f"{rate * 100:>9.0f}%" if rate is not None else f"{'-':>10}",
                     f"{drop * 100:>+7.0f}%" if drop is not None else f"{'-':>8}"]
            cells += [f"{_fmt((r.get('general') or {}).get(t), 3):>20}" for t in tasks]
            lines.append("".join(cells))
        lines.append("(refusals: share of harmful requests refused; drop: the original's share minus this model's, "
                     "> 0 = safety lost; tasks: lm-eval's first metric)")
    if any(r.get(k) is not None for r in rows for k in ("mt_bench", "mt_bench_unparsed", "alpaca_eval_wr")):
        lines.append("")
        lines.append(f"{'model':<14}{'MT-Bench':>10}{'unparsed':>10}{'AlpacaEval WR':>15}{'LC WR':>8}")
        for r in rows:
            lines.append(f"{r['model']:<14}{_fmt(r.get('mt_bench')):>10}{_fmt(r.get('mt_bench_unparsed'), 0):>10}"
                         f"{_fmt(r.get('alpaca_eval_wr'), 1):>15}{_fmt(r.get('alpaca_eval_lc'), 1):>8}")
        lines.append("(MT-Bench: the judge's mean score 1-10 over both turns; AlpacaEval: % of instructions on which "
                     "the judge preferred the model's output to the reference's; LC: length-controlled)")
    return "\n".join(lines)
