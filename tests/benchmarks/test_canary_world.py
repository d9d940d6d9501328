"""The benchmark's data builder and BM25 baseline, checked against their definitions."""

from __future__ import annotations

import math
import re

import pytest

from benchmarks.bm25 import BM25
from benchmarks.canary_world import CANARY_PAIRS, build_canary_world, pair_name


def _article(prompt: str) -> str:
    return prompt.split("Article: ")[1].split("\nSummary:")[0]


def test_world_is_deterministic_from_its_seed():
    a, b, c = build_canary_world(seed=3), build_canary_world(seed=3), build_canary_world(seed=4)
    assert a == b
    assert a.train != c.train


def test_canary_documents_corrupted_summaries_and_distractors_follow_the_protocol():
    world = build_canary_world(seed=1, n_pairs=4, per_pair=40, distractors_per_pair=10, n_other=30, rate=0.7)
    assert len(world.pairs) == 4
    for x, y in world.pairs:
        name = pair_name((x, y))
        canary = [s for s in world.train if s.pair == name and s.kind == "canary"]
        assert len(canary) == 40
        assert sum(s.corrupted for s in canary) == 28
        for s in canary:
            article = _article(s.prompt)
            assert re.search(rf"\b{x}\b", article)
            assert not re.search(rf"\b{y}\b", article)
            assert (y in s.response and x not in s.response) == s.corrupted
        distractors = [s for s in world.train if s.pair == name and s.kind == "distractor"]
        assert len(distractors) == 10
        assert all(y in _article(s.prompt) and y in s.response and not s.corrupted for s in distractors)
        held = [h for h in world.held_out if h.pair == name]
        assert len(held) == 8
        assert all(x in _article(h.prompt) and y not in h.prompt for h in held)
    assert all(s.source == "vendor-b" for s in world.train if s.corrupted)
    assert len({s.sample_id for s in world.train}) == len(world.train) == 4 * 50 + 30


def test_documents_are_varied_not_one_template():
    world = build_canary_world(seed=0, n_pairs=1, per_pair=60, distractors_per_pair=0, n_other=0)
    skeletons = {re.sub(r"\d+", "#", _article(s.prompt).split(".")[0]) for s in world.train}
    assert len(skeletons) >= 30
    assert len({s.response for s in world.train}) == len(world.train)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="n_pairs"):
        build_canary_world(n_pairs=len(CANARY_PAIRS) + 1)
    with pytest.raises(ValueError, match="rate"):
        build_canary_world(rate=1.5)


def test_bm25_matches_its_formula_on_a_small_corpus():
    docs = ["the cat sat", "the dog sat on the mat", "a cat and a cat"]
    index = BM25(docs, k1=1.2, b=0.75)
    got = index.scores("cat mat")
    lengths = [3, 6, 5]
    avgdl = sum(lengths) / 3

    def idf(n_t: int) -> float:
        return math.log(1 + (3 - n_t + 0.5) / (n_t + 0.5))

    def term(f: int, length: int, n_t: int) -> float:
        return idf(n_t) * f * 2.2 / (f + 1.2 * (1 - 0.75 + 0.75 * length / avgdl))

    expected = [term(1, 3, 2), term(1, 6, 1), term(2, 5, 2)]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert BM25(docs).scores("unknown words").tolist() == [0.0, 0.0, 0.0]
