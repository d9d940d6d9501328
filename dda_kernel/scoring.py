"""Pairwise influence scores and their per-checkpoint normalisations (docs/method.md).

Sign convention: both ĝ_q and ĝ_i are gradients of losses, so a gradient step on sample i changes the
query loss by −η ĝ_qᵀ ĝ_i. A **positive** score therefore means the training sample pushed the
model **toward** the query output.
"""

from __future__ import annotations

import torch

from dda_kernel.spec import NORMALISATIONS, Normalisation


def pairwise_scores(
    queries: torch.Tensor, samples: torch.Tensor, chunk_size: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """s = Q · Gᵀ in one pass over the samples: queries (m, D), samples (n, D) → (m, n) in ``dtype``.

    Every query is scored against a chunk while it is in cache. When ``samples`` already has ``dtype`` the
    product runs on them directly; otherwise (e.g. float16 samples, which most CPUs cannot multiply natively)
    each chunk of ``chunk_size`` rows is cast into one reused buffer, so the N × D matrix is never copied
    and accumulation is in ``dtype``. ``samples`` may be a memory-mapped tensor.
    """
    q = queries.to(dtype)
    n = samples.shape[0]
    out = torch.empty(q.shape[0], n, dtype=dtype, device=q.device)
    if samples.dtype == dtype and samples.device == q.device:
        return torch.mm(q, samples.T, out=out)
    buffer = torch.empty(min(chunk_size, n), samples.shape[1], dtype=dtype, device=q.device)
    for start in range(0, n, chunk_size):
        chunk = samples[start : start + chunk_size]
        block = buffer[: chunk.shape[0]]
        block.copy_(chunk)
        torch.mm(q, block.T, out=out[:, start : start + chunk.shape[0]])
    return out


def row_norms(vectors: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row, computed in float64: (n, D) → (n,)."""
    norms: torch.Tensor = torch.linalg.vector_norm(vectors.to(torch.float64), dim=1)
    return norms


def difference_norms(a: torch.Tensor, b: torch.Tensor, beta: float, chunk_size: int = 4096) -> torch.Tensor:
    """‖a_i − β b_i‖ per row, in float64, one chunk of rows at a time: a, b (n, D) (e.g. memory-mapped float16)
    → (n,). The sample norms of the training-side delta ĝ_i(θ_t) − β ĝ_i(θ_0) for cosine normalisation."""
    out = torch.empty(a.shape[0], dtype=torch.float64)
    for start in range(0, a.shape[0], chunk_size):
        end = start + chunk_size
        diff = a[start:end].to(torch.float64) - beta * b[start:end].to(torch.float64)
        out[start:end] = torch.linalg.vector_norm(diff, dim=1)
    return out


def normalise_scores(
    scores: torch.Tensor,
    kind: Normalisation,
    query_norms: torch.Tensor | None = None,
    sample_norms: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Per-checkpoint score normalisation s̃ of docs/method.md; scores (m, n) → (m, n) float64.

    - ``none``:   s̃ = s
    - ``zscore``: s̃_{q,i} = (s_{q,i} − mean_i s_{q,·}) / std_i s_{q,·}  (over samples, per query)
    - ``cosine``: s̃_{q,i} = s_{q,i} / (‖ĝ_q‖ ‖ĝ_i‖)  (needs ``query_norms`` (m,) and ``sample_norms`` (n,))
    """
    s = scores.to(torch.float64)
    if kind == "none":
        return s
    if kind == "zscore":
        centred = s - s.mean(dim=1, keepdim=True)
        std = centred.pow(2).mean(dim=1, keepdim=True).sqrt()
        return centred / std.clamp(min=eps)
    if kind == "cosine":
        if query_norms is None or sample_norms is None:
            raise ValueError("cosine normalisation needs the query and sample gradient norms")
        denom = query_norms.to(torch.float64)[:, None] * sample_norms.to(torch.float64)[None, :]
        return s / denom.clamp(min=eps)
    raise ValueError(f"unknown normalisation {kind!r}: choose one of {', '.join(NORMALISATIONS)}")


def debias(finetuned: torch.Tensor, base: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """s_t^db = s̃_t − λ·s̃_0 (docs/method.md); both (m, n), same normalisation already applied."""
    if finetuned.shape != base.shape:
        raise ValueError(f"score shapes differ: finetuned {tuple(finetuned.shape)} vs base {tuple(base.shape)}")
    return finetuned.to(torch.float64) - coefficient * base.to(torch.float64)
