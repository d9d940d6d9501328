"""The report's content as text: number formats, the correction an output is traced against, its tables, and
their Markdown and self-contained HTML renderings (no files, no plotting: :mod:`tasks.report` writes them)."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Iterable
from typing import Any

from storage.report import QuerySection, ReportData, Row
from tasks.config import ScoringConfig, scored_kind

SNIPPET = 140

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


def epoch(x: float | None) -> str:
    """An epoch with two decimals, or a dash."""
    return "–" if x is None else f"{x:.2f}"


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
        if d.get("gain_is_bound"):  # the search stopped at the threshold: the gain bounds every edit's
            bound = f"no edit gains more than {d['gain']:+.2f} nats at {d['checkpoint_id']}"
            if threshold is None or d["gain"] > threshold:  # stored under a higher min_edit_gain than these settings
                return "derived correction", d["response"], f"{bound}: trace it again to derive the edit"
            return "derived correction", d["response"], f"not used, plain query there: {bound} ≤ {threshold:g}"
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
            ("step", lambda r: str(r["step"])), ("epoch", lambda r: epoch(r["epoch"])),
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
