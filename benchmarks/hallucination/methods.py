"""The methods beside the default: the study rankings (s̃_t, s̃_0 at any λ, sliced projections), BM25 and CEA."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bm25 import BM25
from benchmarks.cea import cea_scores, response_losses
from benchmarks.hallucination.config import KINDS, Log, Size
from benchmarks.hallucination.worlds import lora_model

PRECONDITIONERS = ("identity", "fisher")
NORMALISATIONS = ("cosine", "zscore", "none")
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
STUDY_K = 8
STUDY_INCLUDE = (r"(^|\.)layers\.\d+\.",)  # every linear of the transformer blocks
STUDY_PROJECTION = {"k_in": STUDY_K, "k_out": STUDY_K, "include": list(STUDY_INCLUDE)}
MODULE_SETS: dict[str, str] = {
    "all": r"",
    "attention": r"self_attn\.",
    "mlp": r"mlp\.",
    "o+down": r"(o_proj|down_proj)$",
    "down": r"down_proj$",
}
PROJECTION_KS = (2, 4, 8)


def study_rankings(s: np.ndarray, b: np.ndarray, lam: float, which: str) -> np.ndarray:
    """A (m, n) ranking from the cubes (T, m, n): ``last``: s̃_T − λ s̃_0; ``mean``: mean_t (s̃_t − λ s̃_0).

    The uniform mean is the system's default checkpoint weighting (with a constant learning rate it is
    also the lr weighting).
    """
    db = s - lam * b
    return db[-1] if which == "last" else db.mean(axis=0)


def study_spec() -> Any:
    """The study store's projection: 8×8 on every linear of the transformer blocks."""
    from dda_kernel import ProjectionSpec

    return ProjectionSpec(STUDY_K, STUDY_K, include=STUDY_INCLUDE)


def _prefix_rows_match(seed: int, name: str, side: str, k: int, d: int) -> bool:
    """True when the k×d projection matrix is (8/k)^½ times the first k rows of the 8×d one.

    ``torch.randn`` fills CPU tensors in 16-value blocks, so this holds when k·d is a multiple of 16
    (every SmolLM2 module), and is checked rather than assumed.
    """
    from dda_kernel.projection import gaussian_matrix

    small = gaussian_matrix(seed, name, side, k, d) * k**0.5
    large = gaussian_matrix(seed, name, side, STUDY_K, d)[:k] * STUDY_K**0.5
    return bool(torch.allclose(small, large, rtol=1e-12, atol=0.0))


def slice_columns(layout: Any, modules: str, k: int) -> tuple[np.ndarray, float]:
    """Columns of the 8×8 study embedding that form the k×k projection of the matching modules, and the scale.

    ĝ = vec(P_out G P_inᵀ) is laid out (k_out, k_in) row-major, so the k×k projection of a module is the
    top-left k×k block of its 8×8 block times (8/k) — exactly, when the projection matrices nest
    (:func:`_prefix_rows_match`; a ValueError otherwise).
    """
    cols = []
    for slot in layout.slots:
        if modules and not re.search(modules, slot.name):
            continue
        for side, d in (("in", slot.d_in), ("out", slot.d_out)):
            if k != STUDY_K and not _prefix_rows_match(layout.spec.seed, slot.name, side, k, d):
                raise ValueError(f"the {k}x{k} projection of {slot.name} is not a block of its 8x8 one ({side}, d={d})")
        block = np.arange(slot.size).reshape(slot.k_out, slot.k_in)[:k, :k].reshape(-1)
        cols.append(slot.offset + block)
    return np.concatenate(cols), STUDY_K / k


def sub_layout(layout: Any, modules: str, k: int) -> Any:
    """The layout of the k×k projection of the modules matching ``modules`` (for the preconditioner)."""
    from dda_kernel import ProjectionSpec
    from dda_kernel.projection import make_layout

    slots = [s for s in layout.slots if not modules or re.search(modules, s.name)]
    return make_layout(ProjectionSpec(k, k, layout.spec.seed), [(s.name, s.d_in, s.d_out) for s in slots])


