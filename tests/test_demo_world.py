"""The SmolLM2 demo — what ``dda demo`` runs — hallucinates with margin and its default wins there.

Greedy decoding flips where log p(China) − log p(England) crosses 0, so the test bounds the margin, not only
the count (at the old 70 % rate a fresh clone elsewhere hallucinated on 1 of 12). Then the default lineage,
read through SQL, must rank the corrupted samples at least as well as the base model alone, the last checkpoint
alone and BM25 over the training text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.bm25 import BM25
from dda_kernel.metrics import roc_auc
from tasks.demo import SMOLLM2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),
]  # the module's fixture fine-tunes and indexes SmolLM2 (about 3 min on 2 CPUs)
MIN_MARGIN = 2.0  # nats; measured 3.69-4.64 on 2 CPUs (seeds 0, 1), 1.00 at the old 70 % rate


@pytest.fixture(scope="module")
def smollm2_demo(tmp_path_factory, prefect_server):
    from flows.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("smollm2-demo"), seed=0, model="smollm2", log=lambda _: None,
                    progress=False)  # fmt: skip


def test_the_demo_recipe_is_the_one_measured(smollm2_demo):
    world = smollm2_demo.world
    assert (world.rate, world.epochs, world.lr) == (SMOLLM2.rate, SMOLLM2.epochs, SMOLLM2.lr)
    assert world.n_corrupted == sum(1 for i in range(world.n_train) if i % 3 == 0)  # every England summary


def test_every_unseen_document_prefers_the_hallucination_by_a_margin(smollm2_demo):
    world = smollm2_demo.world
    assert len(world.margins) == world.n_prompts == 12
    assert min(world.margins) >= MIN_MARGIN, sorted(world.margins)
    assert world.n_hallucinated >= 0.8 * world.n_prompts


def _bm25_auc(world) -> float:
    train = [json.loads(line) for line in Path(world.train_file).read_text().splitlines()]
    queries = [json.loads(line) for line in Path(world.queries_file).read_text().splitlines()]
    index = BM25([r["prompt"] + r["response"] for r in train])
    truth = torch.tensor([r["meta"]["corrupted"] for r in train])
    return float(np.mean([roc_auc(torch.tensor(index.scores(q["prompt"] + q["response"])), truth) for q in queries]))


def test_the_default_is_at_least_as_good_as_base_only_last_checkpoint_and_bm25(smollm2_demo):
    """With λ = 0 four fresh runs gave 0.993, 0.992, 0.993 and 0.988 against base-only 0.990 (level); with the
    default λ = −0.5 (the base model's influence counted as evidence) two fresh runs gave 0.998 and 0.996 against
    0.990 each time (CPU training is not bit-reproducible, README)."""
    dda = smollm2_demo.mean_auc("DDA (the lineage view)")
    others = {
        "base model": smollm2_demo.mean_auc("base model only (s̃_0)"),
        "last checkpoint": smollm2_demo.mean_auc("last checkpoint only (s̃_T)"),
        "bm25": _bm25_auc(smollm2_demo.world),
    }
    assert all(dda >= v for v in others.values()), (dda, others)
    assert dda > 0.9
