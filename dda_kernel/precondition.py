"""Preconditioners F for s(q, i) = ĝ_qᵀ F⁻¹ ĝ_i (docs/method.md).

Identity (TracIn-style inner product) needs nothing. The projected Fisher / Gauss–Newton
preconditioner is block-diagonal over tracked modules: F_m = (1/n) Σ_i ĝ_{i,m} ĝ_{i,m}ᵀ, damped as
F_m + ε·μ_m·I with μ_m = tr(F_m)/k_m its mean eigenvalue. Sums are accumulated in float64 as an
immutable, mergeable state, so a stream of batches or shards gives the same F in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dda_kernel.errors import LayoutMismatchError
from dda_kernel.projection import EmbeddingLayout


@dataclass(frozen=True)
class CovarianceState:
    """Running Σ_i ĝ_{i,m} ĝ_{i,m}ᵀ per module: ``blocks[m]`` is (k_m, k_m) float64; ``count`` = n."""

    layout_fingerprint: str
    blocks: tuple[torch.Tensor, ...]
    count: int


def covariance_init(layout: EmbeddingLayout) -> CovarianceState:
    """An empty state for ``layout`` (zero blocks, count 0)."""
    blocks = tuple(torch.zeros(s.size, s.size, dtype=torch.float64) for s in layout.slots)
    return CovarianceState(layout.fingerprint, blocks, 0)


def covariance_update(state: CovarianceState, layout: EmbeddingLayout, vectors: torch.Tensor) -> CovarianceState:
    """Add a batch of embeddings ``vectors`` (n, D): blocks[m] += V_mᵀ V_m, count += n."""
    _check_layout(state, layout)
    v = vectors.detach().to(device="cpu", dtype=torch.float64)
    blocks = tuple(
        b + v[:, layout.slice_of(s)].T @ v[:, layout.slice_of(s)]
        for b, s in zip(state.blocks, layout.slots, strict=True)
    )
    return CovarianceState(state.layout_fingerprint, blocks, state.count + v.shape[0])


def covariance_merge(a: CovarianceState, b: CovarianceState) -> CovarianceState:
    """Combine two shards' states: blockwise sum, counts add (associative and commutative)."""
    if a.layout_fingerprint != b.layout_fingerprint:
        raise LayoutMismatchError(
            f"cannot merge covariances of layouts {a.layout_fingerprint} and {b.layout_fingerprint}"
        )
    return CovarianceState(
        a.layout_fingerprint, tuple(x + y for x, y in zip(a.blocks, b.blocks, strict=True)), a.count + b.count
    )


@dataclass(frozen=True)
class Preconditioner:
    """Cholesky factors L_m of the damped blocks F_m + ε μ_m I (float64), one per module."""

    layout_fingerprint: str
    factors: tuple[torch.Tensor, ...]
    damping: float


def damped_blocks(state: CovarianceState, damping: float) -> tuple[torch.Tensor, ...]:
    """F_m + ε·μ_m·I with F_m = blocks[m] / n and μ_m = tr(F_m) / k_m (falls back to ε·I if μ_m = 0)."""
    if state.count == 0:
        raise ValueError("the covariance state is empty: update it with training embeddings before fitting")
    if damping <= 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    out = []
    for block in state.blocks:
        f = block / state.count
        k = f.shape[0]
        mean_eig = float(torch.trace(f)) / k
        out.append(f + damping * (mean_eig if mean_eig > 0 else 1.0) * torch.eye(k, dtype=torch.float64))
    return tuple(out)


def fit_preconditioner(state: CovarianceState, damping: float = 0.1) -> Preconditioner:
    """Factor the damped per-module covariances (relative damping ``damping`` = ε)."""
    factors = tuple(torch.linalg.cholesky(b) for b in damped_blocks(state, damping))
    return Preconditioner(state.layout_fingerprint, factors, damping)


def apply_preconditioner(pre: Preconditioner | None, layout: EmbeddingLayout, vectors: torch.Tensor) -> torch.Tensor:
    """F⁻¹ v for each row of ``vectors`` (m, D), blockwise, in float64; identity when ``pre`` is None.

    Applied to the (few) query vectors, so that s(q, i) = (F⁻¹ ĝ_q)ᵀ ĝ_i is one matrix product.
    """
    v = vectors.detach().to(device="cpu", dtype=torch.float64)
    if pre is None:
        return v
    if pre.layout_fingerprint != layout.fingerprint:
        raise LayoutMismatchError(
            f"preconditioner was fitted for layout {pre.layout_fingerprint}, vectors use {layout.fingerprint}"
        )
    out = torch.empty_like(v)
    for factor, slot in zip(pre.factors, layout.slots, strict=True):
        sl = layout.slice_of(slot)
        out[:, sl] = torch.cholesky_solve(v[:, sl].T, factor).T
    return out


def _check_layout(state: CovarianceState, layout: EmbeddingLayout) -> None:
    if state.layout_fingerprint != layout.fingerprint:
        raise LayoutMismatchError(
            f"covariance state has layout {state.layout_fingerprint}, the embeddings use {layout.fingerprint}"
        )
