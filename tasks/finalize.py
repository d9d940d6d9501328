"""Finalize a checkpoint once, when it is indexed, so that a query is one matrix product.

For the base model and each checkpoint t, :func:`finalize_checkpoint` reads the stored vectors from Lance
once and writes (:mod:`storage.finalized`) the query-ready matrix in canonical sample order with the
Fisher statistics Σ_i ĝ_{i,m} ĝ_{i,m}ᵀ, accumulated chunk by chunk and merged with
:func:`dda_kernel.covariance_merge` (so they are computed from exactly the stored vectors, whatever
shards, retries or resumed runs wrote them). :func:`open_checkpoint` opens it for scoring and rebuilds it
when it is missing or stale. :func:`stored_layout` rebuilds the projection layout from the store, so
scoring never loads a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dda_kernel import (
    CovarianceState,
    EmbeddingLayout,
    ModuleSlot,
    ProjectionSpec,
    covariance_init,
    covariance_merge,
    covariance_update,
)
from storage import finalized
from storage.errors import FingerprintMismatchError
from storage.finalized import Finalized, FinalizedMeta
from storage.scores import write_sample_set
from storage.store import LineageStore
from storage.vectors import count_embeddings, read_embeddings

CHUNK = 8192


def layout_record(layout: EmbeddingLayout) -> list[dict[str, Any]]:
    """The layout's module slots as plain values (what the store records)."""
    return [
        {"name": s.name, "d_in": s.d_in, "d_out": s.d_out, "k_in": s.k_in, "k_out": s.k_out, "offset": s.offset}
        for s in layout.slots
    ]


def stored_layout(store: LineageStore, spec: ProjectionSpec) -> EmbeddingLayout:
    """The store's layout under ``spec``; :class:`FingerprintMismatchError` when ``spec`` is not the store's."""
    meta = store.meta
    layout = EmbeddingLayout(spec, tuple(ModuleSlot(**s) for s in (meta.layout if meta else [])))
    if meta is None or not meta.layout or layout.fingerprint != meta.projection_fingerprint:
        raise FingerprintMismatchError(
            f"store {store.root} holds projection {meta.projection_fingerprint if meta else 'none'}, the settings "
            f"ask for {layout.fingerprint}: use the projection settings the store was indexed with"
        )
    return layout


def finalize_checkpoint(store: LineageStore, checkpoint: dict[str, Any], layout: EmbeddingLayout) -> FinalizedMeta:
    """Write the finalized files of ``checkpoint`` (a ``checkpoints`` row, or the row about to be written)."""
    cid = checkpoint["checkpoint_id"]
    matrix = read_embeddings(store, cid)
    order = matrix.order
    n = len(order)
    set_id = write_sample_set(store, matrix.sample_ids[order].tolist())
    cov = covariance_init(layout)
    with finalized.writing(store, cid, n, layout.dim) as out:
        for start in range(0, n, CHUNK):
            block = matrix.vectors[order[start : start + CHUNK]]
            out.vectors[start : start + len(block)] = block
            part = covariance_update(covariance_init(layout), layout, torch.from_numpy(block.astype(np.float32)))
            cov = covariance_merge(cov, part)
        out.grad_norms[:] = matrix.grad_norms[order]
        meta = FinalizedMeta(
            cid, checkpoint["fingerprint"], layout.fingerprint, set_id, n, layout.dim, cov.count
        )  # fmt: skip
        flat = np.concatenate([b.numpy().reshape(-1) for b in cov.blocks]) if cov.blocks else np.zeros(0)
        finalized.commit(store, out, meta, flat)
    return meta


def open_checkpoint(store: LineageStore, checkpoint: dict[str, Any], layout: EmbeddingLayout) -> Finalized:
    """The finalized files of ``checkpoint``, rebuilt first when missing or stale (other fingerprints, or fewer
    rows than Lance holds for it). Rebuilding writes: call it holding the writer lock."""
    meta = finalized.read_meta(store, checkpoint["checkpoint_id"])
    current = meta is not None and (
        meta.checkpoint_fingerprint == checkpoint["fingerprint"]
        and meta.projection_fingerprint == layout.fingerprint
        and meta.dim == layout.dim
        and meta.n_samples == count_embeddings(store, checkpoint["checkpoint_id"])
    )
    if meta is None or not current:
        meta = finalize_checkpoint(store, checkpoint, layout)
    return finalized.open_finalized(store, meta)


def covariance_of(fin: Finalized, layout: EmbeddingLayout) -> CovarianceState:
    """The stored Fisher statistics of a finalized checkpoint as a :class:`CovarianceState`."""
    blocks, start = [], 0
    for slot in layout.slots:
        size = slot.size * slot.size
        blocks.append(torch.from_numpy(fin.covariance[start : start + size].reshape(slot.size, slot.size)))
        start += size
    return CovarianceState(layout.fingerprint, tuple(blocks), fin.meta.covariance_count)
