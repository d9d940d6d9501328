"""Lineage tasks: per-checkpoint scores, debias against the base model, fold into the running DDA state.

For each query q and every indexed fine-tuning checkpoint t not yet in q's state:
s_t = ĝ_q(θ_t)ᵀ F_t⁻¹ ĝ_i(θ_t), s_0 the same at the base model, s̃ their normalised forms,
s_t^db = s̃_t − λ s̃_0, and S = Σ_t w_t s_t^db / Σ_t w_t kept as a running state. A new checkpoint
costs one pass over its own vectors; earlier checkpoints are never recomputed. If samples were
added since a query's state was built, its state is rebuilt over every checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    covariance_init,
    covariance_update,
    dda_update,
    debias,
    fit_preconditioner,
    normalise_scores,
    pairwise_scores,
    row_norms,
)
from storage.faults import fault_point
from storage.registry import read_checkpoints
from storage.scores import StoredState, read_dda_state, write_dda_state, write_scores
from storage.store import LineageStore, where_in
from storage.vectors import EmbeddingMatrix, embedded_sample_ids, read_embeddings, read_query_embeddings
from tasks.checkpoints import CheckpointError
from tasks.config import PipelineConfig
from tasks.indexing import BASE_ID, model_layout


@dataclass(frozen=True)
class Aligned:
    """One checkpoint's sample vectors with rows sorted by sample id (the order of every state)."""

    sample_ids: list[str]
    vectors: np.ndarray
    grad_norms: np.ndarray
    preconditioner: Preconditioner | None


def _aligned(store: LineageStore, checkpoint_id: str, layout: EmbeddingLayout, config: PipelineConfig) -> Aligned:
    matrix: EmbeddingMatrix = read_embeddings(store, checkpoint_id)
    order = matrix.order
    vectors = matrix.vectors[order]
    pre = None
    if config.scoring.preconditioner == "fisher":
        state = covariance_init(layout)
        for start in range(0, len(vectors), 8192):
            state = covariance_update(state, layout, torch.from_numpy(vectors[start : start + 8192].astype(np.float32)))
        pre = fit_preconditioner(state, config.scoring.damping)
    return Aligned(matrix.sample_ids[order].tolist(), vectors, matrix.grad_norms[order], pre)


def _scores(
    store: LineageStore, at: Aligned, checkpoint_id: str, kind: str, query_ids: list[str], layout: EmbeddingLayout,
    config: PipelineConfig,
) -> torch.Tensor:  # fmt: skip
    """s̃ (m, n) float64: preconditioned inner products of the queries with every sample, normalised."""
    q = torch.from_numpy(read_query_embeddings(store, checkpoint_id, kind, query_ids))
    s = pairwise_scores(apply_preconditioner(at.preconditioner, layout, q), torch.from_numpy(at.vectors))
    return normalise_scores(s, config.scoring.normalisation, row_norms(q), torch.from_numpy(at.grad_norms))


def query_kinds(store: LineageStore, query_ids: Sequence[str], config: PipelineConfig) -> dict[str, str]:
    """'plain' or 'contrastive' per query, from ``config.scoring.query_kind`` and whether a correction exists."""
    rows = store.read("queries", ["query_id", "corrected"], where_in("query_id", list(query_ids))).to_pylist()
    corrected = {r["query_id"]: bool(r["corrected"]) for r in rows}
    missing = [q for q in query_ids if q not in corrected]
    if missing:
        raise KeyError(f"query {missing[0]!r} is not registered: run dda attribute with a queries file")
    wanted = config.scoring.query_kind
    if wanted == "contrastive" and not all(corrected.values()):
        bad = next(q for q, c in corrected.items() if not c)
        raise CheckpointError(f"query {bad!r} has no corrected response: the contrastive query kind needs one")
    return {q: "contrastive" if wanted != "plain" and corrected[q] else "plain" for q in query_ids}


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

    Needs the query embeddings at the base model and at each checkpoint (:func:`tasks.indexing.embed_queries`).
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
    sample_ids = sorted(embedded_sample_ids(store, BASE_ID))
    states = {q: _state(read_dda_state(store, fp, q), sample_ids) for q in query_ids}
    if all(c["checkpoint_id"] in states[q].checkpoints for q in query_ids for c in finetuned):
        return 0  # every state is current: no vector is read
    layout = model_layout(base_reference, config)
    base = _aligned(store, BASE_ID, layout, config)
    weights = _weights(finetuned, config)
    folds = 0
    for ckpt in finetuned:
        cid = ckpt["checkpoint_id"]
        need = [q for q in query_ids if cid not in states[q].checkpoints]
        if not need:
            continue
        at = _aligned(store, cid, layout, config)
        if at.sample_ids != base.sample_ids:
            raise CheckpointError(f"checkpoint {cid} and the base model embed different samples: re-run dda index")
        for kind in ("plain", "contrastive"):
            qs = [q for q in need if kinds[q] == kind]
            if not qs:
                continue
            s_t = _scores(store, at, cid, kind, qs, layout, config)
            s_0 = _scores(store, base, BASE_ID, kind, qs, layout, config)
            s_db = debias(s_t, s_0, config.scoring.debias_coefficient)
            write_scores(store, fp, cid, qs, base.sample_ids, s_t.numpy(), s_0.numpy(), s_db.numpy(), weights[cid])
            fault_point("scores-written")
            for i, q in enumerate(qs):
                states[q] = dda_update(states[q], cid, s_db[i : i + 1], weights[cid], config.scoring.standardise)
        _write_states(store, fp, need, states, base.sample_ids)
        fault_point("state-written")
        folds += len(need)
    return folds


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
