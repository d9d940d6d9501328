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
from tasks.likelihoods import (
    Scored,
    cast_region,
    edit_likelihoods,
    head_likelihood,
    prefix_likelihoods,
    propose_spans,
    tables,
)
from tasks.models import compute_precision, context_length, model_for
from tasks.tokenize import encode_pair

BASE_MEMO_BYTES = 1 << 30  # θ_0's tables and caches kept across checkpoints, least recently used evicted
SPAN_WORDS = 1  # words per output, ranked by how much fine-tuning raised their likelihood, replaced whole
SPAN_BEAMS = 4  # first tokens per such word (largest joint log-probability), each decoded greedily
SPAN_TOKENS = 8  # longest decoded replacement
PRUNE_ROUNDS = (1, 4)  # candidates per output scored in the first rounds of the search, then all still open
FLOOR_SLACK = 1e-4  # nats below min_edit_gain where the search floor sits: float32 sums never prune a used edit


@dataclass(frozen=True)
class Derived:
    """A derived correction: the edited ``response`` text, the edit (position, replaced and replacement text) and its
    gain [log p_θ0(y') + log p_θt(y')] − [log p_θ0(y) + log p_θt(y)] in nats. ``response_ids``: the edited
    response's token ids (the output's own encoding, the edit applied): what the query embeds, so the vector is
    computed on exactly the scored sequence (decoding then re-encoding text need not give the same ids).
    ``gain_is_bound``: the search stopped at ``min_edit_gain`` because no edit could gain more: ``gain`` is then an
    upper bound of every candidate's gain (≤ ``min_edit_gain``) and the edit the candidate of largest bound."""

    response: str
    position: int
    token: str
    replacement: str
    gain: float
    response_ids: tuple[int, ...] = ()
    gain_is_bound: bool = False


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


