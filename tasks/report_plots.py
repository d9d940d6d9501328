"""The report's plots (matplotlib, PNG bytes): per-sample score trajectories and influence by source and license."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from storage.report import QuerySection, ReportData, Row
from tasks.report_format import snippet

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def plot_trajectories(section: QuerySection) -> bytes:
    """PNG: per top sample, s̃_t − λ·s̃_0 at each checkpoint (solid) and its running smoothed mean (dashed).

    The hollow square at step 0 is the base model's s̃_0. The dashed line ends at the DDA score S.
    """
    fig = Figure(figsize=(7.2, 3.4))
    ax = fig.add_subplot()
    by_sample: dict[str, list[Row]] = {}
    for r in section.trajectories:
        by_sample.setdefault(r["sample_id"], []).append(r)
    for i, (sample_id, rows) in enumerate(by_sample.items()):
        colour = COLOURS[i % len(COLOURS)]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["debiased_score"] for r in rows], "o-", color=colour,
                label=f"#{rows[0]['rank']} {snippet(sample_id, 24)}")  # fmt: skip
        ax.plot(steps, [r["smoothed"] for r in rows], "--", color=colour, alpha=0.7)
        ax.plot([0], [rows[0]["base_score"]], "s", mfc="none", color=colour)
    ax.axhline(0.0, color="#999999", lw=0.8)
    ax.set_xticks(sorted({0, *(r["step"] for r in section.trajectories)}))
    ax.set_xlabel("training step (0 = base model, hollow square = s̃_0)")
    ax.set_ylabel("s̃_t − λ·s̃_0  (dashed: running S)")
    ax.set_title("Score trajectory of the top samples across checkpoints", fontsize=10)
    if by_sample:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return _png(fig)


def _bars(ax: Any, labels: Sequence[str], values: Sequence[float], colour: str, title: str, xlabel: str) -> None:
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, color=colour)
    ax.set_yticks(y, [snippet(label, 22) for label in labels], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.axvline(0.0, color="#999999", lw=0.8)


def plot_by_source_and_license(sources: list[Row], licenses: list[Row], kind: str) -> bytes:
    """PNG, source and license side by side: ``kind`` "share" (percent of the positive influence, one output)
    or "total" (Σ DDA score over the traced outputs)."""
    fig = Figure(figsize=(7.2, 0.6 + 0.32 * max(len(sources), len(licenses), 3)))
    for ax, key, rows, colour in zip(fig.subplots(1, 2), ("source", "license"), (sources, licenses),
                                     COLOURS[:2] if kind == "share" else COLOURS[2:4], strict=True):  # fmt: skip
        if kind == "share":
            values = [100 * (r["share"] or 0.0) for r in rows]
            title, xlabel = f"influence share by {key}", "% of positive influence"
        else:
            values = [r["total_score"] for r in rows]
            title, xlabel = f"total influence by {key}", "Σ DDA score over traced outputs"
        _bars(ax, [r[key] for r in rows], values, colour, title, xlabel)
    fig.tight_layout()
    return _png(fig)


def make_plots(data: ReportData, progress: bool = False) -> dict[str, bytes]:
    """Every plot of the report, keyed by file stem: ``totals``, ``q<i>-trajectory``, ``q<i>-shares``."""
    plots = {"totals": plot_by_source_and_license(data.source_totals, data.license_totals, "total")}
    sections = tqdm(data.queries, desc="report plots", unit="query", disable=not progress)
    for i, section in enumerate(sections, start=1):
        plots[f"q{i}-trajectory"] = plot_trajectories(section)
        plots[f"q{i}-shares"] = plot_by_source_and_license(section.by_source, section.by_license, "share")
    return plots
