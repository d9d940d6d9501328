"""The committed results keep their row contract, and the README's headline quotes only out-of-world rows.

Every quality row (a ``results`` row with a ``mean_auc``) of ``benchmarks/results/*.json`` names its cell
(``world``, ``model``, ``mode``), its ``query``, ``method`` and ``selection``, and carries ``mean_auc``, ``ap`` and
``ci95``; where it keeps per-pair metrics, its means are checked against them. Every number of the README's results
table (BM25, DDA with its interval and seed spread, the other method named) is found among the committed
``selection = out_of_world`` rows.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.hallucination.config import MODELS, MODES

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
CONTRACT = ("world", "model", "mode", "query", "method", "mean_auc", "ap", "ci95", "selection")
HEADLINE_WORLDS = {"canary news": "canary", "fictional people": "people", "invented names": "names",
                   "paraphrase": "paraphrase"}  # fmt: skip
CELL = re.compile(r"\*\*(\d\.\d{3})\*\* \((\d\.\d{3})–(\d\.\d{3})")
OTHER = re.compile(r"^(.+?) (\d\.\d{3}) / (\d\.\d{3})")  # the last column: "NAME no-correction / with"
OTHER_METHODS = {"kronfluence EK-FAC": "kronfluence_ekfac", "TrackStar": "bergson_trackstar",
                 "TracIn over checkpoints": "tracin_cp", "BM25": "bm25"}  # fmt: skip
SEEDS = re.compile(r"(\d\.\d{3}) ± (\d\.\d{3})")


def quality_rows(report: Any) -> list[dict[str, Any]]:
    """A results file's ``results`` rows that report a mean AUC."""
    rows = report.get("results") if isinstance(report, dict) else None
    return [r for r in rows or [] if isinstance(r, dict) and "mean_auc" in r]


