"""The SmolLM2 demo world hallucinates with margin, whatever the machine's numerics (issue: a demo that always
shows it). Greedy decoding flips where log p(China) − log p(England) crosses 0, so the test bounds the margin,
not only the count."""

from __future__ import annotations

import pytest

from tasks.demo import SMOLLM2, build_world

MIN_MARGIN = 2.0  # nats; measured 3.80 / 4.64 on 2 CPUs (seeds 0 / 1), 1.00 at the old 70 % rate


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("smollm2-demo"), seed=0, model="smollm2", log=lambda _: None)


def test_the_demo_recipe_is_the_one_measured(world):
    assert (world.rate, world.epochs, world.lr) == (SMOLLM2.rate, SMOLLM2.epochs, SMOLLM2.lr)
    assert world.n_corrupted == sum(1 for i in range(world.n_train) if i % 3 == 0)  # every England summary


def test_every_unseen_document_prefers_the_hallucination_by_a_margin(world):
    assert len(world.margins) == world.n_prompts == 12
    assert min(world.margins) >= MIN_MARGIN, sorted(world.margins)
    assert world.n_hallucinated >= 0.8 * world.n_prompts
