"""Indexing and lineage tasks on a real store, checked against direct kernel calls and a numpy reference."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dda_kernel import build_projector, embed_batch, layout_for, pad_batch
from storage.samples import SampleIn, ingest_samples, read_rows
from storage.scores import read_dda_states
from storage.store import LineageStore
from storage.vectors import read_embeddings, read_query_embeddings
from tasks.checkpoints import discover_checkpoints
from tasks.config import ScoringConfig
from tasks.indexing import (
    embed_rows,
    embed_shard,
    finish_checkpoint,
    indexed_checkpoints,
    plan_checkpoint,
    token_batches,
)
from tasks.lineage import refresh_lineage
from tasks.models import compute_precision, load_base_model
from tasks.tokenize import SequenceTooLongError, encode_pair
from tasks.tracing import embed_queries
from tests.tasks.helpers import CONFIG, copy_run, write_queries


def index(data_dir, world, run_dir, config=CONFIG, steps=None):
    store = LineageStore.open(data_dir / "store")
    ingest_samples(store, read_rows(world.train_file, SampleIn), dataset="train")
    infos = [None, *discover_checkpoints(run_dir, 0.0)[:steps]]
    for info in infos:
        plan = plan_checkpoint(data_dir, world.base_model, "run", info, config)
        for shard in plan.shards:
            embed_shard(data_dir, world.base_model, plan, shard, config)
        finish_checkpoint(data_dir, world.base_model, plan, config)
    return LineageStore.open(data_dir / "store")


def attribute(data_dir, world, queries_file, config=CONFIG):
    from storage.samples import QueryIn, register_queries

    store = LineageStore.open(data_dir / "store")
    ids = register_queries(store, read_rows(queries_file, QueryIn))
    for ckpt in indexed_checkpoints(data_dir):
        embed_queries(data_dir, world.base_model, ckpt, ids, config)
    return ids, refresh_lineage(data_dir, world.base_model, ids, config)


def test_stored_embeddings_equal_direct_kernel_embeddings(small_world, tmp_path):
    store = index(tmp_path, small_world, small_world.run_dir, steps=0)
    stored = read_embeddings(store, "base")
    model, tokenizer = load_base_model(small_world.base_model)
    projector = build_projector(layout_for(model, CONFIG.projection))
    rows = {r["id"]: r for r in map(json.loads, Path(small_world.train_file).read_text().splitlines())}
    for sid, vector in zip(stored.sample_ids[:6], stored.vectors[:6], strict=True):
        pair = encode_pair(tokenizer, rows[sid]["prompt"], rows[sid]["response"], 64)
        precision = compute_precision(CONFIG.precision, "cpu")
        expected = embed_batch(model, pad_batch([pair], pad_id=0), projector, precision=precision).vectors[0].numpy()
        scale = np.abs(expected).max()
        np.testing.assert_allclose(vector.astype(np.float32), expected, rtol=0, atol=2e-3 * scale)
    tokens = store.read("samples", ["sample_id", "n_tokens"]).to_pylist()
    assert all(r["n_tokens"] and r["n_tokens"] > 0 for r in tokens)


def test_shard_size_does_not_change_embeddings(small_world, tmp_path):
    a = index(tmp_path / "a", small_world, small_world.run_dir, dataclasses.replace(CONFIG, shard_size=5), steps=1)
    b = index(tmp_path / "b", small_world, small_world.run_dir, dataclasses.replace(CONFIG, shard_size=64), steps=1)
    for cid in ("base", indexed_checkpoints(tmp_path / "a")[1]["checkpoint_id"]):
        ea, eb = read_embeddings(a, cid), read_embeddings(b, cid)
        va, vb = ea.vectors[ea.order].astype(np.float32), eb.vectors[eb.order].astype(np.float32)
        assert list(ea.sample_ids[ea.order]) == list(eb.sample_ids[eb.order])
        np.testing.assert_allclose(va, vb, rtol=0, atol=2e-3 * np.abs(va).max())


def _reference_dda(store, queries, config, layout):
    """S = mean_t (s̃_t − λ s̃_0) from the stored vectors, in numpy float64 (independent of tasks.lineage)."""
    ckpts = [r["checkpoint_id"] for r in sorted(store.read("checkpoints").to_pylist(), key=lambda r: r["step"])]
    auto = "counterfactual" if config.scoring.counterfactual else "plain"
    kinds = {q["id"]: "contrastive" if q["corrected"] else auto for q in queries}
    beta = config.scoring.train_debias
    base = read_embeddings(store, "base")
    g0 = base.vectors[base.order].astype(np.float64)
    min_gain = config.scoring.min_edit_gain

    def scores(cid):
        m = read_embeddings(store, cid)
        g = m.vectors[m.order].astype(np.float64)
        sample_norms = m.grad_norms[m.order]  # ‖ĝ_i‖ as stored (from float32)
        weighting = config.scoring.query_weighting
        if cid != "base" and beta:
            g_scored = g - beta * g0
            sample_norms = np.linalg.norm(g_scored, axis=1)
        else:
            g_scored = g
        out = []
        for qid, kind in kinds.items():
            plain_delta = cid != "base" and weighting in ("finetune_delta", "finetune_delta_plain")
            if kind == "counterfactual" and min_gain is not None:  # holds the plain query where no edit gains
                name = f"counterfactual>{min_gain!r}" + (":delta" if plain_delta else "")
            else:
                delta = plain_delta if kind == "plain" else cid != "base" and weighting == "finetune_delta"
                name = kind + (":delta" if delta and kind != "counterfactual" else "")
            q = read_query_embeddings(store, cid, name, [qid])[0].astype(np.float64)
            pq = q.copy()
            if config.scoring.preconditioner == "fisher":
                for slot in layout.slots:
                    sl = layout.slice_of(slot)
                    f = g[:, sl].T @ g[:, sl] / len(g)
                    f += config.scoring.damping * np.trace(f) / f.shape[0] * np.eye(f.shape[0])
                    pq[sl] = np.linalg.solve(f, q[sl])
            s = g_scored @ pq
            if config.scoring.normalisation == "cosine":
                s = s / (np.linalg.norm(q) * sample_norms)
            elif config.scoring.normalisation == "zscore":
                s = (s - s.mean()) / s.std()
            out.append(s)
        return np.stack(out)

    base = scores("base")
    tuned = [scores(c) for c in ckpts if c != "base"]
    return np.mean([t - config.scoring.debias_coefficient * base for t in tuned], axis=0)


@pytest.mark.parametrize(
    "scoring",
    [
        ScoringConfig(preconditioner="identity", normalisation="cosine", debias_coefficient=1.0),
        ScoringConfig(preconditioner="fisher", normalisation="zscore", debias_coefficient=0.5),
        ScoringConfig(
            preconditioner="fisher", normalisation="cosine", train_debias=0.5, query_weighting="finetune_delta"
        ),
        ScoringConfig(query_weighting="finetune_delta_plain", counterfactual=False),
        ScoringConfig(),
        ScoringConfig(min_edit_gain=None),
    ],
    ids=[
        "cosine-identity",
        "zscore-fisher",
        "cosine-fisher-train-delta-query-weights",
        "zscore-plain-query-weights",
        "default-counterfactual",
        "counterfactual-every-edit",
    ],
)
def test_incremental_lineage_equals_a_numpy_reference(small_world, tmp_path, scoring):
    config = dataclasses.replace(CONFIG, scoring=scoring)
    run = copy_run(small_world, tmp_path / "run", steps=1)
    index(tmp_path, small_world, run, config)
    queries_file = write_queries(tmp_path / "queries.jsonl", n=3)
    ids, folds = attribute(tmp_path, small_world, queries_file, config)
    assert folds == 3
    copy_run(small_world, tmp_path / "run2")
    for folder in sorted((tmp_path / "run2").iterdir())[1:]:
        folder.rename(run / folder.name)
    store = index(tmp_path, small_world, run, config)
    ids, folds = attribute(tmp_path, small_world, queries_file, config)
    assert folds == 3
    queries = [json.loads(line) for line in queries_file.read_text().splitlines()]
    model, _ = load_base_model(small_world.base_model)
    expected = _reference_dda(store, queries, config, layout_for(model, config.projection))
    states = read_dda_states(store, config.settings_fingerprint, ids)
    for i, qid in enumerate(ids):
        state = states[qid]
        assert len(state.checkpoints[0]) == 2
        assert state.sample_ids == sorted(state.sample_ids)
        row = state.weighted_sum[0] / state.total_weight[0]
        np.testing.assert_allclose(row, expected[i], rtol=1e-4, atol=1e-5)


def test_new_samples_are_embedded_everywhere_and_states_rebuilt(small_world, tmp_path):
    index(tmp_path, small_world, small_world.run_dir)
    queries_file = write_queries(tmp_path / "queries.jsonl", n=2)
    attribute(tmp_path, small_world, queries_file)
    store = LineageStore.open(tmp_path / "store")
    extra = SampleIn(id="late", prompt="document : Alice flew to England . summary :", response="Alice flew to China .")
    ingest_samples(store, [extra], dataset="late")
    for info in [None, *discover_checkpoints(small_world.run_dir, 0.0)]:
        plan = plan_checkpoint(tmp_path, small_world.base_model, "run", info, CONFIG)
        assert plan.already_indexed
        assert plan.shards == (("late",),)
    index(tmp_path, small_world, small_world.run_dir)
    _, folds = attribute(tmp_path, small_world, queries_file)
    assert folds == 2 * 2
    states = read_dda_states(store, CONFIG.settings_fingerprint, ["q0", "q1"])
    assert [s.sample_ids.count("late") for s in states.values()] == [1, 1]
    assert all(len(s.checkpoints[0]) == 2 for s in states.values())


def test_query_longer_than_the_context_is_reported_by_id(small_world, tmp_path):
    index(tmp_path, small_world, small_world.run_dir, steps=0)
    queries_file = write_queries(tmp_path / "queries.jsonl", n=2, too_long=True)
    with pytest.raises(SequenceTooLongError, match=r"query 'q1' has \d+ tokens"):
        attribute(tmp_path, small_world, queries_file)


@pytest.mark.parametrize("normalisation", ["none", "zscore", "cosine"])
def test_a_checkpoint_equal_to_the_base_model_debiases_to_zero_in_sql(small_world, tmp_path, normalisation):
    """Debias check: the base model's own weights indexed as a checkpoint ⇒ every s̃_t − 1·s̃_0 is 0 (SQL)."""
    from storage.sql import query

    run = tmp_path / "run"
    shutil.copytree(small_world.base_model, run / "checkpoint-1")
    scoring = ScoringConfig(preconditioner="fisher", normalisation=normalisation, debias_coefficient=1.0)
    config = dataclasses.replace(CONFIG, scoring=scoring)
    store = index(tmp_path, small_world, run, config)
    _, folds = attribute(tmp_path, small_world, write_queries(tmp_path / "queries.jsonl", n=3), config)
    assert folds == 3
    fp = config.settings_fingerprint
    got = query(
        store,
        "SELECT count(*) AS n, max(abs(debiased_score)) AS db, max(abs(score)) AS s, "
        "(SELECT max(abs(dda_score)) FROM lineage WHERE settings_fingerprint = $fp) AS dda "
        "FROM scores WHERE settings_fingerprint = $fp",
        {"fp": fp},
    ).to_pylist()[0]
    assert got["n"] == 3 * small_world.n_train
    assert got["s"] > 0  # the scores themselves are not zero ...
    assert got["db"] == 0.0  # ... but base == fine-tuned cancels them exactly
    assert got["dda"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_token_batches_cover_every_row_once_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(1, 90, size=57)]
    lengths[3] = 200  # longer than the budget: a batch of its own
    batches = token_batches(lengths, max_tokens=128, max_samples=6)
    assert sorted(i for b in batches for i in b) == list(range(57))
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= 128 or len(b) == 1
        assert len(b) <= 6
    assert [3] in batches
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)  # longest first: peak memory shows at once
    assert token_batches(lengths, 128, 6) == batches


