"""Rendering and writing of the governance report: self-contained HTML, the same tables in Markdown, safe writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

import tasks.report as report
from storage.report import gather
from tests.report_html import decode_png, markdown_tables, number, parse_html
from tests.storage.helpers import SAMPLES, SETTINGS, lineage_world

K = 5


@pytest.fixture
def written(tmp_path):
    store, dda, *_ = lineage_world(tmp_path / "data")
    data = gather(store, SETTINGS, top_k=K)
    return data, dda, report.write_report(data, tmp_path / "out"), tmp_path


def test_html_is_self_contained_and_embeds_every_plot(written):
    data, _, files, _ = written
    text = files.html.read_text()
    for forbidden in ("http://", "https://", "<script", "<link", 'src="/', "url("):
        assert forbidden not in text
    page = parse_html(text)
    assert len(page.images) == 1 + 2 * len(data.queries) == len(files.plots)
    for img, path in zip(sorted(page.images, key=lambda a: a["id"]), sorted(files.plots), strict=True):
        assert img["id"] == f"plot-{path.stem}"
        pixels = decode_png(img["src"])
        assert pixels.shape[0] > 100
        assert pixels.shape[1] > 500
        assert np.array_equal(pixels, np.asarray(imread(path)))
        assert pixels[..., :3].std() > 0.05  # not a blank canvas
    assert page.section_ids[:4] == ["overview", "across-queries", "queries", "query-1"]
    assert "provenance" in page.section_ids


def test_markdown_has_the_same_tables_as_the_html(written):
    _, _, files, _ = written
    html_tables = list(parse_html(files.html.read_text()).tables.values())
    md = files.markdown.read_text()
    assert html_tables == markdown_tables(md)
    for stem in ("totals", "q1-trajectory", "q2-shares"):
        assert f"](plots/{stem}.png)" in md


def test_rendered_scores_equal_the_lineage_to_display_precision(written):
    _data, dda, files, _ = written
    tables = parse_html(files.html.read_text()).tables
    for qi in range(2):
        header, *rows = tables[f"top-{qi + 1}"]
        assert len(rows) == K
        col = header.index("DDA score S")
        order = sorted(range(len(SAMPLES)), key=lambda i: -dda[qi, i])[:K]
        assert [r[header.index("sample")] for r in rows] == [SAMPLES[i] for i in order]
        np.testing.assert_allclose([number(r[col]) for r in rows], dda[qi, order], atol=5e-5)
        header, *rows = tables[f"by-source-{qi + 1}"]
        shares = [number(r[header.index("share")]) for r in rows]
        assert sum(shares) == pytest.approx(1.0, abs=2e-4)


def test_json_holds_the_rows(written):
    data, _, files, _ = written
    saved = json.loads(files.data.read_text())
    assert saved["settings_fingerprint"] == SETTINGS
    assert [q["top"][0]["sample_id"] for q in saved["queries"]] == [s.top[0]["sample_id"] for s in data.queries]


def test_a_failed_write_keeps_the_previous_report_whole(written, monkeypatch):
    data, _, files, tmp = written
    before = {p.name: p.read_bytes() for p in files.folder.rglob("*") if p.is_file()}

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "render_markdown", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report.write_report(data, files.folder)
    assert {p.name: p.read_bytes() for p in files.folder.rglob("*") if p.is_file()} == before
    # no temporary folder left behind; the report folder's lock file (and its holder) stay beside it
    assert sorted(p.name for p in tmp.iterdir()) == [".out.lock", ".out.lock.json", "data", "out"]


def test_a_report_replaces_the_previous_one_but_never_a_foreign_folder(written):
    data, _, files, tmp = written
    (files.folder / "plots" / "stale.png").write_bytes(b"x")
    report.write_report(data, files.folder)
    assert not (files.folder / "plots" / "stale.png").exists()
    foreign = tmp / "data"
    listing = sorted(p.name for p in foreign.rglob("*"))
    with pytest.raises(ValueError, match="is not a DDA lineage report folder: choose another output folder"):
        report.write_report(data, foreign)
    assert sorted(p.name for p in foreign.rglob("*")) == listing
