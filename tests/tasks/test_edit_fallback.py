"""The fallback of a state whose own derived edits gain nothing: the base model's edit, or the plain query."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa

from dda_kernel import build_projector, embed_batch, layout_for, pad_batch
from storage.store import LineageStore
from storage.vectors import read_query_embeddings
from tasks.config import ScoringConfig
from tasks.indexing import indexed_checkpoints
from tasks.kinds import Kind, StoredKind, stored_kind
from tasks.models import compute_precision, model_for
from tasks.tokenize import encode_pair
from tests.tasks.helpers import CONFIG, copy_run, write_queries
from tests.tasks.test_indexing import attribute, index


def _vector(base_model: str, path: str | None, prompt: str, response_ids: list[int] | None, text: str):
    """ĝ(prompt, y) at a state, from the response's token ids where given (else its text), by the kernel alone."""
    with model_for(base_model, path, "cpu") as cached:
        ids, labels = encode_pair(cached.tokenizer, prompt, text, 64)
        if response_ids is not None:
            n = sum(1 for x in labels if x < 0)
            ids, labels = ids[:n] + response_ids, labels[:n] + response_ids
        projector = build_projector(layout_for(cached.model, CONFIG.projection))
        precision = compute_precision(CONFIG.precision, "cpu")
        return embed_batch(cached.model, pad_batch([(ids, labels)], pad_id=0), projector, precision=precision).vectors[
            0
        ]


def test_a_state_without_a_gaining_edit_contrasts_with_the_base_edit_where_that_one_gained(small_world, tmp_path):
    """With ``edit_fallback`` ``base_edit``: at the fine-tuned state, q1 (its own edit gains −5, its base edit +5)
    is ĝ_t(y) − ĝ_t(y'_0) with the base edit's token ids; q3 (base edit −5 too) is the plain query; at the base
    model each output is what its own edit says. The gains are set in the store, which the derivation reuses."""
    index(tmp_path, small_world, copy_run(small_world, tmp_path / "run", steps=1))
    queries_file = write_queries(tmp_path / "queries.jsonl", n=4)  # q1, q3 have no correction
    every = dataclasses.replace(CONFIG, scoring=ScoringConfig(min_edit_gain=None))
    attribute(tmp_path, small_world, queries_file, every)  # derives and records every state's edit
    store = LineageStore.open(tmp_path / "store")
    base_id, tuned = (c["checkpoint_id"] for c in indexed_checkpoints(tmp_path))
    wanted = {("q1", base_id): 5.0, ("q1", tuned): -5.0, ("q3", base_id): -5.0, ("q3", tuned): -5.0}
    rows = store.read("derived_corrections").to_pylist()
    changed = [{**r, "gain": wanted[(r["query_id"], r["checkpoint_id"])]} for r in rows]
    store.upsert("derived_corrections", pa.Table.from_pylist(changed))
    config = dataclasses.replace(CONFIG, scoring=ScoringConfig(min_edit_gain=0.0, edit_fallback="base_edit"))
    kind = stored_kind(Kind.COUNTERFACTUAL, config, tuned)
    assert kind == StoredKind.parse(kind.name)
    assert kind.name.startswith("counterfactual>0.0@base")
    attribute(tmp_path, small_world, queries_file, config)
    edits = {(r["query_id"], r["checkpoint_id"]): r for r in store.read("derived_corrections").to_pylist()}
    assert len(edits) == 4  # nothing derived again
    queries = {json.loads(line)["id"]: json.loads(line) for line in queries_file.read_text().splitlines()}
    path = indexed_checkpoints(tmp_path)[1]["path"]
    q1 = queries["q1"]
    y = _vector(small_world.base_model, path, q1["prompt"], None, q1["response"])
    fixed = _vector(small_world.base_model, path, q1["prompt"], list(edits[("q1", base_id)]["response_ids"]), "")
    got = read_query_embeddings(store, tuned, kind.name, ["q1"])[0]
    np.testing.assert_allclose(got, (y - fixed).numpy(), rtol=0, atol=2e-3 * float(y.abs().max()))
    attribute(
        tmp_path, small_world, queries_file, dataclasses.replace(CONFIG, scoring=ScoringConfig(query_kind="plain"))
    )
    plain = read_query_embeddings(store, tuned, stored_kind(Kind.PLAIN, config, tuned).name, ["q3"])
    np.testing.assert_array_equal(read_query_embeddings(store, tuned, kind.name, ["q3"]), plain)
    own = read_query_embeddings(store, base_id, "counterfactual", ["q1"])  # the base state: its own edit
    np.testing.assert_allclose(read_query_embeddings(store, base_id, stored_kind(Kind.COUNTERFACTUAL, config,
                               base_id).name, ["q1"]), own, rtol=0, atol=1e-6 * float(np.abs(own).max()))  # fmt: skip
