"""Outputs traced without a correction: how the counterfactual query's derivation and fallback fare, by world.

    python -m benchmarks.no_correction                 # the invented-names world (benchmarks.names_world), LoRA
    python -m benchmarks.no_correction --size paraphrase   # its decoys share the outputs' words, not the sources
    python -m benchmarks.no_correction --size default --model gemma3   # Gemma 3 270M (benchmark-only packages)
    python -m benchmarks.no_correction --size default --mode full   # any size and mode of benchmarks.hallucination

It reuses (or builds) the world, fine-tuned run and real hallucinated outputs of :mod:`benchmarks.hallucination`
(same ``--work`` cache), indexes every model state with the shipped defaults through the system's own flows, and
traces each output twice without its correction, under ids of their own so that each derivation is fresh and both
are recorded side by side in one store: ``words:<id>`` with the shipped derivation, ``single:<id>`` with
whole-word replacements turned off (``tasks.counterfactual.SPAN_WORDS = 0``: single-token edits only, the
derivation before them). Rows (``query`` ``counterfactual``: traced
without the correction; ``contrastive``: with it):

- ``default`` — the shipped scoring (whole-word replacements; a state whose edits gain nothing traces the plain
  query), ``single_token`` — the same with single-token edits only;
- ``base_edit`` / ``single_token_base_edit`` — ``edit_fallback = base_edit``: such a state contrasts with the edit
  derived at the base model instead;
- ``base_only`` / ``last_checkpoint`` — s̃_0 / s̃_T of the default counterfactual query;
- ``contrastive`` — the shipped scoring with the true correction; ``bm25`` — prompt + output against the samples;
- the same query, other scorings: ``<baseline>@counterfactual`` — ``tracin_last`` / ``tracin_cp`` (raw ĝ_qᵀ ĝ_i at
  the last checkpoint / its mean over checkpoints, :data:`TRACIN`), ``projected_if`` (ĝ_qᵀ F_T⁻¹ ĝ_i, ranked as
  s̃_T) and ``dda_denoise_only`` (mean_t s̃_t, λ = 0) of the default's own counterfactual query; the same four of the
  contrastive query (query ``contrastive``), and TracIn of the plain query (query ``plain``: the output alone).

Each row also names its ``model``, its ``ap`` (the mean AP) and its ``selection``
(:func:`~benchmarks.hallucination.config.cell_fields`): ``out_of_world`` on the worlds built after every default was
fixed and for BM25 (nothing to choose), else ``in_sample``.
Beside them, per derivation and state, the share of outputs whose derived edit gains (> 0 nats), the mean gain and
the share of edits that replace more than one token, from the ``derived_corrections`` view. Writes
``benchmarks/results/no_correction_<size>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.hallucination import (
    MODELS,
    MODES,
    RESULTS,
    SIZES,
    bm25_rankings,
    cell_fields,
    lineage_matrix,
    log_line,
    machine,
    mode_context,
    prepare_mode,
    prepare_work,
    record,
    run_system,
    score_cube,
    study_rankings,
)
from flows.settings import code_version
from tasks.config import ScoringConfig
from tasks.counterfactual import SPAN_WORDS

WORDS = "words:"  # the id prefix of the outputs traced with the shipped derivation (whole-word replacements)
SINGLE = "single:"  # the id prefix of the outputs traced with single-token edits only
COUNTERFACTUAL = {"scoring": {"query_kind": "counterfactual"}}
BASE_EDIT = {"scoring": {"query_kind": "counterfactual", "edit_fallback": "base_edit"}}
CONTRASTIVE = {"scoring": {"query_kind": "contrastive"}}
# TracIn on the shipped projection (raw ĝ_qᵀ ĝ_i: no preconditioner, no normalisation, uniform query weights),
# given each query the default gets: the plain output, the derived correction's contrast, the true correction's.
TRACIN = {"query_weighting": "uniform", "preconditioner": "identity", "normalisation": "none"}
TRACIN_PLAIN = {"scoring": {"query_kind": "plain", **TRACIN}}
TRACIN_CF = {"scoring": {"query_kind": "counterfactual", **TRACIN}}
TRACIN_CON = {"scoring": {"query_kind": "contrastive", **TRACIN}}


def _trace(
    root: Path, base_dir: Path, queries: list[dict[str, str]], prefix: str, span_words: int,
    variants: tuple[dict[str, Any], ...],
) -> dict[str, str]:  # fmt: skip
    """Trace the outputs under ``<prefix><id>`` ids (their own derived corrections) with
    ``tasks.counterfactual.SPAN_WORDS = span_words``, under each counterfactual variant; {variant key: fingerprint}."""
    import tasks.counterfactual as cf
    from flows.pipeline import attribute, load_settings

    path = root / f"queries_{prefix.strip(':')}.jsonl"
    path.write_text("".join(json.dumps({"id": prefix + q["id"], "prompt": q["prompt"], "response": q["response"],
                                        "corrected": q["corrected"]}) + "\n" for q in queries))  # fmt: skip
    common = {"data_dir": str(root / "default"), "base_model": str(base_dir)}
    spans, cf.SPAN_WORDS = cf.SPAN_WORDS, span_words
    fps = {}
    try:
        for i, variant in enumerate(variants):
            settings = load_settings({**variant, "indexing": {"batch_size": 16, "progress": False}}, **common)
            if i == 0:
                attribute(queries_file=str(path), settings=settings.model_dump(mode="json"))
            else:
                ids = [prefix + q["id"] for q in queries]
                attribute(query_ids=ids, settings=settings.model_dump(mode="json"))
            fps[json.dumps(variant, sort_keys=True)] = settings.fingerprint
    finally:
        cf.SPAN_WORDS = spans
    return fps


def _nats(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def edit_stats(store: Any, qids: list[str], tokenizer: Any) -> dict[str, dict[str, float | None]]:
    """Per state: share of ``qids`` whose derived edit gains (> 0 nats; a search that stopped at ``min_edit_gain``
    — ``gain_is_bound``, whose best edit gains at most that — counts as not gaining), the mean gain of the edits
    whose search ran to its argmax (None without any), the share that stopped, and the share whose replacement
    text is several tokens (re-encoded with ``tokenizer``)."""
    from storage.sql import query

    rows = query(store, "SELECT checkpoint_id, gain, gain_is_bound, replacement FROM derived_corrections "
                 "WHERE query_id IN (SELECT unnest($q))", {"q": qids}).to_pylist()  # fmt: skip
    out: dict[str, dict[str, float | None]] = {}
    for cid in sorted({r["checkpoint_id"] for r in rows}):
        at = [r for r in rows if r["checkpoint_id"] == cid]
        exact = [r["gain"] for r in at if not r["gain_is_bound"]]
        pieces = [len(tokenizer(r["replacement"], add_special_tokens=False).input_ids) for r in at]
        out[cid] = {"gaining": sum(g > 0 for g in exact) / len(at),
                    "mean_gain": sum(exact) / len(exact) if exact else None,
                    "stopped_at_threshold": (len(at) - len(exact)) / len(at),
                    "whole_word": sum(n > 1 for n in pieces) / len(at)}  # fmt: skip
    return out


def evaluate(
    size_name: str, work: Path, base_dir: Path, seed: int, mode: str = "lora", model: str = "smollm2",
    shipped_only: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Every row of one world and fine-tuning mode, the edit statistics and the timings."""
    from transformers import AutoTokenizer

    from storage.store import LineageStore

    size = SIZES[size_name]
    prepared = prepare_mode(work, base_dir, mode, size, seed, log_line)
    root = work / mode
    ctx, queries, texts = mode_context(root, prepared)
    timings = run_system(root, "default", base_dir, {}, [CONTRASTIVE, TRACIN_CON, TRACIN_PLAIN], log_line)
    t0 = time.perf_counter()
    shipped = (COUNTERFACTUAL, TRACIN_CF) if shipped_only else (COUNTERFACTUAL, BASE_EDIT, TRACIN_CF)
    words = _trace(root, base_dir, queries, WORDS, SPAN_WORDS, shipped)
    words_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = {} if shipped_only else _trace(root, base_dir, queries, SINGLE, 0, (COUNTERFACTUAL, BASE_EDIT))
    single_s = time.perf_counter() - t0
    store = LineageStore.open(root / "default" / "store")
    fps = timings["fingerprints"]
    key = {name: json.dumps(v, sort_keys=True) for name, v in (
        ("cf", COUNTERFACTUAL), ("base", BASE_EDIT), ("con", CONTRASTIVE), ("tcf", TRACIN_CF), ("tcon", TRACIN_CON),
        ("tplain", TRACIN_PLAIN))}  # fmt: skip
    qids, sids = ctx.qids, ctx.sids
    whole, singles = [WORDS + q for q in qids], [SINGLE + q for q in qids]
    ckpts = [c for c in timings["index"] if c != "base"]
    rows = []

    def add(kind: str, method: str, matrix: Any) -> None:
        rows.append({**cell_fields(size_name, method, model), **record(mode, kind, method, ctx.score(matrix), 0.0)})

    add("counterfactual", "default", lineage_matrix(store, words[key["cf"]], whole, sids))
    if not shipped_only:
        add("counterfactual", "single_token", lineage_matrix(store, single[key["cf"]], singles, sids))
        add("counterfactual", "base_edit", lineage_matrix(store, words[key["base"]], whole, sids))
        add("counterfactual", "single_token_base_edit", lineage_matrix(store, single[key["base"]], singles, sids))
    s, b = score_cube(store, words[key["cf"]], ckpts, whole, sids)
    add("counterfactual", "base_only", b[-1])
    add("counterfactual", "last_checkpoint", s[-1])
    # The same query, other scorings: ĝ_qᵀ F_T⁻¹ ĝ_i ranks as its z-score s̃_T (an increasing map per query)
    add("counterfactual", "projected_if@counterfactual", s[-1])
    add("counterfactual", "dda_denoise_only@counterfactual", study_rankings(s, b, 0.0, "mean"))
    t, _ = score_cube(store, words[key["tcf"]], ckpts, whole, sids)
    add("counterfactual", "tracin_last@counterfactual", t[-1])
    add("counterfactual", "tracin_cp@counterfactual", t.mean(axis=0))
    add("contrastive", "contrastive", lineage_matrix(store, fps[key["con"]], qids, sids))
    s, b = score_cube(store, fps[key["con"]], ckpts, qids, sids)
    add("contrastive", "base_only", b[-1])
    add("contrastive", "last_checkpoint", s[-1])
    add("contrastive", "projected_if", s[-1])
    t, _ = score_cube(store, fps[key["tcon"]], ckpts, qids, sids)
    add("contrastive", "tracin_last", t[-1])
    add("contrastive", "tracin_cp", t.mean(axis=0))
    t, _ = score_cube(store, fps[key["tplain"]], ckpts, qids, sids)
    add("plain", "tracin_last", t[-1])
    add("plain", "tracin_cp", t.mean(axis=0))
    bm25, _ = bm25_rankings(texts, queries)
    add("counterfactual", "bm25", bm25["plain"])
    add("contrastive", "bm25", bm25["contrastive"])
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    for r in rows:
        log_line(f"{r['method']}: AUC {r['mean_auc']:.3f}, AP {r['mean_ap']:.3f}")
    return {
        "results": rows, "edits": {"whole_word": edit_stats(store, whole, tokenizer),
                                   **({} if shipped_only else {"single_token": edit_stats(store, singles, tokenizer)})},
        "n_train": prepared["n_train"], "n_corrupted": prepared["n_corrupted"], "per_pair": prepared["per_pair"],
        "index_s": timings["index"], "whole_word_s": words_s, "single_token_s": single_s,
    }  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    """The results table and the edit statistics."""
    lines = [f"# Outputs traced without a correction: {report['size']} world ({report.get('mode', 'lora')})", "",
             f"`{report['command']}` — {report['machine']}; {report['n_train']} samples, {report['n_corrupted']} "
             f"sources; {len(report['results'][0]['per_pair_auc'])} pairs.", "",
             "| query | method | mean AUC | mean AP |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['query']} | {r['method']} | {r['mean_auc']:.3f} | {r['mean_ap']:.3f} |" for r in report["results"]]
    lines += [
        "",
        "| derivation | state | edits that gain | mean gain (nats) | whole-word edits |",
        "|---|---|---|---|---|",
    ]
    for name, states in report["edits"].items():
        lines += [f"| {name} | {cid} | {v['gaining']:.2f} | {_nats(v['mean_gain'])} | {v['whole_word']:.2f} |"
                  for cid, v in states.items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: write ``no_correction_<size>.{json,md}`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="names")
    parser.add_argument("--mode", choices=MODES, default="lora", help="fine-tuning mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="the base model fine-tuned")
    parser.add_argument("--shipped-only", action="store_true",
                        help="trace with the shipped derivation only (no single-token or base_edit rows)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default .bench-work/<size>)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work, base_dir = prepare_work(args.size, args.work, model=args.model)
    started = time.perf_counter()
    report = {
        "command": "python -m benchmarks.no_correction " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "size": args.size, "mode": args.mode, "seed": args.seed,
        "defaults": ScoringConfig().model_dump(), "code": code_version(),
        "model": MODELS[args.model], **evaluate(args.size, work, base_dir, args.seed, args.mode, args.model,
                                                   args.shipped_only),
    }  # fmt: skip
    report["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.mode == "lora" else f"_{args.mode}") + ("" if args.model == "smollm2" else f"_{args.model}")
    stem = args.out / f"no_correction_{args.size}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
