"""Per-sample projected gradient embeddings of a causal LM (docs/method.md).

For each sample i and tracked module m: ĝ_{i,m} = vec(Σ_t (P_out δ_t)(P_in x_t)ᵀ), where x_t is the
module input at token t and δ_t = ∂l_i/∂y_t the gradient of the sample's loss w.r.t. the module
output. The weights are frozen; the backward pass computes activation gradients only, from the loss
down to the earliest tracked module outputs. Because a sample's loss depends only on its own activations, the gradient
of Σ_i l_i w.r.t. sample i's activations is ∇l_i: one backward pass yields every per-sample gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dda_kernel.errors import EmptyResponseError, LayoutMismatchError, NonFiniteLossError
from dda_kernel.modules import tracked_modules
from dda_kernel.projection import LossReduction, Projector

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch: ``input_ids``, ``attention_mask``, ``labels`` all of shape (B, T).

    ``labels`` follows the Hugging Face convention: the token id where the loss counts (response
    tokens), ``IGNORE_INDEX`` elsewhere (prompt, padding); the shift happens inside the loss.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class EmbeddingBatch:
    """Result of :func:`embed_batch`: ``vectors`` (B, D), ``loss`` (B,), ``n_tokens`` (B,) response tokens."""

    vectors: torch.Tensor
    loss: torch.Tensor
    n_tokens: torch.Tensor


def pad_batch(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, side: str = "right") -> TokenBatch:
    """Pad [(input_ids, labels)] pairs of equal per-pair length into a :class:`TokenBatch`.

    ``side`` is ``"right"`` or ``"left"``; padded positions get mask 0 and label ``IGNORE_INDEX``.
    """
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    width = max(len(ids) for ids, _ in sequences)
    ids_rows, mask_rows, label_rows = [], [], []
    for ids, labels in sequences:
        if len(ids) != len(labels):
            raise ValueError(f"input_ids and labels differ in length ({len(ids)} vs {len(labels)})")
        pad = width - len(ids)
        fill_ids, fill_mask, fill_lab = [pad_id] * pad, [0] * pad, [IGNORE_INDEX] * pad
        ones = [1] * len(ids)
        if side == "right":
            ids_rows.append([*ids, *fill_ids])
            mask_rows.append([*ones, *fill_mask])
            label_rows.append([*labels, *fill_lab])
        else:
            ids_rows.append([*fill_ids, *ids])
            mask_rows.append([*fill_mask, *ones])
            label_rows.append([*fill_lab, *labels])
    ids_t, mask_t, labels_t = (torch.tensor(rows, dtype=torch.long) for rows in (ids_rows, mask_rows, label_rows))
    return TokenBatch(ids_t, mask_t, labels_t)


def per_sample_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: LossReduction = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Response-token negative log-likelihood per sample.

    logits: (B, T, V); labels: (B, T). Token t predicts labels[t + 1].
    Returns (loss (B,), n_tokens (B,)) with loss_i = Σ_t nll_{i,t} (÷ n_tokens_i for ``"mean"``).
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    nll = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.clamp(min=0).reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    n_tokens = mask.sum(dim=1)
    total = (nll * mask).sum(dim=1)
    loss = total / n_tokens.clamp(min=1) if reduction == "mean" else total
    return loss, n_tokens


def response_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """Number of loss-bearing tokens per sample (labels after the one-token shift), shape (B,)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def _name(names: Sequence[str] | None, i: int) -> str:
    return f"sample {names[i]!r}" if names is not None else f"sample #{i} of the batch"


def check_batch(batch: TokenBatch, names: Sequence[str] | None = None) -> None:
    """Raise :class:`EmptyResponseError` for a row with no response token to compute a loss on."""
    counts = response_token_counts(batch.labels)
    for i in torch.nonzero(counts == 0).flatten().tolist():
        raise EmptyResponseError(
            f"{_name(names, i)} has no response token after truncation: shorten its prompt or raise "
            "the maximum sequence length"
        )


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter and switch to eval mode; restore both on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype projected gradients are accumulated in: the parameters' dtype, at least float32."""
    return torch.promote_types(next(model.parameters()).dtype, torch.float32)


def _response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the loss counts: (mask (B, T−1) over predicting positions, row (R,) and target (R,) of each).

    Position t predicts ``labels[:, t + 1]``; R = number of response tokens in the batch.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    return mask, torch.nonzero(mask)[:, 0], labels[:, 1:][mask]


