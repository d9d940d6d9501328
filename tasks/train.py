"""Small training loops for the demo world: plain AdamW on response-only loss, snapshot per epoch."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dda_kernel import pad_batch, per_sample_loss


def train_epochs(
    model: nn.Module,
    encoded: Sequence[tuple[list[int], list[int]]],
    epochs: int,
    lr: float,
    batch_size: int = 16,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Train ``model`` in place; return a copy of its state dict after every epoch.

    Loss per batch: mean over samples of the mean response-token NLL (the kernel's ``mean`` loss).
    """
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    snapshots = []
    model.train()
    for epoch in range(epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = pad_batch([encoded[i] for i in order[start : start + batch_size]], pad_id=0)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = per_sample_loss(logits, batch.labels)[0].mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch.input_ids)
        snapshots.append(copy.deepcopy(model.state_dict()))
        if on_epoch is not None:
            on_epoch(epoch + 1, total / len(encoded))
    model.eval()
    return snapshots


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer: object, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy continuation of ``prompt`` up to EOS, decoded without special tokens."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]  # type: ignore[operator]
    model.eval()
    out = model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
    )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))  # type: ignore[attr-defined]
