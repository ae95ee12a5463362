"""Translation quality against general ability, one point per model (PNG).

The idea of the paper's Figure 1: x = translation quality (the scored chrF: cut for
models trained with rationales, raw for the others), y = a measure of general ability,
oriented so that UP means "kept more of the original":

    general ^            RaDis: right, not down
            |  original o -------> o
            |           \\
            |            \\
            |             o  vanilla: right and down
            +--------------------------> chrF

One panel per measure, because they disagree (docs/design.md): the retention proxies
KL(original || tuned) and the NLL of the original's answers are "lower is better", so
their axes are inverted; MT-Bench and the AlpacaEval win rate (the paper's own measures,
drawn first), chrF of the new answers to the original's, the refusal rate on
harmful requests and the lm-eval task scores are "higher is better". Every model has
its own colour and marker, named in a legend: no text labels that print over each other
when two models score alike.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radis.io import write_atomic

# (key in a row's "retention" dict, panel title, axis label, lower is better)
RETENTION_PANELS: tuple[tuple[str, str, str, bool], ...] = (
    ("kl", "KL(original || tuned)", "KL per token  (lower = kept more)", True),
    ("nll_tuned", "NLL of the original's answers", "NLL per token  (lower = kept more)", True),
    ("chrf_to_original", "new answers vs the original's", "chrF to the original's answers", False),
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def panels(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, bool, list[tuple[str, float, float]]]]:
    """(title, y label, lower is better, [(model, chrF, value)]) of every measure some model has."""
    out = []

    def collect(get) -> list[tuple[str, float, float]]:
        pts = []
        for r in rows:
            value = get(r)
            if r.get("chrf") is not None and value is not None:
                pts.append((str(r["model"]), float(r["chrf"]), float(value)))
        return pts

    # the paper's own measures first: MT-Bench (its Figure 1's y axis) and AlpacaEval
    pts = collect(lambda r: r.get("mt_bench"))
    if pts:
        out.append(("MT-Bench", "MT-Bench score (LLM judge, 1-10)", False, pts))
    lc = any(r.get("alpaca_eval_lc") is not None for r in rows)
    pts = collect(lambda r: r.get("alpaca_eval_lc" if lc else "alpaca_eval_wr"))
    if pts:
        out.append(("AlpacaEval" + (" (length-controlled)" if lc else ""),
                    f"{'LC ' if lc else ''}win rate vs the reference (%)", False, pts))
    for key, title, label, lower in RETENTION_PANELS:
        pts = collect(lambda r, key=key: (r.get("retention") or {}).get(key))
        if pts:
            out.append((title, label, lower, pts))
    pts = collect(lambda r: (r.get("safety") or {}).get("refusal_rate"))
    if pts:
        out.append(("refusal rate", "refusals of harmful requests (share)", False, pts))
    tasks = list(dict.fromkeys(t for r in rows for t in (r.get("general") or {})))
    for task in tasks:
        pts = collect(lambda r, task=task: (r.get("general") or {}).get(task))
        if pts:
            out.append((task, f"{task} (lm-eval, first metric)", False, pts))
    return out


def plot_quality_vs_general(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path | None:
    """Draw one panel per measure (summary rows of radis.evaluate.report) and write `path`
    atomically; returns the path, or None when no model has a score on both axes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    todo = panels(rows)
    if not todo:
        return None
    names = list(dict.fromkeys(str(r["model"]) for r in rows))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    style = {n: (cmap(i % cmap.N), MARKERS[i % len(MARKERS)]) for i, n in enumerate(names)}
    cols = min(3, len(todo))
    nrows = -(-len(todo) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4.2 * nrows), squeeze=False)
    for ax, (name, label, lower_better, pts) in zip(axes.flat, todo):
        for model, x, y in pts:
            color, marker = style[model]
            ax.scatter([x], [y], s=60, color=color, marker=marker, label=model, zorder=3, edgecolors="black",
                       linewidths=0.5)
        ax.margins(0.15)
        if lower_better:
            ax.invert_yaxis()
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("translation chrF (scored)")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(todo):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], linestyle="", marker=style[n][1], color=style[n][0], markeredgecolor="black",
                          markersize=8, label=n) for n in names]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 6), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    write_atomic(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120))
    plt.close(fig)
    return path
