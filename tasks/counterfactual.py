"""Derive the correction of an output that has none: the counterfactual query (docs/method.md).

At checkpoint t, the derived correction of y is the single-token edit y' that θ_0 and θ_t together find most
plausible (:mod:`dda_kernel.counterfactual`); the query is then ĝ(prompt, y) − ĝ(prompt, y') like a contrastive
one. Each checkpoint derives its own (its θ_t), so nothing depends on which checkpoints exist yet. No Prefect.

Every pass is batched across the outputs of a call: one forward per chunk of outputs gives their per-token tables
and key/value caches, and one forward per chunk of candidate edits (of any outputs) scores their suffixes over
the cached prefixes. On short outputs a model's fixed cost per call, not its arithmetic, dominated.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

from dda_kernel import apply_edit, autocast_to, best_edit, edit_candidates
from tasks.config import PipelineConfig
from tasks.models import compute_precision, context_length, model_for
from tasks.tokenize import encode_pair

BASE_MEMO_BYTES = 1 << 30  # θ_0's tables and caches kept across checkpoints, least recently used evicted
SCORE_CHUNK_ELEMENTS = 1 << 25  # rows × positions × vocabulary per forward pass (its float32 logits)

Edit = tuple[int, int]  # (position r, replacement token a)
KeyValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (1, heads, L, head_dim) keys and values


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
    """One model's view of one output y = ``response`` (R,) after ``prompt`` (P ids): ``table`` (R, V) float32
    log p(· | prompt, y_<r), the ``likelihoods`` Σ_r log p(y'_r | …) of the edits scored so far, and ``kv``, the
    key/value cache of prompt ‖ y_<R (L = P + R − 1 positions), from which edits are scored (θ_0's is kept across
    checkpoints, so that a later checkpoint's new edits cost their suffix passes only)."""

    prompt: tuple[int, ...]
    response: torch.Tensor
    table: torch.Tensor
    kv: KeyValues
    likelihoods: dict[Edit, float]

    @property
    def nbytes(self) -> int:
        """Memory held: the table and the cache."""
        kv = sum(t.numel() * t.element_size() for layer in self.kv for t in layer)
        return int(self.table.numel() * self.table.element_size() + kv)

    @property
    def own(self) -> torch.Tensor:
        """(R,) log p(y_r | prompt, y_<r) of the output's own tokens."""
        return self.table.gather(1, self.response[:, None])[:, 0]


_BASE_MEMO: OrderedDict[tuple[Any, ...], _Scored] = OrderedDict()


def _chunks(sizes: Sequence[int], vocab: int) -> list[list[int]]:
    """Consecutive index chunks whose n · max(size) · vocab stays within :data:`SCORE_CHUNK_ELEMENTS` (≥ 1 each)."""
    out: list[list[int]] = []
    widest = 0
    for i, size in enumerate(sizes):
        if out and (len(out[-1]) + 1) * max(widest, size) * vocab <= SCORE_CHUNK_ELEMENTS:
            out[-1].append(i)
            widest = max(widest, size)
        else:
            out.append([i])
            widest = size
    return out


@torch.no_grad()
def _tables(
    model: Any, encoded: Sequence[tuple[list[int], torch.Tensor]], precision: torch.dtype | None, desc: str,
    progress: bool,
) -> list[_Scored]:  # fmt: skip
    """Each output's table and cache, one right-padded forward pass over prompt ‖ y_<R per chunk of outputs.

    Right padding leaves every real position's logits and keys exact (causal attention never looks ahead)."""
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    seqs = [prompt + response[:-1].tolist() for prompt, response in encoded]
    out: list[_Scored] = []
    for chunk in tqdm(_chunks([len(s) for s in seqs], vocab), desc=desc, unit="pass", disable=not progress):
        width = max(len(seqs[i]) for i in chunk)
        start = min(len(encoded[i][0]) for i in chunk) - 1  # the first position any table needs
        ids = torch.tensor([seqs[i] + [0] * (width - len(seqs[i])) for i in chunk], device=device)
        with autocast_to(device, precision):
            result = model(input_ids=ids, use_cache=True, logits_to_keep=width - start)
        logp = result.logits.float().log_softmax(dim=-1).cpu()
        layers = [(layer.keys, layer.values) for layer in result.past_key_values.layers]
        for j, i in enumerate(chunk):
            prompt, response = encoded[i]
            first, length = len(prompt) - 1 - start, len(seqs[i])
            kv = tuple((k[j : j + 1, :, :length].clone(), v[j : j + 1, :, :length].clone()) for k, v in layers)
            out.append(_Scored(tuple(prompt), response, logp[j, first : first + len(response)].clone(), kv, {}))
    return out


@dataclass(frozen=True)
class _Row:
    """One edit's suffix pass: output ``index``, the ``edit`` (r, a), and the tokens y'[r : R − 1] = (a, y_{r+1},
    …, y_{R−2}) the row runs after the cached prompt ‖ y_<r."""

    index: int
    edit: Edit
    tokens: list[int]


@torch.no_grad()
def _suffix_log_probs(
    model: Any, scored: Sequence[_Scored], rows: Sequence[_Row], precision: torch.dtype | None
) -> torch.Tensor:
    """(n, S) log p(y_{r+1+k} | prompt, y'_≤r+k) for each row's edit (r, a), S its longest row (shorter rows:
    trailing positions meaningless), in one pass over the rows' cached prefixes.

    Row j attends to its output's cache columns [0, P_j), P_j = |prompt| + r (the rest are masked), then to its own
    tokens at positions P_j + k: what a forward pass over prompt ‖ y'[: R − 1] computes at those positions."""
    device = next(model.parameters()).device
    prefix = [len(scored[r.index].prompt) + r.edit[0] for r in rows]
    outputs = sorted({r.index for r in rows})
    width, span = max(scored[i].kv[0][0].shape[2] for i in outputs), max(len(r.tokens) for r in rows)
    slot = {i: n for n, i in enumerate(outputs)}
    pick = torch.tensor([slot[r.index] for r in rows], device=device)
    cache = DynamicCache()
    for layer in range(len(scored[outputs[0]].kv)):
        parts = []
        for kind in (0, 1):
            first = scored[outputs[0]].kv[layer][kind]
            stack = first.new_zeros((len(outputs), first.shape[1], width, first.shape[3]))
            for n, i in enumerate(outputs):
                own = scored[i].kv[layer][kind]
                stack[n, :, : own.shape[2]] = own[0]
            parts.append(stack.index_select(0, pick))
        cache.update(parts[0], parts[1], layer)
    mask = torch.zeros((len(rows), width + span), dtype=torch.long)
    for j, p in enumerate(prefix):
        mask[j, :p] = 1
    mask[:, width:] = 1
    ids = torch.tensor([r.tokens + [0] * (span - len(r.tokens)) for r in rows])
    positions = torch.tensor(prefix)[:, None] + torch.arange(span)[None, :]
    with autocast_to(device, precision):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       past_key_values=cache, use_cache=True).logits.float()  # fmt: skip
    targets = torch.zeros((len(rows), span), dtype=torch.long)
    for j, r in enumerate(rows):
        after = scored[r.index].response[r.edit[0] + 1 :]
        targets[j, : len(r.tokens)] = after[: len(r.tokens)]
    picked: torch.Tensor = logits.gather(2, targets.to(device)[..., None])[..., 0] - logits.logsumexp(dim=-1)
    return picked.cpu()


def _edit_likelihoods(
    model: Any, scored: Sequence[_Scored], edits: Sequence[Sequence[Edit]], precision: torch.dtype | None,
    progress: bool = False, desc: str = "counterfactual edits",
) -> list[_Scored]:  # fmt: skip
    """``scored`` with log p(y') added for each output's ``edits`` (r, a) it lacks, y' = y with y_r → a.

    The unchanged prefix y_<r and the edited token come from the table: prefix[r] + table[r, a]; the suffix is
    scored over the cached prompt ‖ y_<r: the row of edit (r, a) runs y'[r : R−1] (S = R−1−r tokens) and adds
    Σ_k log p(y_{r+1+k} | prompt, y'_≤r+k). Rows of every output, longest first, share the passes (chunks of
    :data:`SCORE_CHUNK_ELEMENTS` logits)."""
    totals: list[dict[Edit, float]] = []
    rows: list[_Row] = []
    for i, (s, wanted) in enumerate(zip(scored, edits, strict=True)):
        new = [e for e in dict.fromkeys(wanted) if e not in s.likelihoods]
        prefix = torch.cat([torch.zeros(1), s.own.cumsum(0)])
        totals.append({e: float(prefix[e[0]] + s.table[e[0], e[1]]) for e in new})
        y, length = s.response.tolist(), len(s.response)
        rows += [_Row(i, e, apply_edit(y, e)[e[0] : length - 1]) for e in new if e[0] < length - 1]
    rows.sort(key=lambda r: -len(r.tokens))
    vocab = int(model.config.vocab_size)
    for chunk in tqdm(_chunks([len(r.tokens) for r in rows], vocab), desc=desc, unit="pass", disable=not progress):
        block = [rows[j] for j in chunk]
        logp = _suffix_log_probs(model, scored, block, precision)
        for j, r in enumerate(block):
            totals[r.index][r.edit] += float(logp[j, : len(r.tokens)].sum())
    return [replace(s, likelihoods={**s.likelihoods, **t}) for s, t in zip(scored, totals, strict=True)]


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


def _base_tables(
    model: Any, keys: list[tuple[Any, ...]], encoded: list[Any], precision: torch.dtype | None, progress: bool
) -> list[_Scored]:
    """θ_0's view of each output: remembered from an earlier call of this process, else computed now."""
    base: list[_Scored | None] = [_BASE_MEMO.get(k) for k in keys]
    missing = [i for i, b in enumerate(base) if b is None]
    if missing:
        fresh = _tables(model, [encoded[i] for i in missing], precision, "counterfactual tables (θ_0)", progress)
        for i, s in zip(missing, fresh, strict=True):
            base[i] = s
    return [b for b in base if b is not None]


def derive_corrections(
    base_reference: str, checkpoint: str | None, rows: Sequence[tuple[str, str, str]], config: PipelineConfig
) -> list[Derived | None]:
    """The derived correction of each (name, prompt, response) row at ``checkpoint`` (None: the base model,
    where θ_t = θ_0). None for a row with no editable token (an empty response).

    Per model, one batched pass over the prompts and responses (tables and caches), then batched suffix passes
    for the candidate edits (:func:`_edit_likelihoods`). θ_0's tables, caches and edit likelihoods are kept per
    output across checkpoints (:data:`BASE_MEMO_BYTES`): at a later checkpoint θ_0 scores only the edits it has not
    scored yet. Forward passes at the configured indexing precision (bfloat16 where the device has native
    kernels)."""
    if not rows:
        return []  # no model is loaded
    precision = compute_precision(config.precision, config.device)
    progress = config.progress
    with model_for(base_reference, None, config.device) as cached:
        tokenizer = cached.tokenizer
        encoded = _encoded(tokenizer, cached.model, rows, config)
        keys = [_memo_key(base_reference, p, y, precision) for p, y in encoded]
        base = _base_tables(cached.model, keys, encoded, precision, progress)
    editable = [_editable(tokenizer, y) for _, y in encoded]
    tuned: list[_Scored] | None = None
    if checkpoint is None:
        candidates = [edit_candidates(2 * b.table, b.response, n) for b, n in zip(base, editable, strict=True)]
    else:
        with model_for(base_reference, checkpoint, config.device) as cached:
            tuned = _tables(cached.model, encoded, precision, "counterfactual tables (θ_t)", progress)
            candidates = [edit_candidates(b.table + t.table, b.response, n)
                          for b, t, n in zip(base, tuned, editable, strict=True)]  # fmt: skip
            edits = [[(int(r), int(a)) for r, a in c] for c in candidates]
            tuned = _edit_likelihoods(cached.model, tuned, edits, precision, progress, "counterfactual edits (θ_t)")
    edits = [[(int(r), int(a)) for r, a in c] for c in candidates]
    with model_for(base_reference, None, config.device) as cached:
        base = _edit_likelihoods(cached.model, base, edits, precision, progress, "counterfactual edits (θ_0)")
    for key, b in zip(keys, base, strict=True):
        _remember(key, b)
    out = []
    for b, t, cand, wanted in zip(base, tuned or base, candidates, edits, strict=True):
        own = float(b.own.sum()) + float(t.own.sum())
        gains = torch.tensor([b.likelihoods[e] + t.likelihoods[e] - own for e in wanted])
        out.append(_derived(tokenizer, b.response, cand, gains))
    return out


def _derived(tokenizer: Any, response: torch.Tensor, candidates: torch.Tensor, gains: torch.Tensor) -> Derived | None:
    if len(candidates) == 0:
        return None
    r, a = best_edit(candidates, gains)
    full = apply_edit(response.tolist(), (r, a))
    ids = full[: _editable(tokenizer, response)]  # the response text has no EOS
    return Derived(tokenizer.decode(ids), r, tokenizer.decode([response.tolist()[r]]), tokenizer.decode([a]),
                   float(gains[int(torch.argmax(gains))]), tuple(full))  # fmt: skip
