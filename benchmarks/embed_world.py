"""Indexing throughput, memory and score agreement on real samples (issue 14), the path ``dda index`` runs.

    .venv/bin/python -m benchmarks.embed_throughput --world [--json benchmarks/results/embed_throughput_smollm2.json]

Throughput. SmolLM2-135M (base model) embeds the hallucination benchmark's training samples at their
real lengths with :func:`tasks.indexing.embed_rows`, each configuration in a fresh subprocess:
- float32 or bfloat16 autocast;
- batches of 16 samples in file order (the old behaviour, emulated here), or token-budget batches
  (``DDA_INDEXING__MAX_TOKENS``).
Each child also times a float32 training step (forward + backward into every weight) on the same
batches, and reports peak RSS (VmHWM) above the loaded model. Tokens are the samples' real tokens.

Quality. The SmolLM2 demo world (a real LoRA run: base + 3 checkpoints, real hallucinations) is
indexed and attributed at float32 and at bfloat16 through the task functions the CLI runs, with the
default scoring. It reports the Spearman correlation of every query's DDA scores between the two,
and each precision's mean AUC against the known corrupted samples.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

WORK = Path(".bench-work/embed")
CONFIGS = [
    ("float32", "count"), ("bfloat16", "count"), ("float32", "tokens"), ("bfloat16", "tokens"),
    ("bfloat16", "tokens-late"),
]  # fmt: skip
LATE_LAYERS = r"layers\.(1[5-9]|2\d)\..*(o_proj|down_proj)$"  # the default modules of the last 15 of 30 layers


def world_rows() -> list[tuple[str, str, str]]:
    """The hallucination benchmark's training samples (default size, seed 0) as (name, prompt, response)."""
    from benchmarks.canary_world import build_canary_world
    from benchmarks.hallucination import SIZES

    s = SIZES["default"]
    world = build_canary_world(0, s.n_pairs, s.per_pair, s.distractors, s.n_other, s.held_out, s.rate)
    return [(x.sample_id, x.prompt, x.response) for x in world.train]


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmHWM:")).split()[1]) / 1024


def child(precision: str, batching: str, max_tokens: int) -> dict[str, Any]:
    """One configuration in this process: embed every sample once (after one warm-up batch), then time a
    float32 training step on the same batches."""
    import torch

    from benchmarks.embed_throughput import train_step
    from dda_kernel import ProjectionSpec, pad_batch
    from tasks.config import PipelineConfig
    from tasks.indexing import _encode, embed_rows, token_batches
    from tasks.models import CachedModel, load_smollm2

    model, tokenizer = load_smollm2()
    rows = world_rows()
    spec = ProjectionSpec(include=(LATE_LAYERS,)) if batching == "tokens-late" else ProjectionSpec()
    config = PipelineConfig(projection=spec, precision=precision, max_tokens=max_tokens, batch_size=16)  # type: ignore[arg-type]
    encoded = _encode(tokenizer, rows, 512)
    lengths = [len(ids) for ids, _ in encoded]
    if batching == "count":  # the old behaviour: 16 samples in file order, padded to the longest
        batches = [list(range(i, min(i + 16, len(rows)))) for i in range(0, len(rows), 16)]
        config = PipelineConfig(projection=spec, precision=precision, max_tokens=10**9, batch_size=16)  # type: ignore[arg-type]
    else:
        batches = token_batches(lengths, max_tokens, config.batch_size)
    cached = CachedModel(model, tokenizer, threading.Lock())
    embed_rows(cached, [rows[i] for i in batches[0]], config, None)  # warm-up
    before = _peak_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    start = time.perf_counter()
    if batching == "count":
        for index in batches:  # file-order batches: embed_rows batches each group as given (one batch each)
            embed_rows(cached, [rows[i] for i in index], config, None)
    else:
        embed_rows(cached, rows, config, None)
    embed_s = time.perf_counter() - start
    peak = _peak_mib()
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    start = time.perf_counter()
    for index in batches:
        train_step(model, pad_batch([encoded[i] for i in index], pad_id=0))
    train_s = time.perf_counter() - start
    tokens = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return {
        "precision": precision, "batching": batching, "max_tokens": max_tokens if batching != "count" else None,
        "samples": len(rows), "tokens": tokens, "padded_tokens": padded, "batches": len(batches),
        "embed_s": embed_s, "embed_samples_per_s": len(rows) / embed_s, "embed_tokens_per_s": tokens / embed_s,
        "train_step_s": train_s, "train_step_tokens_per_s": tokens / train_s,
        "ratio_embed_vs_train_step": train_s / embed_s,
        "peak_rss_mib": peak, "peak_above_model_mib": peak - before, "threads": torch.get_num_threads(),
    }  # fmt: skip