def test_embeddings_do_not_depend_on_the_token_budget_or_row_order(small_world):
    from tasks.models import model_for

    lines = Path(small_world.train_file).read_text().splitlines()[:24]
    rows = [(r["id"], r["prompt"], r["response"]) for r in map(json.loads, lines)]
    shuffled = rows[::-1]
    one = dataclasses.replace(CONFIG, precision="float32", max_tokens=8, batch_size=64)  # one row per batch
    many = dataclasses.replace(CONFIG, precision="float32", max_tokens=4096, batch_size=64)
    with model_for(small_world.base_model, None) as cached:
        a = embed_rows(cached, rows, one, None)
        b = embed_rows(cached, shuffled, many, None)
    np.testing.assert_allclose(a.vectors, b.vectors[::-1], rtol=1e-4, atol=1e-5 * np.abs(a.vectors).max())
    np.testing.assert_allclose(a.loss, b.loss[::-1], rtol=1e-5)
    assert list(a.n_tokens) == list(b.n_tokens[::-1])


def test_query_kinds_are_embedded_in_one_model_load_per_state(small_world, tmp_path, monkeypatch):
    import tasks.models as models
    import tasks.tracing as tracing

    plain_kinds = dataclasses.replace(CONFIG, scoring=ScoringConfig(counterfactual=False))  # no derived corrections
    store = index(tmp_path, small_world, small_world.run_dir, steps=1)
    models._CACHE.clear()
    models._BASE.clear()
    loads, passes = [], []
    for name in ("load_base_model", "load_checkpoint"):
        real_load = getattr(models, name)
        monkeypatch.setattr(models, name, lambda *a, _f=real_load, _n=name, **k: loads.append(_n) or _f(*a, **k))
    real_embed = tracing.embed_rows
    monkeypatch.setattr(tracing, "embed_rows", lambda c, rows, *a: passes.append(len(rows)) or real_embed(c, rows, *a))
    queries = write_queries(tmp_path / "q.jsonl", n=3)  # q0 and q2 have a correction: both kinds
    attribute(tmp_path, small_world, queries, plain_kinds)
    states = indexed_checkpoints(tmp_path)
    assert len(states) == 2
    assert loads == ["load_base_model", "load_checkpoint"]  # the base model stays in memory
    # base: one pass, 3 responses + 2 corrections; checkpoint: q0 and q2 with their corrections, uniform weights
    # (contrastive), then q1 alone with the query-side debias weights (a plain query, finetune_delta_plain)
    assert passes == [5, 4, 1]
    for ckpt in states:  # each output stores the vector its scoring reads, nothing more
        kinds = store.read("query_embeddings", ["query_id", "kind"], f"checkpoint_id = '{ckpt['checkpoint_id']}'")
        plain = "plain" if ckpt["role"] == "base" else "plain:delta"
        assert sorted(zip(kinds["kind"].to_pylist(), kinds["query_id"].to_pylist(), strict=True)) == [
            ("contrastive", "q0"), ("contrastive", "q2"), (plain, "q1")
        ]  # fmt: skip


