"""Indexing tasks: embed training samples and queries at the base model and at each checkpoint.

Every function takes small references (a data folder, a model reference, ids) and writes to the
store by idempotent upserts, so any of them can be retried or re-run after a crash. A checkpoint is
*indexed* once its ``checkpoints`` row exists; that row is written last, after every registered
sample's embedding is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dda_kernel import (
    EmbeddingLayout,
    build_projector,
    embed_batch,
    layout_for,
    pad_batch,
)
from storage.faults import fault_point
from storage.registry import read_checkpoints, write_checkpoint
from storage.samples import read_samples, sample_ids, set_token_counts
from storage.store import LineageStore, utcnow, where_equal, where_in
from storage.vectors import embedded_sample_ids, write_embeddings
from tasks.checkpoints import CheckpointError, CheckpointInfo, fingerprint_files, fingerprint_paths, read_trainer_state
from tasks.config import PipelineConfig
from tasks.finalize import finalize_checkpoint, layout_record, stored_layout
from tasks.models import compute_precision, context_length, model_for
from tasks.tokenize import encode_pair

BASE_ID = "base"


@dataclass(frozen=True)
class CheckpointPlan:
    """What indexing one checkpoint (or the base model) still has to do: the shards of missing samples."""

    checkpoint_id: str
    run_id: str
    role: str
    path: str
    fingerprint: str
    step: int
    epoch: float | None
    learning_rate: float | None
    shards: tuple[tuple[str, ...], ...]
    already_indexed: bool


def checkpoint_id(run_id: str, info: CheckpointInfo | None) -> str:
    """``base`` for the base model, ``<run_id>/checkpoint-<step>`` for a fine-tuning checkpoint."""
    return BASE_ID if info is None else f"{run_id}/{info.name}"


def model_layout(base_reference: str, config: PipelineConfig) -> EmbeddingLayout:
    """The projection layout of ``config.projection`` on the base model (shared by all its checkpoints)."""
    with model_for(base_reference, None, config.device) as cached:
        return layout_for(cached.model, config.projection)


def open_store(data_dir: str | Path, base_reference: str, config: PipelineConfig) -> LineageStore:
    """The store of ``data_dir`` opened for writing with the base model's projection fingerprint and dim.

    A store that records its layout gives it without loading a model (a wrong projection is refused by
    fingerprint, a model that does not fit the layout by the embedder); a new store asks the base model.
    """
    root = Path(data_dir) / "store"
    existing = LineageStore.open(root)
    if existing.meta is not None and existing.meta.layout:
        layout = stored_layout(existing, config.projection)
    else:
        layout = model_layout(base_reference, config)
    return LineageStore.open(root, layout.fingerprint, layout.dim, layout_record(layout))


def plan_checkpoint(
    data_dir: str | Path, base_reference: str, run_id: str, info: CheckpointInfo | None, config: PipelineConfig
) -> CheckpointPlan:
    """Fingerprint a checkpoint (``info`` None: the base model), check it fits the store, shard its missing samples.

    Raises :class:`CheckpointError` for an incomplete checkpoint, a base model or checkpoint whose files
    changed since they were indexed, or a second run in one data folder.
    """
    store = open_store(data_dir, base_reference, config)
    cid = checkpoint_id(run_id, info)
    if info is not None and info.status != "complete":
        raise CheckpointError(f"checkpoint {info.path} is {info.status}: {info.problem}")
    path = base_reference if info is None else info.path
    fingerprint = _base_fingerprint(base_reference) if info is None else fingerprint_files(info.path)
    known = {r["checkpoint_id"]: r for r in read_checkpoints(store)}
    other_runs = {r["run_id"] for r in known.values() if r["role"] == "finetuned"} - {run_id}
    if info is not None and other_runs:
        raise CheckpointError(
            f"data folder {data_dir} tracks run {sorted(other_runs)[0]!r}; index run {run_id!r} into another --data-dir"
        )
    if cid in known and known[cid]["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{'base model' if info is None else 'checkpoint'} {path} changed since it was indexed (fingerprint "
            f"{known[cid]['fingerprint']} → {fingerprint}): index the new files into another --data-dir"
        )
    missing = sorted(set(sample_ids(store)) - embedded_sample_ids(store, cid))
    size = max(1, config.shard_size)
    shards = tuple(tuple(missing[i : i + size]) for i in range(0, len(missing), size))
    state = read_trainer_state(info.path, info.step) if info is not None else None
    return CheckpointPlan(
        cid, run_id if info is not None else "", "base" if info is None else "finetuned", path, fingerprint,
        0 if info is None else info.step, state.epoch if state else None, state.learning_rate if state else None,
        shards, cid in known,
    )  # fmt: skip


def _base_fingerprint(reference: str) -> str:
    path = Path(reference)
    if path.is_dir():
        return fingerprint_files(path)
    return fingerprint_paths([path]) if path.is_file() else f"hub:{reference}"


def _encode(tokenizer: Any, rows: Sequence[tuple[Any, ...]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of rows (name, prompt, response) or (name, prompt, response, response ids): with ids,
    the prompt's tokens are those of (prompt, response) and the response's are the given ids (a derived
    correction is embedded on exactly the token sequence that was scored)."""
    out = []
    for name, prompt, response, *given in rows:
        ids, labels = encode_pair(tokenizer, prompt, response, max_length, name=name)
        if given and given[0]:
            n_prompt = sum(1 for x in labels if x < 0)
            edited = [int(t) for t in given[0]]
            ids, labels = ids[:n_prompt] + edited, labels[:n_prompt] + edited
        out.append((ids, labels))
    return out


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def token_batches(lengths: Sequence[int], max_tokens: int, max_samples: int) -> list[list[int]]:
    """Group row indices into batches by token budget: longest first (ties by index), each batch's padded
    size (rows × its longest length) ≤ ``max_tokens`` and at most ``max_samples`` rows.

    A row longer than ``max_tokens`` gets a batch of its own. Peak memory of a pass is bounded by the
    budget whatever the lengths; grouping similar lengths wastes little on padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if current and len(current) < max_samples and (len(current) + 1) * lengths[current[0]] <= max_tokens:
            current.append(i)
        else:
            batches.append([i])
    return batches


@dataclass(frozen=True)
class Embedded:
    """Embeddings of rows in their input order: ``vectors`` (n, D) float32, ``loss`` (n,), ``n_tokens`` (n,)."""

    vectors: np.ndarray
    loss: np.ndarray
    n_tokens: np.ndarray


def embed_rows(
    cached: Any, rows: Sequence[tuple[str, str, str]], config: PipelineConfig, desc: str | None,
    references: Sequence[torch.Tensor] | None = None,
) -> Embedded:  # fmt: skip
    """Embed ``rows`` = [(name, prompt, response)] in token-budget batches (:func:`token_batches`) at the
    configured precision; results come back in the order of ``rows`` whatever the batching.

    ``references``: per row, log p_θ0 of its response tokens (:func:`base_log_probs`): the loss's tokens are
    then weighted by the query-side debias (:func:`dda_kernel.finetune_delta_weights`)."""
    model, tokenizer = cached.model, cached.tokenizer
    max_length = min(config.max_length, context_length(model))
    projector = build_projector(layout_for(model, config.projection), torch.float32, config.device)
    precision = compute_precision(config.precision, config.device)
    encoded = _encode(tokenizer, rows, max_length)
    batches = token_batches([len(ids) for ids, _ in encoded], config.max_tokens, config.batch_size)
    vectors = np.zeros((len(rows), projector.layout.dim), dtype=np.float32)
    loss, n_tokens = np.zeros(len(rows)), np.zeros(len(rows), dtype=np.int64)
    bar = tqdm(total=len(rows), desc=desc, unit="sample", disable=desc is None or not config.progress)
    for index in batches:
        batch = pad_batch([encoded[i] for i in index], pad_id=_pad_id(tokenizer))
        ref = torch.cat([references[i] for i in index]) if references is not None else None
        names = [rows[i][0] for i in index]
        out = embed_batch(model, batch, projector, names=names, precision=precision, reference_log_probs=ref)
        vectors[index] = out.vectors.detach().float().cpu().numpy()
        loss[index] = out.loss.detach().double().cpu().numpy()
        n_tokens[index] = out.n_tokens.cpu().numpy()
        bar.update(len(index))
    bar.close()
    return Embedded(vectors, loss, n_tokens)


def embed_shard(
    data_dir: str | Path,
    base_reference: str,
    plan: CheckpointPlan,
    shard: Sequence[str],
    config: PipelineConfig,
) -> int:
    """Embed the samples ``shard`` at the plan's checkpoint (skipping stored ones); returns rows written.

    Writes once per shard (one Lance commit, one fragment): a killed run resumes at the first shard not written.
    """
    store = open_store(data_dir, base_reference, config)
    todo = sorted(set(shard) - embedded_sample_ids(store, plan.checkpoint_id))
    if not todo:
        return 0
    texts = read_samples(store, todo)
    rows = [(f"sample {sid!r}", *texts[sid]) for sid in todo]
    checkpoint = None if plan.role == "base" else plan.path
    with model_for(base_reference, checkpoint, config.device) as cached:
        out = embed_rows(cached, rows, config, desc=f"{plan.checkpoint_id}")
    write_embeddings(store, plan.checkpoint_id, todo, out.vectors, out.loss, out.n_tokens)
    fault_point("embedding-written")
    return len(todo)


def finish_checkpoint(data_dir: str | Path, base_reference: str, plan: CheckpointPlan, config: PipelineConfig) -> str:
    """Finalize the checkpoint (:func:`tasks.finalize.finalize_checkpoint`), compact the tables it wrote, then mark
    it indexed (its ``checkpoints`` row, a version tag); fill token counts for the base.

    Raises :class:`CheckpointError` if a registered sample still lacks its embedding.
    """
    store = open_store(data_dir, base_reference, config)
    missing = set(sample_ids(store)) - embedded_sample_ids(store, plan.checkpoint_id)
    if missing:
        raise CheckpointError(
            f"{len(missing)} samples (e.g. {sorted(missing)[0]!r}) have no embedding at {plan.checkpoint_id}: "
            "re-run the indexing"
        )
    if plan.role == "base":
        _fill_token_counts(store)
    row = {
        "checkpoint_id": plan.checkpoint_id, "run_id": plan.run_id, "role": plan.role, "step": plan.step,
        "epoch": plan.epoch, "learning_rate": plan.learning_rate, "path": plan.path, "fingerprint": plan.fingerprint,
        "projection_fingerprint": store.meta.projection_fingerprint if store.meta else "", "indexed_at": utcnow(),
    }  # fmt: skip
    finalize_checkpoint(store, row, stored_layout(store, config.projection))
    store.compact(("embeddings", "query_embeddings", "samples"))
    store.prune(("embeddings", "query_embeddings", "samples", "scores", "dda_state"))
    fault_point("before-checkpoint-row")
    write_checkpoint(store, row)
    return store.tag_checkpoint(plan.checkpoint_id)


def _fill_token_counts(store: LineageStore) -> None:
    unknown = store.read("samples", ["sample_id"], "n_tokens IS NULL")["sample_id"].to_pylist()
    if not unknown:
        return
    where = f"{where_equal(checkpoint_id=BASE_ID)} AND {where_in('sample_id', unknown)}"
    table = store.read("embeddings", ["sample_id", "n_tokens"], where)
    set_token_counts(store, dict(zip(table["sample_id"].to_pylist(), table["n_tokens"].to_pylist(), strict=True)))


def indexed_checkpoints(data_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of the indexed checkpoints: the base model first, then fine-tuning checkpoints by step."""
    return read_checkpoints(LineageStore.open(Path(data_dir) / "store"))
