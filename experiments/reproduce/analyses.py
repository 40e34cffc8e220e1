"""Exact analyses of the paper (seconds, no training): Section 4's eta curves, bootstrap -> analytical
convergence (Alg. 2 -> Alg. 3) and the advantage values at N = 32.

Everything is computed with the library's own estimators (``passk_jax.advantages``, its ``eta``), so
these numbers test the implementation as much as they reproduce the paper. ``run(out_dir)`` writes
``eta.csv``, ``eta.png``, ``bootstrap_convergence.csv``, ``bootstrap_convergence.png``,
``advantage_table.csv`` and ``analyses.json`` (the summary the report reads).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from passk_jax import advantages, metrics

N = 32
# (label, estimator, k): the curves of the paper's Figure on implicit reward design (Section 4).
ETA_CURVES: tuple[tuple[str, str, int], ...] = (
    ("Pass@1", "grpo", 1),
    ("Pass@2", "passk_analytic", 2),
    ("Pass@4", "passk_analytic", 4),
    ("Pass@8", "passk_analytic", 8),
    ("Pass@16", "passk_analytic", 16),
    ("combination (k=4)", "combination", 4),
    ("exceed (k=4)", "exceed", 4),
)
# What the paper states (or implies) for the argmax of eta, as N_pos at N = 32.
PAPER_ARGMAX = {"Pass@1": 16, "Pass@4": 8, "Pass@8": 4, "exceed (k=4)": 1}
BOOTSTRAP_KS = (4, 8)
BOOTSTRAP_GROUPS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TABLE_KS = (1, 2, 4, 8, 16)
TABLE_NPOS = (1, 2, 4, 8, 16, 24, 28, 31)
PAPER_VALUES = {(8, 1): (1.732, -0.056), (8, 8): (0.274, -0.091)}  # (k, N_pos) -> (A_pos, A_neg)


def binary_rewards(n: int = N) -> np.ndarray:
    """f32[n + 1, n]: row N_pos has N_pos ones followed by zeros (N_pos = 0..n)."""
    return (np.arange(n)[None, :] < np.arange(n + 1)[:, None]).astype(np.float32)


# ------------------------------------------------------------------------------------------------ eta
def eta_curves(n: int = N, curves: Sequence[tuple[str, str, int]] = ETA_CURVES) -> dict[str, np.ndarray]:
    """{label: eta f64[n + 1]} with eta(N_pos) = N_pos |A_pos| + N_neg |A_neg| (Section 4)."""
    return {label: advantages.eta(n, k, name) for label, name, k in curves}


def eta_argmax(curves: dict[str, np.ndarray]) -> dict[str, int]:
    """{label: N_pos of the peak of eta} (the smallest N_pos among exact ties)."""
    return {label: int(np.argmax(eta)) for label, eta in curves.items()}


# ------------------------------------------------------------------------------------------ bootstrap
def bootstrap_convergence(n: int = N, ks: Sequence[int] = BOOTSTRAP_KS,
                          groups: Sequence[int] = BOOTSTRAP_GROUPS, seeds: int = 5) -> list[dict[str, Any]]:
    """Error of Alg. 2 (bootstrap) against Alg. 3 (analytical) as the number of groups grows.

    For every N_pos = 0..n (one prompt each), k, number of groups G and seed, the same random groups give
    the ``mean`` reduction and the paper's ``sum`` (Eq. 6). A response sits in k G / n groups on average,
    so the sum is compared after scaling by n / (k G) (= sum / k at the paper's G = n). Errors are over all
    (N_pos, response) entries: RMS and max |bootstrap - analytical|. One row per (k, G, reduce, seed)."""
    rewards = binary_rewards(n)
    rows = []
    for k in ks:
        exact = np.asarray(advantages.passk_analytic(rewards, k), np.float64)
        for g in groups:
            for seed in range(seeds):
                key = jax.random.fold_in(jax.random.PRNGKey(seed), 1000 * k + g)
                for reduce in ("mean", "sum"):
                    adv = np.asarray(advantages.passk_bootstrap(key, rewards, k, num_groups=g, reduce=reduce),
                                     np.float64)
                    if reduce == "sum":
                        adv = adv * n / (k * g)
                    err = adv - exact
                    rows.append(dict(k=k, num_groups=g, reduce=reduce, seed=seed,
                                     rms_error=float(np.sqrt(np.mean(err ** 2))),
                                     max_abs_error=float(np.abs(err).max())))
    return rows


def convergence_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of the RMS error, per (k, reduce, G)."""
    out = []
    keys = sorted({(r["k"], r["reduce"], r["num_groups"]) for r in rows})
    for k, reduce, g in keys:
        errs = np.array([r["rms_error"] for r in rows if (r["k"], r["reduce"], r["num_groups"]) == (k, reduce, g)])
        maxes = [r["max_abs_error"] for r in rows if (r["k"], r["reduce"], r["num_groups"]) == (k, reduce, g)]
        out.append(dict(k=k, reduce=reduce, num_groups=g, rms_error_mean=float(errs.mean()),
                        rms_error_std=float(errs.std(ddof=1)) if len(errs) > 1 else 0.0,
                        max_abs_error_mean=float(np.mean(maxes)), seeds=len(errs)))
    return out


def paper_sum_slope(n: int = N, k: int = 4, seeds: int = 5) -> float:
    """Least-squares slope of the paper's bootstrap sum (G = n) on the analytical advantage, averaged
    over seeds: the "sum is about k times the analytical value" claim of Section 2.2."""
    rewards = binary_rewards(n)
    exact = np.asarray(advantages.passk_analytic(rewards, k), np.float64).ravel()
    slopes = []
    for seed in range(seeds):
        adv = np.asarray(advantages.passk_bootstrap(jax.random.PRNGKey(seed), rewards, k, reduce="sum"),
                         np.float64).ravel()
        slopes.append(float(adv @ exact / (exact @ exact)))
    return float(np.mean(slopes))


# ----------------------------------------------------------------------------------------- value table
def advantage_table(n: int = N, ks: Sequence[int] = TABLE_KS,
                    n_pos: Sequence[int] = TABLE_NPOS) -> list[dict[str, Any]]:
    """A_pos, A_neg and eta of the analytical Pass@k advantage (k = 1 is Pass@1, population std)."""
    rewards = binary_rewards(n)
    rows = []
    for k in ks:
        adv = np.asarray(advantages.passk_analytic(rewards, k), np.float64)
        for p in n_pos:
            a_pos = float(adv[p, 0]) if p > 0 else 0.0
            a_neg = float(adv[p, -1]) if p < n else 0.0
            rows.append(dict(k=k, n_pos=p, accuracy=p / n, a_pos=a_pos, a_neg=a_neg,
                             eta=p * abs(a_pos) + (n - p) * abs(a_neg)))
    return rows


# ------------------------------------------------------------------------------------------- outputs
def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def _plot_eta(curves: dict[str, np.ndarray], argmax: dict[str, int], n: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    acc = np.arange(n + 1) / n
    for ax, labels in zip(axes, ([lab for lab in curves if lab.startswith("Pass@")],
                                 ["Pass@1", "Pass@4", "combination (k=4)", "exceed (k=4)"])):
        for label in labels:
            line, = ax.plot(acc, curves[label], label=f"{label} (peak {argmax[label] / n:.1%})", lw=1.6)
            ax.plot(argmax[label] / n, curves[label][argmax[label]], "o", color=line.get_color())
        ax.set_xlabel(r"accuracy $N_{pos}/N$" + f" (N = {n})")
        ax.set_ylabel(r"$\eta = N_{pos}|A_{pos}| + N_{neg}|A_{neg}|$")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("Pass@1 vs Pass@k (analytical)", fontsize=10)
    axes[1].set_title("reward designs (Section 4)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_convergence(summary: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in summary})
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 3.8), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for reduce, label in (("mean", "mean over groups"), ("sum", r"sum $\times N/(kG)$ (paper's Eq. 6)")):
            pts = [r for r in summary if r["k"] == k and r["reduce"] == reduce]
            g = np.array([r["num_groups"] for r in pts])
            m = np.array([r["rms_error_mean"] for r in pts])
            s = np.array([r["rms_error_std"] for r in pts])
            ax.plot(g, m, marker="o", label=label)
            ax.fill_between(g, np.maximum(m - s, 1e-6), m + s, alpha=0.2)
        g = np.array(sorted({r["num_groups"] for r in summary}), float)
        ref = [r["rms_error_mean"] for r in summary if r["k"] == k and r["reduce"] == "mean"][-1]
        ax.plot(g, ref * np.sqrt(g[-1] / g), "k--", lw=0.8, label=r"$\propto 1/\sqrt{G}$")
        ax.axvline(N, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("number of bootstrap groups G (dotted: the paper's G = N)")
        ax.set_ylabel("RMS error vs analytical")
        ax.set_title(f"bootstrap -> analytical, N = {N}, k = {k}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(out_dir: str, *, seeds: int = 5, groups: Sequence[int] = BOOTSTRAP_GROUPS,
        verbose: bool = True) -> dict[str, Any]:
    """Compute every analysis, write CSV/PNG and ``analyses.json`` into ``out_dir``; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    curves = eta_curves()
    argmax = eta_argmax(curves)
    _write_csv(os.path.join(out_dir, "eta.csv"),
               [dict(n_pos=p, accuracy=p / N, **{label: float(c[p]) for label, c in curves.items()})
                for p in range(N + 1)])
    _plot_eta(curves, argmax, N, os.path.join(out_dir, "eta.png"))

    rows = bootstrap_convergence(groups=groups, seeds=seeds)
    summary = convergence_summary(rows)
    _write_csv(os.path.join(out_dir, "bootstrap_convergence.csv"), summary)
    _plot_convergence(summary, os.path.join(out_dir, "bootstrap_convergence.png"))
    slope = paper_sum_slope(seeds=seeds)

    table = advantage_table()
    _write_csv(os.path.join(out_dir, "advantage_table.csv"), table)

    result = dict(n=N, eta_argmax={label: dict(n_pos=p, accuracy=p / N, eta=float(curves[label][p]),
                                                paper_n_pos=PAPER_ARGMAX.get(label))
                                   for label, p in argmax.items()},
                  bootstrap=summary, bootstrap_sum_slope_k4=slope, bootstrap_seeds=seeds,
                  advantage_table=table,
                  paper_values=[dict(k=k, n_pos=p, paper_a_pos=v[0], paper_a_neg=v[1])
                                for (k, p), v in PAPER_VALUES.items()])
    with open(os.path.join(out_dir, "analyses.json"), "w") as f:
        json.dump(result, f, indent=1)
    if verbose:
        print(format_summary(result))
    return result


def format_summary(result: dict[str, Any]) -> str:
    """The key numbers as console text."""
    lines = [f"eta argmax at N = {result['n']}:"]
    for label, a in result["eta_argmax"].items():
        paper = "" if a["paper_n_pos"] is None else f"   (paper: N_pos = {a['paper_n_pos']})"
        lines.append(f"  {label:<18} N_pos = {a['n_pos']:>2}  accuracy = {a['accuracy']:6.1%}{paper}")
    lines.append("bootstrap RMS error vs analytical (mean over seeds):")
    for r in result["bootstrap"]:
        if r["num_groups"] in (4, 32, 4096) or r["num_groups"] == max(b["num_groups"] for b in result["bootstrap"]):
            lines.append(f"  k={r['k']} {r['reduce']:<4} G={r['num_groups']:>5}  {r['rms_error_mean']:.4f}")
    lines.append(f"paper's bootstrap sum (G = N, k = 4) ~ {result['bootstrap_sum_slope_k4']:.2f} x analytical")
    lines.append("advantage values (N = 32):")
    for v in result["paper_values"]:
        row = next(r for r in result["advantage_table"] if (r["k"], r["n_pos"]) == (v["k"], v["n_pos"]))
        lines.append(f"  k={v['k']} N_pos={v['n_pos']}: A_pos = {row['a_pos']:.3f}, A_neg = {row['a_neg']:.3f}"
                     f"   (paper: {v['paper_a_pos']:.3f} / {v['paper_a_neg']:.3f})")
    return "\n".join(lines)