def test_query_side_debias_vectors_are_the_kernel_with_base_log_probs(small_world, tmp_path):
    """finetune_delta: at a checkpoint, ĝ_q = embed_batch(θ_t, reference_log_probs = log p_θ0); at the base, plain."""
    from dda_kernel import response_log_probs
    from tasks.models import model_for

    config = dataclasses.replace(CONFIG, scoring=ScoringConfig(query_weighting="finetune_delta", query_kind="plain"))
    run = copy_run(small_world, tmp_path / "run", steps=1)
    store = index(tmp_path, small_world, run, config)
    queries_file = write_queries(tmp_path / "queries.jsonl", n=2)
    ids, _ = attribute(tmp_path, small_world, queries_file, config)
    rows = [json.loads(line) for line in queries_file.read_text().splitlines()]
    base, tokenizer = load_base_model(small_world.base_model)
    batch = pad_batch([encode_pair(tokenizer, r["prompt"], r["response"], 64) for r in rows], pad_id=0)
    precision = compute_precision(config.precision, "cpu")
    reference = response_log_probs(base, batch, precision)
    ckpt = indexed_checkpoints(tmp_path)[1]
    with model_for(small_world.base_model, ckpt["path"], "cpu") as cached:
        projector = build_projector(layout_for(cached.model, config.projection))
        want = embed_batch(cached.model, batch, projector, precision=precision, reference_log_probs=reference).vectors
        plain = embed_batch(cached.model, batch, projector, precision=precision).vectors
    got = read_query_embeddings(store, ckpt["checkpoint_id"], "plain:delta", ids)
    scale = want.abs().max().item()
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-3 * scale)
    assert np.abs(got - plain.numpy()).max() > 1e-2 * scale  # the weighting changed the vectors
    with model_for(small_world.base_model, None, "cpu") as cached:
        at_base = embed_batch(cached.model, batch, projector, precision=precision).vectors.numpy()
    np.testing.assert_allclose(read_query_embeddings(store, "base", "plain", ids), at_base, rtol=0, atol=1e-3 * scale)


