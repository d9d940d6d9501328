"""Schemas, identity, idempotent upserts, fingerprints, versions, float16 storage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from storage.errors import DatasetFormatError, FingerprintMismatchError, SampleConflictError
from storage.samples import (
    QueryIn,
    SampleIn,
    content_hash,
    extra_fields,
    ingest_samples,
    read_rows,
    register_queries,
)
from storage.schemas import TABLE_KEYS, table_schema
from storage.store import LineageStore
from storage.vectors import embedded_sample_ids, read_embeddings, write_embeddings
from tests.storage.helpers import DIM, FP, open_store, random_vectors, sample_rows, seeded_store

PINNED = {
    "samples": "sample_id:string! dataset:string! source:string license:string prompt:string! response:string! "
    "meta_json:string! content_hash:string! n_tokens:int64 ingested_at:timestamp[us]!",
    "checkpoints": "checkpoint_id:string! run_id:string! role:string! step:int64! epoch:double learning_rate:double "
    "path:string! fingerprint:string! projection_fingerprint:string! indexed_at:timestamp[us]!",
    "queries": "query_id:string! prompt:string! response:string! corrected:string meta_json:string! "
    "created_at:timestamp[us]!",
    "query_groups": "group_id:string! query_id:string! added_at:timestamp[us]!",
    "derived_corrections": "query_id:string! checkpoint_id:string! response:string! position:int64! token:string! "
    "replacement:string! gain:double! derived_at:timestamp[us]! response_ids:list<item: int64> gain_is_bound:bool",
    "trace_status": "query_id:string! status:string! checkpoint_id:string stage:string error:string "
    "updated_at:timestamp[us]!",
    "embeddings": "sample_id:string! checkpoint_id:string! projection_fingerprint:string! "
    "vector:fixed_size_list<item: halffloat>[16] loss:double! grad_norm:double! n_tokens:int64!",
    "query_embeddings": "query_id:string! checkpoint_id:string! projection_fingerprint:string! kind:string! "
    "vector:fixed_size_list<item: float>[16] grad_norm:double!",
    "sample_sets": "sample_set_id:string! sample_ids:list<item: string>! n_samples:int64! created_at:timestamp[us]!",
    "scores": "query_id:string! checkpoint_id:string! settings_fingerprint:string! sample_set_id:string! "
    "score:list<item: double>! weight:double! debias_coefficient:double! written_at:timestamp[us]!",
    "dda_state": "query_id:string! settings_fingerprint:string! sample_set_id:string! weighted_sum:list<item: double>! "
    "total_weight:double! checkpoints:list<item: string>! updated_at:timestamp[us]!",
    "runs": "run_id:string! flow_name:string! started_at:timestamp[us]! finished_at:timestamp[us] status:string! "
    "settings_json:string! settings_fingerprint:string! projection_fingerprint:string! code_version:string! "
    "wrote_json:string!",
}


def describe(schema: pa.Schema) -> str:
    return " ".join(f"{f.name}:{f.type}{'' if f.nullable else '!'}" for f in schema)


@pytest.mark.parametrize("table", sorted(TABLE_KEYS))
def test_arrow_schemas_are_pinned(table):
    assert describe(table_schema(table, DIM)) == PINNED[table]


def test_reingesting_the_same_dataset_adds_nothing(tmp_path):
    store = open_store(tmp_path)
    first = ingest_samples(store, sample_rows(10), "toy")
    second = ingest_samples(store, sample_rows(10), "toy")
    assert (first.added, first.unchanged, second.added, second.unchanged) == (10, 0, 0, 10)
    assert store.table("samples").count_rows() == 10


def test_default_id_is_the_content_hash(tmp_path):
    store = open_store(tmp_path)
    ingest_samples(store, [SampleIn(prompt="p", response="r")], "toy")
    assert store.read("samples")["sample_id"].to_pylist() == [content_hash("p", "r")]


def test_a_different_sample_under_an_existing_id_is_refused_and_nothing_changes(tmp_path):
    store = seeded_store(tmp_path)
    version = store.table("samples").version
    clash = [*sample_rows(1), SampleIn(id="s001", prompt="other", response="text")]
    with pytest.raises(SampleConflictError, match="'s001' already names a different sample"):
        ingest_samples(store, clash, "toy")
    with pytest.raises(SampleConflictError, match="appears twice"):
        ingest_samples(
            store, [SampleIn(id="x", prompt="a", response="b"), SampleIn(id="x", prompt="c", response="d")], "t"
        )
    assert store.table("samples").version == version
    assert store.table("samples").count_rows() == 12


def test_malformed_rows_are_listed_with_line_numbers(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c"}, "{not json", {"prompt": 5, "response": "e", "x": 1}]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DatasetFormatError) as exc:
        read_rows(path, SampleIn)
    message = str(exc.value)
    assert "3 malformed row(s), nothing ingested" in message
    assert "line 2: row: Value error, 'response' is missing or empty" in message
    assert "line 3: not valid JSON" in message
    assert "line 4: prompt: Input should be a valid string" in message


@pytest.mark.parametrize("model", [SampleIn, QueryIn])
def test_fields_beyond_the_contract_are_kept_under_meta(tmp_path, model):
    path = tmp_path / "rows.jsonl"
    rows = [
        {"prompt": "p1", "response": "r1", "pair": "england-china", "meta": {"pair": "own", "k": 1}},
        {"prompt": "p2", "response": "r2", "topic": ["a", "b"]},
        {"prompt": "p3", "response": "r3"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_rows(path, model)
    assert [r.meta for r in got] == [{"pair": "own", "k": 1}, {"topic": ["a", "b"]}, {}]
    assert extra_fields(got) == ["pair", "topic"]
    assert "pair" not in got[0].model_dump()


def test_chat_rows_use_the_last_assistant_turn_as_response(tmp_path):
    path = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path.write_text(json.dumps({"messages": messages, "source": "chat"}) + "\n")
    (row,) = read_rows(path, SampleIn)
    assert (row.prompt, row.response, row.meta["messages"]) == ("user: Hi\n", "Hello!", messages)


def test_queries_upsert_by_id(tmp_path):
    store = open_store(tmp_path)
    q = [QueryIn(prompt="p", response="r", corrected="c"), QueryIn(id="q2", prompt="p", response="x")]
    ids = register_queries(store, q)
    assert register_queries(store, q) == ids
    assert store.table("queries").count_rows() == 2


def test_opening_with_another_projection_names_both(tmp_path):
    open_store(tmp_path)
    with pytest.raises(
        FingerprintMismatchError, match=f"holds projection {FP} \\(dim {DIM}\\), asked for other \\(dim 8\\)"
    ):
        LineageStore.open(tmp_path, projection_fingerprint="other", dim=8)
    assert LineageStore.open(tmp_path).meta.projection_fingerprint == FP


def test_vectors_of_the_wrong_dimension_are_refused(tmp_path):
    store = seeded_store(tmp_path)
    with pytest.raises(FingerprintMismatchError, match=r"shape \(2, 8\)"):
        write_embeddings(store, "base", ["s000", "s001"], random_vectors(2, dim=8), np.zeros(2), np.ones(2))


def test_embedding_upserts_are_idempotent_and_versions_are_tagged(tmp_path):
    store = seeded_store(tmp_path)
    ids = [f"s{i:03d}" for i in range(12)]
    vectors = random_vectors(12)
    assert write_embeddings(store, "ckpt-1", ids, vectors, np.zeros(12), np.ones(12)) == 12
    tag = store.tag_checkpoint("run/ckpt-1")
    assert write_embeddings(store, "ckpt-1", ids, vectors, np.zeros(12), np.ones(12)) == 0
    write_embeddings(store, "ckpt-2", ids[:5], vectors[:5], np.zeros(5), np.ones(5))
    assert store.table("embeddings").count_rows() == 17
    assert store.read("embeddings", ["sample_id"], as_of=tag).num_rows == 12
    assert embedded_sample_ids(store, "ckpt-2") == set(ids[:5])
    matrix = read_embeddings(store, "ckpt-1")
    order = matrix.order
    assert matrix.sample_ids[order].tolist() == sorted(ids)
    np.testing.assert_allclose(matrix.vectors[order].astype(np.float32), vectors, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(matrix.grad_norms[order], np.linalg.norm(vectors.astype(np.float64), axis=1))


def test_float16_storage_bounds_the_score_error(tmp_path):
    """|q·g16 − q·g32| ≤ 2⁻¹¹ Σ_j |q_j g_j| + subnormal slack: float16 rounding is at most half an ulp."""
    store = seeded_store(tmp_path, n=200)
    rng = np.random.default_rng(3)
    ids = [f"s{i:03d}" for i in range(200)]
    vectors = (rng.standard_normal((200, DIM)) * rng.lognormal(0, 2, (200, 1))).astype(np.float32)
    write_embeddings(store, "c", ids, vectors, np.zeros(200), np.ones(200))
    matrix = read_embeddings(store, "c")
    stored = matrix.vectors[matrix.order]
    q = rng.standard_normal((5, DIM)).astype(np.float32)
    exact = q.astype(np.float64) @ vectors.astype(np.float64).T
    got = q.astype(np.float64) @ stored.astype(np.float64).T
    bound = 2.0**-11 * np.abs(q).astype(np.float64) @ np.abs(vectors).astype(np.float64).T + 1e-7
    assert np.all(np.abs(got - exact) <= bound)
    relative = np.abs(got - exact).max() / np.abs(exact).max()
    assert relative < 1e-3


def test_ids_with_quotes_are_filtered_exactly(tmp_path):
    store = seeded_store(tmp_path)
    ids = ["s000", "s001"]
    write_embeddings(store, "it's", ids, random_vectors(2), np.zeros(2), np.ones(2))
    write_embeddings(store, "its", ids, random_vectors(2, seed=1), np.zeros(2), np.ones(2))
    assert sorted(read_embeddings(store, "it's").sample_ids.tolist()) == ids
    assert embedded_sample_ids(store, "it' OR '1'='1") == set()
