"""The output-tracing path: derive corrections and embed registered outputs at every indexed model state.

Apart from sample indexing (:mod:`tasks.indexing`). For a batch of outputs, :func:`plan_tracing` lists per model
state (the base model first, then the checkpoints by step) the outputs and query groups still to embed there —
a value a test can inspect before anything runs. :func:`embed_queries` does one state's work with that state
loaded once: the counterfactual corrections are derived (:mod:`tasks.counterfactual`; the base model stays in
memory, :func:`tasks.models.model_for`), then every output is embedded in one pass per token weighting. An
output stores only the vector its scoring reads (:mod:`tasks.kinds`): contrastive ĝ(y) − ĝ(y_corrected),
counterfactual ĝ(y) − ĝ(y'_t) (or the plain query where no edit gains), or plain ĝ(y). Reads go by key. No Prefect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dda_kernel import IGNORE_INDEX, pad_batch, response_log_probs
from storage.registry import read_derived_corrections, write_derived_corrections
from storage.samples import group_members
from storage.schemas import BASE_CHECKPOINT as BASE_ID
from storage.store import LineageStore, where_equal, where_in
from storage.vectors import read_query_embeddings, write_query_embeddings
from tasks.config import PipelineConfig
from tasks.counterfactual import Derived, derive_corrections
from tasks.indexing import _encode, _pad_id, embed_rows, indexed_checkpoints, open_store, token_batches
from tasks.kinds import Kind, kind_of, stored_kind
from tasks.models import compute_precision, context_length, model_for

_BASE_LOG_PROBS: dict[tuple[str, str, str], torch.Tensor] = {}  # (base, prompt, response) → log p_θ0 of its tokens
_BASE_LOG_PROBS_MAX = 100_000


@dataclass(frozen=True)
class StateWork:
    """What tracing still has to do at one model state: embed ``outputs`` (derivations included), then form
    ``groups`` from their members' vectors. ``path`` None: the base model."""

    checkpoint_id: str
    path: str | None
    outputs: tuple[str, ...]
    groups: tuple[str, ...]


def plan_tracing(data_dir: str | Path, query_ids: Sequence[str], config: PipelineConfig) -> list[StateWork]:
    """Per indexed state, in order (base first), the outputs of ``query_ids`` (and the members of its groups) whose
    scored vector is not yet stored there; states with nothing to do are left out. No model is loaded."""
    store = LineageStore.open(Path(data_dir) / "store")
    groups = group_members(store, list(query_ids))
    members = sorted({m for ms in groups.values() for m in ms})
    plan = []
    for ckpt in indexed_checkpoints(data_dir):
        cid = ckpt["checkpoint_id"]
        done = embedded_queries(store, cid, sorted(set(query_ids) | set(members)), config)
        outputs = sorted((set(query_ids) - set(groups) - done) | (set(members) - done))
        todo_groups = sorted(set(groups) - done)
        if outputs or todo_groups:
            plan.append(StateWork(cid, None if ckpt["role"] == "base" else ckpt["path"], tuple(outputs),
                                  tuple(todo_groups)))  # fmt: skip
    return plan


def embedded_queries(
    store: LineageStore, checkpoint_id: str, query_ids: Sequence[str], config: PipelineConfig
) -> set[str]:
    """Those of ``query_ids`` whose scored vector (:func:`tasks.kinds.stored_kind` of the kind each is scored as)
    is stored at the checkpoint. Reads the ids asked only."""
    if not query_ids:
        return set()
    kinds = query_kinds_by_id(store, query_ids, config)
    names = {q: stored_kind(k, config, checkpoint_id).name for q, k in kinds.items()}
    where = f"{where_equal(checkpoint_id=checkpoint_id)} AND {where_in('query_id', sorted(names))}"
    table = store.read("query_embeddings", ["query_id", "kind"], where)
    have = set(zip(table["query_id"].to_pylist(), table["kind"].to_pylist(), strict=True))
    return {q for q, name in names.items() if (q, name) in have}


def query_kinds_by_id(store: LineageStore, query_ids: Sequence[str], config: PipelineConfig) -> dict[str, Kind]:
    """{query_id: the :class:`~tasks.kinds.Kind` it is scored as} for the registered ones of ``query_ids``."""
    rows = store.read("queries", ["query_id", "corrected"], where_in("query_id", list(query_ids))).to_pylist()
    return {r["query_id"]: kind_of(bool(r["corrected"]), config) for r in rows}


