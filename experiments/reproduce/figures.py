"""The study's figures: learning curves with 95% bands over seeds, and the final pass@k curve per method."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from experiments.reproduce import stats
from experiments.reproduce.claims import Metric


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(values: list[float]) -> tuple[float, float, float]:
    ci = stats.t_interval(values)
    lo, hi = (ci.lo, ci.hi) if len(values) > 1 else (ci.mean, ci.mean)
    return ci.mean, lo, hi


def learning_curves(records: Sequence[dict[str, Any]], methods: Sequence[tuple[str, str]],
                    sources: Sequence[str], path: str) -> None:
    """pass@1, pass@16 (held-out, every evaluation point) and the training token entropy, mean over seeds
    with the 95% t-band; ``methods``: (key, label)."""
    plt = _plt()
    n = records[0]["num_samples"]
    panels = [(Metric("pass@1"), "held-out pass@1 (%)"), (Metric("pass@16").resolve(n), "held-out pass@16 (%)"),
              (Metric("entropy"), "training token entropy (nats)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (metric, title) in zip(axes, panels):
        for key, label in methods:
            mine = [r for r in records if r["method"] == key]
            if not mine:
                continue
            if metric.name == "entropy":
                common = set.intersection(*({s for s, _ in r["curves"]["entropy"]} for r in mine))
                steps = sorted(common)
                series = [[dict((s, v) for s, v in r["curves"]["entropy"])[t] for r in mine] for t in steps]
            else:
                steps = sorted(set.intersection(*({int(s) for s in r["evals"]} for r in mine)))
                series = [[100 * metric.value(r, t, sources) for r in mine] for t in steps]
            bands = np.array([_band(v) for v in series])
            line, = ax.plot(steps, bands[:, 0], label=label, lw=1.4, marker="" if metric.name == "entropy" else "o",
                            ms=3)
            ax.fill_between(steps, bands[:, 1], bands[:, 2], color=line.get_color(), alpha=0.15)
        ax.set_xlabel("RL step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pass_at_k_curves(records: Sequence[dict[str, Any]], methods: Sequence[tuple[str, str]],
                     sources: Sequence[str], sizes: Sequence[int], path: str) -> None:
    """Held-out pass@k for k = 1..n at the end of training (and the warm start), all mazes and per size,
    mean over seeds with the 95% t-interval."""
    plt = _plt()
    n = records[0]["num_samples"]
    ks = list(range(1, n + 1))
    panels = [0] + list(sizes)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    warm = {r["seed"]: r for r in records}
    for ax, size in zip(axes[0], panels):
        rows = [("warm start", list(warm.values()), 0)]
        rows += [(label, [r for r in records if r["method"] == key], None) for key, label in methods]
        for label, mine, at in rows:
            if not mine:
                continue
            bands = np.array([_band([100 * Metric(f"pass@{k}", size).value(r, r["steps"] if at is None else at,
                                                                            sources) for r in mine]) for k in ks])
            style = dict(color="k", ls="--") if at == 0 else {}
            line, = ax.plot(ks, bands[:, 0], label=label, lw=1.3, **style)
            ax.fill_between(ks, bands[:, 1], bands[:, 2], color=line.get_color(), alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_title("all held-out mazes" if not size else f"{size}×{size}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("pass@k (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pass_at_k_over_training(records: Sequence[dict[str, Any]], methods: Sequence[tuple[str, str]],
                            sources: Sequence[str], sizes: Sequence[int], path: str, ks: Sequence[int] = (1, 8, 16),
                            switch: int | None = None) -> None:
    """Held-out pass@k over training (every evaluation point) per method, one row per k and one column per
    maze set (all, then each size), mean over seeds with the 95% t-band; ``switch``: a staged run's stage
    boundary, drawn as a vertical line."""
    plt = _plt()
    n = records[0]["num_samples"]
    ks = list(dict.fromkeys(min(k, n) for k in ks))
    panels = [0] + list(sizes)
    fig, axes = plt.subplots(len(ks), len(panels), figsize=(3.6 * len(panels), 2.9 * len(ks)), squeeze=False)
    for row, k in zip(axes, ks):
        for ax, size in zip(row, panels):
            for key, label in methods:
                mine = [r for r in records if r["method"] == key]
                if not mine:
                    continue
                steps = sorted(set.intersection(*({int(s) for s in r["evals"]} for r in mine)))
                bands = np.array([_band([100 * Metric(f"pass@{k}", size).value(r, t, sources) for r in mine])
                                  for t in steps])
                line, = ax.plot(steps, bands[:, 0], label=label, lw=1.3, marker="o", ms=3)
                ax.fill_between(steps, bands[:, 1], bands[:, 2], color=line.get_color(), alpha=0.15)
            if switch:
                ax.axvline(switch, color="grey", lw=0.8, ls=":")
            ax.set_title(f"pass@{k}, " + ("all held-out mazes" if not size else f"{size}×{size}"), fontsize=9)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("%")
    for ax in axes[-1]:
        ax.set_xlabel("RL step")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
