"""
Plots of an evaluation's summary rows (nanokv.eval). Every budget axis is memory as a fraction
of the full cache (keys + values + quantization metadata held, over what the full cache holds
for the same tokens), so eviction, merging and quantization methods share one x-axis.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

YLABEL = {"passkey": "exact match", "lines": "exact match", "needle": "exact match (all cells)",
          "ppl": "perplexity", "attn": "lost attention mass"}


def _finish(fig, ax, path: str, legend: dict | None = None) -> str:
    """Grid, legend, tight layout, write the PNG, free the figure."""
    ax.grid(alpha=0.3)
    ax.legend(**(legend or {}))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MARKERS = "os^vDP<>Xph*d"
BOUNDED = ("passkey", "lines", "needle", "attn")  # values in [0, 1]


def budget_plot(rows, task: str, path: str, title: str | None = None) -> str:
    """budget_axes, written to `path`."""
    fig, ax = budget_axes(rows, task, title)
    return _finish(fig, ax, path, {"fontsize": 7, "ncol": 2})


def budget_axes(rows, task: str, title: str | None = None, ax=None):
    """One line per method: the task's value against memory as a fraction of the full cache. The
    full cache is a dashed reference line (it has one point, at memory 1); accuracies and lost mass
    use the whole [0, 1] axis; each method has its own marker shape, and methods whose points
    coincide are shifted apart a little sideways (a jitter of a few percent on the log axis), so
    that no marker hides another."""
    fig, ax = plt.subplots(figsize=(7, 4.5)) if ax is None else (ax.figure, ax)
    by_method: dict[str, list] = {}
    for r in rows:
        if r["task"] == task:
            by_method.setdefault(r["method"], []).append((r["mem_fraction_of_full"], r["value"]))
    full = by_method.pop("full", None)
    if full:
        ax.axhline(full[0][1], color="black", linestyle="--", linewidth=1, label=f"full cache ({full[0][1]:.3g})")
    seen: dict[tuple, int] = {}  # rounded (x, y) -> methods already drawn there
    for i, (method, pts) in enumerate(by_method.items()):
        pts.sort()
        xs = []
        for x, y in pts:
            key = (round(x, 3), round(y, 3))
            xs.append(x * 1.04 ** seen.get(key, 0))  # shift the k-th coinciding point by 4% per step
            seen[key] = seen.get(key, 0) + 1
        ax.plot(xs, [p[1] for p in pts], "-" if len(pts) > 1 else "", marker=MARKERS[i % len(MARKERS)],
                label=method, markersize=6, alpha=0.85, markerfacecolor="none" if i % 2 else None)
    ax.set_xscale("log")
    ax.set_xlabel("memory held / full cache (log scale)")
    ax.set_ylabel(YLABEL.get(task, task))
    if task in BOUNDED:
        ax.set_ylim(-0.03, 1.03)
    proto = sorted({str(r.get("protocol")) for r in rows if r["task"] == task})
    ax.set_title(title or f"{task} against memory (protocol: {', '.join(proto)})")
    return fig, ax


def needle_heatmaps(rows, path: str) -> str:
    """One heatmap per method x budget: exact match by context length (x) and needle depth (y)."""
    cells = [r for r in rows if r["task"] == "needle"]
    cols = min(4, len(cells))
    nrows = (len(cells) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols + 1, 3.2 * nrows + 0.6), squeeze=False)
    fig.subplots_adjust(wspace=0.55, hspace=0.6)
    for ax in axes.flat[len(cells):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, cells):
        L, D = r["lengths"], r["depths"]
        grid = [[r["grid"][i * len(D) + j] for i in range(len(L))] for j in range(len(D))]  # (depth, length)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(L)), [str(n) for n in L])
        ax.set_yticks(range(len(D)), [f"{d:.0%}" for d in D])
        budget = "all" if r["budget"] is None else f"{100 * r['budget_frac']:.0f}%"
        ax.set_title(f"{r['method']} @ {budget}", fontsize=9)
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
    fig.colorbar(im, ax=axes, shrink=0.6, label="exact match")
    fig.suptitle("passkey retrieval by context length and needle depth")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def persistence_plot(row, path: str) -> str:
    """Persistence ratio per layer, trained model against a randomly initialised one (a layer with
    no ratio in any window, None, is left as a gap)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    layers = range(len(row["per_layer"]))
    for key, style, label in (("per_layer", "o-", "trained"), ("random_per_layer", "s--", "random init")):
        ax.plot(layers, [float("nan") if x is None else x for x in row[key]], style, label=label)
    ax.set_ylim(0, 1.05)
    ax.set_xticks(list(layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("persistence ratio")
    ax.set_title("Scissorhands: persistence of importance")
    return _finish(fig, ax, path)


def attn_error_plot(rows, path: str) -> str:
    """Relative attention-output error per layer, one line per method x budget."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["task"] == "attn" and r["method"] != "full":
            budget = "" if r["budget"] is None else f" @ {100 * r['budget_frac']:.0f}%"
            ax.plot(range(len(r["rel_error_per_layer"])), r["rel_error_per_layer"], "o-", markersize=3,
                    label=r["method"] + budget)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("layer")
    ax.set_ylabel("||out - out_full|| / ||out_full||")
    ax.set_title("attention output error per layer against the full cache")
    return _finish(fig, ax, path, {"fontsize": 6, "ncol": 2})


def retrieval_plot(rows, path: str) -> str:
    """Passkey and line retrieval side by side (one figure: what `python -m nanokv.eval` shows first)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, task in zip(axes, ("passkey", "lines")):
        budget_axes(rows, task, ax=ax)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(rows, out: str) -> list[str]:
    """Every plot the rows support; returns the paths written."""
    paths = []
    tasks = {r["task"] for r in rows}
    if {"passkey", "lines"} <= tasks:
        paths.append(retrieval_plot(rows, os.path.join(out, "retrieval.png")))
    for task in ("passkey", "lines", "ppl", "attn"):
        if task in tasks:
            paths.append(budget_plot(rows, task, os.path.join(out, f"{task}.png")))
    if "attn" in tasks:
        paths.append(attn_error_plot(rows, os.path.join(out, "attn_error.png")))
    if "needle" in tasks:
        paths.append(needle_heatmaps(rows, os.path.join(out, "needle.png")))
    for r in rows:
        if r["task"] == "persistence":
            paths.append(persistence_plot(r, os.path.join(out, "persistence.png")))
    return paths
