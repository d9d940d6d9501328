"""The report's rows (storage.report.gather) against numpy references built from the same synthetic lineage."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from storage.errors import StorageError
from storage.report import gather
from tests.storage.helpers import SAMPLES, SETTINGS, SOURCES, lineage_world

K = 4
STEPS = {"c1": 10, "c2": 20, "c3": 30}
LICENSES = {s: ("cc-by", "proprietary")[i % 2] for i, s in enumerate(SAMPLES)}


@pytest.fixture
def world(tmp_path):
    return lineage_world(tmp_path)


def _order(scores: np.ndarray) -> list[int]:
    """Rank order of the lineage view: score descending, then sample id."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], SAMPLES[i]))


def test_top_samples_carry_the_latest_checkpoint_scores_and_the_dda_score(world):
    store, dda, debiased, _, base = world
    data = gather(store, SETTINGS, top_k=K)
    assert [s.query["query_id"] for s in data.queries] == ["q1", "q2"]
    for qi, section in enumerate(data.queries):
        order = _order(dda[qi])[:K]
        assert [r["sample_id"] for r in section.top] == [SAMPLES[i] for i in order]
        assert [r["rank"] for r in section.top] == list(range(1, K + 1))
        assert section.query["n_checkpoints"] == 3
        assert section.query["n_samples"] == len(SAMPLES)
        for r, i in zip(section.top, order, strict=True):
            assert r["last_step"] == 30  # c3, the latest checkpoint folded in
            assert r["dda_score"] == pytest.approx(dda[qi, i])
            assert r["debiased_score"] == pytest.approx(debiased["c3"][qi, i])
            assert r["base_score"] == pytest.approx(base[qi, i])
            assert r["score"] == pytest.approx(debiased["c3"][qi, i] + base[qi, i])
            assert (r["source"], r["license"]) == (SOURCES[SAMPLES[i]], LICENSES[SAMPLES[i]])


def test_trajectories_are_the_running_weighted_mean_over_checkpoints_in_step_order(world):
    store, dda, debiased, weights, _ = world
    data = gather(store, SETTINGS, top_k=K, n_trajectories=2)
    for qi, section in enumerate(data.queries):
        top2 = [SAMPLES[i] for i in _order(dda[qi])[:2]]
        assert sorted({r["sample_id"] for r in section.trajectories}) == sorted(top2)
        for sample in top2:
            i = SAMPLES.index(sample)
            rows = [r for r in section.trajectories if r["sample_id"] == sample]
            assert [r["step"] for r in rows] == [10, 20, 30]
            d = np.array([debiased[c][qi, i] for c in ("c1", "c2", "c3")])
            w = np.array([weights[c] for c in ("c1", "c2", "c3")])
            np.testing.assert_allclose([r["debiased_score"] for r in rows], d, rtol=1e-6)
            np.testing.assert_allclose([r["smoothed"] for r in rows], np.cumsum(w * d) / np.cumsum(w), rtol=1e-6)
            assert rows[-1]["smoothed"] == pytest.approx(dda[qi, i])


def _shares(scores: np.ndarray, labels: dict[str, str]) -> dict[str, tuple[float, float]]:
    """(Σ S, share of Σ max(S, 0)) per label value."""
    positive = np.maximum(scores, 0).sum()
    out = {}
    for value in sorted(set(labels.values())):
        idx = [i for i, s in enumerate(SAMPLES) if labels[s] == value]
        out[value] = (scores[idx].sum(), np.maximum(scores[idx], 0).sum() / positive)
    return out


@pytest.mark.parametrize("query_ids", [None, ["q2"]])
def test_shares_and_totals_by_source_and_license_equal_the_reference(world, query_ids):
    store, dda, *_ = world
    data = gather(store, SETTINGS, query_ids=query_ids, top_k=K)
    chosen = [0, 1] if query_ids is None else [1]
    assert [s.query["query_id"] for s in data.queries] == [f"q{qi + 1}" for qi in chosen]
    for key, labels, totals in (("source", SOURCES, data.source_totals), ("license", LICENSES, data.license_totals)):
        refs = [_shares(dda[qi], labels) for qi in chosen]
        for section, ref in zip(data.queries, refs, strict=True):
            rows = section.by_source if key == "source" else section.by_license
            assert {r[key]: (r["total_score"], r["share"]) for r in rows} == {
                k: (pytest.approx(v[0]), pytest.approx(v[1])) for k, v in ref.items()
            }
        expected = {k: sum(r[k][0] for r in refs) for k in refs[0]}
        assert [r[key] for r in totals] == sorted(expected, key=lambda k: -expected[k])
        for r in totals:
            assert r["total_score"] == pytest.approx(expected[r[key]])
            assert r["mean_share"] == pytest.approx(np.mean([ref[r[key]][1] for ref in refs]))


def test_recurring_samples_are_those_in_the_top_k_of_both_queries(world):
    store, dda, *_ = world
    data = gather(store, SETTINGS, top_k=K)
    tops = [{SAMPLES[i]: rank for rank, i in enumerate(_order(dda[qi])[:K], start=1)} for qi in (0, 1)]
    both = set(tops[0]) & set(tops[1])
    assert {r["sample_id"] for r in data.recurring} == both
    for r in data.recurring:
        i = SAMPLES.index(r["sample_id"])
        assert r["n_queries"] == 2
        assert r["mean_rank"] == pytest.approx((tops[0][r["sample_id"]] + tops[1][r["sample_id"]]) / 2)
        assert r["total_score"] == pytest.approx(dda[0, i] + dda[1, i])


def test_provenance_lists_checkpoints_and_versions_datasets_by_content(world):
    store, *_ = world
    data = gather(store, SETTINGS)
    assert [(c["checkpoint_id"], c["step"]) for c in data.checkpoints] == [("base", 0), *list(STEPS.items())]
    assert [c["fingerprint"] for c in data.checkpoints] == ["fp-base", "fp-c1", "fp-c2", "fp-c3"]
    hashes = sorted(store.read("samples", ["content_hash"])["content_hash"].to_pylist())
    assert [(d["dataset"], d["n_samples"]) for d in data.datasets] == [("toy", len(SAMPLES))]
    assert data.datasets[0]["version"] == hashlib.md5(",".join(hashes).encode()).hexdigest()
    assert data.projection_fingerprint == store.meta.projection_fingerprint
    assert data.runs == []
    assert data.settings_json is None


def test_unknown_queries_and_settings_are_refused_with_the_fix(world):
    store, *_ = world
    with pytest.raises(StorageError, match=r"no lineage for query nope under settings settings-a: choose"):
        gather(store, SETTINGS, query_ids=["q1", "nope"])
    with pytest.raises(StorageError, match=r"no lineage under settings other: the store has lineage under settings-a"):
        gather(store, "other")
    with pytest.raises(StorageError, match="top_k must be"):
        gather(store, SETTINGS, top_k=0)