@cache
def committed() -> dict[str, dict[str, Any]]:
    """Every committed results file with quality rows, by file name (read once per session; never mutated)."""
    reports = {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    return {name: r for name, r in reports.items() if quality_rows(r)}


def rows_problems(report: dict[str, Any]) -> list[str]:
    """What breaks the row contract in one results file (empty: nothing)."""
    problems = []
    for i, r in enumerate(quality_rows(report)):
        where = f"row {i} ({r.get('method')})"
        missing = [k for k in CONTRACT if k not in r]
        if missing:
            problems.append(f"{where}: missing {missing}")
            continue
        if r["model"] not in MODELS.values() or r["mode"] not in MODES:
            problems.append(f"{where}: model {r['model']!r}, mode {r['mode']!r}")
        if r["selection"] not in ("out_of_world", "in_sample"):
            problems.append(f"{where}: selection {r['selection']!r}")
        if not (0.0 <= r["mean_auc"] <= 1.0 and 0.0 <= r["ap"] <= 1.0):
            problems.append(f"{where}: mean_auc {r['mean_auc']}, ap {r['ap']}")
        if r["ci95"] is None:
            if "ci95_note" not in report:
                problems.append(f"{where}: ci95 null with no ci95_note saying why")
        elif not (len(r["ci95"]) == 2 and 0.0 <= r["ci95"][0] <= r["ci95"][1] <= 1.0):
            problems.append(f"{where}: ci95 {r['ci95']}")
        if "mean_ap" in r and r["ap"] != r["mean_ap"]:
            problems.append(f"{where}: ap {r['ap']} but mean_ap {r['mean_ap']}")
        for key, per_pair in (("mean_auc", "per_pair_auc"), ("ap", "per_pair_ap")):
            if r.get(per_pair) and not np.isclose(r[key], np.mean(list(r[per_pair].values())), atol=1e-12):
                problems.append(f"{where}: {key} {r[key]} is not the mean of {per_pair}")
    return problems


@pytest.mark.parametrize("name", sorted(committed()))
def test_every_committed_quality_row_keeps_the_contract(name):
    assert rows_problems(committed()[name]) == []


def test_a_row_that_breaks_the_contract_is_found():
    good = {"world": "canary", "model": "SmolLM2-135M", "mode": "lora", "query": "counterfactual",
            "method": "default", "mean_auc": 0.9, "ap": 0.5, "mean_ap": 0.5, "ci95": [0.85, 0.95],
            "selection": "out_of_world", "per_pair_auc": {"a": 0.8, "b": 1.0}}  # fmt: skip
    assert rows_problems({"results": [good]}) == []
    broken = [
        {k: v for k, v in good.items() if k != "selection"},
        {**good, "selection": "tuned"},
        {**good, "ci95": None},
        {**good, "ap": 0.6},
        {**good, "mean_auc": 0.95},
        {**good, "ci95": [0.95, 0.85]},
    ]
    for row in broken:
        assert len(rows_problems({"results": [row]})) == 1, row
    assert rows_problems({"results": [{**good, "ci95": None}], "ci95_note": "predates the bootstrap"}) == []


def headline() -> list[tuple[str, str, list[str]]]:
    """The README's results table: (world, mode, cells) per row."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    out = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        label = cells[0].split(", ")
        if len(label) == 2 and label[0] in HEADLINE_WORLDS:
            out.append((HEADLINE_WORLDS[label[0]], {"LoRA": "lora", "full": "full"}[label[1]], cells))
    return out


def out_of_world_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every committed out-of-world quality row of the default at seed 0, and the seed summaries."""
    rows = [r for rep in committed().values() for r in quality_rows(rep)]
    rows = [r for r in rows if r["selection"] == "out_of_world" and r.get("seed", 0) == 0]
    seeds = json.loads((RESULTS / "out_of_world.json").read_text())["seeds"]
    return rows, [s for s in seeds if s["selection"] == "out_of_world"]


def quoted(row: dict[str, Any]) -> tuple[str, str, str]:
    """A row's mean AUC and interval as the README prints them."""
    return f"{row['mean_auc']:.3f}", f"{row['ci95'][0]:.3f}", f"{row['ci95'][1]:.3f}"


def test_the_readme_headline_quotes_only_out_of_world_rows():
    rows, seeds = out_of_world_rows()
    table = headline()
    assert {w for w, _, _ in table} == set(HEADLINE_WORLDS.values())
    for world, mode, cells in table:
        for column, query in ((2, "counterfactual"), (3, "contrastive")):
            found = CELL.search(cells[column])
            assert found, f"{world}/{mode} {query}: no '**AUC** (lo–hi)' in {cells[column]!r}"
            cell = (world, mode, query, MODELS["smollm2"])
            candidates = {quoted(r) for r in rows if (r["world"], r["mode"], r["query"], r["model"]) == cell
                          and r["method"] in ("default", "contrastive")}  # fmt: skip
            assert found.groups() in candidates, f"{world}/{mode} {query}: {found.groups()} not in {candidates}"
            spread = SEEDS.search(cells[column])
            if spread:
                summary = [(f"{s['mean_auc']:.3f}", f"{s['sd_auc']:.3f}") for s in seeds if s["method"] == "default"
                           and (s["world"], s["mode"], s["query"]) == (world, mode, query)]  # fmt: skip
                assert spread.groups() in summary, f"{world}/{mode} {query}: {spread.groups()} not in {summary}"


def test_the_readme_headline_s_bm25_and_other_method_columns_are_out_of_world_rows():
    rows, _ = out_of_world_rows()

    def aucs(world: str, mode: str, query: str, methods: set[str]) -> set[str]:
        return {f"{r['mean_auc']:.3f}" for r in rows if (r["world"], r["mode"], r["query"]) == (world, mode, query)
                and r["method"] in methods}  # fmt: skip

    for world, mode, cells in headline():
        bm25 = re.search(r"\d\.\d{3}", cells[1])
        assert bm25, f"{world}/{mode}: {cells[1]!r}"
        assert bm25.group() in aucs(world, mode, "counterfactual", {"bm25"}), f"{world}/{mode}: {cells[1]!r}"
        other = OTHER.search(cells[4])
        assert other, f"{world}/{mode}: {cells[4]!r}"
        assert other.group(1) in OTHER_METHODS, f"{world}/{mode}: {cells[4]!r}"
        method = OTHER_METHODS[other.group(1)]
        for query, quoted_auc in (("counterfactual", other.group(2)), ("contrastive", other.group(3))):
            named = {method, f"{method}@{query}"}
            assert quoted_auc in aucs(world, mode, query, named), f"{world}/{mode} {query}: {cells[4]!r}"
