"""``dda report`` on the demo: every section, numbers equal to the SQL views, the flows' artifacts, Chromium."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest
from matplotlib.image import imread

from flows.cli import main
from flows.pipeline import ARTIFACT_QUERIES, SUMMARY_KEY, TABLE_KEY
from storage.report import gather
from storage.sql import query
from storage.store import LineageStore
from tasks.report_format import SECTIONS, render_markdown
from tasks.report_plots import COLOURS
from tests.report_html import markdown_tables, number, parse_html

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
TOP_K = 10
SCORE_TOL = 5e-5 + 1e-9  # scores are printed with 4 decimals
SHARE_TOL = 5e-5 + 1e-9  # shares as percent with 2 decimals


@pytest.fixture(scope="module")
def demo_report(demo):
    root, report, _ = demo
    assert main(["report", "--data-dir", str(root), "--quiet"]) == 0
    out = root / "report"
    return root, report.settings_fingerprint, out, parse_html((out / "report.html").read_text())


def _views(root, sql, **params):
    return query(LineageStore.open(root / "store"), sql, params).to_pylist()


def _table(page, table_id):
    header, *rows = page.tables[table_id]
    return [dict(zip(header, r, strict=True)) for r in rows]


def test_every_section_is_there_for_every_traced_output(demo_report):
    root, fp, out, page = demo_report
    ids = [r["query_id"] for r in _views(root, "SELECT DISTINCT query_id FROM lineage WHERE "
                                         "settings_fingerprint = $fp ORDER BY query_id", fp=fp)]  # fmt: skip
    assert len(ids) > 1
    html_text = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for key, title in SECTIONS.items():
        assert key in page.section_ids
        assert f"\n## {title}\n" in md
    articles = re.findall(r'<article id="query-(\d+)" data-query-id="([^"]+)"', html_text)
    assert [qid for _, qid in articles] == ids
    for i in range(1, len(ids) + 1):
        for table in (f"top-{i}", f"by-source-{i}", f"by-license-{i}"):
            assert table in page.tables
        assert {f"plot-q{i}-trajectory", f"plot-q{i}-shares"} <= {img["id"] for img in page.images}
    assert {"source-totals", "license-totals", "recurring", "checkpoints", "datasets", "runs"} <= set(page.tables)
    assert list(page.tables.values()) == markdown_tables(md)  # the Markdown says the same
    assert (out / "plots" / "totals.png").is_file()


def test_top_samples_and_their_scores_equal_the_views(demo_report):
    root, fp, _, page = demo_report
    last = _views(root, "SELECT max(step) AS s FROM checkpoints WHERE role = 'finetuned'")[0]["s"]
    queries = _views(root, "SELECT DISTINCT query_id FROM lineage WHERE settings_fingerprint = $fp "
                           "ORDER BY query_id", fp=fp)  # fmt: skip
    for i, q in enumerate(queries, start=1):
        lineage = _views(root, "SELECT rank, sample_id, dda_score FROM lineage WHERE query_id = $q AND "
                               "settings_fingerprint = $fp AND rank <= $k ORDER BY rank",
                         q=q["query_id"], fp=fp, k=TOP_K)  # fmt: skip
        latest = {r["sample_id"]: r for r in _views(
            root, "SELECT sc.* FROM scores sc JOIN checkpoints c USING (checkpoint_id) WHERE sc.query_id = $q AND "
                  "sc.settings_fingerprint = $fp AND c.step = $step", q=q["query_id"], fp=fp, step=last)}  # fmt: skip
        rows = _table(page, f"top-{i}")
        assert [(int(r["rank"]), r["sample"]) for r in rows] == [(x["rank"], x["sample_id"]) for x in lineage]
        for r, x in zip(rows, lineage, strict=True):
            assert number(r["DDA score S"]) == pytest.approx(x["dda_score"], abs=SCORE_TOL)
            ref = latest[x["sample_id"]]
            assert number(r["s̃_T"]) == pytest.approx(ref["score"], abs=SCORE_TOL)
            assert number(r["s̃_0 (base)"]) == pytest.approx(ref["base_score"], abs=SCORE_TOL)
            assert number(r["s̃_T − λ·s̃_0"]) == pytest.approx(ref["debiased_score"], abs=SCORE_TOL)
        for key, view in (("source", "source_influence"), ("license", "license_influence")):
            ref = {x[key]: x for x in _views(root, f"SELECT * FROM {view} WHERE query_id = $q AND "
                                                   "settings_fingerprint = $fp", q=q["query_id"], fp=fp)}  # fmt: skip
            shown = _table(page, f"by-{key}-{i}")
            assert {r[key] for r in shown} == set(ref)
            for r in shown:
                assert number(r["share"]) == pytest.approx(ref[r[key]]["share"], abs=SHARE_TOL)
                assert number(r["Σ DDA score"]) == pytest.approx(ref[r[key]]["total_score"], abs=SCORE_TOL)
                assert int(r["samples"]) == ref[r[key]]["n_samples"]


def test_across_outputs_totals_and_recurring_samples_equal_the_views(demo_report):
    root, fp, _, page = demo_report
    for key, view in (("source", "source_influence"), ("license", "license_influence")):
        totals: dict[str, float] = defaultdict(float)
        for x in _views(root, f"SELECT * FROM {view} WHERE settings_fingerprint = $fp", fp=fp):
            totals[x[key]] += x["total_score"]
        shown = _table(page, f"{key}-totals")
        assert [r[key] for r in shown] == sorted(totals, key=lambda k: -totals[k])
        for r in shown:
            assert number(r["Σ DDA score"]) == pytest.approx(totals[r[key]], abs=SCORE_TOL)
    tops = _views(root, "SELECT query_id, sample_id, rank, dda_score FROM lineage WHERE settings_fingerprint = $fp "
                        "AND rank <= $k", fp=fp, k=TOP_K)  # fmt: skip
    per_sample: dict[str, list[dict]] = defaultdict(list)
    for x in tops:
        per_sample[x["sample_id"]].append(x)
    recurring = _table(page, "recurring")
    assert recurring, "the demo's outputs share top samples"
    counts = [len(per_sample[r["sample"]]) for r in recurring]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == max(len(v) for v in per_sample.values())
    for r in recurring:
        xs = per_sample[r["sample"]]
        assert r["in top-k of"] == f"{len(xs)} outputs"
        assert float(r["mean rank"]) == pytest.approx(np.mean([x["rank"] for x in xs]), abs=0.05)
        assert number(r["Σ DDA score"]) == pytest.approx(sum(x["dda_score"] for x in xs), abs=SCORE_TOL)


def test_provenance_names_checkpoints_datasets_settings_and_flow_runs(demo_report):
    root, fp, out, page = demo_report
    checkpoints = _views(root, "SELECT * FROM checkpoints ORDER BY role <> 'base', step")
    shown = _table(page, "checkpoints")
    assert [(r["checkpoint"], r["fingerprint"], int(r["step"])) for r in shown] == [
        (c["checkpoint_id"], c["fingerprint"], c["step"]) for c in checkpoints
    ]
    assert [r["epoch"] for r in shown[1:]] == [f"{c['epoch']:.2f}" for c in checkpoints[1:]]
    hashes = sorted(x["content_hash"] for x in _views(root, "SELECT content_hash FROM samples"))
    assert (
        _table(page, "datasets")[0]["version (md5 of content hashes)"]
        == hashlib.md5(",".join(hashes).encode()).hexdigest()
    )
    runs = _views(root, "SELECT run_id, flow_name, code_version FROM runs WHERE settings_fingerprint = $fp", fp=fp)
    shown_runs = {r["flow run"]: r for r in _table(page, "runs")}
    assert {r["run_id"] for r in runs} <= set(shown_runs)
    assert {r["flow_name"] for r in runs} >= {"dda-index-run", "dda-attribute"}
    for r in runs:
        assert shown_runs[r["run_id"]]["code"] == r["code_version"]
    html_text = (out / "report.html").read_text()
    meta = LineageStore.open(root / "store").meta
    assert f"projection fingerprint <code>{meta.projection_fingerprint}</code> (D = {meta.dim})" in html_text
    assert f"settings fingerprint <code>{fp}</code>" in html_text
    assert '"normalisation": "zscore"' in html.unescape(html_text)  # the scoring settings behind the numbers


def _artifacts(key):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def _without_generated_line(markdown: str) -> str:
    return "\n".join(line for line in markdown.splitlines() if not line.startswith("Generated "))


def test_every_flow_run_publishes_the_summary_as_markdown_and_table_artifacts(demo_report):
    root, fp, _, _ = demo_report
    runs = _views(root, "SELECT run_id, flow_name FROM runs WHERE settings_fingerprint = $fp ORDER BY started_at",
                  fp=fp)  # fmt: skip
    summaries = {str(a.flow_run_id): a for a in _artifacts(SUMMARY_KEY)}
    tables = {str(a.flow_run_id): a for a in _artifacts(TABLE_KEY)}
    assert {r["run_id"] for r in runs} <= set(summaries)
    attribute_runs = [r["run_id"] for r in runs if r["flow_name"] == "dda-attribute"]
    assert attribute_runs
    published = summaries[attribute_runs[-1]].data
    data = gather(LineageStore.open(root / "store"), fp)
    shown = replace(data, queries=data.queries[:ARTIFACT_QUERIES])
    expected = render_markdown(shown, None, total_queries=len(data.queries))
    # Same text up to the flow-run table, which gained the runs recorded after this artifact was published.
    cut = "### Flow runs that wrote these numbers"
    assert _without_generated_line(published).split(cut)[0] == _without_generated_line(expected).split(cut)[0]
    for title in SECTIONS.values():
        assert f"## {title}" in published
    rows = tables[attribute_runs[-1]].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert len(rows) == sum(len(s.top) for s in shown.queries)
    first = shown.queries[0].top[0]
    assert (rows[0]["query_id"], rows[0]["sample_id"]) == (shown.queries[0].query["query_id"], first["sample_id"])
    assert rows[0]["dda_score"] == pytest.approx(first["dda_score"])


def test_report_refuses_unknown_queries_and_writes_nothing(demo, tmp_path, capsys):
    root, _, _ = demo
    out = tmp_path / "r"
    assert main(["report", "--data-dir", str(root), "--out", str(out), "--query-id", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dda report: error: no lineage for query nope under settings")
    assert len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["report", "--data-dir", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "holds no lineage store: run `dda ingest` and `dda index` (or `dda demo`) first" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "store").exists()


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]  # fmt: skip


def _screenshot(html_path, png_path, profile, height):
    cmd = [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
           f"--window-size=1200,{height}", f"--screenshot={png_path}", html_path.as_uri()]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return np.asarray(imread(png_path))[..., :3]


def _colour_pixels(pixels, hex_colour, tol=0.03):
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).max(axis=-1) < tol).sum())


def test_report_renders_in_headless_chromium_with_its_plots(demo, tmp_path):
    if shutil.which("chromium") is None:
        if os.environ.get("DDA_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    root, report, _ = demo
    ids = sorted(report.auc["DDA (the lineage view)"])[:2]
    out = tmp_path / "two"
    args = ["report", "--data-dir", str(root), "--out", str(out), "--quiet"]
    assert main([*args, "--query-id", ids[0], "--query-id", ids[1]]) == 0
    html_path = out / "report.html"
    shot = _screenshot(html_path, tmp_path / "page.png", tmp_path / "profile", 6000)
    # Not blank: a good part of the page is ink, with many distinct shades (text, tables, plots).
    ink = (shot.min(axis=-1) < 0.9).mean()
    assert ink > 0.02, ink
    assert len(np.unique((shot * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200
    # The plots are drawn: their colours cover many pixels, and none of them without the images.
    stripped = tmp_path / "stripped.html"
    stripped.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', html_path.read_text()))
    control = _screenshot(stripped, tmp_path / "control.png", tmp_path / "profile2", 6000)
    for colour in COLOURS[:4]:  # trajectory lines, share bars, total bars
        assert _colour_pixels(shot, colour) > 300, colour
        assert _colour_pixels(control, colour) == 0, colour
