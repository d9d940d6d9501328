"""Derive the correction of an output that has none: the counterfactual query (docs/method.md).

At checkpoint t, the derived correction of y is the single-token edit y' that θ_0 and θ_t together find most
plausible (:mod:`dda_kernel.counterfactual`); the query is then ĝ(prompt, y) − ĝ(prompt, y') like a contrastive
one. Each checkpoint derives its own (its θ_t), so nothing depends on which checkpoints exist yet. No Prefect.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from dda_kernel import apply_edit, autocast_to, best_edit, edit_candidates
from tasks.config import PipelineConfig
from tasks.models import compute_precision, context_length, model_for
from tasks.tokenize import encode_pair

BASE_MEMO_BYTES = 1 << 30  # θ_0's tables and caches kept across checkpoints, least recently used evicted
SCORE_CHUNK_ELEMENTS = 1 << 25  # rows × suffix × vocabulary per scoring pass (its float32 log-probabilities)


@dataclass(frozen=True)
class Derived:
    """A derived correction: the edited ``response`` text, the edit (position, old and new token text) and its
    gain [log p_θ0(y') + log p_θt(y')] − [log p_θ0(y) + log p_θt(y)] in nats. ``response_ids``: the edited
    response's token ids (as the output's own encoding, the edit applied): what the query embeds, so the vector is
    computed on exactly the scored sequence (decoding then re-encoding text need not give the same ids)."""

    response: str
    position: int
    token: str
    replacement: str
    gain: float
    response_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Scored:
    """One model's view of one output y (``response``, (R,) ids): ``table`` (R, V) float32
    log p(· | prompt, y_<r), the ``likelihoods`` Σ_r log p(y'_r | …) of the edits (r, a) scored so far, and the
    key/value ``cache`` of prompt ‖ y_<R (θ_0's is kept, so that a later checkpoint's new edits cost their suffix
    passes only)."""

    table: torch.Tensor
    likelihoods: dict[tuple[int, int], float]
    response: torch.Tensor
    cache: Any = None

    @property
    def nbytes(self) -> int:
        """Memory held: the table and the cache's tensors."""
        layers = getattr(self.cache, "layers", []) or []
        kv = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)
        return int(self.table.numel() * self.table.element_size() + kv)

    @property
    def own(self) -> torch.Tensor:
        """(R,) log p(y_r | prompt, y_<r) of the output's own tokens."""
        return self.table.gather(1, self.response[:, None])[:, 0]


_BASE_MEMO: OrderedDict[tuple[Any, ...], _Scored] = OrderedDict()


