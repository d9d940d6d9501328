"""Defaults chosen out of world: each world's default re-measured under the settings the other worlds choose.

    python -m benchmarks.out_of_world          # → benchmarks/results/out_of_world.{json,md}
    python -m benchmarks.out_of_world --reuse  # measure only the cells the committed results lack

Three defaults were chosen on measured data: the Fisher damping ε, the base model's weight (λ = −base_weight) and
``min_edit_gain``. Their grids are the committed ``debias_forms_*.json`` results measured under the current defaults,
on two worlds: the canary news world (sizes ``default``, seeds 0 and 1, and ``prevalence``: one world, its
templates) and the fictional-people world. For each world W, every such setting is chosen on the cells of the other
world alone (:func:`choose`): the grid value of best mean AUC over those cells (a cell: size, mode and query kind,
its seeds averaged; on a tie the shipped value stays). The default's rows of W are then re-measured through the
system on W's fine-tuning runs (:data:`CELLS`: seed 0 cached, each cell also at seeds 1 and 2) under
that choice (:func:`measure_cell`: the same registered outputs, attributed under the chosen settings' fingerprint)
and recorded with ``selection`` = ``out_of_world``, beside the shipped default's rows on the same run
(``in_sample``), both with a bootstrap 95 % interval over outputs; cells at several seeds also get their mean ± sd
(:func:`seed_summary`). Each setting is chosen with the others at their defaults (the grids vary one at a time).

The invented-names and paraphrase worlds were built after every default was fixed and chose nothing: their rows
(:mod:`benchmarks.no_correction`) are out-of-world as they stand and are collected here unchanged.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = {"canary": ("default", "default_seed1", "prevalence"), "people": ("people",)}
# (size, mode, seed) per world: seed 0 is the cached run of the other benchmarks; other seeds build their own
# fine-tuning run in .bench-work/<size>-seed<N> (minutes each)
CELLS = {
    "canary": (
        ("default", "lora", 0),
        ("default", "full", 0),
        ("default", "lora", 1),
        ("default", "lora", 2),
        ("default", "full", 1),
        ("default", "full", 2),
    ),
    "people": (("people", "lora", 0), ("people", "lora", 1), ("people", "lora", 2)),
}
SHIPPED = {"damping": 0.3, "base_weight": 0.5, "min_edit_gain": 0.0}
GRIDS = {"damping": ("dda_damping", "ε="), "base_weight": ("dda_base_evidence", "λ=")}
# The out-of-world default with the base model's term off (λ = 0): the ablation that beat it on canary seed 0
ABLATION = "dda_denoise_only@counterfactual"
COLLECTED = ("names", "paraphrase")  # no_correction_<size>.json: built after every default was fixed


def grid_rows(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Every row of the committed debias-forms files, with its ``family`` (world) and ``cell``."""
    rows = []
    for family, files in FAMILIES.items():
        for name in files:
            report = json.loads((results / f"debias_forms_{name}.json").read_text())
            for r in report["results"]:
                cell = f"{name.removesuffix('_seed1')}/{r['mode']}/{r['query']}"
                rows.append({**r, "family": family, "cell": cell})
    return rows


def _cell_means(rows: list[dict[str, Any]], value: Any) -> dict[str, dict[Any, float]]:
    """Per cell, per candidate: the mean over the cell's seeds of ``value(row)`` ({candidate: AUC})."""
    per: dict[str, list[dict[Any, float]]] = {}
    for r in rows:
        got = value(r)
        if got is not None:
            per.setdefault(r["cell"], []).append(got)
    return {c: {k: float(np.mean([g[k] for g in gs])) for k in gs[0]} for c, gs in per.items()}


def _best(cells: dict[str, dict[Any, float]], shipped: Any) -> tuple[Any, dict[Any, float]]:
    """The candidate of best mean AUC over ``cells`` (the shipped one on a tie) and every candidate's mean."""
    names = list(next(iter(cells.values())))
    means = {k: float(np.mean([c[k] for c in cells.values()])) for k in names}
    top = max(means.values())
    return (shipped if means.get(shipped) == top else max(names, key=lambda k: means[k])), means


