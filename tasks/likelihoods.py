"""Batched likelihoods of edited responses, for the derived corrections (:mod:`tasks.counterfactual`). No Prefect.

An edit is a :data:`~dda_kernel.counterfactual.Span` (r, e, z): y[r:e] replaced by the tokens z (a single-token
edit is (r, r + 1, (a,))). Every pass is batched across the outputs of a call: one right-padded forward per chunk
of outputs gives their per-token tables and key/value caches (:func:`tables`); edited suffixes then run over the
cached prefixes, each row masked to its own prefix (:func:`edit_likelihoods`), and multi-token replacements are
proposed by decoding over the same caches (:func:`propose_spans`). On short outputs a model's fixed cost per call,
not its arithmetic, dominated, so rows of every output share each pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

from dda_kernel import Span, autocast_to

# Rows × positions × vocabulary per forward pass (its float32 logits: 256 MiB). A pass costs about 66 ms before its
# first token on SmolLM2 (2 CPUs, bfloat16; 0.46 ms a token after; a one-off fit, benchmarks/README.md): 1 << 25 ran
# 36 passes on the tracing-latency world's 16 outputs × 6 states where this runs 32, the same edits scored.
SCORE_CHUNK_ELEMENTS = 1 << 26
# Tokens per packed sequence of edit rows: an eighth of a pass's positions on SmolLM2 (2**26 // 49 152 = 1 365). One
# output per sequence padded a derivation's passes by 29 % on the tracing-latency world; this pads only the last.
PACK_TOKENS = 170
LOG_PROB_POSITIONS = 128  # positions whose logits are normalised at once (:func:`_target_log_probs`)

KeyValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (1, heads, L, head_dim) keys and values


@dataclass(frozen=True)
class Scored:
    """One model's view of one output y = ``response`` (R,) after ``prompt`` (P ids): ``table`` (R, V) float32
    log p(· | prompt, y_<r), the ``likelihoods`` log p(y') of the edits scored so far, and ``kv``, the key/value
    cache of prompt ‖ y_<R (L = P + R − 1 positions), from which edits are scored."""

    prompt: tuple[int, ...]
    response: torch.Tensor
    table: torch.Tensor
    kv: KeyValues
    likelihoods: dict[Span, float]

    @property
    def nbytes(self) -> int:
        """Memory held: the table and the cache."""
        kv = sum(t.numel() * t.element_size() for layer in self.kv for t in layer)
        return int(self.table.numel() * self.table.element_size() + kv)

    @property
    def own(self) -> torch.Tensor:
        """(R,) log p(y_r | prompt, y_<r) of the output's own tokens."""
        return self.table.gather(1, self.response[:, None])[:, 0]


@contextmanager
def cast_region(device: str | torch.device, precision: torch.dtype | None) -> Iterator[None]:
    """One autocast region around many forward passes (a whole derivation), so that each weight is cast to
    ``precision`` once instead of at every pass: torch keeps a region's casts of leaf tensors that require grad
    until the outermost region ends, and :func:`_autocast_pass` marks a model's frozen weights for its pass. On
    SmolLM2-135M (2 CPUs) the cast is most of a short pass: 98 ms against 33 ms with the weights already cast,
    for 4 rows of 1 token. No-op without ``precision``."""
    if precision is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=precision):
        yield