@torch.no_grad()
def _forward(model: Any, prompt: list[int], response: torch.Tensor, precision: torch.dtype | None) -> tuple[Any, Any]:
    """One pass over prompt ‖ y_<R: the (R, V) float32 table log p(· | prompt, y_<r) and its key/value cache."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + response[:-1].tolist()], device=device)
    with autocast_to(device, precision):
        out = model(input_ids=ids, use_cache=True)
    table = out.logits[0, len(prompt) - 1 :].float().log_softmax(dim=-1).cpu()
    return table, out.past_key_values


@torch.no_grad()
def _edit_likelihoods(
    model: Any, prompt: list[int], response: torch.Tensor, table: torch.Tensor, cache: Any,
    edits: list[tuple[int, int]], precision: torch.dtype | None,
) -> dict[tuple[int, int], float]:  # fmt: skip
    """log p(y') for each edit (r, a), y' = y with y_r → a, as {edit: nats}.

    The unchanged prefix y_<r and the edited token come from ``table`` (R, V); the suffix y_{r+1..R} is scored in
    one batched pass per chunk of edits over the cached prompt ‖ y_<r0 state, r0 the earliest edited position: row
    i runs y'_i[r0 : R−1] (S = R−1−r0 tokens; before its own edit a row repeats y, whose scores it ignores), and
    log p(y') = prefix[r] + table[r, a] + Σ_{k ≥ r−r0} log p(y_{r0+1+k} | …) over the (C, S) row log-probabilities.
    One pass instead of one per position: on short outputs the passes' fixed cost, not their arithmetic, dominated.
    """
    if not edits:
        return {}
    device = next(model.parameters()).device
    own = table.gather(1, response[:, None])[:, 0]
    prefix = torch.cat([torch.zeros(1), own.cumsum(0)])
    length = len(response)
    positions = torch.tensor([r for r, _ in edits])
    totals = prefix[positions] + table[positions, torch.tensor([a for _, a in edits])]
    r0 = int(positions.min())
    span = length - 1 - r0  # S: suffix tokens scored per row
    if span > 0:
        targets = response[r0 + 1 :]
        rows = torch.tensor([apply_edit(response.tolist(), e)[r0 : length - 1] for e in edits])
        keep = torch.arange(span)[None, :] >= (positions - r0)[:, None]  # (C, S): targets after the row's edit
        chunk = max(1, SCORE_CHUNK_ELEMENTS // (span * table.shape[1]))
        for i in range(0, len(edits), chunk):
            state = copy.deepcopy(cache)
            state.crop(-span)  # keep prompt ‖ y_<r0 (the cache holds prompt ‖ y_<R)
            block = rows[i : i + chunk]
            state.batch_repeat_interleave(len(block))
            with autocast_to(device, precision):
                logits = model(input_ids=block.to(device), past_key_values=state, use_cache=True).logits
            logp = logits.float().log_softmax(dim=-1).cpu()
            picked = logp.gather(2, targets[None, :, None].expand(len(block), -1, 1))[..., 0]  # (c, S)
            totals[i : i + chunk] += torch.where(keep[i : i + chunk], picked, 0.0).sum(dim=1)
    return {e: float(t) for e, t in zip(edits, totals, strict=True)}


def _score(
    model: Any, prompt: list[int], response: torch.Tensor, edits: list[tuple[int, int]], precision: torch.dtype | None,
    known: _Scored | None = None,
) -> _Scored:  # fmt: skip
    """The model's table, cache and the likelihoods of ``edits`` (those ``known`` lacks); ``known``'s table and
    cache are reused, so the prompt and response run once per model and output."""
    new = [e for e in edits if known is None or e not in known.likelihoods]
    if known is not None and not new:
        return known
    if known is not None and known.cache is not None:
        table, cache = known.table, known.cache
    else:
        table, cache = _forward(model, prompt, response, precision)
    found = _edit_likelihoods(model, prompt, response, table, cache, new, precision)
    return _Scored(table, {**(known.likelihoods if known else {}), **found}, response, cache)


def _memo_key(base_reference: str, prompt: list[int], response: torch.Tensor, precision: Any) -> tuple[Any, ...]:
    return base_reference, str(precision), tuple(prompt), tuple(response.tolist())


def _remember(key: tuple[Any, ...], scored: _Scored) -> None:
    _BASE_MEMO[key] = scored
    _BASE_MEMO.move_to_end(key)
    while sum(v.nbytes for v in _BASE_MEMO.values()) > BASE_MEMO_BYTES and len(_BASE_MEMO) > 1:
        _BASE_MEMO.popitem(last=False)


def _encoded(tokenizer: Any, model: Any, rows: Sequence[tuple[str, str, str]], config: PipelineConfig) -> list[Any]:
    max_length = min(config.max_length, context_length(model))
    out = []
    for name, prompt, response in rows:
        ids, labels = encode_pair(tokenizer, prompt, response, max_length, name=name)
        n_prompt = sum(1 for x in labels if x < 0)
        if n_prompt == 0:
            raise ValueError(f"{name} has no prompt tokens: a derived correction needs the prompt it answers")
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

    θ_0's table and its edit likelihoods are kept per output across checkpoints (:data:`BASE_MEMO_BYTES`): at a
    later checkpoint θ_0 scores only the edits it has not scored yet. Per model and output: one pass over the
    prompt and response (the table), then, per candidate position, one pass over the suffix for all of its
    alternatives from the cached prefix state (:func:`_edit_likelihoods`). Forward passes at the configured
    indexing precision (bfloat16 where the device has native kernels)."""
    if not rows:
        return []  # no model is loaded
    precision = compute_precision(config.precision, config.device)
    with model_for(base_reference, None, config.device) as cached:
        tokenizer = cached.tokenizer
        encoded = _encoded(tokenizer, cached.model, rows, config)
        keys = [_memo_key(base_reference, p, y, precision) for p, y in encoded]
        base = [
            _BASE_MEMO.get(k) or _score(cached.model, p, y, [], precision)
            for k, (p, y) in zip(keys, encoded, strict=True)
        ]
    tuned: list[_Scored] = base
    candidates = []
    if checkpoint is None:
        for b, (_, response) in zip(base, encoded, strict=True):
            candidates.append(edit_candidates(2 * b.table, response, _editable(tokenizer, response)))
    else:
        with model_for(base_reference, checkpoint, config.device) as cached:
            tuned = []
            bar = tqdm(zip(base, encoded, strict=True), total=len(base), desc="counterfactual edits (θ_t)",
                       unit="output", disable=not config.progress)  # fmt: skip
            for b, (prompt, response) in bar:
                table, cache = _forward(cached.model, prompt, response, precision)
                cand = edit_candidates(b.table + table, response, _editable(tokenizer, response))
                edits = [(int(r), int(a)) for r, a in cand]
                found = _edit_likelihoods(cached.model, prompt, response, table, cache, edits, precision)
                tuned.append(_Scored(table, found, response))
                candidates.append(cand)
    with model_for(base_reference, None, config.device) as cached:
        for i, (key, (prompt, response), cand) in enumerate(zip(keys, encoded, candidates, strict=True)):
            edits = [(int(r), int(a)) for r, a in cand]
            base[i] = _score(cached.model, prompt, response, edits, precision, base[i])
            _remember(key, base[i])
    if checkpoint is None:
        tuned = base
    out = []
    for b, t, (_, response), cand in zip(base, tuned, encoded, candidates, strict=True):
        edits = [(int(r), int(a)) for r, a in cand]
        own = float(b.own.sum()) + float(t.own.sum())
        gains = torch.tensor([b.likelihoods[e] + t.likelihoods[e] - own for e in edits])
        out.append(_derived(tokenizer, response, cand, gains))
    return out


def _derived(tokenizer: Any, response: torch.Tensor, candidates: torch.Tensor, gains: torch.Tensor) -> Derived | None:
    if len(candidates) == 0:
        return None
    r, a = best_edit(candidates, gains)
    full = apply_edit(response.tolist(), (r, a))
    ids = full[: _editable(tokenizer, response)]  # the response text has no EOS
    return Derived(tokenizer.decode(ids), r, tokenizer.decode([response.tolist()[r]]), tokenizer.decode([a]),
                   float(gains[int(torch.argmax(gains))]), tuple(full))  # fmt: skip
