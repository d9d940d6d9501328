"""Debias forms, query groups and RepSim on the canary world, through the system's own flows.

    python -m benchmarks.debias_forms                 # default size, LoRA and full fine-tuning (CPU)
    python -m benchmarks.debias_forms --size people   # the fictional-people world (also: prevalence, quick)

For each fine-tuning mode it reuses (or builds) the world, run and queries of :mod:`benchmarks.hallucination`
(same ``--work`` cache), indexes the base model and every checkpoint with the shipped defaults, and
attributes the queries under these scorings, read back through the ``scores`` and ``lineage`` views:

- ``default`` (the shipped settings; for plain queries, an output traced with no correction: the counterfactual
  query against the single-token edit θ_0 and θ_t find most plausible, derived per checkpoint),
  ``dda_every_edit`` (the counterfactual query using every derived edit, also where it gains nothing:
  ``min_edit_gain`` None, the plain default before), ``dda_plain_query`` (the plain query with the query-side
  debias weights: the plain default before the counterfactual query),
  ``dda_denoise_only`` (mean over checkpoints of the ``scores`` view, λ = 0, uniform query
  token weights: the default before the query-side debias), ``last_checkpoint`` and ``base_only`` (s̃_T, s̃_0
  with uniform weights);
- score-space debias mean_t (s̃_t − λ s̃_0), uniform weights, λ chosen leave-one-pair-out from
  :data:`~benchmarks.hallucination.methods.LAMBDAS` (0 included): ``dda_score_debias``; the same on the default
  scoring's own s̃_t, s̃_0 with λ ∈ :data:`BASE_LAMBDAS` (≤ 0: the base model's influence counted as evidence):
  ``dda_base_evidence`` (its ``grid`` holds every λ's mean AUC);
- query-side debias (``query_weighting = finetune_delta``): ``dda_qdelta`` (mean over checkpoints) and
  ``dda_qdelta_debias_only`` (last checkpoint);
- training-side delta ĝ_i(θ_t) − β ĝ_i(θ_0), β chosen leave-one-pair-out from :data:`BETAS` (0 included):
  ``dda_tdelta`` (mean) and ``dda_tdelta_debias_only`` (last checkpoint);
- the Fisher preconditioner's relative damping ε ∈ :data:`DAMPINGS` under the default scoring (:func:`shipped`):
  ``dda_damping`` (ε chosen leave-one-pair-out; its ``grid`` holds every ε's mean AUC);
- ``default_grouped``: one query group per canary pair (``group`` field), the default scoring of the mean
  query vector, beside ``cea`` (which fine-tunes on all of a pair's outputs at once: the same pooling);
- baselines ``bm25``, ``repsim`` (:mod:`benchmarks.repsim`, last checkpoint) and the gradient baselines on the
  shipped projection, with uniform query weights: ``tracin_last`` (raw ĝ_qᵀ ĝ_i at the last checkpoint,
  :data:`TRACIN`), ``tracin_cp`` (its mean over checkpoints; the lr-weighted sum under a constant learning
  rate) and ``projected_if`` (ĝ_qᵀ F_T⁻¹ ĝ_i at the last checkpoint, ranked as its z-score s̃_T).

Writes ``benchmarks/results/debias_forms_<size>[_seed<N>].{json,md}``: ``results`` rows with ``world``, ``model``,
``selection``, ``mode``, ``query``, ``method``, ``mean_auc``, ``ap``, ``ci95``, ``mean_recall_at_r``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.evaluate import PairMetrics, evaluate, mean_of
from benchmarks.hallucination import (
    KINDS,
    LAMBDAS,
    MODES,
    RESULTS,
    SIZES,
    Log,
    bm25_rankings,
    cea_all_states,
    cell_fields,
    lineage_matrix,
    log_line,
    lopo,
    machine,
    mode_context,
    prepare_mode,
    prepare_work,
    record,
    run_system,
    score_cube,
    study_rankings,
)
from benchmarks.repsim import repsim_scores
from tasks.config import ScoringConfig, upgrade_scoring

BETAS = (0.0, 0.25, 0.5, 1.0)
# λ of the default scoring's mean_t s̃_t − λ s̃_0: negative λ counts the base model's influence as evidence.
BASE_LAMBDAS = (-1.0, -0.75, -0.5, -0.25, 0.0)
DAMPINGS = (0.1, 0.3, 1.0, 3.0)  # relative damping ε of the Fisher preconditioner


TRACIN: dict[str, Any] = {"query_weighting": "uniform", "preconditioner": "identity", "normalisation": "none"}


def scoring(kind: str, **more: Any) -> dict[str, Any]:
    """A scoring variant of the default settings."""
    return {"scoring": {"query_kind": kind, **more}}


COUNTERFACTUAL = scoring("counterfactual")  # an output traced with no correction under the shipped default
EVERY_EDIT = scoring("counterfactual", min_edit_gain=None)  # ... using every derived edit (the default before)


def shipped(kind: str, **more: Any) -> dict[str, Any]:
    """The default scoring of a query kind's column (plain: the counterfactual query), with ``more`` changed."""
    return scoring("counterfactual" if kind == "plain" else kind, **more)


