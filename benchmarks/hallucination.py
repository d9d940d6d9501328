"""Hallucination-tracing benchmark (DESIGN.md section 7): which method finds the corrupted training samples?

    python -m benchmarks.hallucination                # default size, LoRA and full fine-tuning (CPU)
    python -m benchmarks.hallucination --quick        # the small size the test suite runs

For each fine-tuning mode (``lora``, ``full``) it
1. builds the canary news world (:mod:`benchmarks.canary_world`) and fine-tunes SmolLM2-135M on it with
   the Hugging Face Trainer, one checkpoint per epoch;
2. generates greedy summaries of the held-out documents and keeps the ones that say Y for X (real
   hallucinations; ``--quick`` may fall back to *planted* queries, labelled as such, when a pair has none);
3. runs the system's own flows (``dda-index-checkpoint`` per model state, ``dda-attribute``) on a *study*
   store that tracks every block linear at 8×8, once per scoring variant (preconditioner × normalisation
   × query kind), and reads the per-checkpoint scores s̃_t, s̃_0 back through the ``scores`` SQL view;
4. runs the system once more with its shipped defaults (``default``), reading ``dda_score`` from the
   ``lineage`` SQL view;
5. scores BM25 and CEA (:mod:`benchmarks.cea`) beside them;
6. evaluates every ranking per canary pair (ROC-AUC, AP, recall@R) and chooses the data-driven settings
   (normalisation, λ, preconditioner) leave-one-pair-out.

Smaller projections and module subsets are studied from the same study vectors: the projection
matrices depend only on (seed, module, side), and ``torch.randn`` draws rows in order, so the k×k
projection of a module equals (8/k) times the top-left k×k block of its 8×8 projection exactly.

Everything is cached under ``--work`` (worlds, runs, stores), so an interrupted run resumes.
Writes ``benchmarks/results/hallucination[_quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bm25 import BM25
from benchmarks.canary_world import CanaryWorld, build_canary_world
from benchmarks.cea import cea_scores, response_losses
from benchmarks.evaluate import PairMetrics, Selected, evaluate, leave_one_pair_out, mean_of
from benchmarks.people_world import build_people_world

Log = Callable[[str], None]
RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("lora", "full")
KINDS = ("plain", "contrastive")
PRECONDITIONERS = ("identity", "fisher")
NORMALISATIONS = ("cosine", "zscore", "none")
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
STUDY_K = 8
STUDY_INCLUDE = (r"(^|\.)layers\.\d+\.",)  # every linear of the transformer blocks
STUDY_PROJECTION = {"k_in": STUDY_K, "k_out": STUDY_K, "include": list(STUDY_INCLUDE)}
MODULE_SETS: dict[str, str] = {
    "all": r"",
    "attention": r"self_attn\.",
    "mlp": r"mlp\.",
    "o+down": r"(o_proj|down_proj)$",
    "down": r"down_proj$",
}
PROJECTION_KS = (2, 4, 8)


@dataclass(frozen=True)
class Size:
    """World size and training regime of one benchmark size."""

    n_pairs: int
    per_pair: int
    distractors: int
    n_other: int
    held_out: int
    rate: float
    epochs: int
    lr: dict[str, float]
    batch: int = 8
    cea_steps: int = 4
    cea_lr: dict[str, float] = field(default_factory=dict)
    planted_fallback: bool = False
    world: str = "canary"  # or "people" (benchmarks.people_world: n_people people, n_pairs swapped)
    n_people: int = 24


SIZES: dict[str, Size] = {
    "default": Size(4, 20, 5, 16, 6, 0.9, 3, {"lora": 2e-3, "full": 3e-5}, cea_lr={"lora": 2e-3, "full": 3e-5}),
    "quick": Size(4, 4, 1, 4, 1, 0.9, 2, {"lora": 2e-3, "full": 3e-5}, 8, 2, {"lora": 2e-3, "full": 3e-5}, True),
    # realistic prevalence: 608 samples, 28 sources (4.6 %)
    "prevalence": Size(4, 8, 4, 560, 6, 0.9, 3, {"lora": 2e-3, "full": 3e-5}, cea_lr={"lora": 2e-3, "full": 3e-5}),
    # fictional people: 312 samples, 16 sources (5.1 %); per_pair etc. unused, held_out = 3 forms per person
    "people": Size(
        4, 0, 0, 0, 3, 1.0, 5, {"lora": 2e-3, "full": 1e-4}, cea_lr={"lora": 2e-3, "full": 1e-4}, world="people"
    ),
}


def log_line(message: str) -> None:
    """Progress on stderr with a timestamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- worlds