def choose(rows: list[dict[str, Any]], held_out: str) -> dict[str, Any]:
    """Each chosen setting of the defaults, chosen on the rows of every family but ``held_out``: {setting: {value,
    means}}. ε and base_weight from their grids (every query kind's cells); ``min_edit_gain`` 0 (a checkpoint whose
    edits gain nothing traces the plain query) or None (every edit used), from the plain cells' ``default`` and
    ``dda_every_edit`` rows (the cells that have both)."""
    other = [r for r in rows if r["family"] != held_out]
    out: dict[str, Any] = {}
    for setting, (method, prefix) in GRIDS.items():

        def grid(r: dict[str, Any], method: str = method, prefix: str = prefix, setting: str = setting) -> Any:
            if r["method"] != method:
                return None
            sign = -1.0 if setting == "base_weight" else 1.0  # the grid names λ = −base_weight
            return {sign * float(k.removeprefix(prefix)) + 0.0: v for k, v in r["grid"].items()}

        value, means = _best(_cell_means(other, grid), SHIPPED[setting])
        out[setting] = {"value": value, "means": means}

    def edits(r: dict[str, Any]) -> Any:
        return None if r["query"] != "plain" or r["method"] != "default" else {0.0: r["mean_auc"]}

    every = _cell_means([r for r in other if r["method"] == "dda_every_edit"],
                        lambda r: {None: r["mean_auc"]})  # fmt: skip
    gain = _cell_means(other, edits)
    value, means = _best({c: {**gain[c], **every[c]} for c in gain if c in every}, SHIPPED["min_edit_gain"])
    out["min_edit_gain"] = {"value": value, "means": {str(k): v for k, v in means.items()}}
    return out


