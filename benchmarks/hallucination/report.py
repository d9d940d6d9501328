"""The benchmark's report: summary table, per-mode tables, the debias study grids, and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.hallucination.config import KINDS
from benchmarks.hallucination.methods import LAMBDAS, NORMALISATIONS, PRECONDITIONERS

METHODS = ("bm25", "tracin_last", "tracin_cp", "projected_if", "cea", "dda_debias_only", "dda_denoise_only", "dda",
           "dda_cea", "default")  # fmt: skip


def _find(results: list[dict[str, Any]], mode: str, kind: str, method: str) -> dict[str, Any] | None:
    return next((r for r in results if (r["mode"], r["query"], r["method"]) == (mode, kind, method)), None)


def summary_table(report: dict[str, Any]) -> str:
    """Mean AUC per method (rows) and (mode, query kind) (columns), with the seconds of the last column's run."""
    cols = [(m, k) for m in report["modes"] for k in KINDS]
    lines = ["| method | " + " | ".join(f"{m} / {k}" for m, k in cols) + " | seconds (per mode) |",
             "| --- |" + " --- |" * (len(cols) + 1)]  # fmt: skip
    for method in METHODS:
        rows = [_find(report["results"], m, k, method) for m, k in cols]
        cells = [f"{r['mean_auc']:.3f}" if r else "—" for r in rows]
        secs = " / ".join(f"{r['seconds']:.0f}" for r, (_, k) in zip(rows, cols, strict=True) if r and k == KINDS[0])
        name = f"**{method}**" if method == "default" else method
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The human-readable tables of a benchmark report."""
    res = report["results"]
    out = [f"# Hallucination-tracing benchmark ({report['size']})", "", f"Command: `{report['command']}`  ",
           f"Machine: {report['machine']}  ", f"Seed {report['seed']}, sizes `{json.dumps(report['sizes'])}`  ",
           f"Wall time: {report['wall_seconds'] / 60:.1f} min  ",
           f"Code {report.get('code', '(not recorded)')}, scoring defaults "
           f"`{json.dumps(report.get('defaults', '(not recorded)'))}`", "", "Mean ROC-AUC over the canary pairs "
           "(`default` traces each column as `dda attribute` would: an output without a correction by the "
           "counterfactual query, one with a correction by the contrastive query):", "",
           summary_table(report), ""]  # fmt: skip
    for mode, info in report["modes"].items():
        counts = ", ".join(
            f"{p} {c['hallucinated']}/{c['generated']} ({c['queries']})" for p, c in info["per_pair"].items()
        )
        out += [f"**{mode}**: {info['n_train']} training samples ({info['n_corrupted']} corrupted), "
                f"training {info['train_seconds']:.0f} s; hallucinated outputs per pair: {counts}", ""]  # fmt: skip
    for mode in report["modes"]:
        for kind in KINDS:
            header = "| method | mean AUC | mean AP | recall@R | per-pair AUC | seconds |"
            out += [f"## {mode} / {kind} queries", "", header, "| --- | --- | --- | --- | --- | --- |"]
            for method in METHODS:
                r = _find(res, mode, kind, method)
                if r is None:
                    continue
                pp = " ".join(f"{v:.2f}" for v in r["per_pair_auc"].values())
                means = f"{r['mean_auc']:.3f} | {r['mean_ap']:.3f} | {r['mean_recall_at_r']:.3f}"
                out.append(f"| {method} | {means} | {pp} | {r['seconds']:.0f} |")
            out.append("")
            dda, den, deb = (_find(res, mode, kind, m) for m in ("dda", "dda_denoise_only", "dda_debias_only"))
            last = _find(res, mode, kind, "tracin_last")
            if dda and den and deb and last:
                out += [f"Debias adds {dda['mean_auc'] - den['mean_auc']:+.3f} to denoise; denoise adds "
                        f"{dda['mean_auc'] - deb['mean_auc']:+.3f} to debias; debias alone vs last checkpoint "
                        f"{deb['mean_auc'] - last['mean_auc']:+.3f}; denoise alone vs last checkpoint "
                        f"{den['mean_auc'] - last['mean_auc']:+.3f}.", ""]  # fmt: skip
    out += ["## Debias study: mean AUC of mean-over-checkpoints s̃_t − λ·s̃_0 (all pairs)", ""]
    for mode, study in report["study"].items():
        for kind, s in study.items():
            header = "| preconditioner / normalisation | " + " | ".join(f"λ={x}" for x in LAMBDAS) + " |"
            out += [f"### {mode} / {kind}", "", header, "| --- |" + " --- |" * len(LAMBDAS)]
            for p in PRECONDITIONERS:
                for n in NORMALISATIONS:
                    cells = [next(g["mean_auc"] for g in s["grid"] if (g["preconditioner"], g["normalisation"],
                             g["lambda"], g["checkpoints"]) == (p, n, lam, "mean")) for lam in LAMBDAS]  # fmt: skip
                    out.append(f"| {p} / {n} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
            cells = [f"{r['modules']} {r['k']}×{r['k']} (D={r['dim']}) {r['mean_auc']:.3f}" for r in s["projection"]]
            out += ["", "Projection study (the default scoring): " + ", ".join(cells), ""]
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Mean AUC per method (bars) and per pair (dots), one panel per (mode, query kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, k) for m in report["modes"] for k in KINDS]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, (mode, kind) in zip(axes[0], panels, strict=True):
        rows = [r for m in METHODS if (r := _find(report["results"], mode, kind, m)) is not None]
        x = np.arange(len(rows))
        colours = ["tab:red" if r["method"] == "default" else "tab:blue" for r in rows]
        ax.bar(x, [r["mean_auc"] for r in rows], color=colours, alpha=0.7)
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r["per_pair_auc"]), list(r["per_pair_auc"].values()), s=8, color="black", zorder=3)
        ax.set_xticks(x, [r["method"] for r in rows], rotation=70, fontsize=8)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{mode} / {kind}")
    axes[0][0].set_ylabel("ROC-AUC (bar: mean over pairs, dots: pairs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