def embed_queries(
    data_dir: str | Path, base_reference: str, checkpoint: dict[str, Any], query_ids: Sequence[str],
    config: PipelineConfig,
) -> int:  # fmt: skip
    """Store the scored vectors of ``query_ids`` at an indexed checkpoint (skipping stored ones); a query group's
    vector is the mean of its members' (members are embedded first when missing). Returns the number embedded
    now (groups included); no model is loaded when every query is embedded there."""
    cid = checkpoint["checkpoint_id"]
    done = embedded_queries(LineageStore.open(Path(data_dir) / "store"), cid, query_ids, config)
    todo = sorted(set(query_ids) - done)
    if not todo:
        return 0
    store = open_store(data_dir, base_reference, config)
    groups = group_members(store, todo)
    members = sorted({m for ms in groups.values() for m in ms})
    member_done = embedded_queries(store, cid, members, config)
    singles = sorted((set(todo) - set(groups)) | (set(members) - member_done))
    if singles:
        _embed_outputs(store, base_reference, checkpoint, singles, config)
    for gid, ms in sorted(groups.items()):
        _embed_group(store, cid, gid, ms, config)
    return len(todo)


def edit_used(derived: Derived | None, config: PipelineConfig) -> bool:
    """Whether the counterfactual query contrasts with the derived edit: there is one and its gain exceeds
    ``scoring.min_edit_gain`` (None: any edit). Otherwise θ_0 and θ_t prefer the output to every candidate
    edit, the edit names nothing fine-tuning changed, and the checkpoint traces the plain query."""
    if derived is None or derived.gain_is_bound:  # a search stopped at a threshold names no edit to use
        return False
    threshold = config.scoring.min_edit_gain
    return threshold is None or derived.gain > threshold


def _as_derived(row: dict[str, Any]) -> Derived:
    """A stored ``derived_corrections`` row as the :class:`~tasks.counterfactual.Derived` it recorded."""
    ids = tuple(row.get("response_ids") or ())  # stores from before the column: the text is re-encoded
    bound = bool(row.get("gain_is_bound"))  # null before the column: every search ran to its argmax
    return Derived(row["response"], int(row["position"]), row["token"], row["replacement"], float(row["gain"]), ids,
                   bound)  # fmt: skip


def serves(derived: Derived, config: PipelineConfig) -> bool:
    """Whether a stored correction answers these settings: an argmax always; a search that stopped at an earlier
    ``min_edit_gain`` (its gain an upper bound) only where that bound is within this ``min_edit_gain`` — the edit is
    not used either way — else the edit is derived again."""
    threshold = config.scoring.min_edit_gain
    return not derived.gain_is_bound or (threshold is not None and derived.gain <= threshold)


def _correction_row(query: dict[str, Any], derived: Derived) -> tuple[Any, ...]:
    """The row that embeds a derived correction: from its token ids where stored, else from its text."""
    name = f"query {query['query_id']!r} (derived correction)"
    if derived.response_ids:
        return name, query["prompt"], query["response"], derived.response_ids
    return name, query["prompt"], derived.response


def _derived_at(
    store: LineageStore, base_reference: str, checkpoint: dict[str, Any], rows: list[dict[str, Any]],
    config: PipelineConfig,
) -> tuple[dict[str, Derived | None], dict[str, Derived | None]]:  # fmt: skip
    """({query_id: its correction at the checkpoint}, the ones derived now) for counterfactual ``rows``: the one
    ``derived_corrections`` holds (one per output and state: scorings that differ in other settings reuse it, so
    every vector agrees with the audit trail), else derived now (:func:`tasks.counterfactual.derive_corrections`)."""
    cid = checkpoint["checkpoint_id"]
    stored = read_derived_corrections(store, cid, [q["query_id"] for q in rows])
    known: dict[str, Derived | None] = {qid: d for qid, row in stored.items() if serves(d := _as_derived(row), config)}
    todo = [q for q in rows if q["query_id"] not in known]
    path = None if checkpoint["role"] == "base" else checkpoint["path"]
    texts = [(f"query {q['query_id']!r}", q["prompt"], q["response"]) for q in todo]
    fresh = dict(zip((q["query_id"] for q in todo), derive_corrections(base_reference, path, texts, config),
                     strict=True))  # fmt: skip
    return {**known, **fresh}, fresh


