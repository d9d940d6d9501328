"""Lineage tasks: per-checkpoint scores, debias against the base model, fold into the running DDA state.

For each query q and every indexed fine-tuning checkpoint t not yet in q's state:
s_t = ĝ_q(θ_t)ᵀ F_t⁻¹ ĝ_i(θ_t), s_0 the same at the base model, s̃ their normalised forms,
s_t^db = s̃_t − λ s̃_0, and S = Σ_t w_t s_t^db / Σ_t w_t kept as a running state.

A refresh reads each finalized checkpoint (:mod:`tasks.finalize`: a memory-mapped float16 matrix in
canonical sample order and its stored Fisher statistics) once, and scores every pending query of it in one
matrix product; the base model is scored once per query and its s̃_0 kept with the scores, so a later
checkpoint costs one pass over its own matrix. Scores are written once per checkpoint, the states once per
refresh. If samples were added since a query's state was built, its state is rebuilt over every checkpoint.
No model is loaded: the layout comes from the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dda_kernel import (
    DDAState,
    EmbeddingLayout,
    Preconditioner,
    apply_preconditioner,
    checkpoint_weights,
    dda_update,
    debias,
    difference_norms,
    fit_preconditioner,
    normalise_scores,
    pairwise_scores,
    row_norms,
)
from storage.faults import fault_point
from storage.finalized import Finalized
from storage.registry import read_checkpoints
from storage.schemas import BASE_CHECKPOINT
from storage.scores import (
    ScoreBlock,
    StoredState,
    read_base_scores,
    read_dda_states,
    read_sample_set,
    write_dda_state,
    write_scores,
)
from storage.store import LineageStore, where_in
from storage.vectors import read_query_embeddings
from tasks.checkpoints import CheckpointError
from tasks.config import PipelineConfig
from tasks.finalize import covariance_of, open_checkpoint, stored_layout
from tasks.kinds import Kind, kind_of, stored_kind


def _preconditioner(fin: Finalized, layout: EmbeddingLayout, config: PipelineConfig) -> Preconditioner | None:
    """F_t from the checkpoint's stored Fisher statistics (a Cholesky per module), or None for the identity."""
    if config.scoring.preconditioner != "fisher":
        return None
    return fit_preconditioner(covariance_of(fin, layout), config.scoring.damping)


def _scores(
    store: LineageStore, fin: Finalized, kind: Kind, query_ids: list[str], layout: EmbeddingLayout,
    config: PipelineConfig, base: Finalized | None = None,
) -> torch.Tensor:  # fmt: skip
    """s̃ (m, n) float64: preconditioned inner products of the queries with every sample, normalised.

    With ``base`` (the training-side delta, β = ``train_debias``): s = ĝ_qᵀ F_t⁻¹ [ĝ_i(θ_t) − β ĝ_i(θ_0)], by
    linearity two products with the same preconditioned queries; cosine uses ‖ĝ_i(θ_t) − β ĝ_i(θ_0)‖.
    """
    name = stored_kind(kind, config, fin.meta.checkpoint_id).name
    q = torch.from_numpy(read_query_embeddings(store, fin.meta.checkpoint_id, name, query_ids))
    pq = apply_preconditioner(_preconditioner(fin, layout, config), layout, q)
    vectors = torch.from_numpy(fin.vectors)
    s = pairwise_scores(pq, vectors)
    norms = torch.from_numpy(fin.grad_norms)
    beta = config.scoring.train_debias
    if base is not None and beta:
        base_vectors = torch.from_numpy(base.vectors)
        s = s - beta * pairwise_scores(pq, base_vectors)
        if config.scoring.normalisation == "cosine":
            norms = difference_norms(vectors, base_vectors, beta)
    return normalise_scores(s, config.scoring.normalisation, row_norms(q), norms)


def query_kinds(store: LineageStore, query_ids: Sequence[str], config: PipelineConfig) -> dict[str, Kind]:
    """The kind each query is scored as (:func:`tasks.kinds.kind_of`: from ``config.scoring`` and whether a
    correction exists)."""
    rows = store.read("queries", ["query_id", "corrected"], where_in("query_id", list(query_ids))).to_pylist()
    corrected = {r["query_id"]: bool(r["corrected"]) for r in rows}
    missing = [q for q in query_ids if q not in corrected]
    if missing:
        raise KeyError(f"query {missing[0]!r} is not registered: run dda attribute with a queries file")
    wanted = config.scoring.query_kind
    if wanted == "contrastive" and not all(corrected.values()):
        bad = next(q for q, c in corrected.items() if not c)
        raise CheckpointError(f"query {bad!r} has no corrected response: the contrastive query kind needs one")
    return {q: kind_of(corrected[q], config) for q in query_ids}


def _state(stored: StoredState | None, sample_ids: list[str]) -> DDAState:
    if stored is None or stored.sample_ids != sample_ids:
        return DDAState(torch.zeros(1, len(sample_ids), dtype=torch.float64), 0.0, frozenset())
    return DDAState(
        torch.from_numpy(np.array(stored.weighted_sum)), float(stored.total_weight[0]), stored.checkpoints[0]
    )