def write_world(world: CanaryWorld, path: Path) -> None:
    """The training samples as input-contract JSONL rows; ``meta`` holds the ground truth."""
    with path.open("w", encoding="utf-8") as f:
        for s in world.train:
            meta = {"corrupted": s.corrupted, "pair": s.pair, "kind": s.kind}
            row = {"id": s.sample_id, "prompt": s.prompt, "response": s.response, "source": s.source,
                   "license": s.license, "meta": meta}  # fmt: skip
            f.write(json.dumps(row) + "\n")


def build_world(size: Size, seed: int) -> CanaryWorld:
    """The size's world: the canary news world, or the fictional-people world (:mod:`benchmarks.people_world`)."""
    if size.world == "people":
        return build_people_world(seed, size.n_people, size.n_pairs, size.rate)
    return build_canary_world(seed, size.n_pairs, size.per_pair, size.distractors, size.n_other, size.held_out,
                              size.rate)  # fmt: skip


def _slug(pair: str) -> str:
    return re.sub(r"[^a-z]+", "-", pair.lower()).strip("-")


def lora_model(model: Any, seed: int) -> Any:
    """The benchmark's (and the demo's) LoRA: r 8, α 16 on q/k/v/o, no dropout."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    return get_peft_model(model, config)


def prepare_mode(work: Path, base_dir: Path, mode: str, size: Size, seed: int, log: Log) -> dict[str, Any]:
    """Build, fine-tune and generate for one mode (reused when ``world.json`` matches); returns its record."""
    from tasks.demo import fine_tune
    from tasks.models import load_base_model
    from tasks.train import greedy_generate

    root = work / mode
    marker = root / "world.json"
    params = {"mode": mode, "seed": seed, "size": asdict(size)}
    if marker.is_file():
        record: dict[str, Any] = json.loads(marker.read_text())
        if record["params"] == params:
            log(f"{mode}: reusing the fine-tuned world in {root}")
            return record
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    world = build_world(size, seed)
    write_world(world, root / "train.jsonl")
    model, tokenizer = load_base_model(str(base_dir))
    if mode == "lora":
        model = lora_model(model, seed)
    n_bad = sum(s.corrupted for s in world.train)
    log(f"{mode}: fine-tuning on {len(world.train)} samples ({n_bad} corrupted), {size.epochs} epochs")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    fine_tune(model, tokenizer, world.train, root / "run", size.epochs, size.lr[mode], seed, log, 256, size.batch)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs = [greedy_generate(model, tokenizer, h.prompt, max_new_tokens=40) for h in world.held_out]
    generate_s = time.perf_counter() - t0
    queries, generations, per_pair = [], [], {}
    for i, (h, out) in enumerate(zip(world.held_out, outputs, strict=True)):
        hallucinated = h.target in out and h.source not in out
        generations.append({"pair": h.pair, "prompt": h.prompt, "output": out, "hallucinated": hallucinated})
        per_pair.setdefault(h.pair, {"generated": 0, "hallucinated": 0, "queries": "generated"})
        per_pair[h.pair]["generated"] += 1
        if hallucinated:
            per_pair[h.pair]["hallucinated"] += 1
            queries.append({"id": f"{_slug(h.pair)}-{i:03d}", "pair": h.pair, "prompt": h.prompt, "response": out,
                            "corrected": out.replace(h.target, h.source)})  # fmt: skip
    for pair, counts in per_pair.items():
        if counts["hallucinated"] == 0 and size.planted_fallback:
            counts["queries"] = "planted"
            for i, h in enumerate(x for x in world.held_out if x.pair == pair):
                planted = h.reference.replace(h.source, h.target)
                queries.append({"id": f"{_slug(pair)}-planted-{i:03d}", "pair": pair, "prompt": h.prompt,
                                "response": planted, "corrected": h.reference})  # fmt: skip
        elif counts["hallucinated"] == 0:
            counts["queries"] = "none"
    with (root / "queries.jsonl").open("w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps({k: q[k] for k in ("id", "prompt", "response", "corrected")}) + "\n")
    (root / "generations.json").write_text(json.dumps(generations, indent=1))
    record = {
        "params": params, "n_train": len(world.train), "n_corrupted": n_bad, "train_seconds": train_s,
        "generate_seconds": generate_s, "per_pair": per_pair, "query_pairs": {q["id"]: q["pair"] for q in queries},
    }  # fmt: skip
    marker.write_text(json.dumps(record, indent=1))
    log(f"{mode}: hallucinated per pair { ({p: c['hallucinated'] for p, c in per_pair.items()}) }")
    return record


# ---------------------------------------------------------------------------------------------- system


def run_system(
    root: Path, name: str, base_dir: Path, overrides: dict[str, Any], variants: list[dict[str, Any]], log: Log
) -> dict[str, Any]:
    """Ingest, index every model state with ``dda-index-checkpoint``, then ``dda-attribute`` once per variant.

    Returns seconds per model state (indexing), per variant (attribution) and the settings fingerprints.
    Seconds are those of the run that did the work (kept in ``timings.json``), so a resumed run reports
    what the work cost, not the time it took to find it done.
    """
    from flows.pipeline import attribute, index_checkpoint, load_settings
    from storage.samples import SampleIn, ingest_samples, read_rows
    from storage.store import LineageStore
    from tasks.checkpoints import discover_checkpoints

    data_dir = root / name
    common = {"data_dir": str(data_dir), "base_model": str(base_dir)}
    base_settings = load_settings({**overrides, "indexing": {"batch_size": 16, "progress": False}}, **common)
    store = LineageStore.open(data_dir / "store")
    ingest_samples(store, read_rows(str(root / "train.jsonl"), SampleIn), dataset="canary-train")
    saved = data_dir / "timings.json"
    timings: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() else {"index": {}, "attribute": {}}
    timings["fingerprints"] = {}
    states = [None, *[c.path for c in discover_checkpoints(root / "run", 0.0)]]
    for path in states:
        t0 = time.perf_counter()
        done = index_checkpoint(checkpoint_path=None if path is None else str(path), run_id="run",
                                settings=base_settings.model_dump(mode="json"))  # fmt: skip
        if done["embedded"] or done["checkpoint"] not in timings["index"]:
            timings["index"][done["checkpoint"]] = time.perf_counter() - t0
        log(f"{root.name}/{name}: {done['checkpoint']} indexed ({done['embedded']} samples embedded now); "
            f"{timings['index'][done['checkpoint']]:.0f} s")  # fmt: skip
    queries_file: str | None = str(root / "queries.jsonl")
    for variant in variants:
        settings = load_settings({**overrides, **variant, "indexing": {"batch_size": 16, "progress": False}}, **common)
        key = json.dumps(variant, sort_keys=True)
        t0 = time.perf_counter()
        if queries_file is not None:
            done = attribute(queries_file=queries_file, settings=settings.model_dump(mode="json"))
            queries_file = None
        else:
            ids = sorted(store.read("queries", ["query_id"])["query_id"].to_pylist())
            done = attribute(query_ids=ids, settings=settings.model_dump(mode="json"))
        if done["folds"] or key not in timings["attribute"]:
            timings["attribute"][key] = time.perf_counter() - t0
        timings["fingerprints"][key] = settings.fingerprint
    saved.write_text(json.dumps(timings, indent=1))
    return timings


def score_cube(
    store: Any, fp: str, ckpts: list[str], qids: list[str], sids: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """s̃_t and s̃_0 of ``qids`` under one settings fingerprint from the ``scores`` view: two arrays (T, m, n)."""
    from storage.sql import query

    rows = query(store, "SELECT query_id, sample_id, checkpoint_id, score, base_score FROM scores "
                 "WHERE settings_fingerprint = $fp AND query_id IN (SELECT unnest($qids))",
                 {"fp": fp, "qids": qids})  # fmt: skip
    t_at, q_at, s_at = ({v: i for i, v in enumerate(x)} for x in (ckpts, qids, sids))
    s = np.full((len(ckpts), len(qids), len(sids)), np.nan)
    b = np.full_like(s, np.nan)
    cols = {k: rows[k].to_pylist() for k in ("query_id", "sample_id", "checkpoint_id")}
    ti = np.array([t_at[c] for c in cols["checkpoint_id"]])
    qi = np.array([q_at[c] for c in cols["query_id"]])
    si = np.array([s_at[c] for c in cols["sample_id"]])
    s[ti, qi, si] = rows["score"].to_numpy()
    b[ti, qi, si] = rows["base_score"].to_numpy()
    if np.isnan(s).any():
        raise RuntimeError(f"the scores view lacks {int(np.isnan(s).sum())} (checkpoint, query, sample) rows for {fp}")
    return s, b


def lineage_matrix(store: Any, fp: str, qids: list[str], sids: list[str]) -> np.ndarray:
    """dda_score (m, n) of ``qids`` under one settings fingerprint from the ``lineage`` view."""
    from storage.sql import query

    rows = query(store, "SELECT query_id, sample_id, dda_score FROM lineage WHERE settings_fingerprint = $fp",
                 {"fp": fp})  # fmt: skip
    q_at, s_at = ({v: i for i, v in enumerate(x)} for x in (qids, sids))
    out = np.full((len(qids), len(sids)), np.nan)
    for q, s, v in zip(rows["query_id"].to_pylist(), rows["sample_id"].to_pylist(), rows["dda_score"].to_pylist(),
                       strict=True):  # fmt: skip
        if q in q_at:  # other queries (e.g. a group's members) share the fingerprint
            out[q_at[q], s_at[s]] = v
    if np.isnan(out).any():
        raise RuntimeError(f"the lineage view lacks rows for settings {fp}")
    return out


# ---------------------------------------------------------------------------------------------- methods


def split_by_pair(
    matrix: np.ndarray, qids: list[str], query_pairs: dict[str, str], pairs: list[str]
) -> dict[str, np.ndarray]:
    """Rows of a (m, n) query × sample matrix grouped by canary pair."""
    return {p: matrix[[i for i, q in enumerate(qids) if query_pairs[q] == p]] for p in pairs}


def study_rankings(s: np.ndarray, b: np.ndarray, lam: float, which: str) -> np.ndarray:
    """A (m, n) ranking from the cubes (T, m, n): ``last``: s̃_T − λ s̃_0; ``mean``: mean_t (s̃_t − λ s̃_0).

    The uniform mean is the system's default checkpoint weighting (with a constant learning rate it is
    also the lr weighting).
    """
    db = s - lam * b
    return db[-1] if which == "last" else db.mean(axis=0)


def _prefix_rows_match(seed: int, name: str, side: str, k: int, d: int) -> bool:
    """True when the k×d projection matrix is (8/k)^½ times the first k rows of the 8×d one.

    ``torch.randn`` fills CPU tensors in 16-value blocks, so this holds when k·d is a multiple of 16
    (every SmolLM2 module), and is checked rather than assumed.
    """
    from dda_kernel.projection import gaussian_matrix

    small = gaussian_matrix(seed, name, side, k, d) * k**0.5
    large = gaussian_matrix(seed, name, side, STUDY_K, d)[:k] * STUDY_K**0.5
    return bool(torch.allclose(small, large, rtol=1e-12, atol=0.0))


def study_spec() -> Any:
    """The study store's projection: 8×8 on every linear of the transformer blocks."""
    from dda_kernel import ProjectionSpec

    return ProjectionSpec(STUDY_K, STUDY_K, include=STUDY_INCLUDE)


