"""Typed row models of the lineage store (LanceDB ``LanceModel``) and their natural keys.

Every table is keyed by natural ids (never by row position), so writes are idempotent upserts.
Vectors are float16 (``VECTOR_TYPE``): ``tests/storage/test_store.py`` bounds the score error this
costs against float32. The dimension of the two vector tables comes from the projection layout.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache

import pyarrow as pa
from lancedb.pydantic import LanceModel, Vector
from pydantic import create_model

VECTOR_TYPE = pa.float16()
SCHEMA_VERSION = 2
BASE_CHECKPOINT = "base"  # checkpoint_id of the base model θ_0


class SampleRow(LanceModel):
    """A training sample. Key: ``sample_id`` (the user's id, else a content hash of prompt + response)."""

    sample_id: str
    dataset: str
    source: str | None
    license: str | None
    prompt: str
    response: str
    meta_json: str
    content_hash: str
    n_tokens: int | None
    ingested_at: datetime


class CheckpointRow(LanceModel):
    """The base model or one fine-tuning checkpoint. Key: ``checkpoint_id``."""

    checkpoint_id: str
    run_id: str
    role: str
    step: int
    epoch: float | None
    learning_rate: float | None
    path: str
    fingerprint: str
    projection_fingerprint: str
    indexed_at: datetime


class QueryRow(LanceModel):
    """An output to trace. Key: ``query_id``; ``corrected`` enables the contrastive query."""

    query_id: str
    prompt: str
    response: str
    corrected: str | None
    meta_json: str
    created_at: datetime


class QueryGroupRow(LanceModel):
    """Membership of a query group (docs/store.md). Key: (``group_id``, ``query_id``).

    ``group_id`` is the group's own row in ``queries`` (``group:<name>``); its vector at each checkpoint is
    the mean of its members' vectors, and its lineage is kept like any query's.
    """

    group_id: str
    query_id: str
    added_at: datetime


class DerivedCorrectionRow(LanceModel):
    """The correction the counterfactual query derived for an output at one checkpoint (docs/method.md).
    Key: (``query_id``, ``checkpoint_id``).

    ``response`` is y' = y with the token at ``position`` (0-based, in the response's tokens) ``token`` replaced
    by ``replacement``; ``gain`` = [log p_θ0(y') + log p_θt(y')] − [log p_θ0(y) + log p_θt(y)] in nats.
    ``response_ids``: y' as token ids (the query embeds these; null in stores written before the column).
    ``gain_is_bound``: true where the search stopped at ``min_edit_gain`` because no edit could gain more: ``gain``
    is then an upper bound of every candidate's gain and the edit the candidate of largest bound (null: false).
    """

    query_id: str
    checkpoint_id: str
    response: str
    position: int
    token: str
    replacement: str
    gain: float
    derived_at: datetime
    response_ids: list[int] | None = None
    gain_is_bound: bool | None = None


class TraceStatusRow(LanceModel):
    """Whether the last attempt to trace an output failed, and why. Key: ``query_id``.

    ``status`` is ``failed`` (``stage`` 'embed' at ``checkpoint_id``, or 'score'; ``error`` one line) or ``ok``
    once a later attempt traced it. Outputs never attempted have no row. A failed output keeps no new lineage
    and never stops the others.
    """

    query_id: str
    status: str
    checkpoint_id: str | None
    stage: str | None
    error: str | None
    updated_at: datetime


class SampleSetRow(LanceModel):
    """An ordered list of sample ids that score and state vectors are aligned to. Key: ``sample_set_id``.

    ``sample_set_id`` = md5 of the ids joined by newlines (:func:`storage.scores.sample_set_id`): the same
    samples in the same order are one set, whoever writes them.
    """

    sample_set_id: str
    sample_ids: list[str]
    n_samples: int
    created_at: datetime


class ScoreRow(LanceModel):
    """Scores of one query at one checkpoint, over every sample. Key: (query_id, checkpoint_id, settings_fingerprint).

    ``score[j]`` = s̃_t(q, i_j) for the j-th sample of ``sample_set_id``; the row of ``checkpoint_id`` =
    ``'base'`` holds s̃_0. ``debias_coefficient`` λ gives s_t^db = s̃_t − λ s̃_0 (computed by the ``scores``
    view, the formula :func:`dda_kernel.debias` folds); ``weight`` = w_t in the denoise mean (0 for the base).
    """

    query_id: str
    checkpoint_id: str
    settings_fingerprint: str
    sample_set_id: str
    score: list[float]
    weight: float
    debias_coefficient: float
    written_at: datetime


class DDAStateRow(LanceModel):
    """Running denoise state of one query over every sample. Key: (query_id, settings_fingerprint).

    dda_score[j] = weighted_sum[j] / total_weight over the checkpoints listed in ``checkpoints``, for the
    j-th sample of ``sample_set_id``.
    """

    query_id: str
    settings_fingerprint: str
    sample_set_id: str
    weighted_sum: list[float]
    total_weight: float
    checkpoints: list[str]
    updated_at: datetime


class RunRow(LanceModel):
    """Which flow run wrote what, with which settings. Key: ``run_id``."""

    run_id: str
    flow_name: str
    started_at: datetime
    finished_at: datetime | None
    status: str
    settings_json: str
    settings_fingerprint: str
    projection_fingerprint: str
    code_version: str
    wrote_json: str


@cache
def embedding_row_model(dim: int) -> type[LanceModel]:
    """Row model of training-sample embeddings. Key: (sample_id, checkpoint_id, projection_fingerprint)."""
    return create_model(  # type: ignore[call-overload, no-any-return]
        f"EmbeddingRow{dim}",
        __base__=LanceModel,
        __doc__="Projected gradient ĝ_i(θ_t) of one sample at one checkpoint, with its loss and norm.",
        sample_id=(str, ...),
        checkpoint_id=(str, ...),
        projection_fingerprint=(str, ...),
        vector=(Vector(dim, value_type=VECTOR_TYPE), ...),
        loss=(float, ...),
        grad_norm=(float, ...),
        n_tokens=(int, ...),
    )


@cache
def query_embedding_row_model(dim: int) -> type[LanceModel]:
    """Row model of query embeddings. Key: (query_id, checkpoint_id, projection_fingerprint, kind)."""
    return create_model(  # type: ignore[call-overload, no-any-return]
        f"QueryEmbeddingRow{dim}",
        __base__=LanceModel,
        __doc__="Projected query gradient ĝ_q(θ_t), 'plain' or 'contrastive', at one checkpoint.",
        query_id=(str, ...),
        checkpoint_id=(str, ...),
        projection_fingerprint=(str, ...),
        kind=(str, ...),
        vector=(Vector(dim, value_type=pa.float32()), ...),
        grad_norm=(float, ...),
    )


TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "samples": ("sample_id",),
    "checkpoints": ("checkpoint_id",),
    "queries": ("query_id",),
    "query_groups": ("group_id", "query_id"),
    "derived_corrections": ("query_id", "checkpoint_id"),
    "trace_status": ("query_id",),
    "embeddings": ("sample_id", "checkpoint_id", "projection_fingerprint"),
    "query_embeddings": ("query_id", "checkpoint_id", "projection_fingerprint", "kind"),
    "sample_sets": ("sample_set_id",),
    "scores": ("query_id", "checkpoint_id", "settings_fingerprint"),
    "dda_state": ("query_id", "settings_fingerprint"),
    "runs": ("run_id",),
}


def table_schema(table: str, dim: int) -> pa.Schema:
    """The Arrow schema of ``table`` for embeddings of dimension ``dim``."""
    models: dict[str, type[LanceModel]] = {
        "samples": SampleRow,
        "checkpoints": CheckpointRow,
        "queries": QueryRow,
        "query_groups": QueryGroupRow,
        "derived_corrections": DerivedCorrectionRow,
        "trace_status": TraceStatusRow,
        "embeddings": embedding_row_model(dim),
        "query_embeddings": query_embedding_row_model(dim),
        "sample_sets": SampleSetRow,
        "scores": ScoreRow,
        "dda_state": DDAStateRow,
        "runs": RunRow,
    }
    schema: pa.Schema = models[table].to_arrow_schema()  # type: ignore[no-untyped-call]
    return schema