def _weights(checkpoints: list[dict[str, Any]], config: PipelineConfig) -> dict[str, float]:
    rates = [c["learning_rate"] or 0.0 for c in checkpoints]
    weights = checkpoint_weights(rates, config.scoring.weighting)
    return {c["checkpoint_id"]: w for c, w in zip(checkpoints, weights, strict=True)}


def refresh_lineage(data_dir: str | Path, base_reference: str, query_ids: Sequence[str], config: PipelineConfig) -> int:
    """Fold every indexed checkpoint missing from the queries' DDA states in; returns (query, checkpoint) folds.

    Needs the query embeddings at the base model and at each checkpoint (:func:`tasks.tracing.embed_queries`).
    ``base_reference`` is not loaded (kept for the flows' uniform task signature).
    """
    store = LineageStore.open(Path(data_dir) / "store")
    checkpoints = read_checkpoints(store)
    if not checkpoints or checkpoints[0]["role"] != "base":
        raise CheckpointError(f"data folder {data_dir} has no indexed base model: run dda index first")
    finetuned = checkpoints[1:]
    if not finetuned or not query_ids:
        return 0
    fp = config.settings_fingerprint
    kinds = query_kinds(store, query_ids, config)
    layout = stored_layout(store, config.projection)
    base = open_checkpoint(store, checkpoints[0], layout)
    set_id = base.meta.sample_set_id
    sample_ids = read_sample_set(store, set_id)
    stored = read_dda_states(store, fp, query_ids)
    states = {q: _state(stored.get(q), sample_ids) for q in query_ids}
    pending = [q for q in query_ids if any(c["checkpoint_id"] not in states[q].checkpoints for c in finetuned)]
    if not pending:
        return 0  # every state is current: no vector is read
    base_scores = _base_scores(store, base, pending, kinds, layout, config)
    weights = _weights(finetuned, config)
    fresh = [ScoreBlock(BASE_CHECKPOINT, list(base_scores.computed), base_scores.matrix(base_scores.computed), 0.0)]
    folds = 0
    for ckpt in finetuned:
        cid = ckpt["checkpoint_id"]
        need = [q for q in pending if cid not in states[q].checkpoints]
        if not need:
            continue
        at = open_checkpoint(store, ckpt, layout)
        if at.meta.sample_set_id != set_id:
            raise CheckpointError(f"checkpoint {cid} and the base model embed different samples: re-run dda index")
        blocks = [b for b in fresh if b.query_ids]
        fresh = []
        for kind in Kind:
            qs = [q for q in need if kinds[q] == kind]
            if not qs:
                continue
            s_t = _scores(store, at, kind, qs, layout, config, base)
            s_db = debias(s_t, torch.from_numpy(base_scores.matrix(qs)), config.scoring.debias_coefficient)
            blocks.append(ScoreBlock(cid, qs, s_t.numpy(), weights[cid]))
            for i, q in enumerate(qs):
                states[q] = dda_update(states[q], cid, s_db[i : i + 1], weights[cid], config.scoring.standardise)
        write_scores(store, fp, set_id, blocks, config.scoring.debias_coefficient)
        fault_point("scores-written")
        folds += len(need)
    _write_states(store, fp, pending, states, sample_ids)
    fault_point("state-written")
    return folds


class _BaseScores:
    """s̃_0 per query: reused from the store when kept there, else computed now (``computed``)."""

    def __init__(self, rows: dict[str, np.ndarray], computed: list[str]) -> None:
        self.rows = rows
        self.computed = computed

    def matrix(self, query_ids: Sequence[str]) -> np.ndarray:
        """(m, n) float64 rows of ``query_ids``."""
        if not query_ids:
            return np.zeros((0, 0))
        return np.stack([self.rows[q] for q in query_ids])


def _base_scores(
    store: LineageStore, base: Finalized, query_ids: list[str], kinds: dict[str, Kind], layout: EmbeddingLayout,
    config: PipelineConfig,
) -> _BaseScores:  # fmt: skip
    """s̃_0 of ``query_ids``: read where stored over the base's sample set, the others scored in one pass per kind."""
    fp = config.settings_fingerprint
    rows = read_base_scores(store, fp, base.meta.sample_set_id, query_ids)
    computed = [q for q in query_ids if q not in rows]
    for kind in Kind:
        qs = [q for q in computed if kinds[q] == kind]
        if qs:
            s_0 = _scores(store, base, kind, qs, layout, config).numpy()
            rows.update(zip(qs, s_0, strict=True))
    return _BaseScores(rows, computed)


def _write_states(
    store: LineageStore, fp: str, query_ids: list[str], states: dict[str, DDAState], sample_ids: list[str]
) -> None:
    stored = StoredState(
        query_ids,
        sample_ids,
        torch.cat([states[q].weighted_sum for q in query_ids]).numpy(),
        np.array([states[q].total_weight for q in query_ids]),
        [states[q].checkpoints for q in query_ids],
    )
    write_dda_state(store, fp, stored)