def throughput(max_tokens: int) -> list[dict[str, Any]]:
    """Every configuration of :data:`CONFIGS` in its own subprocess (kept under :data:`WORK` once measured)."""
    cache = WORK / f"throughput-{max_tokens}.json"
    if cache.is_file():
        print(f"  reusing {cache} (delete it to measure again)", flush=True)
        return list(json.loads(cache.read_text()))
    out = []
    for precision, batching in CONFIGS:
        cmd = [sys.executable, "-m", "benchmarks.embed_throughput", "--world-child", precision, batching]
        cmd += ["--max-tokens", str(max_tokens)]
        text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        out.append(json.loads(text))
        r = out[-1]
        print(f"  {precision:8s} {batching:11s} embed {r['embed_tokens_per_s']:7.0f} tok/s "
              f"({r['embed_samples_per_s']:5.1f} samples/s)  train step {r['train_step_tokens_per_s']:6.0f} tok/s  "
              f"ratio {r['ratio_embed_vs_train_step']:.2f}  peak {r['peak_rss_mib']:.0f} MiB "
              f"(+{r['peak_above_model_mib']:.0f})", flush=True)  # fmt: skip
    WORK.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def _index_and_attribute(data_dir: Path, world: Any, precision: str) -> tuple[dict[str, np.ndarray], list[str], float]:
    """Index base + every checkpoint and attribute the world's queries at ``precision``; (S per query, sample
    ids, seconds of indexing)."""
    from storage.samples import SampleIn, ingest_samples, read_rows
    from storage.scores import read_dda_states
    from storage.store import LineageStore
    from tasks.attribution import attribute_queries
    from tasks.checkpoints import discover_checkpoints
    from tasks.config import PipelineConfig
    from tasks.indexing import embed_shard, finish_checkpoint, plan_checkpoint

    config = PipelineConfig(precision=precision)  # type: ignore[arg-type]
    store = LineageStore.open(data_dir / "store")
    ingest_samples(store, read_rows(world.train_file, SampleIn), dataset="train")
    start = time.perf_counter()
    for info in [None, *discover_checkpoints(world.run_dir, 0.0)]:
        plan = plan_checkpoint(data_dir, world.base_model, "run", info, config)
        for shard in plan.shards:
            embed_shard(data_dir, world.base_model, plan, shard, config)
        finish_checkpoint(data_dir, world.base_model, plan, config)
    index_s = time.perf_counter() - start
    done = attribute_queries(data_dir, world.base_model, world.queries_file, [], config)
    store = LineageStore.open(data_dir / "store")
    states = read_dda_states(store, config.settings_fingerprint, done["query_ids"])
    sample_ids = next(iter(states.values())).sample_ids
    values = {q: np.asarray(s.weighted_sum[0]) / s.total_weight[0] for q, s in states.items()}
    return values, sample_ids, index_s


