"""Evaluation: every method of one fine-tuning mode scored per canary pair, settings chosen leave-one-pair-out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.evaluate import PairMetrics, Selected, bootstrap_ci, evaluate, leave_one_pair_out, mean_of
from benchmarks.hallucination.config import KINDS, Log, Size
from benchmarks.hallucination.methods import (
    LAMBDAS,
    MODULE_SETS,
    NORMALISATIONS,
    PRECONDITIONERS,
    PROJECTION_KS,
    STUDY_PROJECTION,
    _sliced_scores,
    _study_vectors,
    bm25_rankings,
    cea_all_states,
    default_projection,
    normalise_cea,
    slice_columns,
    study_rankings,
    study_spec,
    sub_layout,
)
from benchmarks.hallucination.system import lineage_matrix, run_system, score_cube, variant, variant_key
from benchmarks.hallucination.worlds import load_truth, read_queries


def split_by_pair(
    matrix: np.ndarray, qids: list[str], query_pairs: dict[str, str], pairs: list[str]
) -> dict[str, np.ndarray]:
    """Rows of a (m, n) query × sample matrix grouped by canary pair."""
    return {p: matrix[[i for i, q in enumerate(qids) if query_pairs[q] == p]] for p in pairs}


def lopo(
    candidates: dict[str, dict[str, PairMetrics]], pairs: list[str]
) -> tuple[dict[str, PairMetrics], dict[str, str]]:
    selected: Selected = leave_one_pair_out(candidates, pairs)
    return selected.metrics, selected.chosen


# What the shipped defaults trace per column: an output without a correction is traced by the counterfactual query
DEFAULT_QUERY = {"plain": "counterfactual", "contrastive": "contrastive"}


@dataclass(frozen=True)
class Context:
    """What every ranking of one mode is evaluated against."""

    pairs: list[str]
    qids: list[str]
    sids: list[str]
    query_pairs: dict[str, str]
    truth: dict[str, np.ndarray]

    def by_pair(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of a (m, n) ranking grouped by canary pair."""
        return split_by_pair(matrix, self.qids, self.query_pairs, self.pairs)

    def score(self, matrix: np.ndarray) -> dict[str, PairMetrics]:
        """Per-pair metrics of a (m, n) per-query ranking."""
        return evaluate(self.by_pair(matrix), self.truth)


def mode_context(root: Path, prepared: dict[str, Any]) -> tuple[Context, list[dict[str, str]], list[str]]:
    """A mode's evaluation context (pairs with queries, sorted query and sample ids, positives per pair), its
    queries (each with its ``pair``) and the training texts in sample-id order; ``prepared`` is
    :func:`~benchmarks.hallucination.worlds.prepare_mode`'s record."""
    pairs = [p for p, c in prepared["per_pair"].items() if c["queries"] != "none"]
    queries = [{**q, "pair": prepared["query_pairs"][q["id"]]} for q in read_queries(root)]
    sids, truth, texts = load_truth(root, pairs)
    return Context(pairs, [q["id"] for q in queries], sids, prepared["query_pairs"], truth), queries, texts


def record(
    mode: str, kind: str, method: str, metrics: dict[str, PairMetrics], seconds: float, **more: Any
) -> dict[str, Any]:
    """One JSON result record: ``mode``, ``query``, ``method``, ``mean_auc``, ``ap`` (the mean AP, also as ``mean_ap``)
    and ``ci95`` (bootstrap interval of the mean AUC over outputs), plus recall, per-pair metrics and notes; the
    caller adds the cell's :func:`~benchmarks.hallucination.config.cell_fields`."""
    ap = mean_of(metrics, "ap")
    return {
        "mode": mode, "query": kind, "method": method, "mean_auc": mean_of(metrics, "auc"), "ap": ap,
        "mean_ap": ap, "mean_recall_at_r": mean_of(metrics, "recall_at_r"),
        "mean_recall_at_10": mean_of(metrics, "recall_at_10"), "mean_mrr": mean_of(metrics, "mrr"),
        "per_pair_auc": {p: m.auc for p, m in metrics.items()}, "per_pair_ap": {p: m.ap for p, m in metrics.items()},
        "per_pair_recall_at_r": {p: m.recall_at_r for p, m in metrics.items()}, "ci95": bootstrap_ci(metrics),
        "seconds": seconds, **more,
    }  # fmt: skip


