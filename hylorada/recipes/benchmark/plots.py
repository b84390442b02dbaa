"""methods.png (test perplexity per row with its seed spread; LiM buckets) and frontier.png (size
vs perplexity relative to dense), from results.json's dict."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .cells import num
from .report import fmt

FRONTIER_CLIP = 10.0  # frontier.png: points above this multiple of the dense perplexity sit at the top edge
FRONTIER_STYLES = {"svd": ("#1f77b4", "o", "plain SVD"), "whiten": ("#d62728", "s", "whitened SVD")}


def render_plots(res: dict[str, Any], out_dir: Path) -> list[str]:
    """methods.png and frontier.png in out_dir; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ad = [e for e in res["adaptation"] if e.get("test_ppl_mean") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    _methods_axis(axes[0], ad, res["config"]["preset"])
    _lim_axis(axes[1], ad)
    fig.tight_layout()
    fig.savefig(out_dir / "methods.png", dpi=120)
    plt.close(fig)
    _frontier_plot(res, out_dir / "frontier.png", plt)
    return ["methods.png", "frontier.png"]


def _row_color(e: dict[str, Any]) -> str:
    return ("#999999" if e["kind"] == "base" else "#d62728" if e["row"] == "hylorada" else
            "#1f77b4" if e["kind"] == "method" else "#2ca02c" if e["kind"] == "peft" else "#ff7f0e")


def _methods_axis(ax, ad: list[dict[str, Any]], preset: str) -> None:
    """A dot plot (a bar chart with a cut axis would exaggerate small differences)."""
    if ad:
        for i, e in enumerate(ad):
            color = _row_color(e)
            std = e.get("test_ppl_std")
            ax.errorbar([e["test_ppl_mean"]], [i], xerr=None if std is None else [std], fmt="o", color=color,
                        capsize=4, ms=7)
            vals = [v for v in (e.get("test_ppl_values") or []) if v is not None]
            if len(vals) > 1:
                ax.scatter(vals, [i] * len(vals), marker="|", color=color, s=80)
        ax.set_yticks(range(len(ad)), [e["row"] for e in ad], fontsize=8)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_xlabel("test perplexity (dot: mean over seeds; bar: ± std; ticks: seeds)")
    ax.set_title(f"adaptation at matched budgets ({preset})")


def _lim_axis(ax, ad: list[dict[str, Any]]) -> None:
    for e in ad:
        b = e.get("lim_bucket_ppl")
        if b:
            ax.plot(range(1, len(b) + 1), [x if x is not None else float("nan") for x in b], marker=".",
                    label=e["row"], lw=2.0 if e["row"] in ("hylorada", "base") else 1.0)
    ax.set_xlabel("relative position in the window (bucket)")
    ax.set_ylabel("perplexity")
    ax.set_title("LiM: perplexity by position")
    if ad:
        ax.legend(fontsize=7, ncol=2)


def frontier_points(res: dict[str, Any], clip: float = FRONTIER_CLIP) -> list[dict[str, Any]]:
    """The frontier as plotted: per compressed cell, size, rel = test PPL / dense test PPL and y =
    min(rel, clip) (`clipped` says where y < rel). Empty without a dense (`base`) perplexity."""
    fr = [e for e in res["frontier"] if num(e["test_ppl"]) is not None]
    dense = next((e for e in fr if e["compress_method"] is None), None)
    if dense is None:
        return []
    d = num(dense["test_ppl"])
    out = []
    for e in fr:
        rel = num(e["test_ppl"]) / d
        out.append({**e, "rel": rel, "y": min(rel, clip), "clipped": rel > clip})
    return out


def _frontier_plot(res: dict[str, Any], path: Path, plt) -> None:
    """Size vs perplexity relative to dense on a linear axis cut at FRONTIER_CLIP x dense; points
    above the cut are drawn on it as triangles (filled: recovered), their real ratios written
    under it (collapsed plain SVD would otherwise squash the useful region into a sliver of a
    log axis)."""
    pts = frontier_points(res)
    fig, ax = plt.subplots(figsize=(9.5, 5))
    clipped = _frontier_points_drawn(ax, pts)
    for method, (color, _, _) in FRONTIER_STYLES.items():
        for rec in (False, True):
            line = sorted((p["size_mb"], p["y"]) for p in pts
                          if p["compress_method"] == method and p["recovery"] == rec and not p["clipped"])
            if len(line) > 1:
                ax.plot(*zip(*line), color=color, lw=1, ls="-" if rec else "--", alpha=0.6)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    top = max([p["y"] for p in pts] + [1.5])
    if clipped:
        ax.axhline(FRONTIER_CLIP, color="grey", lw=0.8, ls="--")
        for x, texts in clipped.items():
            ax.annotate("\n".join(texts), (x, FRONTIER_CLIP), textcoords="offset points", xytext=(0, -14),
                        ha="center", va="top", fontsize=7, color="#1f3f77",
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))
        top = FRONTIER_CLIP
    _frontier_axes(ax, pts, top, bool(clipped), res["config"]["preset"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _frontier_points_drawn(ax, pts: list[dict[str, Any]]) -> dict[float, list[str]]:
    """Draw every point; returns {size: labels of the points drawn at the cut}."""
    clipped: dict[float, list[str]] = {}
    for p in pts:
        x, y = p["size_mb"], p["y"]
        if p["compress_method"] is None:
            ax.scatter([x], [1.0], marker="*", s=220, color="black", label="dense", zorder=3)
            ax.annotate(f"dense: PPL {fmt(num(p['test_ppl']))}", (x, 1.0), textcoords="offset points",
                        xytext=(0, 10), ha="center", fontsize=8)
            continue
        color, marker, name = FRONTIER_STYLES[p["compress_method"]]
        label = name + (" + recovery" if p["recovery"] else "")
        face = color if p["recovery"] else "none"
        if p["clipped"]:
            ax.scatter([x], [y], marker="^", s=90, zorder=3, facecolors=face, edgecolors=color,
                       label=label + f" (above {FRONTIER_CLIP:g}x)")
            clipped.setdefault(x, []).append(f"{label} {p['ratio']:g}: {p['rel']:.3g}x")
            continue
        ax.scatter([x], [y], marker=marker, s=60, zorder=3, facecolors=face, edgecolors=color, label=label)
        ax.annotate(f"{p['ratio']:g}: {p['rel']:.2f}x", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    return clipped


def _frontier_axes(ax, pts: list[dict[str, Any]], top: float, clipped: bool, preset: str) -> None:
    ax.set_ylim(0.0, top * 1.06)
    xs = [p["size_mb"] for p in pts]
    if xs:
        pad = 0.12 * (max(xs) - min(xs) or max(xs))
        ax.set_xlim(min(xs) - pad, max(xs) + pad)
    uniq = dict(zip(*reversed(ax.get_legend_handles_labels())))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("model size (MiB, every stored tensor)")
    ax.set_ylabel("test perplexity / dense" + (f" (axis cut at {FRONTIER_CLIP:g}x)" if clipped else ""))
    ax.set_title(f"size / quality frontier ({preset}); labels: ratio: perplexity vs dense", fontsize=10)
    ax.grid(True, alpha=0.3)