def variants() -> list[dict[str, Any]]:
    """Every scoring the benchmark attributes under (the first registers the queries)."""
    out = [COUNTERFACTUAL, EVERY_EDIT]
    for kind in KINDS:
        out.append(scoring(kind, query_weighting="uniform"))
        out.append(scoring(kind))
        out.append(scoring(kind, query_weighting="finetune_delta"))
        out += [scoring(kind, query_weighting="uniform", train_debias=b) for b in BETAS[1:]]
        out += [shipped(kind, damping=d) for d in DAMPINGS]
        out.append(scoring(kind, **TRACIN))
    return out


def _key(v: dict[str, Any]) -> str:
    return json.dumps(v, sort_keys=True)


def grid_means(grid: dict[str, dict[str, PairMetrics]]) -> dict[str, float]:
    """Mean AUC over pairs of every candidate of a leave-one-pair-out grid."""
    return {k: mean_of(v) for k, v in grid.items()}


def grouped_rankings(
    root: Path, base_dir: Path, kind: str, pairs: list[str], queries: list[dict[str, str]], sids: list[str]
) -> np.ndarray:
    """(pairs, n): the lineage of one query group per pair (its members: the pair's queries), default scoring."""
    from flows.pipeline import attribute, load_settings
    from storage.store import LineageStore

    rows = [{**q, "group": q["pair"]} for q in queries]
    chosen = shipped(kind)
    path = root / "queries_grouped.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("id", "prompt", "response", "corrected", "group")}) + "\n"
                            for r in rows))  # fmt: skip
    settings = load_settings({**chosen, "indexing": {"batch_size": 16, "progress": False}},
                             data_dir=str(root / "default"), base_model=str(base_dir))  # fmt: skip
    attribute(queries_file=str(path), settings=settings.model_dump(mode="json"))
    store = LineageStore.open(root / "default" / "store")
    return lineage_matrix(store, settings.fingerprint, [f"group:{p}" for p in pairs], sids)


def repsim_rankings(
    root: Path, base_dir: Path, sids: list[str], queries: list[dict[str, str]]
) -> dict[str, np.ndarray]:
    """RepSim at the last checkpoint of the mode's run."""
    from tasks.checkpoints import discover_checkpoints
    from tasks.models import model_for

    rows = {r["id"]: r for r in (json.loads(line) for line in (root / "train.jsonl").open())}
    last = discover_checkpoints(root / "run", 0.0)[-1].path
    with model_for(str(base_dir), str(last), "cpu") as cached:
        return repsim_scores(cached.model, cached.tokenizer, [(rows[s]["prompt"], rows[s]["response"]) for s in sids],
                             queries)  # fmt: skip


