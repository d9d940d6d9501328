"""CEA-style attribution by loss differences after short fine-tunes (the benchmark's non-gradient scorer).

From a model state θ (the base model or a checkpoint) and the traced outputs of one canary pair:
θ_err = θ after ``steps`` AdamW steps on the hallucinated outputs, θ_fix = the same on their
corrected versions. For every training sample z with response loss L (mean NLL of its response
tokens):
- plain:        c(z) = L(z; θ) − L(z; θ_err)      (how much learning the error made z more likely),
- contrastive:  c(z) = L(z; θ_fix) − L(z; θ_err)  (… more than learning the correction did).
A positive c(z) means z agrees with the error, the same sign convention as the gradient scores.
Only the parameters that the fine-tuning trained move (the LoRA adapter, or every weight).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dda_kernel import pad_batch
from dda_kernel.gradients import per_sample_loss

Encoded = Sequence[tuple[list[int], list[int]]]


@dataclass(frozen=True)
class CEAScores:
    """One pair's CEA scores at one model state, each (n_samples,)."""

    plain: np.ndarray
    contrastive: np.ndarray


@torch.no_grad()
def response_losses(
    model: nn.Module, encoded: Encoded, pad_id: int, batch_size: int = 32, bf16: bool = False
) -> np.ndarray:
    """Mean response NLL of every (input_ids, labels) pair, (n,) float64; batches sorted by length.

    ``bf16`` runs the forward pass under CPU bfloat16 autocast (weights stay float32).
    """
    model.eval()
    order = np.argsort([len(ids) for ids, _ in encoded], kind="stable")
    out = np.zeros(len(encoded))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pad_batch([encoded[i] for i in idx], pad_id=pad_id)
        position_ids = (batch.attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
            ).logits
        loss, _ = per_sample_loss(logits.float(), batch.labels, "mean")
        out[idx] = loss.double().numpy()
    return out


def short_finetune(model: nn.Module, encoded: Encoded, pad_id: int, steps: int, lr: float, bf16: bool = False) -> None:
    """``steps`` full-batch AdamW steps (weight decay 0) on the trainable parameters of ``model``, in place.

    ``bf16`` runs forward and backward under CPU bfloat16 autocast; parameters and optimiser stay float32.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = pad_batch(list(encoded), pad_id=pad_id)
    position_ids = (batch.attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    model.train()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
            ).logits
        loss, _ = per_sample_loss(logits.float(), batch.labels, "mean")
        optimiser.zero_grad()
        loss.mean().backward()
        optimiser.step()
    model.eval()


def cea_scores(
    model: nn.Module,
    samples: Encoded,
    errors: Encoded,
    corrections: Encoded,
    pad_id: int,
    steps: int,
    lr: float,
    reference: np.ndarray | None = None,
    bf16: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> CEAScores:
    """CEA scores of every sample for one pair (see the module docstring); ``model`` is left as it came.

    ``reference`` is L(z; θ) when already computed (it does not depend on the pair). ``bf16``: forward
    and backward passes under CPU bfloat16 autocast (float32 weights and optimiser state).
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.detach().clone() for n, p in trainable.items()}

    def after(encoded: Encoded) -> np.ndarray:
        short_finetune(model, encoded, pad_id, steps, lr, bf16)
        losses = response_losses(model, samples, pad_id, bf16=bf16)
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(saved[n])
        return losses

    base = reference if reference is not None else response_losses(model, samples, pad_id, bf16=bf16)
    err = after(errors)
    if on_step:
        on_step("error")
    fix = after(corrections)
    if on_step:
        on_step("correction")
    return CEAScores(base - err, fix - err)