def _record(store: LineageStore, checkpoint_id: str, fresh: dict[str, Derived | None]) -> None:
    """Keep the edits derived now at ``checkpoint_id`` in ``derived_corrections`` (with their token ids)."""
    edits = [{"query_id": q, **asdict(d), "response_ids": list(d.response_ids)} for q, d in fresh.items() if d]
    write_derived_corrections(store, checkpoint_id, edits)


def _base_edits(
    store: LineageStore, base_reference: str, checkpoint: dict[str, Any], rows: list[dict[str, Any]],
    config: PipelineConfig,
) -> dict[str, Derived]:  # fmt: skip
    """{query_id: the edit derived at the base model} for those counterfactual ``rows`` whose base edit gained
    (:func:`edit_used`), where ``scoring.edit_fallback`` is ``base_edit`` and ``checkpoint`` is fine-tuned: what a
    state whose own edits gain nothing contrasts with. Base edits not derived yet are derived now and recorded."""
    if config.scoring.edit_fallback != "base_edit" or checkpoint["role"] == "base" or not rows:
        return {}
    base = {"checkpoint_id": BASE_ID, "role": "base", "path": None}
    derived, fresh = _derived_at(store, base_reference, base, rows, config)
    _record(store, BASE_ID, fresh)
    return {q: d for q, d in derived.items() if d is not None and edit_used(d, config)}


def _embed_outputs(
    store: LineageStore, base_reference: str, checkpoint: dict[str, Any], query_ids: list[str], config: PipelineConfig
) -> None:
    """Embed registered outputs at ``checkpoint`` with one loaded model, one pass per token weighting needed.

    plain: ĝ(y) with the plain weighting; contrastive: ĝ(y) − ĝ(y_corrected) with the contrastive weighting;
    counterfactual: ĝ(y) − ĝ(y'_t), uniform weights, y'_t embedded from its token ids — or, where the edit is not
    used (:func:`edit_used`), ĝ(y) − ĝ(y'_0) with the base model's edit (``edit_fallback`` ``base_edit``, where
    that one gained: :func:`_base_edits`), else ĝ(y) with the plain weighting (uniform with ``min_edit_gain``
    None)."""
    table = store.read("queries", ["query_id", "prompt", "response", "corrected"], where_in("query_id", query_ids))
    rows = sorted(table.to_pylist(), key=lambda r: r["query_id"])
    cid = checkpoint["checkpoint_id"]
    kinds = {q["query_id"]: kind_of(bool(q["corrected"]), config) for q in rows}
    derived, fresh = _derived_at(store, base_reference, checkpoint, [q for q in rows if kinds[q["query_id"]] is
                                                                     Kind.COUNTERFACTUAL], config)  # fmt: skip
    unused = [q for q in rows if kinds[q["query_id"]] is Kind.COUNTERFACTUAL and not edit_used(derived[q["query_id"]],
                                                                                              config)]  # fmt: skip
    base_edits = _base_edits(store, base_reference, checkpoint, unused, config)
    plain_w = stored_kind(Kind.PLAIN, config, cid).delta
    contrast_w = stored_kind(Kind.CONTRASTIVE, config, cid).delta
    fallback_w = plain_w and config.scoring.min_edit_gain is not None
    passes: dict[bool, list[tuple[tuple[str, str], tuple[Any, ...]]]] = {False: [], True: []}
    for q in rows:
        qid, kind = q["query_id"], kinds[q["query_id"]]
        own = (f"query {qid!r}", q["prompt"], q["response"])
        if kind is Kind.PLAIN:
            passes[plain_w].append(((qid, "y"), own))
        elif kind is Kind.CONTRASTIVE:
            fixed = (f"query {qid!r} (corrected)", q["prompt"], q["corrected"])
            passes[contrast_w] += [((qid, "y"), own), ((qid, "fixed"), fixed)]
        elif edit_used(derived[qid], config):
            passes[False] += [((qid, "y"), own), ((qid, "edit"), _correction_row(q, derived[qid]))]  # type: ignore[arg-type]
        elif qid in base_edits:
            passes[False] += [((qid, "y"), own), ((qid, "edit"), _correction_row(q, base_edits[qid]))]
        else:
            passes[fallback_w].append(((qid, "y"), own))
    vectors = _embed_passes(base_reference, checkpoint, passes, config)
    by_kind: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    for q in rows:
        qid, kind = q["query_id"], kinds[q["query_id"]]
        vector = vectors[(qid, "y")]
        if (qid, "fixed") in vectors or (qid, "edit") in vectors:
            vector = vector - vectors.get((qid, "fixed"), vectors.get((qid, "edit")))
        ids, vs = by_kind.setdefault(stored_kind(kind, config, cid).name, ([], []))
        ids.append(qid)
        vs.append(vector)
    _record(store, cid, fresh)
    for name, (ids, vs) in sorted(by_kind.items()):
        write_query_embeddings(store, cid, name, ids, np.stack(vs))