def _study_vectors(store: Any, cid: str, kind: str, qids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from storage.vectors import read_embeddings, read_query_embeddings

    matrix = read_embeddings(store, cid)
    g = matrix.vectors[matrix.order].astype(np.float64)
    return g, read_query_embeddings(store, cid, kind, qids).astype(np.float64)


def _sliced_scores(
    vectors: tuple[np.ndarray, np.ndarray], cols: np.ndarray, scale: float, sub_layout: Any, scoring: Any
) -> np.ndarray:
    """s̃ (m, n) of the sliced (rescaled) vectors, computed as ``tasks.lineage`` does for ``scoring``.

    ``sub_layout`` is the layout the sliced vectors form (k×k blocks of the selected modules), so the
    Fisher preconditioner is fitted per module block exactly as the system fits it.
    """
    from dda_kernel import (
        apply_preconditioner,
        covariance_init,
        covariance_update,
        fit_preconditioner,
        normalise_scores,
    )

    g, q = vectors[0][:, cols] * scale, vectors[1][:, cols] * scale
    qt = torch.from_numpy(q)
    if scoring.preconditioner == "fisher":
        state = covariance_update(covariance_init(sub_layout), sub_layout, torch.from_numpy(g).float())
        qt = apply_preconditioner(fit_preconditioner(state, scoring.damping), sub_layout, qt)
    qn, gn = (torch.from_numpy(np.linalg.norm(x, axis=1)) for x in (q, g))
    s = qt @ torch.from_numpy(g).T
    return normalise_scores(s, scoring.normalisation, qn, gn).numpy()  # type: ignore[no-any-return]


def default_projection(study: Any, default: Any) -> dict[str, Any]:
    """The module set and k of the study that the system's default layout equals (``modules`` None if none)."""
    names = [s.name for s in default.slots]
    k = default.spec.k_in if default.spec.k_in == default.spec.k_out else None
    match = next(
        (n for n, pattern in MODULE_SETS.items() if [s.name for s in sub_layout(study, pattern, 1).slots] == names),
        None,
    )
    return {"modules": match, "k": k, "dim": default.dim}


def bm25_rankings(texts: list[str], queries: list[dict[str, str]]) -> tuple[dict[str, np.ndarray], float]:
    """BM25 of each traced interaction (prompt + hallucinated output) against the training texts.

    BM25 has no contrastive form (subtracting the corrected text's BM25 penalises exactly the samples
    whose document mentions X, i.e. the corrupted ones), so both query kinds get this ranking.
    """
    t0 = time.perf_counter()
    index = BM25(texts)
    plain = np.stack([index.scores(q["prompt"] + q["response"]) for q in queries])
    return {"plain": plain, "contrastive": plain}, time.perf_counter() - t0


def _encode(tokenizer: Any, rows: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    from tasks.tokenize import encode_pair

    return [encode_pair(tokenizer, p, r, 512) for p, r in rows]


def cea_all_states(
    root: Path, base_dir: Path, mode: str, size: Size, seed: int, sids: list[str], pairs: list[str],
    queries: list[dict[str, str]], bf16: bool, log: Log, last_only: bool = False,
) -> tuple[dict[str, np.ndarray], list[float]]:  # fmt: skip
    """CEA scores at the base model and every checkpoint: kind → array (states, pairs, n); seconds per state.
    ``last_only``: the last checkpoint alone (states = 1), which is what CEA is compared at.

    Cached in ``cea.npz`` (``cea_last.npz``) under the mode's folder; the last state of a matching
    ``cea.npz`` serves ``last_only``.
    """
    from tasks.checkpoints import discover_checkpoints
    from tasks.models import load_base_model

    key = json.dumps({"steps": size.cea_steps, "lr": size.cea_lr[mode], "bf16": bf16, "pairs": pairs})
    full, last = root / "cea.npz", root / "cea_last.npz"
    sources = [(full, slice(-1, None)), (last, slice(None))] if last_only else [(full, slice(None))]
    for cache, take in sources:
        if cache.is_file():
            data = np.load(cache)
            if str(data["key"]) == key:
                return {k: data[k][take] for k in KINDS}, data["seconds"][take].tolist()
    cache = last if last_only else full
    rows = {r["id"]: r for r in (json.loads(line) for line in (root / "train.jsonl").open())}
    states = [None, *[c.path for c in discover_checkpoints(root / "run", 0.0)]]
    states = states[-1:] if last_only else states
    out = {k: np.zeros((len(states), len(pairs), len(sids))) for k in KINDS}
    seconds = []
    for t, path in enumerate(states):
        t0 = time.perf_counter()
        model, tokenizer = load_base_model(str(base_dir))
        if mode == "lora":
            from peft import PeftModel

            model = (
                lora_model(model, seed)
                if path is None
                else PeftModel.from_pretrained(model, str(path), is_trainable=True)
            )
        elif path is not None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        if mode == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        samples = _encode(tokenizer, [(rows[s]["prompt"], rows[s]["response"]) for s in sids])
        reference = response_losses(model, samples, pad, bf16=bf16)
        for j, pair in enumerate(pairs):
            mine = [q for q in queries if q["pair"] == pair]
            errors = _encode(tokenizer, [(q["prompt"], q["response"]) for q in mine])
            fixes = _encode(tokenizer, [(q["prompt"], q["corrected"]) for q in mine])
            scores = cea_scores(model, samples, errors, fixes, pad, size.cea_steps, size.cea_lr[mode], reference, bf16)
            out["plain"][t, j], out["contrastive"][t, j] = scores.plain, scores.contrastive
        seconds.append(time.perf_counter() - t0)
        log(f"{mode}: CEA at {'base' if path is None else Path(path).name} ({len(pairs)} pairs) in {seconds[-1]:.0f} s")
        del model
    np.savez(cache, key=np.array(key), seconds=np.array(seconds), **out)
    return out, seconds


def normalise_cea(c: np.ndarray, norm: str) -> np.ndarray:
    """CEA scores per state and pair, raw (``none``) or z-scored over samples (``zscore``)."""
    if norm == "none":
        return c
    return (c - c.mean(axis=-1, keepdims=True)) / np.maximum(c.std(axis=-1, keepdims=True), 1e-12)