def _response_loss(
    logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, n_tokens: torch.Tensor, reduction: LossReduction,
    dtype: torch.dtype, reference_log_probs: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Per-sample loss from the logits of response positions only: logits (R, V) → loss (B,) in ``dtype``.

    loss_i = Σ_{r: rows[r] = i} w_r nll_r (÷ n_tokens_i for ``"mean"``); the log-softmax runs in ``dtype``.
    w_r = 1, or with ``reference_log_probs`` (R,) :func:`finetune_delta_weights` of the detached log-probs.
    """
    nll = nn.functional.cross_entropy(logits.to(dtype), targets, reduction="none")
    if reference_log_probs is not None:
        ref = reference_log_probs.to(nll.device, dtype)
        nll = nll * finetune_delta_weights(-nll.detach(), ref, rows, n_tokens.shape[0])
    total = torch.zeros(n_tokens.shape[0], dtype=dtype, device=nll.device).index_add(0, rows, nll)
    return total / n_tokens.clamp(min=1).to(dtype) if reduction == "mean" else total


def finetune_delta_weights(
    log_probs: torch.Tensor, reference_log_probs: torch.Tensor, rows: torch.Tensor, n_samples: int
) -> torch.Tensor:
    """Query-side debias weights of response tokens (docs/method.md), shape (R,).

    δ_r = max(0, log p_θt(y_r) − log p_θ0(y_r)) (``log_probs`` minus ``reference_log_probs``, both (R,));
    w_r = δ_r · n_i / Σ_{r' ∈ i} δ_{r'} for the sample i = ``rows[r]``: mean 1 over its response tokens, so
    uniform weights give the plain loss. A sample whose tokens fine-tuning raised none keeps w_r = 1.
    """
    delta = (log_probs - reference_log_probs).clamp(min=0)
    zeros = torch.zeros(n_samples, dtype=delta.dtype, device=delta.device)
    total = zeros.index_add(0, rows, delta)
    count = torch.zeros_like(zeros).index_add(0, rows, torch.ones_like(delta))
    raised = total[rows] > 0
    return torch.where(raised, delta * count[rows] / total[rows].clamp(min=torch.finfo(delta.dtype).tiny), 1.0)


@torch.no_grad()
def response_log_probs(model: nn.Module, batch: TokenBatch, precision: torch.dtype | None = None) -> torch.Tensor:
    """log p(y_r) of every response token of ``batch`` (R,) in the accumulation dtype (:func:`accumulation_dtype`),
    in row-major order (sample, then position): the order :func:`embed_batch` takes ``reference_log_probs`` in."""
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.labels))
    where, _, targets = _response_positions(labels)
    position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    with _frozen_eval(model), autocast_to(device, precision):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    picked = logits[:, :-1][where].to(accumulation_dtype(model)).log_softmax(dim=-1)
    chosen: torch.Tensor = picked.gather(1, targets[:, None])[:, 0]
    return chosen


def autocast_to(device: torch.device, precision: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``precision`` (e.g. bfloat16) on ``device``; no autocast when ``precision`` is None."""
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision)


