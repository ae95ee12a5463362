"""Translation quality against general-ability retention, one point per model (PNG).

The idea of the paper's Figure 1: x = translation quality (chrF of the cut
hypotheses), y = retention, oriented so that UP means "kept more of the original":

    retention ^            RaDis: right, not down
              |  original o -------> o
              |           \\
              |            \\
              |             o  vanilla: right and down
              +--------------------------> chrF (cut)

One panel per proxy, because the proxies disagree (docs/design.md): KL(original || tuned)
and the NLL of the original's answers are "lower is better", so their axes are
inverted; chrF of the new answers to the original answers is "higher is better".
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radis.io import write_atomic

# (key in a point's "retention" dict, axis label, lower is better)
PANELS: tuple[tuple[str, str, bool], ...] = (
    ("kl", "KL(original || tuned) per token  (lower = kept more)", True),
    ("nll_tuned", "NLL of original answers  (lower = kept more)", True),
    ("chrf_to_original", "chrF of new answers to original answers", False),
)


def plot_quality_vs_retention(points: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Draw the panels and write `path` atomically; returns the path.

    Each point: {"name": str, "chrf": float (cut, averaged over directions),
    "retention": {"kl": ..., "nll_tuned": ..., "chrf_to_original": ...}}.
    Points missing a value are left out of that panel.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    points = [p for p in points if p.get("chrf") is not None and p.get("retention")]
    if not points:
        raise ValueError("plot_quality_vs_retention: no model has both a chrF score and retention proxies")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.2))
    for ax, (key, label, lower_better) in zip(axes, PANELS):
        xs, ys, names = [], [], []
        for p in points:
            value = p["retention"].get(key)
            if value is not None:
                xs.append(float(p["chrf"]))
                ys.append(float(value))
                names.append(str(p["name"]))
        ax.scatter(xs, ys, s=40, zorder=3)
        ax.margins(0.15)  # room for the labels of points at the edges
        for x, y, name in zip(xs, ys, names):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        if lower_better:
            ax.invert_yaxis()
        ax.set_xlabel("translation chrF (cut at separator)")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120))
    plt.close(fig)
    return path