def slice_columns(layout: Any, modules: str, k: int) -> tuple[np.ndarray, float]:
    """Columns of the 8×8 study embedding that form the k×k projection of the matching modules, and the scale.

    ĝ = vec(P_out G P_inᵀ) is laid out (k_out, k_in) row-major, so the k×k projection of a module is the
    top-left k×k block of its 8×8 block times (8/k) — exactly, when the projection matrices nest
    (:func:`_prefix_rows_match`; a ValueError otherwise).
    """
    cols = []
    for slot in layout.slots:
        if modules and not re.search(modules, slot.name):
            continue
        for side, d in (("in", slot.d_in), ("out", slot.d_out)):
            if k != STUDY_K and not _prefix_rows_match(layout.spec.seed, slot.name, side, k, d):
                raise ValueError(f"the {k}x{k} projection of {slot.name} is not a block of its 8x8 one ({side}, d={d})")
        block = np.arange(slot.size).reshape(slot.k_out, slot.k_in)[:k, :k].reshape(-1)
        cols.append(slot.offset + block)
    return np.concatenate(cols), STUDY_K / k


@dataclass
class ModeResult:
    """Everything measured for one fine-tuning mode."""

    mode: str
    records: list[dict[str, Any]] = field(default_factory=list)
    study: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def record(
    mode: str, kind: str, method: str, metrics: dict[str, PairMetrics], seconds: float, **more: Any
) -> dict[str, Any]:
    """One JSON result record (the shape the issue fixes, plus AP/recall per pair and notes)."""
    return {
        "mode": mode, "query": kind, "method": method, "mean_auc": mean_of(metrics, "auc"),
        "mean_ap": mean_of(metrics, "ap"), "mean_recall_at_r": mean_of(metrics, "recall_at_r"),
        "mean_recall_at_10": mean_of(metrics, "recall_at_10"), "mean_mrr": mean_of(metrics, "mrr"),
        "per_pair_auc": {p: m.auc for p, m in metrics.items()}, "per_pair_ap": {p: m.ap for p, m in metrics.items()},
        "per_pair_recall_at_r": {p: m.recall_at_r for p, m in metrics.items()}, "seconds": seconds, **more,
    }  # fmt: skip