@dataclass
class ModeResult:
    """Everything measured for one fine-tuning mode."""

    mode: str
    records: list[dict[str, Any]] = field(default_factory=list)
    study: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Costs:
    """Seconds of the parts methods are made of (indexing includes the share of query embedding)."""

    state: dict[str, float]
    ckpts: list[str]
    scoring: float
    bm25: float
    cea: list[float]
    default: float

    @property
    def last(self) -> float:
        """Embedding at the last checkpoint plus scoring."""
        return self.state[self.ckpts[-1]] + self.scoring

    @property
    def finetuned(self) -> float:
        """Embedding at every fine-tuning checkpoint plus scoring."""
        return sum(self.state[c] for c in self.ckpts) + self.scoring


def debias_grid(
    cubes: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]], kind: str, ctx: Context
) -> dict[tuple[str, str, float, str], dict[str, PairMetrics]]:
    """Per-pair metrics of s̃_T − λ s̃_0 (``last``) and mean_t (s̃_t − λ s̃_0) (``mean``) for every study variant."""
    grid = {}
    for (p, n, k), (s, b) in cubes.items():
        if k == kind:
            for lam in LAMBDAS:
                for which in ("last", "mean"):
                    grid[(p, n, lam, which)] = ctx.score(study_rankings(s, b, lam, which))
    return grid


def cea_grid(cea: np.ndarray, ctx: Context) -> dict[str, dict[str, PairMetrics]]:
    """Per-pair metrics of DDA over CEA scores, mean_t (c̃_t − λ c̃_0), for normalisations and λ > 0."""
    out = {}
    for n in ("none", "zscore"):
        c = normalise_cea(cea, n)
        for lam in LAMBDAS[1:]:
            ranking = (c[1:] - lam * c[0]).mean(axis=0)
            out[f"cea/{n}/λ={lam}"] = evaluate({p: ranking[j][None] for j, p in enumerate(ctx.pairs)}, ctx.truth)
    return out


def projection_study(
    store: Any, layout: Any, ckpts: list[str], kind: str, scoring: Any, ctx: Context
) -> list[dict[str, Any]]:
    """Mean AUC of DDA under ``scoring`` (preconditioner, normalisation, λ) for k×k projections of module subsets."""
    vectors = {cid: _study_vectors(store, cid, kind, ctx.qids) for cid in ["base", *ckpts]}
    lam = scoring.debias_coefficient
    rows = []
    for name, pattern in MODULE_SETS.items():
        for k in PROJECTION_KS:
            cols, scale = slice_columns(layout, pattern, k)
            sub = sub_layout(layout, pattern, k)
            s0 = _sliced_scores(vectors["base"], cols, scale, sub, scoring) if lam else 0.0
            ranking = np.mean([_sliced_scores(vectors[c], cols, scale, sub, scoring) - lam * s0 for c in ckpts], axis=0)
            rows.append({"modules": name, "k": k, "dim": len(cols), "mean_auc": mean_of(ctx.score(ranking))})
    return rows


def evaluate_kind(
    mode: str, kind: str, ctx: Context, cubes: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]],
    bm25: np.ndarray, cea: np.ndarray, default: np.ndarray, costs: Costs,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Every method's record for one (mode, query kind), and the debias study grids."""
    records = []

    def add(method: str, metrics: dict[str, PairMetrics], seconds: float, **more: Any) -> None:
        records.append(record(mode, kind, method, metrics, seconds, **more))

    add("bm25", ctx.score(bm25), costs.bm25)
    s_id, b_id = cubes[("identity", "none", kind)]
    add("tracin_last", ctx.score(study_rankings(s_id, b_id, 0.0, "last")), costs.last)
    add("tracin_cp", ctx.score(study_rankings(s_id, b_id, 0.0, "mean")), costs.finetuned)
    s_f, b_f = cubes[("fisher", "none", kind)]
    add("projected_if", ctx.score(study_rankings(s_f, b_f, 0.0, "last")), costs.last)
    add("cea", evaluate({p: cea[-1, j][None] for j, p in enumerate(ctx.pairs)}, ctx.truth), costs.cea[-1])
    grid = debias_grid(cubes, kind, ctx)
    names = {key: f"{key[0]}/{key[1]}/λ={key[2]}" for key in grid}
    for method, keep, seconds in (
        ("dda_debias_only", lambda x: x[2] > 0 and x[3] == "last", costs.state["base"] + costs.last),
        ("dda_denoise_only", lambda x: x[2] == 0 and x[3] == "mean", costs.finetuned),
        ("dda", lambda x: x[2] > 0 and x[3] == "mean", costs.state["base"] + costs.finetuned),
    ):
        metrics, chosen = lopo({names[x]: grid[x] for x in grid if keep(x)}, ctx.pairs)
        add(method, metrics, seconds, chosen=chosen)
    cgrid = cea_grid(cea, ctx)
    metrics, chosen = lopo(cgrid, ctx.pairs)
    add("dda_cea", metrics, sum(costs.cea), chosen=chosen)
    add("default", ctx.score(default), costs.default, traced_as=DEFAULT_QUERY[kind])
    study = {
        "grid": [
            {"preconditioner": key[0], "normalisation": key[1], "lambda": key[2], "checkpoints": key[3],
             "mean_auc": mean_of(v), "per_pair_auc": {p: x.auc for p, x in v.items()}}
            for key, v in grid.items()
        ],
        "cea_grid": {k: mean_of(v) for k, v in cgrid.items()},
    }  # fmt: skip
    return records, study