def evaluate_mode(
    work: Path, base_dir: Path, mode: str, size_name: str, seed: int, log: Log, with_cea: bool = True
) -> list[dict[str, Any]]:
    """Every method's record for one mode of the world :data:`SIZES` ``[size_name]`` (see the module docstring)."""
    from storage.store import LineageStore

    size = SIZES[size_name]
    prepared = prepare_mode(work, base_dir, mode, size, seed, log)
    root = work / mode
    ctx, queries, texts = mode_context(root, prepared)
    pairs, qids, sids, truth = ctx.pairs, ctx.qids, ctx.sids, ctx.truth
    timings = run_system(root, "default", base_dir, {}, variants(), log)
    store = LineageStore.open(root / "default" / "store")
    ckpts = [c for c in timings["index"] if c != "base"]
    fps = timings["fingerprints"]
    bm25, _ = bm25_rankings(texts, queries)
    t0 = time.perf_counter()
    rep = repsim_rankings(root, base_dir, sids, queries)
    log(f"{mode}: RepSim in {time.perf_counter() - t0:.0f} s")
    cached = any((root / f).is_file() for f in ("cea.npz", "cea_last.npz"))
    with_cea = with_cea or cached  # --no-cea still reports CEA scores already computed
    cea, cea_s = (
        cea_all_states(root, base_dir, mode, size, seed, sids, pairs, queries, True, log, last_only=True)
        if with_cea
        else ({}, [])
    )
    records = []
    for kind in KINDS:

        def add(method: str, metrics: dict[str, PairMetrics], **more: Any) -> None:
            records.append({**cell_fields(size_name, method), **record(mode, kind, method, metrics, 0.0, **more)})  # noqa: B023

        uniform = fps[_key(scoring(kind, query_weighting="uniform"))]
        s, b = score_cube(store, uniform, ckpts, qids, sids)
        default = fps[_key(shipped(kind))]
        add("default", ctx.score(lineage_matrix(store, default, qids, sids)))
        if kind == "plain":  # the plain query with the query-side debias weights: the default before
            add("dda_plain_query", ctx.score(lineage_matrix(store, fps[_key(scoring(kind))], qids, sids)))
            add("dda_every_edit", ctx.score(lineage_matrix(store, fps[_key(EVERY_EDIT)], qids, sids)))
        add("dda_denoise_only", ctx.score(study_rankings(s, b, 0.0, "mean")))
        add("last_checkpoint", ctx.score(s[-1]))
        add("base_only", ctx.score(b[-1]))
        lams = {f"λ={lam}": ctx.score(study_rankings(s, b, lam, "mean")) for lam in LAMBDAS}
        metrics, chosen = lopo(lams, pairs)
        add("dda_score_debias", metrics, chosen=chosen, grid=grid_means(lams))
        ds, db = score_cube(store, default, ckpts, qids, sids)  # the default's own s̃_t, s̃_0 (any λ)
        lams = {f"λ={lam}": ctx.score(study_rankings(ds, db, lam, "mean")) for lam in BASE_LAMBDAS}
        metrics, chosen = lopo(lams, pairs)
        add("dda_base_evidence", metrics, chosen=chosen, grid=grid_means(lams))
        tracin, _ = score_cube(store, fps[_key(scoring(kind, **TRACIN))], ckpts, qids, sids)
        add("tracin_last", ctx.score(tracin[-1]))
        add("tracin_cp", ctx.score(tracin.mean(axis=0)))
        # ĝ_qᵀ F_T⁻¹ ĝ_i: s̃_T is its z-score, an increasing affine map per query, so the ranking is the same
        add("projected_if", ctx.score(s[-1]))
        add("bm25", ctx.score(bm25[kind]))
        add("repsim", ctx.score(rep[kind]))
        qfp = fps[_key(scoring(kind, query_weighting="finetune_delta"))]
        sq, _ = score_cube(store, qfp, ckpts, qids, sids)
        add("dda_qdelta", ctx.score(lineage_matrix(store, qfp, qids, sids)))
        add("dda_qdelta_debias_only", ctx.score(sq[-1]))
        cubes = {0.0: s, **{
            beta: score_cube(store, fps[_key(scoring(kind, query_weighting="uniform", train_debias=beta))], ckpts,
                             qids, sids)[0]
            for beta in BETAS[1:]}}  # fmt: skip
        for method, pick in (("dda_tdelta", lambda c: c.mean(axis=0)), ("dda_tdelta_debias_only", lambda c: c[-1])):
            grid = {f"β={beta}": ctx.score(pick(c)) for beta, c in cubes.items()}
            metrics, chosen = lopo(grid, pairs)
            add(method, metrics, chosen=chosen, grid=grid_means(grid))
        damped = {f"ε={d}": ctx.score(lineage_matrix(store, fps[_key(shipped(kind, damping=d))], qids, sids))
                  for d in DAMPINGS}  # fmt: skip
        metrics, chosen = lopo(damped, pairs)
        add("dda_damping", metrics, chosen=chosen, grid=grid_means(damped))
        grouped = grouped_rankings(root, base_dir, kind, pairs, queries, sids)
        add("default_grouped", evaluate({p: grouped[j][None] for j, p in enumerate(pairs)}, truth))
        if with_cea:
            add(
                "cea", evaluate({p: cea[kind][-1, j][None] for j, p in enumerate(pairs)}, truth), cea_seconds=sum(cea_s)
            )
        log(f"{mode}/{kind}: " + ", ".join(f"{r['method']} {r['mean_auc']:.3f}" for r in records if r["query"] == kind))
    return records