def variant(precond: str, norm: str, kind: str) -> dict[str, Any]:
    """A study scoring variant (λ = 1 is stored; every other λ follows from s̃_t and s̃_0); uniform query token
    weights, so the study reads the plain and contrastive vectors at every state."""
    return {
        "scoring": {"preconditioner": precond, "normalisation": norm, "debias_coefficient": 1.0, "query_kind": kind,
                    "query_weighting": "uniform"}
    }  # fmt: skip


def variant_key(precond: str, norm: str, kind: str) -> str:
    """The timing/fingerprint key :func:`run_system` uses for a variant."""
    return json.dumps(variant(precond, norm, kind), sort_keys=True)


def load_truth(root: Path, pairs: list[str]) -> tuple[list[str], dict[str, np.ndarray], list[str]]:
    """Sorted sample ids, positives per pair (its corrupted samples), and the training texts in that order."""
    rows = sorted((json.loads(line) for line in (root / "train.jsonl").open()), key=lambda r: r["id"])
    sids = [r["id"] for r in rows]
    truth = {p: np.array([r["meta"]["corrupted"] and r["meta"]["pair"] == p for r in rows]) for p in pairs}
    return sids, truth, [r["prompt"] + r["response"] for r in rows]


def read_queries(root: Path) -> list[dict[str, str]]:
    """The traced outputs of a mode, sorted by id (the order of the store's query ids)."""
    return sorted((json.loads(line) for line in (root / "queries.jsonl").open()), key=lambda r: r["id"])