class _Search:
    """Best-first scoring of candidate edits with exact pruning, over the outputs of one call.

    An edit's total T(e) = log p_θ0(y') + log p_θt(y') (at the base model θ_t = θ_0, counted twice) is at most its
    bound B(e): each model's term known exactly where scored, else the table's
    :func:`tasks.likelihoods.head_likelihood` (the rest of y' adds log-probabilities ≤ 0). An edit with
    B(e) < max T over the scored edits of its output can never be the argmax, so it is never scored in full.
    Each round scores, per output, the open edits of largest bound (:data:`PRUNE_ROUNDS`, then all still open)
    in one batched pass per model, θ_0 first (its likelihoods are kept across checkpoints), then θ_t on those of
    the batch whose bound, tightened by θ_0's exact terms, can still win: the argmax, its gain and the first-on-ties
    choice are those of scoring every candidate in full.

    ``floors`` (per output, a total; None: −inf): an edit is only wanted if its total exceeds the floor (an edit
    that gains no more than ``min_edit_gain`` is not used), so the floor starts as the best total: an output whose
    candidates all have B(e) < floor is settled without scoring them (:meth:`settled`)."""

    def __init__(
        self, views: list[list[Scored]], models: list[Any], precision: Any, progress: bool,
        floors: Sequence[float] | None = None,
    ) -> None:  # fmt: skip
        self.views, self.models, self.precision, self.progress = views, models, precision, progress
        self.prefixes = [[prefix_likelihoods(s) for s in view] for view in views]
        self.seen: list[list[Span]] = [[] for _ in views[0]]
        self.floors = list(floors) if floors is not None else [float("-inf")] * len(views[0])

    def _term(self, m: int, i: int, edit: Span) -> float:
        s = self.views[m][i]
        return s.likelihoods[edit] if edit in s.likelihoods else head_likelihood(s, self.prefixes[m][i], edit)

    def bound(self, i: int, edit: Span) -> float:
        """B(edit) for output i (its exact total once every model has scored it)."""
        ms = range(len(self.views))
        return sum(self._term(m, i, edit) for m in ms) * (2 // len(ms))  # the base model alone: θ_t = θ_0

    def head(self, i: int, r: int, a: int) -> float:
        """The bound of every edit of output i at position r whose first token is a — (r, e, (a, …)) for any e and
        continuation — from the tables alone, whatever has been scored (a scored single-token edit (r, r + 1, (a,))
        says nothing about a longer replacement starting with a)."""
        ms = range(len(self.views))
        single = (r, r + 1, (a,))
        return sum(head_likelihood(self.views[m][i], self.prefixes[m][i], single) for m in ms) * (2 // len(ms))

    def scored(self, i: int) -> list[Span]:
        """Output i's candidates scored by every model, in the order they were offered."""
        return [e for e in self.seen[i] if all(e in view[i].likelihoods for view in self.views)]

    def best(self, i: int) -> float:
        """max T(e) over output i's edits scored by every model, and its floor (−inf before any, without one)."""
        return max([self.floors[i], *(self.bound(i, e) for e in self.scored(i))])

    def settled(self, i: int) -> bool:
        """Whether output i's search stopped at its floor: no edit scored above it, every other bounded below it."""
        return self.best(i) == self.floors[i] > float("-inf")

    def _open(self, size: int | None) -> list[list[Span]]:
        """Per output, the ``size`` unscored edits of largest bound (all: None) among those that can still win."""
        batch = []
        for i in range(len(self.seen)):
            done = set(self.scored(i))
            best = max([self.floors[i], *(self.bound(i, e) for e in done)])  # = self.best(i), scored() once
            open_ = [
                (-b, n, e) for n, e in enumerate(self.seen[i]) if e not in done and (b := self.bound(i, e)) >= best
            ]
            batch.append([e for *_, e in sorted(open_)[:size]])
        return batch

    def run(self, edits: Sequence[Sequence[Span]]) -> None:
        """Offer each output's ``edits`` and score, round by round, those whose bound can still beat its best."""
        for i, wanted in enumerate(edits):
            self.seen[i] += [e for e in dict.fromkeys(wanted) if e not in self.seen[i]]
        for size in (*PRUNE_ROUNDS, None):
            batch = self._open(size)
            if not any(batch):
                return
            for m in range(len(self.models)):
                if m:  # the model before tightened the batch's bounds: its edits that can no longer win are dropped
                    best = [self.best(i) for i in range(len(batch))]
                    batch = [[e for e in es if self.bound(i, e) >= best[i]] for i, es in enumerate(batch)]
                context, desc = self.models[m]
                with context() as cached:
                    self.views[m] = edit_likelihoods(cached.model, self.views[m], batch, self.precision,
                                                     self.progress, desc)  # fmt: skip


def _beams_that_can_win(search: _Search, beams: list[list[tuple[int, int, int]]]) -> list[list[tuple[int, int, int]]]:
    """The whole-word beams (r, e, a) worth decoding: those whose bound (:meth:`_Search.head`) is not below their
    output's best total so far; no replacement started by the others can be the argmax."""
    best = [search.best(i) for i in range(len(beams))]
    return [[(r, e, a) for r, e, a in bs if search.head(i, r, a) >= best[i]] for i, bs in enumerate(beams)]


def derive_corrections(
    base_reference: str, checkpoint: str | None, rows: Sequence[tuple[str, str, str]], config: PipelineConfig
) -> list[Derived | None]:
    """The derived correction of each (name, prompt, response) row at ``checkpoint`` (None: the base model,
    where θ_t = θ_0). None for a row with no editable token (an empty response).

    Per model, one batched pass over the prompts and responses (tables and caches); the single-token edits scored
    best-first with exact pruning (:class:`_Search`); whole-word replacements decoded only from first tokens whose
    bound can still beat the best edit, then scored the same way (:mod:`tasks.likelihoods`). θ_0's tables, caches
    and edit likelihoods are kept per output across checkpoints (:data:`BASE_MEMO_BYTES`): at a later checkpoint
    θ_0 scores only the edits it has not scored yet. Forward passes at the configured indexing precision."""
    if not rows:
        return []  # no model is loaded
    precision = compute_precision(config.precision, config.device)
    with cast_region(config.device, precision):  # each weight cast once for the whole derivation
        return _derive(base_reference, checkpoint, rows, config, precision)


def _derive(
    base_reference: str, checkpoint: str | None, rows: Sequence[tuple[str, str, str]], config: PipelineConfig,
    precision: torch.dtype | None,
) -> list[Derived | None]:  # fmt: skip
    progress = config.progress
    base_model = partial(model_for, base_reference, None, config.device)
    tuned_model = partial(model_for, base_reference, checkpoint, config.device)
    with base_model() as cached:
        tokenizer = cached.tokenizer
        encoded = _encoded(tokenizer, cached.model, rows, config)
        keys = [_memo_key(base_reference, p, y, precision) for p, y in encoded]
        base = _base_views(cached.model, keys, encoded, precision, progress)
    words = _Words(tokenizer)
    editable = [_editable(tokenizer, y) for _, y in encoded]
    models = [(base_model, "counterfactual edits (θ_0)")]
    views = [base]
    if checkpoint is not None:
        with tuned_model() as cached:
            views.append(tables(cached.model, encoded, precision, "counterfactual tables (θ_t)", progress))
        models.append((tuned_model, "counterfactual edits (θ_t)"))
    joints = [b.table + t.table for b, t in zip(base, views[-1], strict=True)]
    threshold = config.scoring.min_edit_gain
    own = [float(b.own.sum()) + float(t.own.sum()) for b, t in zip(base, views[-1], strict=True)]
    floors = None if threshold is None else [o + threshold - FLOOR_SLACK for o in own]
    search = _Search(views, models, precision, progress, floors)
    search.run([_single_edits(j, b.response, n) for j, b, n in zip(joints, base, editable, strict=True)])
    dropped: list[list[tuple[int, int, int]]] = [[] for _ in rows]  # whole-word beams never decoded
    if checkpoint is not None:  # at the base model nothing has been fine-tuned: no word to replace
        offered = [_span_beams(b, t, j, n, words) for b, t, j, n in zip(base, views[1], joints, editable, strict=True)]
        beams = _beams_that_can_win(search, offered)
        dropped = [[x for x in o if x not in kept] for o, kept in zip(offered, beams, strict=True)]
        spans = propose_spans(list(zip((base_model, tuned_model), views, strict=True)), beams, words, SPAN_TOKENS,
                              precision)  # fmt: skip
        search.run(spans)
    for key, b in zip(keys, search.views[0], strict=True):
        _remember(key, b)
    tuned = search.views[-1]
    return [_bounded(tokenizer, search, i, [search.head(i, r, a) for r, _, a in dropped[i]], own[i])
            if search.settled(i) else _derived(tokenizer, b, t, search.scored(i))
            for i, (b, t) in enumerate(zip(search.views[0], tuned, strict=True))]  # fmt: skip


def _record(tokenizer: Any, response: torch.Tensor, span: Span, gain: float, bound: bool) -> Derived:
    """The :class:`Derived` of ``span`` (r, e, z) applied to ``response`` (R,), with ``gain``."""
    r, e, z = span
    y = response.tolist()
    full = apply_span(y, span)
    ids = full[: len(full) - (len(y) - _editable(tokenizer, response))]  # the response text has no EOS
    return Derived(tokenizer.decode(ids), r, tokenizer.decode(y[r:e]), tokenizer.decode(list(z)), gain, tuple(full),
                   bound)  # fmt: skip


def _derived(tokenizer: Any, base: Scored, tuned: Scored, edits: list[Span]) -> Derived | None:
    """The edit of largest gain (the first on ties), or None without candidates."""
    if not edits:
        return None
    own = float(base.own.sum()) + float(tuned.own.sum())
    gains = torch.tensor([base.likelihoods[e] + tuned.likelihoods[e] - own for e in edits], dtype=torch.float64)
    return _record(tokenizer, base.response, best_edit(edits, gains), float(gains.max()), False)


def _bounded(tokenizer: Any, search: _Search, i: int, beam_heads: list[float], own: float) -> Derived | None:
    """Output i's search settled at its floor (no edit gains more than ``min_edit_gain``): the candidate of largest
    bound B(e) (exact where scored; the first on ties), with ``gain`` = max B(e) − own over every candidate offered
    (single-token edits and decoded whole-word replacements) and the :meth:`_Search.head` of every whole-word beam
    never decoded (``beam_heads``: a bound of whatever it would have decoded): an upper bound of any edit's gain,
    below the floor's threshold. None without candidates."""
    edits = search.seen[i]
    if not edits:
        return None
    bounds = torch.tensor([search.bound(i, e) for e in edits], dtype=torch.float64)
    gain = max([float(bounds.max()), *beam_heads]) - own
    return _record(tokenizer, search.views[0][i].response, best_edit(edits, bounds), gain, True)
