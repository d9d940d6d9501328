"""Indexing tasks: embed training samples and queries at the base model and at each checkpoint.

Every function takes small references (a data folder, a model reference, ids) and writes to the
store by idempotent upserts, so any of them can be retried or re-run after a crash. A checkpoint is
*indexed* once its ``checkpoints`` row exists; that row is written last, after every registered
sample's embedding is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dda_kernel import (
    IGNORE_INDEX,
    EmbeddingLayout,
    build_projector,
    embed_batch,
    layout_for,
    pad_batch,
    response_log_probs,
)
from storage.faults import fault_point
from storage.registry import read_checkpoints, read_derived_corrections, write_checkpoint, write_derived_corrections
from storage.samples import group_members, read_samples, sample_ids, set_token_counts
from storage.store import LineageStore, utcnow, where_equal, where_in
from storage.vectors import embedded_sample_ids, read_query_embeddings, write_embeddings, write_query_embeddings
from tasks.checkpoints import CheckpointError, CheckpointInfo, fingerprint_files, fingerprint_paths, read_trainer_state
from tasks.config import PipelineConfig
from tasks.counterfactual import Derived, derive_corrections
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


_BASE_LOG_PROBS: dict[tuple[str, str, str], torch.Tensor] = {}  # (base, prompt, response) → log p_θ0 of its tokens
_BASE_LOG_PROBS_MAX = 100_000


def base_log_probs(
    base_reference: str, rows: Sequence[tuple[str, str, str]], config: PipelineConfig
) -> list[torch.Tensor]:
    """log p_θ0(y_t) of each row's response tokens, (n_i,) per row of ``rows`` = [(name, prompt, response)].

    Computed once per process and text (a forward pass of the base model, which is loaded only when a row
    is new), so every checkpoint of one attribution reuses them.
    """
    keys = [(base_reference, p, r) for _, p, r in rows]
    new = sorted({i for i, k in enumerate(keys) if k not in _BASE_LOG_PROBS}, key=lambda i: keys[i])
    if new:
        if len(_BASE_LOG_PROBS) + len(new) > _BASE_LOG_PROBS_MAX:
            _BASE_LOG_PROBS.clear()
        with model_for(base_reference, None, config.device) as cached:
            max_length = min(config.max_length, context_length(cached.model))
            encoded = _encode(cached.tokenizer, [rows[i] for i in new], max_length)
            precision = compute_precision(config.precision, config.device)
            for index in token_batches([len(ids) for ids, _ in encoded], config.max_tokens, config.batch_size):
                batch = pad_batch([encoded[j] for j in index], pad_id=_pad_id(cached.tokenizer))
                flat = response_log_probs(cached.model, batch, precision).cpu()
                counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
                for j, part in zip(index, torch.split(flat, counts), strict=True):
                    _BASE_LOG_PROBS[keys[new[j]]] = part
    return [_BASE_LOG_PROBS[k] for k in keys]


DELTA = ":delta"  # suffix of query vectors embedded with the query-side debias token weights
QUERY_KINDS = ("plain", "contrastive", "counterfactual")


def effective_kind(corrected: bool, config: PipelineConfig) -> str:
    """The query kind a query is scored as: ``query_kind`` when it names one, else (``auto``) 'contrastive' with a
    correction, 'counterfactual' without one when ``scoring.counterfactual`` is on, else 'plain'."""
    return config.scoring.kind_for(corrected)


def stored_query_kind(kind: str, config: PipelineConfig, checkpoint_id: str) -> str:
    """The ``query_embeddings.kind`` that holds ``kind`` (one of :data:`QUERY_KINDS`) for this configuration:
    ``<kind>:delta`` at a fine-tuned checkpoint when the query weighting applies to the kind
    (``finetune_delta``: plain and contrastive; ``finetune_delta_plain``: plain queries only); at the base model the
    weights are uniform, so the uniform vectors serve. Counterfactual contrasts always use uniform weights; with
    ``scoring.min_edit_gain`` set they are stored as ``counterfactual>{gain}`` (plus the plain kind's ``:delta``
    where the plain kind has it), since an output whose edit gains no more is the plain query there."""
    weighting = config.scoring.query_weighting
    min_gain = config.scoring.min_edit_gain
    if kind == "counterfactual" and min_gain is not None:
        return f"{kind}>{min_gain!r}" + stored_query_kind("plain", config, checkpoint_id).removeprefix("plain")
    applies = (weighting == "finetune_delta" and kind != "counterfactual") or (
        weighting == "finetune_delta_plain" and kind == "plain"
    )
    return f"{kind}{DELTA}" if applies and checkpoint_id != BASE_ID else kind


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


def embed_queries(
    data_dir: str | Path,
    base_reference: str,
    checkpoint: dict[str, Any],
    query_ids: Sequence[str],
    config: PipelineConfig,
) -> int:
    """Store the plain (and, with a correction, contrastive) query embeddings at an indexed checkpoint.

    plain ĝ_q = ĝ(prompt, response); contrastive ĝ_q = ĝ(prompt, response) − ĝ(prompt, corrected); a query
    group's ĝ = the mean of its members' ĝ of the same kind (members are embedded first when missing).
    Queries already embedded there are skipped; returns the number embedded now (groups included).
    """
    cid = checkpoint["checkpoint_id"]
    done = _embedded_queries(LineageStore.open(Path(data_dir) / "store"), cid, query_ids, config)
    todo = sorted(set(query_ids) - done)
    if not todo:
        return 0  # no model is loaded when every query is embedded here
    store = open_store(data_dir, base_reference, config)
    groups = group_members(store, todo)
    members = {m for ms in groups.values() for m in ms}
    singles = sorted((set(todo) - set(groups)) | (members - done))
    if singles:
        _embed_outputs(store, base_reference, checkpoint, singles, config)
    for gid, ms in sorted(groups.items()):
        _embed_group(store, cid, gid, ms, config)
    return len(todo)


def _embedded_queries(
    store: LineageStore, checkpoint_id: str, query_ids: Sequence[str], config: PipelineConfig
) -> set[str]:
    """Those of ``query_ids`` whose vectors this configuration reads at the checkpoint are all stored: the plain
    kind, the contrastive kind where the query has a correction, and the counterfactual kind where the query is
    scored as one (other weightings store other kinds)."""
    kinds = {k: stored_query_kind(k, config, checkpoint_id) for k in QUERY_KINDS}
    where = f"{where_equal(checkpoint_id=checkpoint_id)} AND {where_in('kind', sorted(set(kinds.values())))}"
    table = store.read("query_embeddings", ["query_id", "kind"], where)
    have: dict[str, set[str]] = {}
    for q, k in zip(table["query_id"].to_pylist(), table["kind"].to_pylist(), strict=True):
        have.setdefault(k, set()).add(q)
    plain = have.get(kinds["plain"], set()) & set(query_ids)
    if not plain:
        return set()
    rows = store.read("queries", ["query_id", "corrected"], where_in("query_id", sorted(plain))).to_pylist()
    done = set()
    for r in rows:
        needs = {"contrastive"} if r["corrected"] else set()
        if effective_kind(bool(r["corrected"]), config) == "counterfactual":
            needs.add("counterfactual")
        if all(r["query_id"] in have.get(kinds[k], set()) for k in needs):
            done.add(r["query_id"])
    return done


def edit_used(derived: Derived | None, config: PipelineConfig) -> bool:
    """Whether the counterfactual query contrasts with the derived edit: there is one and its gain exceeds
    ``scoring.min_edit_gain`` (None: any edit). Otherwise θ_0 and θ_t prefer the output to every single-token
    edit, the edit names nothing fine-tuning changed, and the checkpoint traces the plain query."""
    if derived is None:
        return False
    threshold = config.scoring.min_edit_gain
    return threshold is None or derived.gain > threshold


def _as_derived(row: dict[str, Any]) -> Derived:
    """A stored ``derived_corrections`` row as the :class:`~tasks.counterfactual.Derived` it recorded."""
    ids = tuple(row.get("response_ids") or ())  # stores from before the column: the text is re-encoded
    return Derived(row["response"], int(row["position"]), row["token"], row["replacement"], float(row["gain"]), ids)


def _correction_row(query: dict[str, Any], derived: Derived) -> tuple[Any, ...]:
    """The row that embeds a derived correction: from its token ids where stored, else from its text."""
    name = f"query {query['query_id']!r} (derived correction)"
    if derived.response_ids:
        return name, query["prompt"], query["response"], derived.response_ids
    return name, query["prompt"], derived.response


def _embed_outputs(
    store: LineageStore, base_reference: str, checkpoint: dict[str, Any], query_ids: list[str], config: PipelineConfig
) -> None:
    """Embed registered outputs at ``checkpoint`` with one loaded model: both kinds in one pass when they share
    a token weighting (:func:`stored_query_kind`), else one pass per weighting. Outputs scored as counterfactual
    queries get their derived correction at this checkpoint first — the one ``derived_corrections`` holds (one per
    output and checkpoint: scorings that differ in other settings reuse it, so every vector agrees with the audit
    trail), else derived now (:func:`tasks.counterfactual.derive_corrections`) and kept there — and
    ĝ(prompt, y) − ĝ(prompt, y'), uniform weights; an
    output whose edit is not used (:func:`edit_used`) keeps its plain vector (ĝ(prompt, y), uniform weights, with
    ``min_edit_gain`` None)."""
    rows = store.read("queries", ["query_id", "prompt", "response", "corrected"], where_in("query_id", query_ids))
    queries = sorted(rows.to_pylist(), key=lambda r: r["query_id"])
    path = None if checkpoint["role"] == "base" else checkpoint["path"]
    fixed_rows = [q for q in queries if q["corrected"]]
    index = {q["query_id"]: i for i, q in enumerate(queries)}
    plain_texts = [(f"query {q['query_id']!r}", q["prompt"], q["response"]) for q in queries]
    fixed_texts = [(f"query {q['query_id']!r} (corrected)", q["prompt"], q["corrected"]) for q in fixed_rows]
    cf_rows = [q for q in queries if effective_kind(bool(q["corrected"]), config) == "counterfactual"]
    stored = read_derived_corrections(store, checkpoint["checkpoint_id"], [q["query_id"] for q in cf_rows])
    known: dict[str, Derived | None] = {qid: _as_derived(row) for qid, row in stored.items()}
    todo = [q for q in cf_rows if q["query_id"] not in known]
    fresh = dict(zip((q["query_id"] for q in todo), derive_corrections(
        base_reference, path, [plain_texts[index[q["query_id"]]] for q in todo], config), strict=True))  # fmt: skip
    known.update(fresh)
    derived = [known[q["query_id"]] for q in cf_rows]
    used = [edit_used(d, config) for d in derived]
    cf_texts = [_correction_row(q, d) for q, d, u in zip(cf_rows, derived, used, strict=True) if d is not None and u]
    cid = checkpoint["checkpoint_id"]
    plain_kind, contrast_kind = (stored_query_kind(k, config, cid) for k in ("plain", "contrastive"))
    plain_w, contrast_w = plain_kind.endswith(DELTA), contrast_kind.endswith(DELTA)
    fallback_w = plain_w and config.scoring.min_edit_gain is not None  # the weighting of an unused edit's vector
    uniform_needed = bool(cf_texts) or (not fallback_w and not all(used))
    weightings = {plain_w} | ({contrast_w} if fixed_rows else set()) | ({False} if uniform_needed else set())
    refs = base_log_probs(base_reference, plain_texts + fixed_texts, config) if True in weightings else None
    out: dict[bool, np.ndarray] = {}
    with model_for(base_reference, path, config.device) as cached:
        for weighted in sorted(weightings):
            with_fixed = bool(fixed_rows) and contrast_w == weighted
            texts = plain_texts + (fixed_texts if with_fixed else []) + ([] if weighted else cf_texts)
            chosen = refs[: len(texts)] if weighted and refs is not None else None  # refs: plain texts first
            out[weighted] = embed_rows(cached, texts, config, None, chosen).vectors
    if cid == BASE_ID and config.scoring.query_weighting != "uniform":  # θ_0 is still loaded: keep its log-probs
        base_log_probs(base_reference, plain_texts + fixed_texts, config)  # for every later checkpoint
    if cf_rows:
        uniform, fallback = out.get(False), out[fallback_w]
        tail = iter(uniform[len(uniform) - len(cf_texts) :] if cf_texts else [])
        contrasts = [uniform[index[q["query_id"]]] - next(tail) if u else fallback[index[q["query_id"]]]
                     for q, u in zip(cf_rows, used, strict=True)]  # fmt: skip
        cf_kind = stored_query_kind("counterfactual", config, cid)
        write_query_embeddings(store, cid, cf_kind, [q["query_id"] for q in cf_rows], np.stack(contrasts))
        edits = [{"query_id": q, **asdict(d), "response_ids": list(d.response_ids)} for q, d in fresh.items() if d]
        write_derived_corrections(store, cid, edits)
    if fixed_rows:
        both = out[contrast_w]
        plain, fixed = both[: len(queries)], both[len(queries) : len(queries) + len(fixed_rows)]
        contrast = plain[[index[q["query_id"]] for q in fixed_rows]] - fixed
        write_query_embeddings(store, cid, contrast_kind, [q["query_id"] for q in fixed_rows], contrast)
    write_query_embeddings(store, cid, plain_kind, [q["query_id"] for q in queries], out[plain_w][: len(queries)])


def _embed_group(
    store: LineageStore, checkpoint_id: str, group_id: str, members: list[str], config: PipelineConfig
) -> None:
    """ĝ_group = (1/|G|) Σ_{q∈G} ĝ_q per kind (float64 mean of the stored float32 vectors); contrastive only
    when every member has a correction; counterfactual when the group is scored as one, each member contributing
    the vector it is itself scored by (its contrastive one where it has a correction)."""
    rows = store.read("queries", ["query_id", "corrected"], where_in("query_id", members)).to_pylist()
    corrected = {r["query_id"]: bool(r["corrected"]) for r in rows}
    kinds = ["plain", "contrastive"] if all(corrected.values()) else ["plain"]
    if effective_kind(all(corrected.values()), config) == "counterfactual":
        kinds.append("counterfactual")
    for kind in reversed(kinds):  # plain last: its row marks the group embedded here
        name = stored_query_kind(kind, config, checkpoint_id)
        if kind == "counterfactual":
            own = {m: stored_query_kind(effective_kind(corrected[m], config), config, checkpoint_id) for m in members}
            vectors = np.stack([read_query_embeddings(store, checkpoint_id, own[m], [m])[0] for m in members])
        else:
            vectors = read_query_embeddings(store, checkpoint_id, name, members)
        write_query_embeddings(
            store, checkpoint_id, name, [group_id], vectors.astype(np.float64).mean(axis=0, keepdims=True)
        )


def check_lengths(base_reference: str, rows: Sequence[tuple[str, str, str]], config: PipelineConfig) -> int:
    """Raise :class:`~tasks.tokenize.SequenceTooLongError` naming the first (name, prompt, response) row that
    exceeds the context; nothing is truncated. Returns the longest length in tokens."""
    with model_for(base_reference, None, config.device) as cached:
        max_length = min(config.max_length, context_length(cached.model))
        return max((len(ids) for ids, _ in _encode(cached.tokenizer, rows, max_length)), default=0)