def evaluate_mode(
    work: Path, base_dir: Path, mode: str, size: Size, seed: int, prepared: dict[str, Any], cea_bf16: bool, log: Log
) -> ModeResult:
    """Run every method of one fine-tuning mode and score it (see the module docstring)."""
    from storage.store import LineageStore
    from tasks.config import PipelineConfig
    from tasks.indexing import model_layout

    root = work / mode
    ctx, queries, texts = mode_context(root, prepared)
    pairs, qids, sids = ctx.pairs, ctx.qids, ctx.sids
    variants = [variant(p, n, k) for p in PRECONDITIONERS for n in NORMALISATIONS for k in KINDS]
    study_t = run_system(root, "study", base_dir, {"projection": STUDY_PROJECTION}, variants, log)
    store = LineageStore.open(root / "study" / "store")
    ckpts = [c for c in study_t["index"] if c != "base"]
    cubes = {
        (p, n, k): score_cube(store, study_t["fingerprints"][variant_key(p, n, k)], ckpts, qids, sids)
        for p in PRECONDITIONERS for n in NORMALISATIONS for k in KINDS
    }  # fmt: skip
    attr = list(study_t["attribute"].values())
    scoring_s = float(np.median(attr[1:])) if len(attr) > 1 else 0.0
    per_state_q = max(attr[0] - scoring_s, 0.0) / (len(ckpts) + 1)
    bm25, bm25_s = bm25_rankings(texts, queries)
    cea, cea_s = cea_all_states(root, base_dir, mode, size, seed, sids, pairs, queries, cea_bf16, log)
    shipped = {k: {"scoring": {"query_kind": DEFAULT_QUERY[k]}} for k in KINDS}
    default_t = run_system(root, "default", base_dir, {}, list(shipped.values()), log)
    default_store = LineageStore.open(root / "default" / "store")
    costs = Costs(
        {c: t + per_state_q for c, t in study_t["index"].items()}, ckpts, scoring_s, bm25_s, cea_s,
        sum(default_t["index"].values()) + sum(default_t["attribute"].values()) / len(KINDS),
    )  # fmt: skip
    result = ModeResult(mode)
    result.extra = {"study_timings": study_t, "default_timings": default_t, "cea_seconds": cea_s, "pairs": pairs}
    layout = model_layout(str(base_dir), PipelineConfig(projection=study_spec()))
    default_scoring = PipelineConfig().scoring
    result.extra["default_projection"] = default_projection(layout, model_layout(str(base_dir), PipelineConfig()))
    for kind in KINDS:
        fp = default_t["fingerprints"][json.dumps(shipped[kind], sort_keys=True)]
        default = lineage_matrix(default_store, fp, qids, sids)
        records, study = evaluate_kind(mode, kind, ctx, cubes, bm25[kind], cea[kind], default, costs)
        study["projection"] = projection_study(store, layout, ckpts, kind, default_scoring, ctx)
        result.records += records
        result.study[kind] = study
        log(f"{mode}/{kind}: " + ", ".join(f"{r['method']} {r['mean_auc']:.3f}" for r in records))
    return result
