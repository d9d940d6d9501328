"""The data-governance report: plots (matplotlib) and HTML + Markdown rendering of :mod:`storage.report` rows.

``write_report`` writes one folder: ``report.html`` (self-contained: inline CSS, plots as PNG data URIs,
no script, no external address, opens offline), ``report.md`` (the same content, plots as files under
``plots/``) and ``report.json`` (the rows, for scripts). The folder is written beside the target and
swapped in when complete, so a killed run leaves the previous report (or none), never half of one.
:func:`render_markdown` without plots is the summary the flows publish as a Prefect artifact.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from storage.lock import announce_wait, exclusive
from storage.report import QuerySection, ReportData, Row
from tasks.config import ScoringConfig, scored_kind

SNIPPET = 140
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MARKER = "report.json"

SECTIONS = {
    "overview": "Overview",
    "across-queries": "Across traced outputs",
    "queries": "Traced outputs",
    "provenance": "Provenance",
}
SCORE_HELP = (
    "s̃_T is the normalised influence at the latest checkpoint folded in (step T), s̃_0 the same at the base "
    "model, s̃_T − λ·s̃_0 its debiased value, and DDA the smoothed score S = Σ_t w_t (s̃_t − λ·s̃_0) / Σ_t w_t over "
    "every checkpoint. Positive means the sample pushed the model toward the traced output. Shares are of the "
    "positive influence Σ max(S, 0)."
)


@dataclass(frozen=True)
class ReportFiles:
    """Where :func:`write_report` put the report."""

    folder: Path
    html: Path
    markdown: Path
    data: Path
    plots: tuple[Path, ...]


# -- formatting ---------------------------------------------------------------------------------------------


def fmt_score(x: float | None) -> str:
    """A score as shown in the report: signed, 4 decimals (``–`` when missing)."""
    return "–" if x is None else f"{x:+.4f}"


def fmt_share(x: float | None) -> str:
    """A share as shown in the report: percent with 2 decimals (``n/a`` when there is no positive influence)."""
    return "n/a" if x is None else f"{100 * x:.2f} %"


def snippet(text: str | None, limit: int = SNIPPET) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _epoch(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


# -- plots ----------------------------------------------------------------------------------------------------


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


# -- tables -------------------------------------------------------------------------------------------------

Column = tuple[str, Callable[[Row], str]]


def _settings_subtree(data: ReportData) -> dict[str, Any]:
    if not data.settings_json:
        return {}
    tree = json.loads(data.settings_json)
    return {key: tree[key] for key in ("projection", "scoring") if key in tree}


def correction_line(data: ReportData, section: QuerySection) -> tuple[str, str, str] | None:
    """(label, text, note) of the correction the output's query contrasts with under the report's settings: the
    given one (contrastive query), the one derived at the latest checkpoint (counterfactual query), or a given
    one these settings do not use; None for a plain query without one."""
    q, d = section.query, section.derived
    scoring, shipped = _settings_subtree(data).get("scoring", {}), ScoringConfig()  # unknown settings: the defaults
    kind = scored_kind(bool(q["corrected"]), scoring.get("query_kind", shipped.query_kind),
                       scoring.get("counterfactual", shipped.counterfactual))  # fmt: skip
    if kind == "contrastive":
        return "corrected", q["corrected"], "contrastive query"
    if kind == "counterfactual" and d is not None:
        edit = f"{d['token']!r} → {d['replacement']!r} at {d['checkpoint_id']}, {d['gain']:+.2f} nats"
        # stores scored before the option existed have no min_edit_gain in their settings: every edit was used
        threshold = scoring.get("min_edit_gain", None if scoring else shipped.min_edit_gain)
        if threshold is not None and d["gain"] <= threshold:
            return "derived correction", d["response"], f"not used, plain query there: {edit} ≤ {threshold:g}"
        return "derived correction", d["response"], f"counterfactual query: {edit}"
    if q["corrected"]:
        return "corrected", q["corrected"], f"given; this {kind} query does not use it"
    return None


def _tables(data: ReportData) -> dict[str, tuple[list[Column], list[Row]]]:
    """The report's tables (columns as (header, cell formatter)), shared by the HTML and the Markdown."""
    return {
        "source_totals": (totals_columns("source"), data.source_totals),
        "license_totals": (totals_columns("license"), data.license_totals),
        "recurring": ([
            ("sample", lambda r: r["sample_id"]), ("in top-k of", lambda r: f"{r['n_queries']} outputs"),
            ("mean rank", lambda r: f"{r['mean_rank']:.1f}"), ("Σ DDA score", lambda r: fmt_score(r["total_score"])),
            ("source", lambda r: r["source"] or "(unknown)"), ("license", lambda r: r["license"] or "(unknown)"),
            ("text", lambda r: snippet(f"{r['prompt']} → {r['response']}")),
        ], data.recurring),
        "checkpoints": ([
            ("checkpoint", lambda r: r["checkpoint_id"]), ("role", lambda r: r["role"]),
            ("step", lambda r: str(r["step"])), ("epoch", lambda r: _epoch(r["epoch"])),
            ("fingerprint", lambda r: r["fingerprint"]), ("indexed at", lambda r: f"{r['indexed_at']:%Y-%m-%d %H:%M}"),
            ("path", lambda r: r["path"]),
        ], data.checkpoints),
        "datasets": ([
            ("dataset", lambda r: r["dataset"]), ("samples", lambda r: str(r["n_samples"])),
            ("version (md5 of content hashes)", lambda r: r["version"]), ("sources", lambda r: r["sources"]),
            ("licenses", lambda r: r["licenses"]), ("last ingested", lambda r: f"{r['last_ingested']:%Y-%m-%d %H:%M}"),
        ], data.datasets),
        "runs": ([
            ("flow run", lambda r: r["run_id"]), ("flow", lambda r: r["flow_name"]), ("status", lambda r: r["status"]),
            ("started", lambda r: f"{r['started_at']:%Y-%m-%d %H:%M:%S}"), ("code", lambda r: r["code_version"]),
            ("settings", lambda r: r["settings_fingerprint"]), ("wrote", lambda r: snippet(r["wrote_json"], 90)),
        ], data.runs),
    }  # fmt: skip


