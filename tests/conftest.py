"""Shared fixtures: tiny LLaMA models built from a config with a fixed seed (nothing is downloaded)."""

from __future__ import annotations

import os
import random

import pytest
import torch
from transformers import LlamaForCausalLM

from tasks import models

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 61


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    """A 2-layer LLaMA (hidden 24, MLP 40, 4 heads, 2 KV heads) with random weights, in eval mode."""
    return models.tiny_llama(
        VOCAB, hidden=24, layers=2, heads=4, seed=seed, max_positions=64, intermediate=40, dtype=dtype
    )


def toy_samples(n: int = 6, seed: int = 1) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs of different lengths; labels mask the prompt with -100."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(2, 7))]
        response = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 6))]
        out.append((prompt + response, [-100] * len(prompt) + response))
    return out


@pytest.fixture
def model64() -> LlamaForCausalLM:
    """The tiny LLaMA in float64."""
    return tiny_llama()


@pytest.fixture
def samples() -> list[tuple[list[int], list[int]]]:
    """Six variable-length toy samples."""
    return toy_samples()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One temporary Prefect backend for the whole test session (entering it costs several seconds)."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                       "DDA_INDEXING__PROGRESS": "false"})  # fmt: skip
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small demo world on disk: base model folder, a Trainer run with 2 full checkpoints, train.jsonl."""
    from tasks.demo import build_world

    return build_world(tmp_path_factory.mktemp("world"), seed=1, n_train=40, n_prompts=4, epochs=2, log=lambda _: None)


@pytest.fixture(scope="session")
def demo(tmp_path_factory, prefect_server):
    """The tiny ``dda demo`` run once through the flows: (data folder, its DemoReport, the lines it logged)."""
    from flows.demo import run_demo

    root = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    first = run_demo(root, seed=0, model="tiny", log=lines.append, progress=False)
    return root, first, lines