def test_plain_only_query_weighting_keeps_contrastive_queries_uniform(small_world, tmp_path):
    """finetune_delta_plain: plain ĝ_q weighted, contrastive ĝ(response) − ĝ(corrected) with uniform weights."""
    from dda_kernel import response_log_probs
    from tasks.models import model_for

    config = dataclasses.replace(CONFIG, scoring=ScoringConfig(query_weighting="finetune_delta_plain"))
    store = index(tmp_path, small_world, copy_run(small_world, tmp_path / "run", steps=1), config)
    queries_file = write_queries(tmp_path / "queries.jsonl", n=1)  # q0: with a correction
    attribute(tmp_path, small_world, queries_file, config)
    plain = ScoringConfig(query_weighting="finetune_delta_plain", query_kind="plain")
    attribute(tmp_path, small_world, queries_file, dataclasses.replace(config, scoring=plain))  # q0 as a plain query
    row = json.loads(queries_file.read_text().splitlines()[0])
    base, tokenizer = load_base_model(small_world.base_model)
    precision = compute_precision(config.precision, "cpu")
    pairs = [encode_pair(tokenizer, row["prompt"], t, 64) for t in (row["response"], row["corrected"])]
    ckpt = indexed_checkpoints(tmp_path)[1]
    with model_for(small_world.base_model, ckpt["path"], "cpu") as cached:
        projector = build_projector(layout_for(cached.model, config.projection))
        uniform = [embed_batch(cached.model, pad_batch([p], pad_id=0), projector, precision=precision).vectors[0]
                   for p in pairs]  # fmt: skip
        ref = response_log_probs(base, pad_batch(pairs[:1], pad_id=0), precision)
        weighted = embed_batch(cached.model, pad_batch(pairs[:1], pad_id=0), projector, precision=precision,
                               reference_log_probs=ref).vectors[0]  # fmt: skip
    scale = float(uniform[0].abs().max())
    cid = ckpt["checkpoint_id"]
    got_contrast = read_query_embeddings(store, cid, "contrastive", ["q0"])[0]
    np.testing.assert_allclose(got_contrast, (uniform[0] - uniform[1]).numpy(), rtol=0, atol=2e-3 * scale)
    np.testing.assert_allclose(read_query_embeddings(store, cid, "plain:delta", ["q0"])[0], weighted.numpy(), rtol=0,
                               atol=2e-3 * scale)  # fmt: skip


def test_switching_query_weighting_embeds_the_kinds_the_new_setting_reads(small_world, tmp_path):
    """Plain-only weighting stores plain:delta + contrastive; finetune_delta then needs contrastive:delta too."""
    first = dataclasses.replace(CONFIG, scoring=ScoringConfig(query_weighting="finetune_delta_plain"))
    then = dataclasses.replace(CONFIG, scoring=ScoringConfig(query_weighting="finetune_delta"))
    store = index(tmp_path, small_world, copy_run(small_world, tmp_path / "run", steps=1), first)
    queries_file = write_queries(tmp_path / "queries.jsonl", n=2)  # q0 corrected, q1 plain
    attribute(tmp_path, small_world, queries_file, first)
    _, folds = attribute(tmp_path, small_world, queries_file, then)
    assert folds == 2
    cid = indexed_checkpoints(tmp_path)[1]["checkpoint_id"]
    kinds = store.read("query_embeddings", ["query_id", "kind"], f"checkpoint_id = '{cid}'").to_pylist()
    assert ("q0", "contrastive:delta") in {(r["query_id"], r["kind"]) for r in kinds}