_MEMBERS: weakref.WeakKeyDictionary[Any, tuple[tuple[str, ...], tuple[Any, ...], tuple[Any, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _pass_members(model: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``model``'s floating-point parameters and its peft layers that cast their input, listed once per model and
    set of adapters (a peft model's adapter names: attaching or deleting an adapter is what changes them). Walking
    the modules cost about 6 ms per forward pass on SmolLM2, and a derivation runs dozens of short passes."""
    key = tuple(getattr(model, "peft_config", None) or ())
    known = _MEMBERS.get(model)
    if known is None or known[0] != key:
        params = tuple(p for p in model.parameters() if p.is_floating_point())
        known = _MEMBERS[model] = (key, params, tuple(m for m in model.modules() if hasattr(m, "_cast_input_dtype")))
    return known[1], known[2]


@contextmanager
def _autocast_pass(model: Any, device: torch.device, precision: torch.dtype | None) -> Iterator[None]:
    """Autocast for one forward pass of ``model`` (under no_grad), its frozen weights marked as requiring grad for
    the pass so that their casts are kept in the enclosing :func:`cast_region` (nothing is tracked without grad
    mode), then restored. peft's LoRA layers cast their input to the adapter weights' dtype (float32) before autocast
    casts it back: their ``cast_input_dtype_enabled`` is off for the pass (the same values, two fewer activation
    copies per LoRA layer and pass)."""
    params, adapters = _pass_members(model) if precision else ((), ())
    frozen = [p for p in params if not p.requires_grad]
    casting = [getattr(m, "cast_input_dtype_enabled", True) for m in adapters]
    try:
        for p in frozen:
            p.requires_grad_(True)
        for m in adapters:
            m.cast_input_dtype_enabled = False
        with autocast_to(device, precision):
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for m, enabled in zip(adapters, casting, strict=True):
            m.cast_input_dtype_enabled = enabled


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
def tables(
    model: Any, encoded: Sequence[tuple[list[int], torch.Tensor]], precision: torch.dtype | None, desc: str = "",
    progress: bool = False,
) -> list[Scored]:  # fmt: skip
    """Each (prompt ids, response (R,)) output's table and cache, one right-padded forward pass over prompt ‖ y_<R
    per chunk of outputs. Right padding leaves every real position's logits and keys exact (causal attention)."""
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    seqs = [prompt + response[:-1].tolist() for prompt, response in encoded]
    out: list[Scored] = []
    for chunk in tqdm(_chunks([len(s) for s in seqs], vocab), desc=desc, unit="pass", disable=not progress):
        width = max(len(seqs[i]) for i in chunk)
        start = min(len(encoded[i][0]) for i in chunk) - 1  # the first position any table needs
        ids = torch.tensor([seqs[i] + [0] * (width - len(seqs[i])) for i in chunk], device=device)
        with _autocast_pass(model, device, precision):
            result = model(input_ids=ids, use_cache=True, logits_to_keep=width - start)
        logp = result.logits.float().log_softmax(dim=-1).cpu()
        layers = [(layer.keys, layer.values) for layer in result.past_key_values.layers]
        for j, i in enumerate(chunk):
            prompt, response = encoded[i]
            first, length = len(prompt) - 1 - start, len(seqs[i])
            kv = tuple((k[j : j + 1, :, :length].clone(), v[j : j + 1, :, :length].clone()) for k, v in layers)
            out.append(Scored(tuple(prompt), response, logp[j, first : first + len(response)].clone(), kv, {}))
    return out


def prefix_likelihoods(scored: Scored) -> torch.Tensor:
    """(R + 1,) log p(y_<r | prompt) = Σ_{k<r} log p(y_k | prompt, y_<k) for r = 0..R, from the table."""
    return torch.cat([torch.zeros(1), scored.own.cumsum(0)])


def head_likelihood(scored: Scored, prefix: torch.Tensor, edit: Span) -> float:
    """log p(y_<r) + log p(z_0 | prompt, y_<r) for ``edit`` = (r, e, z), ``prefix`` its output's
    :func:`prefix_likelihoods`: the part of log p(y') the table gives. The rest of y' adds log-probabilities
    (each ≤ 0), so this is an upper bound of log p(y'), and :func:`edit_likelihoods` starts from exactly it."""
    return float(prefix[edit[0]] + scored.table[edit[0], edit[2][0]])


def _row_cache(scored: Sequence[Scored], index: Sequence[int], prefix: Sequence[int]) -> tuple[DynamicCache, Any]:
    """A cache with one row per ``index`` (its output's keys and values, right-padded to the longest) and the
    (n, width) attention mask that lets row j see its first ``prefix[j]`` positions only."""
    outputs = sorted(set(index))
    width = max(scored[i].kv[0][0].shape[2] for i in outputs)
    slot = {i: n for n, i in enumerate(outputs)}
    pick = torch.tensor([slot[i] for i in index], device=scored[outputs[0]].kv[0][0].device)
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
    mask = torch.zeros((len(index), width), dtype=torch.long)
    for j, p in enumerate(prefix):
        mask[j, :p] = 1
    return cache, mask


@dataclass(frozen=True)
class _Row:
    """One edit's suffix pass: output ``index``, the ``edit`` (r, e, z), the ``tokens`` w[:-1] the row runs after
    the cached prompt ‖ y_<r and the ``targets`` w[1:] they predict, w = z ‖ y[e:R]."""

    index: int
    edit: Span
    tokens: list[int]
    targets: list[int]


def _packs(rows: Sequence[_Row], cap: int) -> list[list[_Row]]:
    """The rows, in order (each output's rows together), in packs of at most ``cap`` tokens (a longer row alone).
    A pack may hold the rows of several outputs: only the last pack of a pass is padded."""
    packs: list[list[_Row]] = [[]]
    size = 0
    for r in rows:
        if packs[-1] and size + len(r.tokens) > cap:
            packs.append([])
            size = 0
        packs[-1].append(r)
        size += len(r.tokens)
    return [p for p in packs if p]


def _pack_cache(scored: Sequence[Scored], packs: Sequence[Sequence[_Row]]) -> tuple[DynamicCache, list[dict[int, int]]]:
    """One cache row per pack: the key/value caches of the pack's outputs one after another, right-padded to the
    widest pack, and per pack where each of its outputs' caches starts."""
    members = [list(dict.fromkeys(r.index for r in pack)) for pack in packs]
    offsets: list[dict[int, int]] = []
    for outputs in members:
        offsets.append({})
        at = 0
        for i in outputs:
            offsets[-1][i] = at
            at += scored[i].kv[0][0].shape[2]
    width = max(o[i] + scored[i].kv[0][0].shape[2] for o in offsets for i in o)
    cache = DynamicCache()
    for layer in range(len(scored[members[0][0]].kv)):
        parts = []
        for kind in (0, 1):
            first = scored[members[0][0]].kv[layer][kind]
            stack = first.new_zeros((len(packs), first.shape[1], width, first.shape[3]))
            for j, outputs in enumerate(members):
                for i in outputs:
                    own = scored[i].kv[layer][kind]
                    stack[j, :, offsets[j][i] : offsets[j][i] + own.shape[2]] = own[0]
            parts.append(stack)
        cache.update(parts[0], parts[1], layer)
    return cache, offsets


def _target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, s) log p(target) = logit[target] − logsumexp(logits) in float32, from (n, s, V) logits of any dtype.

    :data:`LOG_PROB_POSITIONS` positions at a time: a float32 copy of every position's logits at once is
    memory-bound (about 100 ms for 680 positions of SmolLM2's 49 152 words on 2 CPUs, against 21 ms in slices);
    the values are the same."""
    flat, wanted = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], LOG_PROB_POSITIONS):
        part = flat[start : start + LOG_PROB_POSITIONS].float()
        picked = part.gather(1, wanted[start : start + len(part), None])[:, 0]
        out[start : start + len(part)] = picked - part.logsumexp(1)
    return out.view(targets.shape)


@torch.no_grad()
def _packed_log_probs(
    model: Any, scored: Sequence[Scored], packs: Sequence[Sequence[_Row]], precision: Any
) -> list[list[torch.Tensor]]:  # fmt: skip
    """Per pack, per row, (len(tokens),) log p(target_k | prompt, y_<r, tokens_≤k), in one pass for all packs.

    A pack is one sequence: the tokens of its rows one after another, after the caches (prompt ‖ y_<R) of the
    outputs they edit (:func:`_pack_cache`, each stored once per pack, not once per row). A 4-D attention mask lets
    row j's tokens see the first P_j = |prompt| + r_j positions of its own output's cache and row j's own earlier
    tokens, at positions P_j + k: what a forward pass over prompt ‖ y' computes at those positions."""
    device = next(model.parameters()).device
    cache, offsets = _pack_cache(scored, packs)
    width = cache.get_seq_length()
    span = max(sum(len(r.tokens) for r in pack) for pack in packs)
    allowed = torch.zeros((len(packs), 1, span, width + span), dtype=torch.bool)
    ids, targets, positions = (torch.zeros((len(packs), span), dtype=torch.long) for _ in range(3))
    for j, pack in enumerate(packs):
        at = 0
        for r in pack:
            n, p, start = len(r.tokens), len(scored[r.index].prompt) + r.edit[0], offsets[j][r.index]
            allowed[j, 0, at : at + n, start : start + p] = True
            allowed[j, 0, at : at + n, width + at : width + at + n] = torch.ones((n, n), dtype=torch.bool).tril()
            ids[j, at : at + n], targets[j, at : at + n] = torch.tensor(r.tokens), torch.tensor(r.targets)
            positions[j, at : at + n] = p + torch.arange(n)
            at += n
        allowed[j, 0, at:, 0] = True  # padding sees one key (no empty softmax); nothing reads it
    with _autocast_pass(model, device, precision):
        logits = model(input_ids=ids.to(device), attention_mask=allowed.to(device), position_ids=positions.to(device),
                       past_key_values=cache, use_cache=True).logits  # fmt: skip
    picked = _target_log_probs(logits, targets.to(device)).cpu()
    lengths = [[len(r.tokens) for r in pack] for pack in packs]
    return [list(picked[j, : sum(n)].split(n)) for j, n in enumerate(lengths)]


def edit_likelihoods(
    model: Any, scored: Sequence[Scored], edits: Sequence[Sequence[Span]], precision: torch.dtype | None,
    progress: bool = False, desc: str = "counterfactual edits",
) -> list[Scored]:  # fmt: skip
    """``scored`` with log p(y') added for each output's ``edits`` (r, e, z) it lacks, y' = y_<r ‖ z ‖ y[e:].

    The unchanged prefix and z's first token come from the table (:func:`head_likelihood`); the row of the edit
    runs w[:-1], w = z ‖ y[e:R], over the cached prompt ‖ y_<r and adds Σ_k log p(w_{k+1} | prompt, y_<r, w_≤k).
    The rows run packed, :data:`PACK_TOKENS` tokens to a sequence, over the caches of the outputs they edit
    (:func:`_packed_log_probs`); the packs, longest first, share the passes (chunks of :data:`SCORE_CHUNK_ELEMENTS`
    logits)."""
    totals: list[dict[Span, float]] = []
    rows: list[_Row] = []
    for i, (s, wanted) in enumerate(zip(scored, edits, strict=True)):
        new = [e for e in dict.fromkeys(wanted) if e not in s.likelihoods]
        prefix = prefix_likelihoods(s)
        totals.append({e: head_likelihood(s, prefix, e) for e in new})
        y = s.response.tolist()
        for e in new:
            w = [*e[2], *y[e[1] :]]
            if len(w) > 1:
                rows.append(_Row(i, e, w[:-1], w[1:]))
    vocab = int(model.config.vocab_size)
    packs = _packs(rows, min(PACK_TOKENS, max(1, SCORE_CHUNK_ELEMENTS // vocab)))
    packs.sort(key=lambda pack: -sum(len(r.tokens) for r in pack))
    sizes = [sum(len(r.tokens) for r in pack) for pack in packs]
    for chunk in tqdm(_chunks(sizes, vocab), desc=desc, unit="pass", disable=not progress):
        block = [packs[j] for j in chunk]
        for pack, logps in zip(block, _packed_log_probs(model, scored, block, precision), strict=True):
            for r, logp in zip(pack, logps, strict=True):
                totals[r.index][r.edit] += float(logp.sum())
    return [replace(s, likelihoods={**s.likelihoods, **t}) for s, t in zip(scored, totals, strict=True)]


ModelView = tuple[Callable[[], AbstractContextManager[Any]], Sequence[Scored]]  # (a model's context, its views)


@torch.no_grad()
def propose_spans(
    views: Sequence[ModelView], starts: Sequence[Sequence[tuple[int, int, int]]], breaks: Callable[[int, int], bool],
    max_tokens: int, precision: torch.dtype | None,
) -> list[list[Span]]:  # fmt: skip
    """Multi-token replacements of whole words, decoded greedily by the models of ``views`` together.

    ``starts[i]``: output i's beams (r, e, a): replace the word y[r:e] starting with token a. Each beam continues
    with z_{k+1} = argmax_v Σ_m log p_m(v | prompt, y_<r, z_≤k) until that token begins a new word after z_k
    (``breaks(z_k, v)``) or z has ``max_tokens`` tokens; one batched forward per model and step over every beam of
    every output, each from its output's cached prefix. Returns per output its spans (r, e, z), those equal to
    y[r:e] left out."""
    flat = [(i, r, e, a) for i, beams in enumerate(starts) for r, e, a in beams]
    if not flat:
        return [[] for _ in starts]
    grown: list[list[int]] = [[a] for _, _, _, a in flat]
    done = [False] * len(flat)
    caches: list[Any] = [None] * len(views)
    masks: list[torch.Tensor] = [torch.zeros(0)] * len(views)
    for step in range(max_tokens - 1):
        joint = None
        for m, (context, scored) in enumerate(views):
            prefix = [len(scored[i].prompt) + r for i, r, _, _ in flat]
            if caches[m] is None:
                caches[m], masks[m] = _row_cache(scored, [i for i, *_ in flat], prefix)
            masks[m] = torch.cat([masks[m], torch.ones((len(flat), 1), dtype=torch.long)], dim=1)
            with context() as cached:
                device = next(cached.model.parameters()).device
                inputs = {"input_ids": torch.tensor([[z[-1]] for z in grown]), "attention_mask": masks[m],
                          "position_ids": torch.tensor(prefix)[:, None] + step}  # fmt: skip
                with _autocast_pass(cached.model, device, precision):
                    out = cached.model(**{k: v.to(device) for k, v in inputs.items()}, past_key_values=caches[m])
            logp = out.logits[:, -1].float().log_softmax(dim=-1).cpu()
            joint = logp if joint is None else joint + logp
        assert joint is not None
        for j, token in enumerate(joint.argmax(dim=-1).tolist()):
            if not done[j]:
                done[j] = breaks(grown[j][-1], token)
                if not done[j]:
                    grown[j].append(token)
        if all(done):
            break
    out: list[list[Span]] = [[] for _ in starts]
    for (i, r, e, _), z in zip(flat, grown, strict=True):
        y = views[0][1][i].response.tolist()
        span = (r, e, tuple(z))
        if list(z) != y[r:e] and span not in out[i]:
            out[i].append(span)
    return out
