"""Representation similarity (RepSim), the baseline recent benchmarks found competitive with gradients.

r(z) = mean over the tokens of prompt + response of the hidden state at layer ℓ (a middle layer and the
last one), at the last checkpoint. score(q, i) = ½ Σ_ℓ cos(r_ℓ(q), r_ℓ(i)); the contrastive form
subtracts the same score of the corrected output: score(q, i) − score(q_corrected, i).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


@torch.no_grad()
def mean_hidden_states(
    model: Any, tokenizer: Any, texts: Sequence[tuple[str, str]], layers: Sequence[int], batch_size: int = 16
) -> list[np.ndarray]:
    """Per layer of ``layers`` (indices into ``hidden_states``, 0 = embeddings): (len(texts), H) float64 of
    mean-pooled hidden states over the non-padding tokens of prompt + response."""
    model.eval()
    out: list[list[np.ndarray]] = [[] for _ in layers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids = [tokenizer(p + r, add_special_tokens=False)["input_ids"] for p, r in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        weights = mask.unsqueeze(-1).to(torch.float64)
        for j, layer in enumerate(layers):
            pooled = (hidden[layer].to(torch.float64) * weights).sum(dim=1) / weights.sum(dim=1)
            out[j].append(pooled.numpy())
    return [np.concatenate(parts) for parts in out]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def repsim_scores(
    model: Any, tokenizer: Any, samples: Sequence[tuple[str, str]], queries: Sequence[dict[str, str]]
) -> dict[str, np.ndarray]:
    """RepSim rankings {'plain', 'contrastive'}: (m, n) each, at a middle and the last layer."""
    n_layers = int(model.config.num_hidden_layers)
    layers = [n_layers // 2, n_layers]
    reps = [_unit(x) for x in mean_hidden_states(model, tokenizer, samples, layers)]
    plain_q = [_unit(x) for x in mean_hidden_states(model, tokenizer, [(q["prompt"], q["response"]) for q in queries],
                                                    layers)]  # fmt: skip
    fixed_q = [_unit(x) for x in mean_hidden_states(model, tokenizer, [(q["prompt"], q["corrected"]) for q in queries],
                                                    layers)]  # fmt: skip
    plain = sum(q @ r.T for q, r in zip(plain_q, reps, strict=True)) / len(layers)
    fixed = sum(q @ r.T for q, r in zip(fixed_q, reps, strict=True)) / len(layers)
    return {"plain": np.asarray(plain), "contrastive": np.asarray(plain - fixed)}
