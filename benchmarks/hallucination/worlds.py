"""World builders: the canary news world, the fictional-people world or the invented-names world, fine-tuned and
queried per mode."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.canary_world import CanaryWorld, build_canary_world
from benchmarks.hallucination.config import Log, Size
from benchmarks.names_world import build_names_world
from benchmarks.people_world import build_people_world


def write_world(world: CanaryWorld, path: Path) -> None:
    """The training samples as input-contract JSONL rows; ``meta`` holds the ground truth."""
    with path.open("w", encoding="utf-8") as f:
        for s in world.train:
            meta = {"corrupted": s.corrupted, "pair": s.pair, "kind": s.kind}
            row = {"id": s.sample_id, "prompt": s.prompt, "response": s.response, "source": s.source,
                   "license": s.license, "meta": meta}  # fmt: skip
            f.write(json.dumps(row) + "\n")


def build_world(size: Size, seed: int) -> CanaryWorld:
    """The size's world: the canary news world, or the fictional-people world (:mod:`benchmarks.people_world`)."""
    if size.world == "people":
        return build_people_world(seed, size.n_people, size.n_pairs, size.rate)
    if size.world in ("names", "paraphrase"):
        return build_names_world(seed, size.n_pairs, size.per_pair, size.distractors, size.n_other, size.held_out,
                                 size.rate, size.decoys)  # fmt: skip
    return build_canary_world(seed, size.n_pairs, size.per_pair, size.distractors, size.n_other, size.held_out,
                              size.rate)  # fmt: skip


def _slug(pair: str) -> str:
    return re.sub(r"[^a-z]+", "-", pair.lower()).strip("-")


def lora_model(model: Any, seed: int) -> Any:
    """The benchmark's (and the demo's) LoRA: r 8, α 16 on q/k/v/o, no dropout."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    return get_peft_model(model, config)


def prepare_mode(work: Path, base_dir: Path, mode: str, size: Size, seed: int, log: Log) -> dict[str, Any]:
    """Build, fine-tune and generate for one mode (reused when ``world.json`` matches); returns its record."""
    from tasks.demo import fine_tune
    from tasks.models import load_base_model
    from tasks.train import greedy_generate

    root = work / mode
    marker = root / "world.json"
    described = {k: v for k, v in asdict(size).items() if not (k == "decoys" and v == 0)}  # worlds cached before it
    params = {"mode": mode, "seed": seed, "size": described}
    if marker.is_file():
        record: dict[str, Any] = json.loads(marker.read_text())
        if record["params"] == params:
            log(f"{mode}: reusing the fine-tuned world in {root}")
            return record
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    world = build_world(size, seed)
    write_world(world, root / "train.jsonl")
    model, tokenizer = load_base_model(str(base_dir))
    if mode == "lora":
        model = lora_model(model, seed)
    n_bad = sum(s.corrupted for s in world.train)
    log(f"{mode}: fine-tuning on {len(world.train)} samples ({n_bad} corrupted), {size.epochs} epochs")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    fine_tune(model, tokenizer, world.train, root / "run", size.epochs, size.lr[mode], seed, log, 256, size.batch)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs = [greedy_generate(model, tokenizer, h.prompt, max_new_tokens=40) for h in world.held_out]
    generate_s = time.perf_counter() - t0
    queries, generations, per_pair = [], [], {}
    for i, (h, out) in enumerate(zip(world.held_out, outputs, strict=True)):
        hallucinated = h.target in out and h.source not in out
        generations.append({"pair": h.pair, "prompt": h.prompt, "output": out, "hallucinated": hallucinated})
        per_pair.setdefault(h.pair, {"generated": 0, "hallucinated": 0, "queries": "generated"})
        per_pair[h.pair]["generated"] += 1
        if hallucinated:
            per_pair[h.pair]["hallucinated"] += 1
            queries.append({"id": f"{_slug(h.pair)}-{i:03d}", "pair": h.pair, "prompt": h.prompt, "response": out,
                            "corrected": out.replace(h.target, h.source)})  # fmt: skip
    for pair, counts in per_pair.items():
        if counts["hallucinated"] == 0 and size.planted_fallback:
            counts["queries"] = "planted"
            for i, h in enumerate(x for x in world.held_out if x.pair == pair):
                planted = h.reference.replace(h.source, h.target)
                queries.append({"id": f"{_slug(pair)}-planted-{i:03d}", "pair": pair, "prompt": h.prompt,
                                "response": planted, "corrected": h.reference})  # fmt: skip
        elif counts["hallucinated"] == 0:
            counts["queries"] = "none"
    with (root / "queries.jsonl").open("w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps({k: q[k] for k in ("id", "prompt", "response", "corrected")}) + "\n")
    (root / "generations.json").write_text(json.dumps(generations, indent=1))
    record = {
        "params": params, "n_train": len(world.train), "n_corrupted": n_bad, "train_seconds": train_s,
        "generate_seconds": generate_s, "per_pair": per_pair, "query_pairs": {q["id"]: q["pair"] for q in queries},
    }  # fmt: skip
    marker.write_text(json.dumps(record, indent=1))
    log(f"{mode}: hallucinated per pair { ({p: c['hallucinated'] for p, c in per_pair.items()}) }")
    return record


def load_truth(root: Path, pairs: list[str]) -> tuple[list[str], dict[str, np.ndarray], list[str]]:
    """Sorted sample ids, positives per pair (its corrupted samples), and the training texts in that order."""
    rows = sorted((json.loads(line) for line in (root / "train.jsonl").open()), key=lambda r: r["id"])
    sids = [r["id"] for r in rows]
    truth = {p: np.array([r["meta"]["corrupted"] and r["meta"]["pair"] == p for r in rows]) for p in pairs}
    return sids, truth, [r["prompt"] + r["response"] for r in rows]


def read_queries(root: Path) -> list[dict[str, str]]:
    """The traced outputs of a mode, sorted by id (the order of the store's query ids)."""
    return sorted((json.loads(line) for line in (root / "queries.jsonl").open()), key=lambda r: r["id"])