def measure_cell(size_name: str, mode: str, seed: int, chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """The default's rows on one cell (its fine-tuning run cached, or built at ``seed``), under the shipped settings
    and under ``chosen``: the outputs traced without their correction (query ``counterfactual``) and with it
    (``contrastive``)."""
    from benchmarks.hallucination import (
        SIZES,
        cell_fields,
        lineage_matrix,
        log_line,
        mode_context,
        prepare_mode,
        prepare_work,
        record,
        run_system,
    )

    work, base_dir = prepare_work(size_name, None if seed == 0 else Path(".bench-work") / f"{size_name}-seed{seed}")
    size = SIZES[size_name]
    prepared = prepare_mode(work, base_dir, mode, size, seed, log_line)
    root = work / mode
    ctx, _, _ = mode_context(root, prepared)
    picked = {k: v["value"] for k, v in chosen.items()}
    variants = {(kind, sel, "default"): {"scoring": {"query_kind": kind, **(picked if sel == "out_of_world" else {})}}
                for kind in ("counterfactual", "contrastive") for sel in ("in_sample", "out_of_world")}  # fmt: skip
    ablation = {"query_kind": "counterfactual", **picked, "base_weight": 0.0}  # the out-of-world default, λ = 0
    variants["counterfactual", "out_of_world", ABLATION] = {"scoring": ablation}
    t0 = time.perf_counter()
    timings = run_system(root, "default", base_dir, {}, list(variants.values()), log_line)
    from storage.store import LineageStore

    store = LineageStore.open(root / "default" / "store")
    rows = []
    for (kind, selection, method), variant in variants.items():
        fp = timings["fingerprints"][json.dumps(variant, sort_keys=True)]
        row = record(mode, kind, method, ctx.score(lineage_matrix(store, fp, ctx.qids, ctx.sids)), 0.0)
        rows.append({**cell_fields(size_name, method), "size": size_name, "seed": seed, "selection": selection,
                     "settings": variant["scoring"], **row})  # fmt: skip
    log_line(f"{size_name}/{mode}/seed {seed}: measured in {time.perf_counter() - t0:.0f} s")
    return rows


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (size, mode, query, selection, method) measured at several seeds: the mean and sample sd of the mean AUC
    and AP (no ``ci95``: the spread over seeds is the ``sd``)."""
    groups: dict[tuple[str, str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["size"], r["mode"], r["query"], r["selection"], r["method"]), []).append(r)
    out = []
    for (size, mode, query, selection, method), rs in groups.items():
        if len(rs) > 1:
            auc, ap = [r["mean_auc"] for r in rs], [r["ap"] for r in rs]
            out.append({"size": size, "world": rs[0]["world"], "model": rs[0]["model"], "mode": mode, "query": query,
                        "selection": selection, "method": method,
                        "seeds": [r["seed"] for r in rs], "mean_auc": float(np.mean(auc)),
                        "sd_auc": float(np.std(auc, ddof=1)), "ap": float(np.mean(ap)),
                        "sd_ap": float(np.std(ap, ddof=1))})  # fmt: skip
    return out


def collected(results: Path = RESULTS) -> list[dict[str, Any]]:
    """The rows of the worlds built after every default was fixed (:data:`COLLECTED`), as committed."""
    out = []
    for size in COLLECTED:
        path = results / f"no_correction_{size}.json"
        if path.is_file():
            out += [{**r, "size": size} for r in json.loads(path.read_text())["results"]]
    return out


def markdown(report: dict[str, Any]) -> str:
    """The choices per held-out world, then every default row with its interval."""
    lines = ["# Defaults chosen out of world", "", f"`{report['command']}` — {report['machine']}", "",
             "| held-out world | ε | base_weight (−λ) | min_edit_gain |", "| --- | --- | --- | --- |"]  # fmt: skip
    for world, c in report["choices"].items():
        lines.append(f"| {world} | {c['damping']['value']} | {c['base_weight']['value']} | "
                     f"{c['min_edit_gain']['value']} |")  # fmt: skip
    lines += ["", "| world | mode | seed | query | method | selection | mean AUC (CI95) | AP |", "| --- " * 8 + "|"]
    for r in report["results"]:
        lo, hi = r["ci95"]
        lines.append(f"| {r['size']} | {r['mode']} | {r.get('seed', 0)} | {r['query']} | {r['method']} | "
                     f"{r['selection']} | {r['mean_auc']:.3f} ({lo:.3f}–{hi:.3f}) | {r['ap']:.3f} |")  # fmt: skip
    lines += ["", "| world | mode | query | method | selection | seeds | mean AUC ± sd | AP ± sd |", "| --- " * 8 + "|"]
    for g in report["seeds"]:
        lines.append(f"| {g['size']} | {g['mode']} | {g['query']} | {g['method']} | {g['selection']} | "
                     f"{g['seeds']} | "
                     f"{g['mean_auc']:.3f} ± {g['sd_auc']:.3f} | {g['ap']:.3f} ± {g['sd_ap']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Choose per held-out world, measure each cached cell in its own process, write the results."""
    from benchmarks.hallucination import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", help="size:mode:seed (one cell, in this process; prints its rows as JSON)")
    ap.add_argument("--reuse", action="store_true", help="keep the committed rows of cells measured before")
    ap.add_argument("--again", default="", help="with --reuse, cells to measure anew (size:mode:seed,…)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = grid_rows()
    choices = {family: choose(rows, family) for family in FAMILIES}
    if args.cell:
        size_name, mode, seed = args.cell.split(":")
        family = next(f for f, cells in CELLS.items() if (size_name, mode, int(seed)) in cells)
        print(json.dumps(measure_cell(size_name, mode, int(seed), choices[family])))
        return 0
    path = args.out / "out_of_world.json"
    before = json.loads(path.read_text()) if args.reuse and path.is_file() else {"results": [], "cell_seconds": {}}
    again = {tuple(c.split(":")) for c in args.again.split(",") if c}
    kept = [{"seed": 0, **r} for r in before["results"] if r["method"] in ("default", ABLATION) and "settings" in r
            and (r["size"], r["mode"], str(r.get("seed", 0))) not in again]  # fmt: skip
    started, results, seconds = time.perf_counter(), [], dict(before.get("cell_seconds", {}))
    for cells in CELLS.values():
        for size_name, mode, seed in cells:
            have = [r for r in kept if (r["size"], r["mode"], r.get("seed", 0)) == (size_name, mode, seed)]
            if have:
                results += have
                continue
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "benchmarks.out_of_world", "--cell", f"{size_name}:{mode}:{seed}"]
            done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            results += json.loads(done.stdout.strip().splitlines()[-1])
            seconds[f"{size_name}:{mode}:{seed}"] = time.perf_counter() - t0
    report = {"command": "python -m benchmarks.out_of_world" + (" --reuse" if args.reuse else ""),
              "machine": machine(), "shipped": SHIPPED, "choices": choices, "seeds": seed_summary(results),
              "results": results + collected(args.out), "cell_seconds": seconds,
              "wall_seconds": time.perf_counter() - started}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "out_of_world.json").write_text(json.dumps(report, indent=1, default=float))
    (args.out / "out_of_world.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
