"""The output-tracing path: each model state loaded once per command, derived edits embedded as scored."""

from __future__ import annotations

import dataclasses

import pytest

import tasks.indexing as indexing
import tasks.models as models
from storage.samples import QueryIn, read_rows
from storage.store import LineageStore
from tasks.attribution import attribute_queries
from tasks.config import ScoringConfig
from tasks.counterfactual import _BASE_MEMO
from tasks.indexing import indexed_checkpoints
from tasks.kinds import Kind, StoredKind, stored_kind
from tasks.tokenize import encode_pair
from tasks.tracing import plan_tracing
from tests.tasks.helpers import CONFIG, copy_run, write_queries
from tests.tasks.test_indexing import index


def _count_loads(monkeypatch) -> list[str]:
    models._CACHE.clear()
    models._BASE.clear()
    _BASE_MEMO.clear()
    loads: list[str] = []
    for name in ("load_base_model", "load_checkpoint"):
        real = getattr(models, name)
        monkeypatch.setattr(models, name, lambda *a, _f=real, _n=name, **k: loads.append(_n) or _f(*a, **k))
    return loads


def test_one_attribute_call_loads_each_model_state_once(small_world, tmp_path, monkeypatch):
    """Counterfactual outputs (no correction) and contrastive ones over base + 2 checkpoints: deriving the edits
    needs θ_0 at every checkpoint, yet the base model is read from disk once and each checkpoint once."""
    index(tmp_path, small_world, copy_run(small_world, tmp_path / "run"))
    assert len(indexed_checkpoints(tmp_path)) == 3
    loads = _count_loads(monkeypatch)
    queries = write_queries(tmp_path / "q.jsonl", n=4)  # q1, q3 without a correction: derived at every state
    report = attribute_queries(tmp_path, small_world.base_model, str(queries), [], CONFIG)
    assert report["failed"] == {}
    assert loads == ["load_base_model", "load_checkpoint", "load_checkpoint"]
    store = LineageStore.open(tmp_path / "store")
    assert store.read("derived_corrections").num_rows == 2 * 3


def test_a_derived_edit_is_embedded_on_the_token_ids_that_were_scored(small_world, tmp_path, monkeypatch):
    """The stored edit's token ids are the output's own ids with one position replaced, and the correction row the
    query embeds has exactly those ids as its response (not a re-encoding of the decoded text)."""
    index(tmp_path, small_world, copy_run(small_world, tmp_path / "run", steps=1))
    seen: list[list[int]] = []
    real = indexing._encode

    def spy(tokenizer, rows, max_length):
        out = real(tokenizer, rows, max_length)
        for row, (_, labels) in zip(rows, out, strict=True):
            if row[0].endswith("(derived correction)"):
                seen.append([t for t in labels if t >= 0])
        return out

    monkeypatch.setattr(indexing, "_encode", spy)
    queries = write_queries(tmp_path / "q.jsonl", n=2)
    attribute_queries(tmp_path, small_world.base_model, str(queries), [], CONFIG)
    store = LineageStore.open(tmp_path / "store")
    rows = store.read("derived_corrections").to_pylist()
    assert len(rows) == 2
    output = read_rows(queries, QueryIn)[1]
    _, tokenizer = models.load_base_model(small_world.base_model)
    _, labels = encode_pair(tokenizer, output.prompt, output.response, 64)
    own = [t for t in labels if t >= 0]
    for row in rows:
        edited = row["response_ids"]
        assert len(edited) == len(own)
        assert [i for i, (a, b) in enumerate(zip(own, edited, strict=True)) if a != b] == [row["position"]]
        assert tokenizer.decode([edited[row["position"]]]) == row["replacement"]
    assert sorted(seen) == sorted(r["response_ids"] for r in rows)


def test_the_plan_lists_each_state_once_in_order_and_is_empty_once_traced(small_world, tmp_path):
    index(tmp_path, small_world, copy_run(small_world, tmp_path / "run"))
    queries = write_queries(tmp_path / "q.jsonl", n=3)
    store = LineageStore.open(tmp_path / "store")
    from storage.samples import register_queries

    ids = register_queries(store, read_rows(queries, QueryIn))
    plan = plan_tracing(tmp_path, ids, CONFIG)
    states = [c["checkpoint_id"] for c in indexed_checkpoints(tmp_path)]
    assert [w.checkpoint_id for w in plan] == states
    assert [w.path is None for w in plan] == [True, False, False]
    assert all(w.outputs == ("q0", "q1", "q2") and w.groups == () for w in plan)
    attribute_queries(tmp_path, small_world.base_model, None, ids, CONFIG)
    assert plan_tracing(tmp_path, ids, CONFIG) == []


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (StoredKind(Kind.PLAIN), "plain"),
        (StoredKind(Kind.PLAIN, delta=True), "plain:delta"),
        (StoredKind(Kind.CONTRASTIVE, delta=True), "contrastive:delta"),
        (StoredKind(Kind.COUNTERFACTUAL), "counterfactual"),
        (StoredKind(Kind.COUNTERFACTUAL, delta=True, min_gain=0.0), "counterfactual>0.0:delta"),
        (StoredKind(Kind.COUNTERFACTUAL, min_gain=-1.5), "counterfactual>-1.5"),
    ],
)
def test_stored_kind_names_round_trip(kind, name):
    assert kind.name == name
    assert StoredKind.parse(name) == kind


def test_stored_kinds_follow_the_weighting_and_the_edit_threshold():
    at, base = "run/checkpoint-1", "base"
    default = CONFIG  # finetune_delta_plain, min_edit_gain 0
    assert stored_kind(Kind.PLAIN, default, at).name == "plain:delta"
    assert stored_kind(Kind.PLAIN, default, base).name == "plain"
    assert stored_kind(Kind.CONTRASTIVE, default, at).name == "contrastive"
    assert stored_kind(Kind.COUNTERFACTUAL, default, at).name == "counterfactual>0.0:delta"
    every = dataclasses.replace(CONFIG, scoring=ScoringConfig(query_weighting="finetune_delta", min_edit_gain=None))
    assert stored_kind(Kind.CONTRASTIVE, every, at).name == "contrastive:delta"
    assert stored_kind(Kind.COUNTERFACTUAL, every, at).name == "counterfactual"
    with pytest.raises(ValueError, match="not a stored query kind"):
        StoredKind.parse("plain:delta:delta")