def top_columns() -> list[Column]:
    """Columns of a query's top-k table."""
    return [
        ("rank", lambda r: str(r["rank"])),
        ("sample", lambda r: r["sample_id"]),
        ("source", lambda r: r["source"] or "(unknown)"),
        ("license", lambda r: r["license"] or "(unknown)"),
        ("s̃_T", lambda r: fmt_score(r["score"])),
        ("s̃_0 (base)", lambda r: fmt_score(r["base_score"])),
        ("s̃_T − λ·s̃_0", lambda r: fmt_score(r["debiased_score"])),
        ("DDA score S", lambda r: fmt_score(r["dda_score"])),
        ("text", lambda r: snippet(f"{r['prompt']} → {r['response']}")),
    ]


def totals_columns(key: str) -> list[Column]:
    """Columns of the across-outputs ranking by ``key`` (source or license)."""
    return [
        (key, lambda r: r[key]),
        ("Σ DDA score", lambda r: fmt_score(r["total_score"])),
        ("mean share", lambda r: fmt_share(r["mean_share"])),
        ("samples", lambda r: str(r["n_samples"])),
    ]


def share_columns(key: str) -> list[Column]:
    """Columns of a query's share table by ``key`` (source or license)."""
    return [
        (key, lambda r: r[key]),
        ("share", lambda r: fmt_share(r["share"])),
        ("Σ DDA score", lambda r: fmt_score(r["total_score"])),
        ("samples", lambda r: str(r["n_samples"])),
    ]


def summary_table(data: ReportData) -> list[dict[str, Any]]:
    """One row per (traced output, top-k sample): the table artifact the flows publish."""
    return [
        {"query_id": s.query["query_id"], "rank": r["rank"], "sample_id": r["sample_id"], "source": r["source"],
         "license": r["license"], "score": r["score"], "base_score": r["base_score"],
         "debiased_score": r["debiased_score"], "dda_score": r["dda_score"]}
        for s in data.queries for r in s.top
    ]  # fmt: skip


