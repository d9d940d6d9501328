"""Derive the correction of an output that has none: the counterfactual query (docs/method.md).

At checkpoint t, the derived correction of y is the edit y' that θ_0 and θ_t together find most plausible: the
argmax over candidate edits of [log p_θ0(y') + log p_θt(y')] − [log p_θ0(y) + log p_θt(y)]. Candidates are the
single-token edits of :func:`dda_kernel.edit_candidates` and, at a fine-tuned checkpoint where the word
fine-tuning made most likely (among those the prompt does not contain) has several tokens (an invented name),
whole-word replacements of it decoded by both models together (:func:`tasks.likelihoods.propose_spans`): a
single token cannot express "another name". The query is then ĝ(prompt, y) − ĝ(prompt, y') like a contrastive
one. Each checkpoint derives its own (its θ_t), so nothing depends on which checkpoints exist yet. No Prefect.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from dda_kernel import Span, apply_span, best_edit, changed_words, edit_candidates, word_spans
from tasks.config import PipelineConfig
from tasks.likelihoods import Scored, edit_likelihoods, propose_spans, tables
from tasks.models import compute_precision, context_length, model_for
from tasks.tokenize import encode_pair

BASE_MEMO_BYTES = 1 << 30  # θ_0's tables and caches kept across checkpoints, least recently used evicted
SPAN_WORDS = 1  # words per output, ranked by how much fine-tuning raised their likelihood, replaced whole
SPAN_BEAMS = 4  # first tokens per such word (largest joint log-probability), each decoded greedily
SPAN_TOKENS = 8  # longest decoded replacement


@dataclass(frozen=True)
class Derived:
    """A derived correction: the edited ``response`` text, the edit (position, replaced and replacement text) and its
    gain [log p_θ0(y') + log p_θt(y')] − [log p_θ0(y) + log p_θt(y)] in nats. ``response_ids``: the edited
    response's token ids (the output's own encoding, the edit applied): what the query embeds, so the vector is
    computed on exactly the scored sequence (decoding then re-encoding text need not give the same ids)."""

    response: str
    position: int
    token: str
    replacement: str
    gain: float
    response_ids: tuple[int, ...] = ()


_BASE_MEMO: OrderedDict[tuple[Any, ...], Scored] = OrderedDict()


def _memo_key(base_reference: str, prompt: list[int], response: torch.Tensor, precision: Any) -> tuple[Any, ...]:
    return base_reference, str(precision), tuple(prompt), tuple(response.tolist())


def _remember(key: tuple[Any, ...], scored: Scored) -> None:
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


class _Words:
    """Whether token t begins a new word after token p (memoised): the text of (p, t) has a space or a
    non-alphanumeric character at the join, or t is the EOS. Without p (the first token), t begins a word."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.known = tokenizer, dict[tuple[int | None, int], bool]()

    def __call__(self, previous: int | None, token: int) -> bool:
        key = (previous, token)
        if key not in self.known:
            decode = self.tokenizer.decode
            if previous is None or token == self.tokenizer.eos_token_id:
                self.known[key] = True
            else:
                left, pair = decode([previous]), decode([previous, token])
                rest = pair[len(left) :] if pair.startswith(left) else pair
                self.known[key] = not rest[:1].isalnum()
        return self.known[key]


def _single_edits(joint: torch.Tensor, response: torch.Tensor, editable: int) -> list[Span]:
    return [(int(r), int(r) + 1, (int(a),)) for r, a in edit_candidates(joint, response, editable)]


def _span_beams(
    base: Scored, tuned: Scored, joint: torch.Tensor, editable: int, words: _Words
) -> list[tuple[int, int, int]]:  # fmt: skip
    """(r, e, a) beams: the word fine-tuning made most likely (:func:`dda_kernel.changed_words`) among the words
    the prompt does not contain (a word copied from the prompt is supported by it, not what an error changed),
    where it has several tokens, started by the :data:`SPAN_BEAMS` tokens a ≠ y_r of largest J[r, a] that begin
    a word."""
    y = base.response.tolist()
    spans = word_spans([words(y[r - 1] if r else None, t) for r, t in enumerate(y)], editable)
    prompt = words.tokenizer.decode(list(base.prompt))
    spans = [(r, e) for r, e in spans if words.tokenizer.decode(y[r:e]).strip() not in prompt]
    beams = []
    for r, e in changed_words(tuned.own - base.own, spans, SPAN_WORDS):
        previous = y[r - 1] if r else None
        order = joint[r].topk(min(50 * SPAN_BEAMS, joint.shape[1])).indices.tolist()
        firsts = [a for a in order if a != y[r] and (previous is None or words(previous, a))][:SPAN_BEAMS]
        beams += [(r, e, a) for a in firsts]
    return beams


