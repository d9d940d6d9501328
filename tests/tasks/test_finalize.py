"""Finalized checkpoints: the query-ready matrix, its Fisher statistics, staleness, and the precision of scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dda_kernel import ProjectionSpec, apply_preconditioner, fit_preconditioner, make_layout, pairwise_scores
from storage import finalized
from storage.errors import FingerprintMismatchError
from storage.samples import ingest_samples
from storage.store import LineageStore
from storage.vectors import read_embeddings, write_embeddings
from tasks.finalize import covariance_of, finalize_checkpoint, layout_record, open_checkpoint, stored_layout
from tests.storage.helpers import sample_rows

MODULES = [("model.layers.0.self_attn.o_proj", 32, 32), ("model.layers.0.mlp.down_proj", 64, 32)]
LAYOUT = make_layout(ProjectionSpec(k_in=4, k_out=4), MODULES)


def checkpoint_row(cid: str = "base") -> dict:
    return {"checkpoint_id": cid, "fingerprint": f"fp-{cid}"}


def store_with_vectors(root, n: int = 50, seed: int = 0, scale: float = 1.0):
    """``n`` samples whose vectors are written in shuffled order over three shards; returns (store, vectors by id)."""
    store = LineageStore.open(root, LAYOUT.fingerprint, LAYOUT.dim, layout_record(LAYOUT))
    ingest_samples(store, sample_rows(n), dataset="toy")
    rng = np.random.default_rng(seed)
    ids = [f"s{i:03d}" for i in rng.permutation(n)]
    vectors = (rng.standard_normal((n, LAYOUT.dim)) * scale).astype(np.float32)
    for part in np.array_split(np.arange(n), 3):
        write_embeddings(store, "base", [ids[i] for i in part], vectors[part], np.ones(len(part)), np.ones(len(part)))
    return store, dict(zip(ids, vectors, strict=True))


def test_the_matrix_is_the_stored_vectors_in_sorted_order_with_their_fisher_statistics(tmp_path):
    store, _ = store_with_vectors(tmp_path)
    fin = open_checkpoint(store, checkpoint_row(), LAYOUT)
    stored = read_embeddings(store, "base")
    order = np.argsort(stored.sample_ids)
    assert fin.vectors.dtype == np.float16
    assert fin.vectors.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(fin.vectors, stored.vectors[order])  # an exact copy, sorted by id
    np.testing.assert_array_equal(fin.grad_norms, stored.grad_norms[order])
    v = stored.vectors.astype(np.float64)
    cov = covariance_of(fin, LAYOUT)
    assert cov.count == 50
    for block, slot in zip(cov.blocks, LAYOUT.slots, strict=True):
        part = v[:, LAYOUT.slice_of(slot)]
        np.testing.assert_allclose(block.numpy(), part.T @ part, rtol=1e-12)  # Σ_i ĝ_{i,m} ĝ_{i,m}ᵀ


def test_a_stale_or_missing_matrix_is_rebuilt_and_a_failed_build_leaves_the_old_one(tmp_path, monkeypatch):
    store, _ = store_with_vectors(tmp_path, n=20)
    first = open_checkpoint(store, checkpoint_row(), LAYOUT)
    assert first.meta.n_samples == 20
    ingest_samples(store, sample_rows(21)[20:], dataset="late")
    write_embeddings(store, "base", ["s020"], np.ones((1, LAYOUT.dim), np.float32), np.ones(1), np.ones(1))
    assert open_checkpoint(store, checkpoint_row(), LAYOUT).meta.n_samples == 21  # more rows in Lance: rebuilt
    assert (
        open_checkpoint(store, {"checkpoint_id": "base", "fingerprint": "other"}, LAYOUT).meta.checkpoint_fingerprint
        == "other"
    )
    folder = finalized.finalized_dir(store, "base")
    (folder / "meta.json").unlink()
    assert open_checkpoint(store, checkpoint_row(), LAYOUT).meta.n_samples == 21  # missing: rebuilt
    before = (folder / "vectors.npy").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(finalized, "commit", fail)
    with pytest.raises(OSError, match="disk full"):
        finalize_checkpoint(store, checkpoint_row(), LAYOUT)
    assert (folder / "vectors.npy").read_bytes() == before
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind


def test_scoring_from_the_finalized_matrix_is_within_float32_rounding_of_a_float64_reference(tmp_path):
    """Bound: |s − s_ref| ≤ 1e-5 · ‖F⁻¹q‖ ‖ĝ_i‖ (float32 accumulation of the stored float16 values)."""
    store, _ = store_with_vectors(tmp_path, n=300, scale=0.02)
    fin = open_checkpoint(store, checkpoint_row(), LAYOUT)
    pre = fit_preconditioner(covariance_of(fin, LAYOUT), 0.1)
    q = apply_preconditioner(pre, LAYOUT, torch.from_numpy(np.random.default_rng(1).standard_normal((5, LAYOUT.dim))))
    got = pairwise_scores(q, torch.from_numpy(fin.vectors), chunk_size=64).double()
    g = torch.from_numpy(fin.vectors.astype(np.float64))
    ref = q @ g.T
    bound = 1e-5 * torch.linalg.vector_norm(q, dim=1)[:, None] * torch.linalg.vector_norm(g, dim=1)[None, :]
    assert ((got - ref).abs() <= bound).all()


def test_storage_in_float16_keeps_scores_within_its_rounding_of_the_float32_vectors(tmp_path):
    """Bound: |s₁₆ − s₃₂| ≤ 2⁻¹⁰ · Σ_k |q_k ĝ_ik| for vectors in float16's normal range (relative rounding 2⁻¹¹)."""
    store, by_id = store_with_vectors(tmp_path, n=200, scale=0.05)
    fin = open_checkpoint(store, checkpoint_row(), LAYOUT)
    exact = np.stack([by_id[i] for i in sorted(by_id)]).astype(np.float64)
    q = np.random.default_rng(2).standard_normal((4, LAYOUT.dim))
    got = q @ fin.vectors.astype(np.float64).T
    ref = q @ exact.T
    bound = 2.0**-10 * (np.abs(q) @ np.abs(exact).T)
    assert (np.abs(got - ref) <= bound).all()


def test_a_value_float16_cannot_hold_is_refused_by_sample(tmp_path):
    store, _ = store_with_vectors(tmp_path, n=3)
    big = np.zeros((1, LAYOUT.dim), np.float32)
    big[0, 5] = 1e6
    with pytest.raises(ValueError, match=r"'s001' has a value beyond the float16 range"):
        write_embeddings(store, "c1", ["s001"], big, np.ones(1), np.ones(1))
    assert store.read("embeddings", ["sample_id"], "checkpoint_id = 'c1'").num_rows == 0


def test_scoring_rebuilds_the_layout_from_the_store_and_refuses_another_projection(tmp_path):
    store, _ = store_with_vectors(tmp_path, n=3)
    assert stored_layout(store, LAYOUT.spec) == LAYOUT
    with pytest.raises(FingerprintMismatchError, match="use the projection settings the store was indexed with"):
        stored_layout(store, ProjectionSpec(k_in=8, k_out=8))