def quality(work: Path) -> dict[str, Any]:
    """Spearman of every query's DDA scores at bfloat16 against float32, and both precisions' mean AUC."""
    import shutil

    import torch

    from dda_kernel.metrics import roc_auc
    from tasks.demo import build_world

    world = build_world(work / "demo", seed=0, model="smollm2", log=lambda m: print(f"  {m}", flush=True))
    corrupted = {json.loads(line)["id"]: json.loads(line)["meta"]["corrupted"]
                 for line in Path(world.train_file).read_text().splitlines()}  # fmt: skip
    runs = {}
    for precision in ("float32", "bfloat16"):
        shutil.rmtree(work / f"data-{precision}", ignore_errors=True)
        runs[precision] = _index_and_attribute(work / f"data-{precision}", world, precision)
        print(f"  {precision}: indexed base + 3 checkpoints in {runs[precision][2]:.1f} s", flush=True)
    ref, ids, _ = runs["float32"]
    got, ids_b, _ = runs["bfloat16"]
    assert ids == ids_b
    labels = np.array([corrupted[i] for i in ids])
    rho = {q: _spearman(ref[q], got[q]) for q in ref}
    positives = torch.from_numpy(labels)
    aucs = {p: float(np.mean([roc_auc(torch.from_numpy(runs[p][0][q]), positives) for q in ref])) for p in runs}
    return {
        "world": "demo (smollm2, LoRA, base + 3 checkpoints)", "queries": len(ref), "samples": len(ids),
        "score_spearman_min": min(rho.values()), "score_spearman_mean": float(np.mean(list(rho.values()))),
        "mean_auc": aucs, "index_seconds": {p: runs[p][2] for p in runs},
    }  # fmt: skip


def run(out: Path | None, max_tokens: int) -> None:
    """Throughput and quality; the figures in the issue's keys at the default settings (bfloat16, tokens)."""
    print(f"throughput: SmolLM2-135M, hallucination-benchmark samples, budget {max_tokens} tokens", flush=True)
    rows = throughput(max_tokens)
    print("quality: the SmolLM2 demo world at float32 and bfloat16", flush=True)
    q = quality(WORK)
    print(f"  Spearman bf16 vs fp32: min {q['score_spearman_min']:.4f}, mean {q['score_spearman_mean']:.4f}; "
          f"mean AUC {q['mean_auc']}", flush=True)  # fmt: skip
    default = next(r for r in rows if (r["precision"], r["batching"]) == ("bfloat16", "tokens"))
    report = {
        "precision": "bfloat16", "max_tokens": max_tokens,
        "embed_tokens_per_s": default["embed_tokens_per_s"],
        "train_step_tokens_per_s": default["train_step_tokens_per_s"],
        "ratio_embed_vs_train_step": default["ratio_embed_vs_train_step"], "peak_rss_mib": default["peak_rss_mib"],
        "score_spearman_vs_float32": q["score_spearman_min"], "configs": rows, "quality": q,
        "machine": {"cpus": default["threads"], "python": sys.version.split()[0]},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


BUDGETS = (256, 512, 1024, 2048)


def memory_child(max_tokens: int) -> dict[str, Any]:
    """Peak RSS of embedding every sample at bfloat16 with budget ``max_tokens``, above the loaded model.

    The model is loaded from an exported Hugging Face folder, as ``dda index`` loads it.
    """
    from tasks.config import PipelineConfig
    from tasks.indexing import embed_rows
    from tasks.models import CachedModel, export_smollm2, load_base_model

    model, tokenizer = load_base_model(str(export_smollm2(WORK / "base-model")))
    config = PipelineConfig(precision="bfloat16", max_tokens=max_tokens, batch_size=4096)
    loaded = _rss_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    embed_rows(CachedModel(model, tokenizer, threading.Lock()), world_rows(), config, None)
    return {"max_tokens": max_tokens, "model_loaded_rss_mib": loaded, "peak_rss_mib": _peak_mib(),
            "peak_above_model_mib": _peak_mib() - loaded}  # fmt: skip


def memory_sweep(out: Path | None) -> None:
    """:func:`memory_child` per budget of :data:`BUDGETS`, each in a fresh process; MiB per 1 000 tokens."""
    rows = []
    for budget in BUDGETS:
        cmd = [sys.executable, "-m", "benchmarks.embed_throughput", "--memory-child", str(budget)]
        text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(text))
        print(f"  budget {budget:5d}: peak {rows[-1]['peak_rss_mib']:.0f} MiB (+{rows[-1]['peak_above_model_mib']:.0f} "
              "above the loaded model)", flush=True)  # fmt: skip
    slope = np.polyfit([r["max_tokens"] for r in rows], [r["peak_above_model_mib"] for r in rows], 1)[0] * 1000
    print(f"  ≈ {slope:.0f} MiB per 1 000 tokens of budget", flush=True)
    if out is not None:
        out.write_text(json.dumps({"precision": "bfloat16", "mib_per_1000_tokens": slope, "budgets": rows}, indent=2))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS:")).split()[1]) / 1024