def markdown(report: dict[str, Any]) -> str:
    """Mean AUC (AP) per method and (mode, query kind)."""
    cols = [(m, k) for m in report["modes"] for k in KINDS]
    methods = list(dict.fromkeys(r["method"] for r in report["results"]))
    lines = [f"# Debias forms, query groups and RepSim (size {report['size']}, world {report['world']})", "",
             f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"Wall time: {report['wall_seconds'] / 60:.1f} min", "",
             "Mean AUC / AP / MRR over canary pairs; `dda_tdelta*` choose β leave-one-pair-out (held-out estimates).",
             "", "| method | " + " | ".join(f"{m} / {k}" for m, k in cols) + " |",
             "| --- |" + " --- |" * len(cols)]  # fmt: skip
    for method in methods:
        cells = []
        for m, k in cols:
            r = next((x for x in report["results"] if (x["mode"], x["query"], x["method"]) == (m, k, method)), None)
            cells.append(
                f"{r['mean_auc']:.3f} / {r['mean_ap']:.3f} / {r.get('mean_mrr', float('nan')):.2f}" if r else "—"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for mode, info in report["modes"].items():
        lines.append(
            f"\n**{mode}**: {info['n_train']} training samples ({info['n_corrupted']} corrupted); "
            + ", ".join(f"{p} {c['hallucinated']}/{c['generated']}" for p, c in info["per_pair"].items())
        )
    return "\n".join(lines) + "\n"


CHANGE_MARGIN = 0.002  # mean AUC another ε must gain over the shipped one before the default moves


def choose_damping(
    results: list[dict[str, Any]], incumbent: str, margin: float = CHANGE_MARGIN, method: str = "dda_damping"
) -> dict[str, Any]:
    """ε (or the grid value of ``method``'s rows: λ of ``dda_base_evidence``) chosen across every (size or world,
    mode, query kind) cell of ``method`` rows.

    A cell's grid is the mean over the seeds measured for it (a replication adds evidence about its cell, not a
    cell). ``best`` is the ε of the highest mean AUC over cells; ``chosen`` is ``best`` only when it beats the
    ``incumbent`` (the shipped ε) by more than ``margin``, so that a default does not move on a tie (every store's
    lineage is re-scored under a new settings fingerprint when it does). Per cell, the held-out estimate is that
    cell's AUC under the ε the same rule chooses on the other cells."""
    grids: dict[str, list[dict[str, float]]] = {}
    for r in results:
        if r["method"] == method:
            grids.setdefault(f"{r.get('size', r['world'])}/{r['mode']}/{r['query']}", []).append(r["grid"])
    names = list(next(iter(grids.values()))[0])
    cells = {c: {e: float(np.mean([g[e] for g in gs])) for e in names} for c, gs in grids.items()}

    def mean(e: str, keep: list[str]) -> float:
        return float(np.mean([cells[c][e] for c in keep]))

    def best(keep: list[str]) -> str:
        return max(names, key=lambda e: (mean(e, keep), -names.index(e)))

    def choose(keep: list[str]) -> str:
        top = best(keep)
        return top if mean(top, keep) - mean(incumbent, keep) > margin else incumbent

    held_out = {}
    for cell in cells:
        chosen = choose([c for c in cells if c != cell])
        held_out[cell] = {"chosen": chosen, "auc": cells[cell][chosen]}
    means = {e: mean(e, list(cells)) for e in names}
    seeds = {c: len(gs) for c, gs in grids.items()}
    return {"chosen": choose(list(cells)), "best": best(list(cells)), "incumbent": incumbent, "margin": margin,
            "mean_auc": means, "cells": cells, "seeds": seeds, "held_out": held_out}  # fmt: skip


def damping_markdown(choice: dict[str, Any], symbol: str = "ε") -> str:
    """The grid per cell (mean over its seeds), the mean, and the leave-one-cell-out estimate."""
    names = list(choice["mean_auc"])
    lines = ["| cell | " + " | ".join(names) + f" | held out ({symbol} chosen on the other cells) |",
             "| --- |" + " --- |" * (len(names) + 1)]  # fmt: skip
    for cell, grid in choice["cells"].items():
        h = choice["held_out"][cell]
        n = choice["seeds"][cell]
        label = f"{cell} (mean of {n} seeds)" if n > 1 else cell
        lines.append(
            f"| {label} | " + " | ".join(f"{grid[e]:.3f}" for e in names) + f" | {h['auc']:.3f} ({h['chosen']}) |"
        )
    lines.append("| **mean** | " + " | ".join(f"{choice['mean_auc'][e]:.4f}" for e in names) + " | |")
    best, inc, chosen = choice["best"], choice["incumbent"], choice["chosen"]
    m = choice["mean_auc"]
    verdict = (
        f"Best mean: {best} ({m[best]:.4f}); the shipped {inc} ({m[inc]:.4f}) is kept: a change needs a gain of more "
        f"than {choice['margin']}."
        if chosen == inc and best != inc
        else f"Chosen on every cell: {chosen} (shipped: {inc}; a change needs a gain of more than {choice['margin']})."
    )
    return "\n".join(lines) + f"\n\n{verdict}\n"


def carried_cea(results: list[dict[str, Any]], previous: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The committed ``cea`` rows of (mode, query kind) cells this run has none for, marked ``carried``: CEA reads
    only the fine-tuned world (cached runs are identical), not the store, so ``--no-cea`` keeps its rows."""
    have = {(r["mode"], r["query"]) for r in results if r["method"] == "cea"}
    cells = {(r["mode"], r["query"]) for r in results}
    return [{**r, "carried": True} for r in previous
            if r["method"] == "cea" and (r["mode"], r["query"]) in cells - have]  # fmt: skip


def results_stem(size_name: str, seed: int) -> str:
    """``debias_forms_<size>``, with ``_seed<N>`` for a replication at seed N > 0 (seed 0 keeps the old name)."""
    return f"debias_forms_{size_name}" + (f"_seed{seed}" if seed else "")


def seeded_work(size_name: str, seed: int) -> Path | None:
    """The default cache folder of a replication (None: :func:`prepare_work`'s ``.bench-work/<size>`` for seed 0)."""
    return Path(".bench-work") / f"{size_name}-seed{seed}" if seed else None


def current_reports(paths: list[Path], defaults: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The results files measured under ``defaults`` (the scoring defaults they record), and the names of the
    others: a grid around other defaults says nothing about moving the current ones."""
    reports: list[dict[str, Any]] = []
    stale: list[str] = []
    for path in paths:
        report = json.loads(path.read_text())
        recorded = report.get("defaults")
        if isinstance(recorded, dict):  # files written before base_weight recorded λ as debias_coefficient
            recorded = upgrade_scoring(recorded)
        if recorded == defaults:
            reports.append(report)
        else:
            stale.append(path.name)
    return reports, stale


def cell_label(report: dict[str, Any]) -> str:
    """A results file's name in the damping cells: its world or size (``canary`` for the default size); the
    replications of one size at other seeds share it."""
    return {"default": "canary"}.get(report["size"], report["size"])


def main(argv: list[str] | None = None) -> int:
    """Entry point: run every mode, write JSON + Markdown under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default", help="world and size (SIZES)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="cache folder (default .bench-work/<size>, <size>-seed<N> for seed N > 0)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-cea", action="store_true", help="skip CEA where it is not cached (its loss sweeps dominate)"
    )
    parser.add_argument(
        "--choose-damping",
        action="store_true",
        help="choose ε and the base-evidence λ across the committed results (no run); writes damping.md, "
        "base_evidence.md",
    )
    args = parser.parse_args(argv)
    if args.choose_damping:
        defaults = ScoringConfig()
        reports, stale = current_reports(sorted(args.out.glob("debias_forms_*.json")), defaults.model_dump())
        if stale:
            print(f"left out, measured under other default settings: {', '.join(stale)}")
        rows = [{**r, "size": cell_label(rep)} for rep in reports for r in rep["results"]]
        for stem, method, symbol, incumbent in (
            ("damping", "dda_damping", "ε", f"ε={defaults.damping}"),
            ("base_evidence", "dda_base_evidence", "λ", f"λ={defaults.debias_coefficient}"),
        ):
            if not any(r["method"] == method for r in rows):
                continue
            choice = choose_damping(rows, incumbent=incumbent, method=method)
            (args.out / f"{stem}.json").write_text(json.dumps(choice, indent=1))
            (args.out / f"{stem}.md").write_text(damping_markdown(choice, symbol))
            print(damping_markdown(choice, symbol))
        return 0
    size_name = args.size
    work, base_dir = prepare_work(size_name, args.work or seeded_work(size_name, args.seed))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python -m benchmarks.debias_forms " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "seed": args.seed, "size": size_name, "world": SIZES[size_name].world,
        "sizes": asdict(SIZES[size_name]), "betas": list(BETAS), "defaults": ScoringConfig().model_dump(),
        "modes": {}, "results": [],
    }  # fmt: skip
    for mode in args.modes:
        report["results"] += evaluate_mode(work, base_dir, mode, size_name, args.seed, log_line, not args.no_cea)
        info = json.loads((work / mode / "world.json").read_text())
        report["modes"][mode] = {k: info[k] for k in ("n_train", "n_corrupted", "per_pair")}
    report["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / results_stem(size_name, args.seed)
    previous = RESULTS / f"{results_stem(size_name, args.seed)}.json"
    if args.no_cea and previous.is_file():
        report["results"] += carried_cea(report["results"], json.loads(previous.read_text())["results"])
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
