"""The embedded end-to-end example: a canary world, a base model, a fine-tuning run, DDA lineage.

Everything is built in memory from a seed (no download): a tiny LLaMA is pretrained on clean
summaries (the base model θ_0), fine-tuned on data where a share of England summaries say China
(checkpoints θ_1..θ_T, one per epoch), asked to summarise unseen England documents, and every
hallucinated output is traced back to the training samples with DDA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dda_kernel import (
    ProjectionSpec,
    build_projector,
    contrastive_query,
    dda_init,
    dda_update,
    dda_value,
    debias,
    embed_batch,
    layout_for,
    normalise_scores,
    pad_batch,
    pairwise_scores,
    row_norms,
)
from dda_kernel.metrics import roc_auc
from tasks.models import tiny_llama
from tasks.tokenize import encode_pairs, word_level_tokenizer
from tasks.toy_world import ToySample, build_samples, held_out_prompts
from tasks.train import greedy_generate, train_epochs

Log = Callable[[str], None]


@dataclass
class DemoResult:
    """What the demo measured: hallucinations found, AUC per method, top samples of the first query."""

    n_train: int
    n_corrupted: int
    n_prompts: int
    hallucinated: list[tuple[str, str]]
    auc: dict[str, float] = field(default_factory=dict)
    top: list[tuple[float, ToySample]] = field(default_factory=list)


def _embed_all(model: torch.nn.Module, encoded: list, projector, batch_size: int = 32) -> torch.Tensor:  # type: ignore[no-untyped-def]
    parts = [
        embed_batch(model, pad_batch(encoded[i : i + batch_size], pad_id=0), projector).vectors
        for i in range(0, len(encoded), batch_size)
    ]
    return torch.cat(parts)


def run_demo(seed: int = 0, log: Log = print) -> DemoResult:
    """Build the world, train, generate, attribute; log progress; return the measured numbers."""
    base_data = build_samples(300, seed + 100, rate=0.0, prefix="pre")
    train = build_samples(240, seed, rate=0.7)
    prompts = held_out_prompts(24, seed + 200)
    texts = [s.prompt + " " + s.response for s in base_data + train] + [p for p, _ in prompts]
    tokenizer = word_level_tokenizer(texts)
    enc_base = encode_pairs(tokenizer, [(s.prompt, " " + s.response) for s in base_data], 64)
    enc_train = encode_pairs(tokenizer, [(s.prompt, " " + s.response) for s in train], 64, [s.sample_id for s in train])

    model = tiny_llama(len(tokenizer), hidden=64, layers=2, heads=4, seed=seed, max_positions=64)
    model.train()
    log(f"pretraining the base model on {len(base_data)} clean summaries")
    base_state = train_epochs(model, enc_base, epochs=6, lr=3e-3, seed=seed)[-1]
    log(f"fine-tuning on {len(train)} samples ({sum(s.corrupted for s in train)} say China for England)")
    checkpoints = train_epochs(
        model, enc_train, epochs=3, lr=1e-3, seed=seed, on_epoch=lambda e, loss: log(f"  epoch {e}: loss {loss:.3f}")
    )

    outputs = [(p, greedy_generate(model, tokenizer, p)) for p, _ in prompts]
    hallucinated = [(p, out) for p, out in outputs if "China" in out]
    result = DemoResult(len(train), sum(s.corrupted for s in train), len(prompts), hallucinated)
    log(f"{len(hallucinated)} of {len(prompts)} held-out England documents were summarised with China")
    if not hallucinated:
        return result

    spec = ProjectionSpec(k_in=8, k_out=8, seed=seed)
    projector = build_projector(layout_for(model, spec), torch.float32)
    q_halluc = encode_pairs(tokenizer, [(p, " " + o) for p, o in hallucinated], 64)
    q_fixed = encode_pairs(tokenizer, [(p, " " + o.replace("China", "England")) for p, o in hallucinated], 64)
    states = [("base", base_state)] + [(f"checkpoint-{t + 1}", s) for t, s in enumerate(checkpoints)]
    raw: dict[str, torch.Tensor] = {}
    for name, state in states:
        model.load_state_dict(state)
        grads = _embed_all(model, enc_train, projector)
        queries = contrastive_query(_embed_all(model, q_halluc, projector), _embed_all(model, q_fixed, projector))
        raw[name] = normalise_scores(pairwise_scores(queries, grads), "cosine", row_norms(queries), row_norms(grads))
        log(f"  embedded {len(enc_train)} samples at {name}")
    dda = dda_init(*raw["base"].shape)
    for name, _ in states[1:]:
        dda = dda_update(dda, name, debias(raw[name], raw["base"], coefficient=1.0))
    methods = {
        "base only": raw["base"],
        "last checkpoint": raw[states[-1][0]],
        "mean over checkpoints (denoise)": torch.stack([raw[n] for n, _ in states[1:]]).mean(0),
        "DDA (debias + denoise, cosine)": dda_value(dda),
    }
    truth = torch.tensor([s.corrupted for s in train])
    result.auc = {m: sum(roc_auc(row, truth) for row in s) / s.shape[0] for m, s in methods.items()}
    top = torch.argsort(dda_value(dda)[0], descending=True)[:5]
    result.top = [(float(dda_value(dda)[0, i]), train[int(i)]) for i in top]
    return result