def _embed_passes(
    base_reference: str, checkpoint: dict[str, Any], passes: dict[bool, list[tuple[tuple[str, str], tuple[Any, ...]]]],
    config: PipelineConfig,
) -> dict[tuple[str, str], np.ndarray]:  # fmt: skip
    """{key: ĝ} of every row of ``passes`` ({weighted: [(key, row)]}): one :func:`tasks.indexing.embed_rows` call
    per weighting with the checkpoint's model loaded once; weighted rows use log p_θ0 (:func:`base_log_probs`)."""
    weighted = [row for _, row in passes[True]]
    refs = base_log_probs(base_reference, weighted, config) if weighted else None
    path = None if checkpoint["role"] == "base" else checkpoint["path"]
    out: dict[tuple[str, str], np.ndarray] = {}
    with model_for(base_reference, path, config.device) as cached:
        for w in (False, True):
            if passes[w]:
                got = embed_rows(cached, [row for _, row in passes[w]], config, None, refs if w else None).vectors
                out.update({key: v for (key, _), v in zip(passes[w], got, strict=True)})
    return out


def _embed_group(
    store: LineageStore, checkpoint_id: str, group_id: str, members: list[str], config: PipelineConfig
) -> None:
    """ĝ_group = (1/|G|) Σ_{q∈G} ĝ_q (float64 mean of the stored float32 vectors), each member contributing the
    vector it is itself scored by; stored under the kind the group is scored as (its ``queries`` row has a
    correction when every member has one)."""
    kinds = query_kinds_by_id(store, members, config)
    group_kind = query_kinds_by_id(store, [group_id], config)[group_id]
    vectors = np.stack([
        read_query_embeddings(store, checkpoint_id, stored_kind(kinds[m], config, checkpoint_id).name, [m])[0]
        for m in members
    ])  # fmt: skip
    name = stored_kind(group_kind, config, checkpoint_id).name
    write_query_embeddings(
        store, checkpoint_id, name, [group_id], vectors.astype(np.float64).mean(axis=0, keepdims=True)
    )


def base_log_probs(base_reference: str, rows: Sequence[tuple[Any, ...]], config: PipelineConfig) -> list[torch.Tensor]:
    """log p_θ0(y_t) of each row's response tokens, (n_i,) per row of ``rows`` = [(name, prompt, response)].

    Computed once per process and text (a forward pass of the resident base model), so every checkpoint of one
    attribution reuses them.
    """
    keys = [(base_reference, r[1], r[2]) for r in rows]
    new = sorted({i for i, k in enumerate(keys) if k not in _BASE_LOG_PROBS}, key=lambda i: keys[i])
    if new:
        if len(_BASE_LOG_PROBS) + len(new) > _BASE_LOG_PROBS_MAX:
            _BASE_LOG_PROBS.clear()
        with model_for(base_reference, None, config.device) as cached:
            max_length = min(config.max_length, context_length(cached.model))
            encoded = _encode(cached.tokenizer, [rows[i][:3] for i in new], max_length)
            precision = compute_precision(config.precision, config.device)
            for index in token_batches([len(ids) for ids, _ in encoded], config.max_tokens, config.batch_size):
                batch = pad_batch([encoded[j] for j in index], pad_id=_pad_id(cached.tokenizer))
                flat = response_log_probs(cached.model, batch, precision).cpu()
                counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
                for j, part in zip(index, torch.split(flat, counts), strict=True):
                    _BASE_LOG_PROBS[keys[new[j]]] = part
    return [_BASE_LOG_PROBS[k] for k in keys]


def check_lengths(base_reference: str, rows: Sequence[tuple[str, str, str]], config: PipelineConfig) -> int:
    """Raise :class:`~tasks.tokenize.SequenceTooLongError` naming the first (name, prompt, response) row that
    exceeds the context; nothing is truncated. Returns the longest length in tokens."""
    with model_for(base_reference, None, config.device) as cached:
        max_length = min(config.max_length, context_length(cached.model))
        return max((len(ids) for ids, _ in _encode(cached.tokenizer, rows, max_length)), default=0)