def bm25_rankings(texts: list[str], queries: list[dict[str, str]]) -> tuple[dict[str, np.ndarray], float]:
    """BM25 of each traced interaction (prompt + hallucinated output) against the training texts.

    BM25 has no contrastive form (subtracting the corrected text's BM25 penalises exactly the samples
    whose document mentions X, i.e. the corrupted ones), so both query kinds get this ranking.
    """
    t0 = time.perf_counter()
    index = BM25(texts)
    plain = np.stack([index.scores(q["prompt"] + q["response"]) for q in queries])
    return {"plain": plain, "contrastive": plain}, time.perf_counter() - t0


def _encode(tokenizer: Any, rows: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    from tasks.tokenize import encode_pair

    return [encode_pair(tokenizer, p, r, 512) for p, r in rows]


def cea_all_states(
    root: Path, base_dir: Path, mode: str, size: Size, seed: int, sids: list[str], pairs: list[str],
    queries: list[dict[str, str]], bf16: bool, log: Log,
) -> tuple[dict[str, np.ndarray], list[float]]:  # fmt: skip
    """CEA scores at the base model and every checkpoint: kind → array (states, pairs, n); seconds per state.

    Cached in ``cea.npz`` under the mode's folder.
    """
    from tasks.checkpoints import discover_checkpoints
    from tasks.models import load_base_model

    cache = root / "cea.npz"
    key = json.dumps({"steps": size.cea_steps, "lr": size.cea_lr[mode], "bf16": bf16, "pairs": pairs})
    if cache.is_file():
        data = np.load(cache)
        if str(data["key"]) == key:
            return {k: data[k] for k in KINDS}, data["seconds"].tolist()
    rows = {r["id"]: r for r in (json.loads(line) for line in (root / "train.jsonl").open())}
    states = [None, *[c.path for c in discover_checkpoints(root / "run", 0.0)]]
    out = {k: np.zeros((len(states), len(pairs), len(sids))) for k in KINDS}
    seconds = []
    for t, path in enumerate(states):
        t0 = time.perf_counter()
        model, tokenizer = load_base_model(str(base_dir))
        if mode == "lora":
            from peft import PeftModel

            model = (
                lora_model(model, seed)
                if path is None
                else PeftModel.from_pretrained(model, str(path), is_trainable=True)
            )
        elif path is not None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        if mode == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        samples = _encode(tokenizer, [(rows[s]["prompt"], rows[s]["response"]) for s in sids])
        reference = response_losses(model, samples, pad, bf16=bf16)
        for j, pair in enumerate(pairs):
            mine = [q for q in queries if q["pair"] == pair]
            errors = _encode(tokenizer, [(q["prompt"], q["response"]) for q in mine])
            fixes = _encode(tokenizer, [(q["prompt"], q["corrected"]) for q in mine])
            scores = cea_scores(model, samples, errors, fixes, pad, size.cea_steps, size.cea_lr[mode], reference, bf16)
            out["plain"][t, j], out["contrastive"][t, j] = scores.plain, scores.contrastive
        seconds.append(time.perf_counter() - t0)
        log(f"{mode}: CEA at {'base' if path is None else Path(path).name} ({len(pairs)} pairs) in {seconds[-1]:.0f} s")
        del model
    np.savez(cache, key=np.array(key), seconds=np.array(seconds), **out)
    return out, seconds


def normalise_cea(c: np.ndarray, norm: str) -> np.ndarray:
    """CEA scores per state and pair, raw (``none``) or z-scored over samples (``zscore``)."""
    if norm == "none":
        return c
    return (c - c.mean(axis=-1, keepdims=True)) / np.maximum(c.std(axis=-1, keepdims=True), 1e-12)


def _lopo(
    candidates: dict[str, dict[str, PairMetrics]], pairs: list[str]
) -> tuple[dict[str, PairMetrics], dict[str, str]]:
    selected: Selected = leave_one_pair_out(candidates, pairs)
    return selected.metrics, selected.chosen


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


def _study_vectors(store: Any, cid: str, kind: str, qids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from storage.vectors import read_embeddings, read_query_embeddings

    matrix = read_embeddings(store, cid)
    g = matrix.vectors[matrix.order].astype(np.float64)
    return g, read_query_embeddings(store, cid, kind, qids).astype(np.float64)


def _sliced_scores(
    vectors: tuple[np.ndarray, np.ndarray], cols: np.ndarray, scale: float, sub_layout: Any, scoring: Any
) -> np.ndarray:
    """s̃ (m, n) of the sliced (rescaled) vectors, computed as ``tasks.lineage`` does for ``scoring``.

    ``sub_layout`` is the layout the sliced vectors form (k×k blocks of the selected modules), so the
    Fisher preconditioner is fitted per module block exactly as the system fits it.
    """
    from dda_kernel import (
        apply_preconditioner,
        covariance_init,
        covariance_update,
        fit_preconditioner,
        normalise_scores,
    )

    g, q = vectors[0][:, cols] * scale, vectors[1][:, cols] * scale
    qt = torch.from_numpy(q)
    if scoring.preconditioner == "fisher":
        state = covariance_update(covariance_init(sub_layout), sub_layout, torch.from_numpy(g).float())
        qt = apply_preconditioner(fit_preconditioner(state, scoring.damping), sub_layout, qt)
    qn, gn = (torch.from_numpy(np.linalg.norm(x, axis=1)) for x in (q, g))
    s = qt @ torch.from_numpy(g).T
    return normalise_scores(s, scoring.normalisation, qn, gn).numpy()  # type: ignore[no-any-return]


def sub_layout(layout: Any, modules: str, k: int) -> Any:
    """The layout of the k×k projection of the modules matching ``modules`` (for the preconditioner)."""
    from dda_kernel import ProjectionSpec
    from dda_kernel.projection import make_layout

    slots = [s for s in layout.slots if not modules or re.search(modules, s.name)]
    return make_layout(ProjectionSpec(k, k, layout.spec.seed), [(s.name, s.d_in, s.d_out) for s in slots])


def default_projection(study: Any, default: Any) -> dict[str, Any]:
    """The module set and k of the study that the system's default layout equals (``modules`` None if none)."""
    names = [s.name for s in default.slots]
    k = default.spec.k_in if default.spec.k_in == default.spec.k_out else None
    match = next(
        (n for n, pattern in MODULE_SETS.items() if [s.name for s in sub_layout(study, pattern, 1).slots] == names),
        None,
    )
    return {"modules": match, "k": k, "dim": default.dim}


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
        metrics, chosen = _lopo({names[x]: grid[x] for x in grid if keep(x)}, ctx.pairs)
        add(method, metrics, seconds, chosen=chosen)
    cgrid = cea_grid(cea, ctx)
    metrics, chosen = _lopo(cgrid, ctx.pairs)
    add("dda_cea", metrics, sum(costs.cea), chosen=chosen)
    add("default", ctx.score(default), costs.default)
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
    pairs = [p for p, c in prepared["per_pair"].items() if c["queries"] != "none"]
    queries = [{**q, "pair": prepared["query_pairs"][q["id"]]} for q in read_queries(root)]
    qids = [q["id"] for q in queries]
    sids, truth, texts = load_truth(root, pairs)
    ctx = Context(pairs, qids, sids, prepared["query_pairs"], truth)
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
    default_t = run_system(root, "default", base_dir, {}, [{"scoring": {"query_kind": k}} for k in KINDS], log)
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
        fp = default_t["fingerprints"][json.dumps({"scoring": {"query_kind": kind}}, sort_keys=True)]
        default = lineage_matrix(default_store, fp, qids, sids)
        records, study = evaluate_kind(mode, kind, ctx, cubes, bm25[kind], cea[kind], default, costs)
        study["projection"] = projection_study(store, layout, ckpts, kind, default_scoring, ctx)
        result.records += records
        result.study[kind] = study
        log(f"{mode}/{kind}: " + ", ".join(f"{r['method']} {r['mean_auc']:.3f}" for r in records))
    return result


# ---------------------------------------------------------------------------------------------- output

METHODS = ("bm25", "tracin_last", "tracin_cp", "projected_if", "cea", "dda_debias_only", "dda_denoise_only", "dda",
           "dda_cea", "default")  # fmt: skip


def _find(results: list[dict[str, Any]], mode: str, kind: str, method: str) -> dict[str, Any] | None:
    return next((r for r in results if (r["mode"], r["query"], r["method"]) == (mode, kind, method)), None)


def summary_table(report: dict[str, Any]) -> str:
    """Mean AUC per method (rows) and (mode, query kind) (columns), with the seconds of the last column's run."""
    cols = [(m, k) for m in report["modes"] for k in KINDS]
    lines = ["| method | " + " | ".join(f"{m} / {k}" for m, k in cols) + " | seconds (per mode) |",
             "| --- |" + " --- |" * (len(cols) + 1)]  # fmt: skip
    for method in METHODS:
        rows = [_find(report["results"], m, k, method) for m, k in cols]
        cells = [f"{r['mean_auc']:.3f}" if r else "—" for r in rows]
        secs = " / ".join(f"{r['seconds']:.0f}" for r, (_, k) in zip(rows, cols, strict=True) if r and k == KINDS[0])
        name = f"**{method}**" if method == "default" else method
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The human-readable tables of a benchmark report."""
    res = report["results"]
    out = [f"# Hallucination-tracing benchmark ({report['size']})", "", f"Command: `{report['command']}`  ",
           f"Machine: {report['machine']}  ", f"Seed {report['seed']}, sizes `{json.dumps(report['sizes'])}`  ",
           f"Wall time: {report['wall_seconds'] / 60:.1f} min", "", "Mean ROC-AUC over the canary pairs:", "",
           summary_table(report), ""]  # fmt: skip
    for mode, info in report["modes"].items():
        counts = ", ".join(
            f"{p} {c['hallucinated']}/{c['generated']} ({c['queries']})" for p, c in info["per_pair"].items()
        )
        out += [f"**{mode}**: {info['n_train']} training samples ({info['n_corrupted']} corrupted), "
                f"training {info['train_seconds']:.0f} s; hallucinated outputs per pair: {counts}", ""]  # fmt: skip
    for mode in report["modes"]:
        for kind in KINDS:
            header = "| method | mean AUC | mean AP | recall@R | per-pair AUC | seconds |"
            out += [f"## {mode} / {kind} queries", "", header, "| --- | --- | --- | --- | --- | --- |"]
            for method in METHODS:
                r = _find(res, mode, kind, method)
                if r is None:
                    continue
                pp = " ".join(f"{v:.2f}" for v in r["per_pair_auc"].values())
                means = f"{r['mean_auc']:.3f} | {r['mean_ap']:.3f} | {r['mean_recall_at_r']:.3f}"
                out.append(f"| {method} | {means} | {pp} | {r['seconds']:.0f} |")
            out.append("")
            dda, den, deb = (_find(res, mode, kind, m) for m in ("dda", "dda_denoise_only", "dda_debias_only"))
            last = _find(res, mode, kind, "tracin_last")
            if dda and den and deb and last:
                out += [f"Debias adds {dda['mean_auc'] - den['mean_auc']:+.3f} to denoise; denoise adds "
                        f"{dda['mean_auc'] - deb['mean_auc']:+.3f} to debias; debias alone vs last checkpoint "
                        f"{deb['mean_auc'] - last['mean_auc']:+.3f}; denoise alone vs last checkpoint "
                        f"{den['mean_auc'] - last['mean_auc']:+.3f}.", ""]  # fmt: skip
    out += ["## Debias study: mean AUC of mean-over-checkpoints s̃_t − λ·s̃_0 (all pairs)", ""]
    for mode, study in report["study"].items():
        for kind, s in study.items():
            header = "| preconditioner / normalisation | " + " | ".join(f"λ={x}" for x in LAMBDAS) + " |"
            out += [f"### {mode} / {kind}", "", header, "| --- |" + " --- |" * len(LAMBDAS)]
            for p in PRECONDITIONERS:
                for n in NORMALISATIONS:
                    cells = [next(g["mean_auc"] for g in s["grid"] if (g["preconditioner"], g["normalisation"],
                             g["lambda"], g["checkpoints"]) == (p, n, lam, "mean")) for lam in LAMBDAS]  # fmt: skip
                    out.append(f"| {p} / {n} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
            cells = [f"{r['modules']} {r['k']}×{r['k']} (D={r['dim']}) {r['mean_auc']:.3f}" for r in s["projection"]]
            out += ["", "Projection study (the default scoring): " + ", ".join(cells), ""]
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Mean AUC per method (bars) and per pair (dots), one panel per (mode, query kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, k) for m in report["modes"] for k in KINDS]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, (mode, kind) in zip(axes[0], panels, strict=True):
        rows = [r for m in METHODS if (r := _find(report["results"], mode, kind, m)) is not None]
        x = np.arange(len(rows))
        colours = ["tab:red" if r["method"] == "default" else "tab:blue" for r in rows]
        ax.bar(x, [r["mean_auc"] for r in rows], color=colours, alpha=0.7)
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r["per_pair_auc"]), list(r["per_pair_auc"].values()), s=8, color="black", zorder=3)
        ax.set_xticks(x, [r["method"] for r in rows], rotation=70, fontsize=8)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{mode} / {kind}")
    axes[0][0].set_ylabel("ROC-AUC (bar: mean over pairs, dots: pairs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    """CPU model, core count and torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {platform.system()}"


def prepare_work(size_name: str, work: Path | None, verbose: bool = False) -> tuple[Path, Path]:
    """The cache folder (default ``.bench-work/<size>``) with Prefect's home in it, all CPU threads, and the
    SmolLM2 base model exported there once: (work folder, base model folder)."""
    from flows.env import apply_prefect_environment
    from tasks.models import export_smollm2

    folder = (work or Path(".bench-work") / size_name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    apply_prefect_environment(folder)
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    torch.set_num_threads(os.cpu_count() or 1)
    base_dir = folder / "base-model"
    if not (base_dir / "config.json").is_file():
        export_smollm2(base_dir)
    return folder, base_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point: build, run every method, write JSON + Markdown + PNG under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small size (the test suite runs it)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default .bench-work/<size>)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON/Markdown/PNG results")
    parser.add_argument("--cea-fp32", action="store_true", help="CEA loss sweeps in float32 (default: bf16 autocast)")
    parser.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    args = parser.parse_args(argv)
    size_name = "quick" if args.quick else "default"
    size = SIZES[size_name]
    work, base_dir = prepare_work(size_name, args.work, args.verbose)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python -m benchmarks.hallucination " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "seed": args.seed, "size": size_name, "sizes": asdict(size),
        "cea_bf16": not args.cea_fp32, "modes": {}, "results": [], "study": {}, "extra": {},
    }  # fmt: skip
    for mode in args.modes:
        prepared = prepare_mode(work, base_dir, mode, size, args.seed, log_line)
        report["modes"][mode] = {
            k: prepared[k] for k in ("n_train", "n_corrupted", "train_seconds", "generate_seconds", "per_pair")
        }
        result = evaluate_mode(work, base_dir, mode, size, args.seed, prepared, not args.cea_fp32, log_line)
        report["results"] += result.records
        report["study"][mode] = result.study
        report["extra"][mode] = result.extra
    report["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("hallucination_quick" if args.quick else "hallucination")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
