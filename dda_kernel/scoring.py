"""Pairwise influence scores and their per-checkpoint normalisations (DESIGN.md section 2, steps 4-5).

Sign convention: both ĝ_q and ĝ_i are gradients of losses, so a gradient step on sample i changes the
query loss by −η ĝ_qᵀ ĝ_i. A **positive** score therefore means the training sample pushed the
model **toward** the query output.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

Normalisation = Literal["none", "zscore", "cosine"]
NORMALISATIONS: tuple[str, ...] = ("none", "zscore", "cosine")


def pairwise_scores(
    queries: torch.Tensor, samples: torch.Tensor, chunk_size: int = 65536, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """s = Q · Gᵀ computed over chunks of samples: queries (m, D), samples (n, D) → (m, n) in ``dtype``.

    Chunks bound the temporary memory to chunk_size × D values of ``dtype`` (samples may be stored as
    float16; each chunk is cast before the product).
    """
    return chunked_scores(queries, (samples[i : i + chunk_size] for i in range(0, samples.shape[0], chunk_size)), dtype)


def chunked_scores(
    queries: torch.Tensor, sample_chunks: Iterable[torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """s = Q · Gᵀ with G given as a stream of row chunks (n_c, D); returns (m, Σ n_c) in ``dtype``."""
    q = queries.to(dtype)
    parts = [q @ chunk.to(device=q.device, dtype=dtype).T for chunk in sample_chunks]
    if not parts:
        return torch.zeros(q.shape[0], 0, dtype=dtype)
    return torch.cat(parts, dim=1)


def row_norms(vectors: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row, computed in float64: (n, D) → (n,)."""
    norms: torch.Tensor = torch.linalg.vector_norm(vectors.to(torch.float64), dim=1)
    return norms


def normalise_scores(
    scores: torch.Tensor,
    kind: Normalisation,
    query_norms: torch.Tensor | None = None,
    sample_norms: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Per-checkpoint score normalisation s̃ of DESIGN.md section 2, step 5; scores (m, n) → (m, n) float64.

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
    """s_t^db = s̃_t − λ·s̃_0 (DESIGN.md section 2, step 5); both (m, n), same normalisation already applied."""
    if finetuned.shape != base.shape:
        raise ValueError(f"score shapes differ: finetuned {tuple(finetuned.shape)} vs base {tuple(base.shape)}")
    return finetuned.to(torch.float64) - coefficient * base.to(torch.float64)