def _overview(data: ReportData) -> list[str]:
    """Sentences of the overview (plain text)."""
    tuned = [c for c in data.checkpoints if c["role"] == "finetuned"]
    lines = [
        f"{len(data.queries)} traced output(s), {sum(d['n_samples'] for d in data.datasets)} training samples in "
        f"{len(data.datasets)} dataset(s), the base model and {len(tuned)} fine-tuning checkpoint(s).",
        f"Scoring settings {data.settings_fingerprint}, projection {data.projection_fingerprint} (D = {data.dim}).",
    ]
    if data.source_totals:
        top = data.source_totals[0]
        lines.append(f"Most influential source: {top['source']} (Σ DDA score {fmt_score(top['total_score'])}, "
                     f"mean share {fmt_share(top['mean_share'])}).")  # fmt: skip
    if data.license_totals:
        top = data.license_totals[0]
        lines.append(f"Most influential license: {top['license']} (Σ DDA score {fmt_score(top['total_score'])}, "
                     f"mean share {fmt_share(top['mean_share'])}).")  # fmt: skip
    if data.other_fingerprints:
        others = ", ".join(r["settings_fingerprint"] for r in data.other_fingerprints)
        lines.append(f"The store also holds lineage under other settings ({others}); this report reads only one.")
    return lines


# -- Markdown -----------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(columns: list[Column], rows: Iterable[Row]) -> str:
    """A GitHub-flavoured Markdown table (``_none_`` for no rows)."""
    rows = list(rows)
    if not rows:
        return "_none_"
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(f(r)) for _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(
    data: ReportData, plot_files: dict[str, str] | None = None, total_queries: int | None = None
) -> str:
    """The report as Markdown; ``plot_files`` maps plot stems to relative paths (None: no plots, the summary).

    ``total_queries`` > ``len(data.queries)`` says that the per-output part shows only the first ones.
    """
    t = _tables(data)

    def image(stem: str, alt: str) -> list[str]:
        return [f"![{alt}]({plot_files[stem]})", ""] if plot_files and stem in plot_files else []

    out = ["# DDA lineage — data-governance report", "",
           f"Generated {data.generated_at:%Y-%m-%d %H:%M:%S} UTC from the store `{data.store_root}`.", "",
           f"## {SECTIONS['overview']}", "", *[f"- {line}" for line in _overview(data)], "", SCORE_HELP, "",
           f"## {SECTIONS['across-queries']}", "", "### Sources ranked by total influence", "",
           md_table(*t["source_totals"]), "", "### Licenses ranked by total influence", "",
           md_table(*t["license_totals"]), "", *image("totals", "total influence by source and license"),
           f"### Samples that recur in the top {data.top_k} of several outputs", "", md_table(*t["recurring"]), "",
           f"## {SECTIONS['queries']}", ""]  # fmt: skip
    for i, s in enumerate(data.queries, start=1):
        q = s.query
        out += [f"### {i}. `{q['query_id']}`", "", f"- prompt: {snippet(q['prompt'], 400)}",
                f"- output: **{snippet(q['response'], 400)}**"]  # fmt: skip
        line = correction_line(data, s)
        if line:
            out.append(f"- {line[0]}: {snippet(line[1], 400)} ({line[2]})")
        out += [f"- lineage over {q['n_checkpoints']} checkpoint(s), {q['n_samples']} samples ranked", "",
                f"Top {len(s.top)} training samples:", "", md_table(top_columns(), s.top), "",
                *image(f"q{i}-trajectory", "score trajectory"), "Influence by source:", "",
                md_table(share_columns("source"), s.by_source), "", "Influence by license:", "",
                md_table(share_columns("license"), s.by_license), "",
                *image(f"q{i}-shares", "influence shares")]  # fmt: skip
    if total_queries is not None and total_queries > len(data.queries):
        out += [f"… and {total_queries - len(data.queries)} more traced outputs: `dda report` shows every one.", ""]
    settings = json.dumps(_settings_subtree(data), indent=2, sort_keys=True)
    out += [f"## {SECTIONS['provenance']}", "", "### Base model and checkpoints", "", md_table(*t["checkpoints"]), "",
            "### Datasets", "", md_table(*t["datasets"]), "", "### Projection and settings", "",
            f"- projection fingerprint: `{data.projection_fingerprint}` (D = {data.dim})",
            f"- settings fingerprint: `{data.settings_fingerprint}`", "", "```json", settings, "```", "",
            "### Flow runs that wrote these numbers", "", md_table(*t["runs"]), ""]  # fmt: skip
    return "\n".join(out)


