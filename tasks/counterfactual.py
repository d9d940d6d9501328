"""Derive the correction of an output that has none: the counterfactual query (DESIGN.md section 2, step 3).

At checkpoint t, the derived correction of y is the single-token edit y' that θ_0 and θ_t together find most
plausible (:mod:`dda_kernel.counterfactual`); the query is then ĝ(prompt, y) − ĝ(prompt, y') like a contrastive
one. Each checkpoint derives its own (its θ_t), so nothing depends on which checkpoints exist yet. No Prefect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from dda_kernel import apply_edit, autocast_to, best_edit, edit_candidates
from tasks.config import PipelineConfig
from tasks.models import compute_precision, context_length, model_for
from tasks.tokenize import encode_pair

CANDIDATE_CHUNK = 16  # candidate responses scored per forward pass (bounds the (chunk, R, V) logits)


@dataclass(frozen=True)
class Derived:
    """A derived correction: the edited ``response`` text, the edit (position, old and new token text) and its
    gain [log p_θ0(y') + log p_θt(y')] − [log p_θ0(y) + log p_θt(y)] in nats."""

    response: str
    position: int
    token: str
    replacement: str
    gain: float


@torch.no_grad()
def _tables(model: Any, prompt: list[int], responses: torch.Tensor, precision: torch.dtype | None) -> torch.Tensor:
    """log p(· | prompt, y_<r) for each response row: (C, R, V) float32 from (C, R) token ids, the forward passes
    autocast to ``precision`` (None: the model's dtype). The prompt runs once per call; its key/value cache is
    repeated over the rows."""
    device = next(model.parameters()).device
    with autocast_to(device, precision):
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        first = out.logits[:, -1:].float().log_softmax(dim=-1).expand(responses.shape[0], 1, -1)
        if responses.shape[1] == 1:
            return first.cpu()
        cache = out.past_key_values
        cache.batch_repeat_interleave(responses.shape[0])
        rest = model(input_ids=responses[:, :-1].to(device), past_key_values=cache, use_cache=True).logits
    return torch.cat([first, rest.float().log_softmax(dim=-1)], dim=1).cpu()


def _likelihoods(model: Any, prompt: list[int], responses: torch.Tensor, precision: torch.dtype | None) -> torch.Tensor:
    """Σ_r log p(y_r | prompt, y_<r) per response row: (C,) float32, :data:`CANDIDATE_CHUNK` rows a pass."""
    parts = []
    for chunk in torch.split(responses, CANDIDATE_CHUNK):
        table = _tables(model, prompt, chunk, precision)
        parts.append(table.gather(2, chunk[:, :, None])[..., 0].sum(dim=1))
    return torch.cat(parts)


def _encoded(tokenizer: Any, model: Any, rows: Sequence[tuple[str, str, str]], config: PipelineConfig) -> list[Any]:
    max_length = min(config.max_length, context_length(model))
    out = []
    for name, prompt, response in rows:
        ids, labels = encode_pair(tokenizer, prompt, response, max_length, name=name)
        n_prompt = sum(1 for x in labels if x < 0)
        out.append((ids[:n_prompt], torch.tensor(ids[n_prompt:])))
    return out


def _editable(tokenizer: Any, response: torch.Tensor) -> int:
    """Response tokens an edit may replace: all but the EOS :func:`encode_pair` appends."""
    return len(response) - (tokenizer.eos_token_id is not None)


def derive_corrections(
    base_reference: str, checkpoint: str | None, rows: Sequence[tuple[str, str, str]], config: PipelineConfig
) -> list[Derived | None]:
    """The derived correction of each (name, prompt, response) row at ``checkpoint`` (None: the base model,
    where θ_t = θ_0). None for a row with no editable token (an empty response).

    Loads θ_0 and θ_t in turn (one model in memory at a time): per-token tables of both, candidate edits from
    their sum, then the candidates' response log-likelihoods under each model; forward passes at the configured
    indexing precision (bfloat16 where the device has native kernels)."""
    if not rows:
        return []  # no model is loaded
    states = [None] if checkpoint is None else [None, checkpoint]
    precision = compute_precision(config.precision, config.device)
    tables: list[list[torch.Tensor]] = [[] for _ in rows]
    encoded: list[Any] = []
    for state in states:
        with model_for(base_reference, state, config.device) as cached:
            encoded = encoded or _encoded(cached.tokenizer, cached.model, rows, config)
            for i, (prompt, response) in enumerate(encoded):
                tables[i].append(_tables(cached.model, prompt, response[None], precision)[0])
            tokenizer = cached.tokenizer
    candidates = []
    for (_, response), per_state in zip(encoded, tables, strict=True):
        joint = per_state[0] + per_state[-1]  # at the base model θ_t = θ_0: 2 log p_θ0
        candidates.append(edit_candidates(joint, response, _editable(tokenizer, response)))
    gains = [torch.zeros(len(c)) for c in candidates]
    for j in reversed(range(len(states))):  # θ_t is still loaded
        state = states[j]
        with model_for(base_reference, state, config.device) as cached:
            label = "θ_0" if state is None else "θ_t"
            bar = tqdm(list(enumerate(zip(encoded, candidates, strict=True))), desc=f"counterfactual edits ({label})",
                       unit="output", disable=not config.progress)  # fmt: skip
            for i, ((prompt, response), cand) in bar:
                if len(cand) == 0:
                    continue
                edited = torch.stack([torch.tensor(apply_edit(response.tolist(), (int(r), int(a)))) for r, a in cand])
                own = tables[i][j].gather(1, response[:, None]).sum()  # log p(y) from the first pass
                gains[i] += (_likelihoods(cached.model, prompt, edited, precision) - own) * (
                    2 if checkpoint is None else 1
                )
    return [_derived(tokenizer, response, cand, gain) for (_, response), cand, gain in zip(encoded, candidates, gains,
                                                                                            strict=True)]  # fmt: skip


def _derived(tokenizer: Any, response: torch.Tensor, candidates: torch.Tensor, gains: torch.Tensor) -> Derived | None:
    if len(candidates) == 0:
        return None
    r, a = best_edit(candidates, gains)
    ids = response.tolist()[: _editable(tokenizer, response)]  # the response text has no EOS
    return Derived(tokenizer.decode(apply_edit(ids, (r, a))), r, tokenizer.decode([ids[r]]), tokenizer.decode([a]),
                   float(gains[int(torch.argmax(gains))]))  # fmt: skip