def embed_batch(
    model: nn.Module,
    batch: TokenBatch,
    projector: Projector,
    names: Sequence[str] | None = None,
    precision: torch.dtype | None = None,
    reference_log_probs: torch.Tensor | None = None,
) -> EmbeddingBatch:
    """Projected per-sample gradients of the response loss for every sample of ``batch``.

    ``reference_log_probs`` (R,) — log p_θ0 of the response tokens (:func:`response_log_probs` of the base
    model) — weights the loss's tokens by :func:`finetune_delta_weights` (the query-side debias); the returned
    ``loss`` is then the weighted one.

    model: a causal LM taking ``input_ids``, ``attention_mask``, ``position_ids`` and returning
    ``.logits``. Position ids are derived from the mask, so left and right padding give the same result.
    ``precision`` (e.g. ``torch.bfloat16``) runs the forward under autocast, and with it the backward;
    module inputs and output gradients are cast to the accumulation dtype (:func:`accumulation_dtype`,
    float32 for a float32 or 16-bit model) before they are projected and summed over tokens.

    Work is spent only where the result needs it:
    - the output head sees the hidden states of response positions only (R rows, not B × T);
    - the backward starts at the loss and stops at the earliest tracked module outputs: nothing below
      them requires grad, so layers before the first tracked one keep no activations for backward.

    Returns vectors (B, D) in the accumulation dtype with D = ``projector.layout.dim``. ``names`` label
    samples in error messages.
    """
    check_batch(batch, names)
    layout = projector.layout
    modules = tracked_modules(model, layout.spec)
    if [(n, a, b) for n, _, a, b in modules] != [(s.name, s.d_in, s.d_out) for s in layout.slots]:
        raise LayoutMismatchError(
            f"model modules do not match projection layout {layout.fingerprint}: rebuild the layout for this model"
        )
    device = next(model.parameters()).device
    acc = accumulation_dtype(model)
    ids, mask, labels = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.labels))
    where, rows, targets = _response_positions(labels)
    n_tokens = where.sum(dim=1)
    # Slot j of the layout is module j: inputs and outputs are kept by slot, never by execution order
    # (a model may run its modules in another order than it registers them).
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    fired = [0] * len(modules)

    def capture(index: int) -> Any:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            fired[index] += 1
            with torch.no_grad(), torch.autocast(device.type, enabled=False):  # project in ``acc``
                x = args[0].detach().to(acc)
                p_in = projector.p_in[index]
                inputs[index] = x if p_in is None else x @ p_in.to(x.device, acc).T
            if not out.requires_grad:  # nothing tracked upstream: the backward stops here
                out.requires_grad_(True)
            outputs[index] = out

        return hook

    handles = [m.register_forward_hook(capture(j)) for j, (_, m, _, _) in enumerate(modules)]
    head = _untracked_head(model, modules)
    if head is not None:
        handles.append(head.register_forward_pre_hook(lambda _m, args: (args[0][:, :-1][where],)))
    try:
        with _frozen_eval(model), torch.enable_grad():
            position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
            with autocast_to(device, precision):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
            if head is None:
                logits = logits[:, :-1][where]
            loss = _response_loss(logits, rows, targets, n_tokens, layout.spec.loss_reduction, acc, reference_log_probs)
            _check_finite(loss, names)
            _check_fired_once(modules, fired)
            order = range(len(modules))
            deltas = torch.autograd.grad(loss.sum(), [outputs[j] for j in order], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    vectors = _assemble(projector, [inputs[j] for j in order], [outputs[j] for j in order], deltas, acc)
    _check_finite(vectors.sum(dim=1), names, what="gradient")
    return EmbeddingBatch(vectors, loss.detach(), n_tokens)


def _untracked_head(model: nn.Module, modules: Sequence[tuple[str, nn.Module, int, int]]) -> nn.Module | None:
    """The output head, when it can be fed response positions only: it exists and is not itself tracked."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or any(m is head for _, m, _, _ in modules):
        return None
    return head


def _check_fired_once(modules: Sequence[tuple[str, nn.Module, int, int]], fired: Sequence[int]) -> None:
    """Raise :class:`LayoutMismatchError` naming the first tracked module that did not run exactly once."""
    for (name, _, _, _), count in zip(modules, fired, strict=True):
        if count != 1:
            raise LayoutMismatchError(
                f"tracked module {name} ran {count} times in one forward pass (exactly once is needed): "
                "exclude shared or unused modules with the projection spec's exclude patterns"
            )


def _check_finite(values: torch.Tensor, names: Sequence[str] | None, what: str = "loss") -> None:
    """Raise :class:`NonFiniteLossError` naming the first sample whose ``values`` entry is NaN/inf."""
    bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
    if bad:
        raise NonFiniteLossError(
            f"{_name(names, bad[0])} has a non-finite {what} ({values[bad[0]].item()}): check the "
            "checkpoint weights and the sample's tokens"
        )


def _assemble(
    projector: Projector,
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    deltas: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Concatenate ĝ_{i,m} = vec(Σ_t δ̃_t x̃_tᵀ) over modules in ``dtype``: (B, T, k_out) × (B, T, k_in) → (B, D)."""
    parts = []
    for j, (x_proj, out, delta) in enumerate(zip(inputs, outputs, deltas, strict=True)):
        d = torch.zeros_like(out, dtype=dtype) if delta is None else delta.to(dtype)
        p_out = projector.p_out[j]
        d_proj = d if p_out is None else d @ p_out.to(d.device, dtype).T
        batch = d.shape[0]
        d_flat = d_proj.reshape(batch, -1, d_proj.shape[-1])
        x_flat = x_proj.reshape(batch, -1, x_proj.shape[-1])
        g = torch.einsum("btk,btj->bkj", d_flat, x_flat)
        parts.append(g.reshape(g.shape[0], -1))
    return torch.cat(parts, dim=1)


def contrastive_query(hallucinated: torch.Tensor, corrected: torch.Tensor) -> torch.Tensor:
    """ĝ_q = ĝ(prompt, hallucinated) − ĝ(prompt, corrected), rows paired: (m, D), (m, D) → (m, D).

    Traces what made the model prefer the error over the correction (docs/method.md).
    """
    if hallucinated.shape != corrected.shape:
        raise ValueError(
            f"hallucinated {tuple(hallucinated.shape)} and corrected {tuple(corrected.shape)} embeddings "
            "differ in shape: pair every hallucinated output with one corrected output"
        )
    return hallucinated - corrected