# -- HTML ---------------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#fff}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}h2{border-bottom:2px solid #d8dde6;padding-bottom:4px;margin-top:36px}
h3{margin-top:24px}nav a{margin-right:14px}.meta{color:#5a6372;font-size:.9em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.86em;width:100%}
th,td{border:1px solid #d8dde6;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f1f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
article{border:1px solid #d8dde6;border-radius:6px;padding:4px 16px 12px;margin:16px 0}
.output{background:#fff4e5;padding:6px 8px;border-left:4px solid #e8a33d}
img{max-width:100%;height:auto;display:block;margin:8px 0}pre{background:#f6f8fa;padding:8px;overflow:auto}
code{font-size:.92em}
"""

NUMERIC = {"s̃_T", "s̃_0 (base)", "s̃_T − λ·s̃_0", "DDA score S", "Σ DDA score", "share", "mean share", "samples",
           "rank", "step", "epoch", "mean rank"}  # fmt: skip


def html_table(columns: list[Column], rows: Iterable[Row], table_id: str) -> str:
    """An HTML table with escaped cells; numeric columns are right-aligned (``<p>none</p>`` for no rows)."""
    rows = list(rows)
    if not rows:
        return f'<p id="{table_id}" class="meta">none</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if h in NUMERIC else ''}>{html.escape(f(r))}</td>" for h, f in columns)
        + "</tr>"
        for r in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(plots: dict[str, bytes], stem: str, alt: str) -> str:
    if stem not in plots:
        return ""
    data = base64.b64encode(plots[stem]).decode("ascii")
    return f'<img class="plot" id="plot-{stem}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(data: ReportData, plots: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page (inline CSS, plots as data URIs, no script)."""
    t = _tables(data)
    e = html.escape
    nav = "".join(f'<a href="#{key}">{e(title)}</a>' for key, title in SECTIONS.items())
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>DDA lineage report — {e(data.settings_fingerprint)}</title><style>{CSS}</style></head><body><main>",
        "<h1>DDA lineage — data-governance report</h1>",
        f'<p class="meta">Generated {data.generated_at:%Y-%m-%d %H:%M:%S} UTC from the store '
        f"<code>{e(data.store_root)}</code>.</p><nav>{nav}</nav>",
        f'<section id="overview"><h2>{SECTIONS["overview"]}</h2><ul>',
        *[f"<li>{e(line)}</li>" for line in _overview(data)],
        f'</ul><p class="meta">{e(SCORE_HELP)}</p></section>',
        f'<section id="across-queries"><h2>{SECTIONS["across-queries"]}</h2>',
        "<h3>Sources ranked by total influence</h3>",
        html_table(*t["source_totals"], "source-totals"),
        "<h3>Licenses ranked by total influence</h3>",
        html_table(*t["license_totals"], "license-totals"),
        _img(plots, "totals", "total influence by source and by license"),
        f"<h3>Samples that recur in the top {data.top_k} of several outputs</h3>",
        html_table(*t["recurring"], "recurring"),
        "</section>",
        f'<section id="queries"><h2>{SECTIONS["queries"]}</h2>',
    ]
    for i, s in enumerate(data.queries, start=1):
        q = s.query
        line = correction_line(data, s)
        corrected = f"<p>{e(line[0])}: {e(line[1])} <span class=meta>({e(line[2])})</span></p>" if line else ""
        parts += [
            f'<article id="query-{i}" data-query-id="{e(q["query_id"])}"><h3>{i}. <code>{e(q["query_id"])}</code></h3>',
            f"<p>prompt: {e(snippet(q['prompt'], 600))}</p><p class=output>output: <b>{e(q['response'])}</b></p>",
            corrected,
            f'<p class="meta">lineage over {q["n_checkpoints"]} checkpoint(s), {q["n_samples"]} samples ranked</p>',
            f"<h4>Top {len(s.top)} training samples</h4>",
            html_table(top_columns(), s.top, f"top-{i}"),
            _img(plots, f"q{i}-trajectory", "score trajectory of the top samples"),
            "<h4>Influence by source and by license</h4>",
            html_table(share_columns("source"), s.by_source, f"by-source-{i}"),
            html_table(share_columns("license"), s.by_license, f"by-license-{i}"),
            _img(plots, f"q{i}-shares", "influence share by source and by license"),
            "</article>",
        ]
    settings = json.dumps(_settings_subtree(data), indent=2, sort_keys=True)
    parts += [
        f'</section><section id="provenance"><h2>{SECTIONS["provenance"]}</h2>',
        "<h3>Base model and checkpoints</h3>", html_table(*t["checkpoints"], "checkpoints"),
        "<h3>Datasets</h3>", html_table(*t["datasets"], "datasets"),
        "<h3>Projection and settings</h3>",
        f"<p>projection fingerprint <code>{e(str(data.projection_fingerprint))}</code> (D = {data.dim}); "
        f"settings fingerprint <code>{e(data.settings_fingerprint)}</code></p><pre>{e(settings)}</pre>",
        "<h3>Flow runs that wrote these numbers</h3>", html_table(*t["runs"], "runs"),
        "</section></main></body></html>",
    ]  # fmt: skip
    return "\n".join(p for p in parts if p)


# -- files --------------------------------------------------------------------------------------------------


def _check_target(out_dir: Path) -> None:
    """Refuse to replace a folder that is not empty and not a report of ours."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).exists())):
        raise ValueError(f"{out_dir} exists and is not a DDA lineage report folder: choose another output folder")


def write_report(
    data: ReportData, out_dir: str | Path, progress: bool = False, lock_timeout: float = 300.0
) -> ReportFiles:
    """Render ``data`` and write ``report.html``, ``report.md``, ``report.json`` and ``plots/`` into ``out_dir``.

    The folder is built beside ``out_dir`` and swapped in at the end: a previous report is replaced whole.
    Writers of one report folder take turns (a lock file ``.<name>.lock`` beside it, waited for up to
    ``lock_timeout`` seconds); the store itself is only read.
    """
    out_dir = Path(out_dir).resolve()
    _check_target(out_dir)
    plots = make_plots(data, progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir.with_name(f".{out_dir.name}.lock"), "dda report", lock_timeout, announce_wait):
        _check_target(out_dir)
        _swap_in(data, plots, out_dir)
    return ReportFiles(out_dir, out_dir / "report.html", out_dir / "report.md", out_dir / MARKER,
                       tuple(out_dir / "plots" / f"{stem}.png" for stem in plots))  # fmt: skip


def _swap_in(data: ReportData, plots: dict[str, bytes], out_dir: Path) -> None:
    """Write the report into a temporary folder beside ``out_dir``, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-report-", dir=out_dir.parent))
    try:
        (tmp / "plots").mkdir()
        for stem, png in plots.items():
            (tmp / "plots" / f"{stem}.png").write_bytes(png)
        (tmp / "report.html").write_text(render_html(data, plots), encoding="utf-8")
        files = {stem: f"plots/{stem}.png" for stem in plots}
        (tmp / "report.md").write_text(render_markdown(data, files), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(asdict(data), indent=1, default=str, ensure_ascii=False), encoding="utf-8")
        old = out_dir.with_name(f".old-{out_dir.name}")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