def _base_views(
    model: Any, keys: list[tuple[Any, ...]], encoded: list[Any], precision: torch.dtype | None, progress: bool
) -> list[Scored]:
    """θ_0's view of each output: remembered from an earlier call of this process, else computed now."""
    base: list[Scored | None] = [_BASE_MEMO.get(k) for k in keys]
    missing = [i for i, b in enumerate(base) if b is None]
    if missing:
        fresh = tables(model, [encoded[i] for i in missing], precision, "counterfactual tables (θ_0)", progress)
        for i, s in zip(missing, fresh, strict=True):
            base[i] = s
    return [b for b in base if b is not None]


def derive_corrections(
    base_reference: str, checkpoint: str | None, rows: Sequence[tuple[str, str, str]], config: PipelineConfig
) -> list[Derived | None]:
    """The derived correction of each (name, prompt, response) row at ``checkpoint`` (None: the base model,
    where θ_t = θ_0). None for a row with no editable token (an empty response).

    Per model, one batched pass over the prompts and responses (tables and caches), the decoding of whole-word
    replacements, then batched suffix passes for every candidate (:mod:`tasks.likelihoods`). θ_0's tables, caches
    and edit likelihoods are kept per output across checkpoints (:data:`BASE_MEMO_BYTES`): at a later checkpoint
    θ_0 scores only the edits it has not scored yet. Forward passes at the configured indexing precision."""
    if not rows:
        return []  # no model is loaded
    precision = compute_precision(config.precision, config.device)
    progress = config.progress
    base_model = partial(model_for, base_reference, None, config.device)
    with base_model() as cached:
        tokenizer = cached.tokenizer
        encoded = _encoded(tokenizer, cached.model, rows, config)
        keys = [_memo_key(base_reference, p, y, precision) for p, y in encoded]
        base = _base_views(cached.model, keys, encoded, precision, progress)
    words = _Words(tokenizer)
    editable = [_editable(tokenizer, y) for _, y in encoded]
    tuned: list[Scored] = base
    if checkpoint is not None:
        with model_for(base_reference, checkpoint, config.device) as cached:
            tuned = tables(cached.model, encoded, precision, "counterfactual tables (θ_t)", progress)
    joints = [b.table + t.table for b, t in zip(base, tuned, strict=True)]
    spans: list[list[Span]] = [[] for _ in encoded]
    if checkpoint is not None:  # at the base model nothing has been fine-tuned: no word to replace
        beams = [_span_beams(b, t, j, n, words) for b, t, j, n in zip(base, tuned, joints, editable, strict=True)]
        views = [(base_model, base), (partial(model_for, base_reference, checkpoint, config.device), tuned)]
        spans = propose_spans(views, beams, words, SPAN_TOKENS, precision)
    edits = [_single_edits(j, b.response, n) + s for j, b, n, s in zip(joints, base, editable, spans, strict=True)]
    if checkpoint is not None:
        with model_for(base_reference, checkpoint, config.device) as cached:
            tuned = edit_likelihoods(cached.model, tuned, edits, precision, progress, "counterfactual edits (θ_t)")
    with base_model() as cached:
        base = edit_likelihoods(cached.model, base, edits, precision, progress, "counterfactual edits (θ_0)")
    for key, b in zip(keys, base, strict=True):
        _remember(key, b)
    if checkpoint is None:
        tuned = base
    return [_derived(tokenizer, b, t, wanted) for b, t, wanted in zip(base, tuned, edits, strict=True)]


def _derived(tokenizer: Any, base: Scored, tuned: Scored, edits: list[Span]) -> Derived | None:
    """The edit of largest gain (the first on ties), or None without candidates."""
    if not edits:
        return None
    own = float(base.own.sum()) + float(tuned.own.sum())
    gains = torch.tensor([base.likelihoods[e] + tuned.likelihoods[e] - own for e in edits], dtype=torch.float64)
    r, e, z = best = best_edit(edits, gains)
    y = base.response.tolist()
    full = apply_span(y, best)
    ids = full[: len(full) - (len(y) - _editable(tokenizer, base.response))]  # the response text has no EOS
    return Derived(tokenizer.decode(ids), r, tokenizer.decode(y[r:e]), tokenizer.decode(list(z)), float(gains.max()),
                   tuple(full))  # fmt: skip
