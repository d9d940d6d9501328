"""Tracing latency: what a user waits for when ``dda attribute`` traces outputs.

    .venv/bin/python -m benchmarks.attribute_latency      # SmolLM2-135M LoRA, base + 5, N = 100 000, 2 CPUs

The models and outputs are real: the SmolLM2 demo world (``tasks.demo.build_world``) fine-tuned with LoRA for 5
epochs through the Hugging Face Trainer (one adapter checkpoint per epoch), its real hallucinated summaries of
unseen documents as the outputs. The sample side is synthetic: N finalized vectors per state in the real
projection layout of the model, written as indexing writes them (``benchmarks.query_latency.index_checkpoint``),
so that scoring runs against N = 100 000 without embedding 100 000 texts.

Every timed run is a fresh process that imports the stack and then calls the function ``dda attribute`` calls
without a server, :func:`tasks.attribution.attribute_queries` (``--all``: :func:`tasks.attribution.refresh_queries`):
registration, model loading, derivation, embedding, scoring and writes — everything but the imports, which are
measured apart (``python_import_floor_s``: ``import torch, transformers, lancedb`` in a fresh process). Keys:

- ``one_output_counterfactual_s`` / ``one_output_contrastive_s``: one new output without / with a correction
  (median of 3 runs, each a new output);
- ``sixteen_outputs_counterfactual_s``: 16 new outputs without a correction in one call (median of 3 runs, each
  the same 16 texts under new ids), and ``sixteen_vs_one_counterfactual``, its ratio to the one-output median;
- ``model_loads_per_state``: model loads (base model read from disk, checkpoint loaded) over states, max over runs;
- ``derivation_vs_embedding_cpu``: CPU seconds in the derivation over CPU seconds in embedding the outputs and
  their corrections (the three 16-output runs together), each without the model loads that happen inside it (a
  state is loaded by whichever step needs it first, the derivation here; ``load_cpu_s`` per run);
  ``derivation_with_loads_vs_embedding_cpu``: the same with the loads counted in the derivation, as this key was
  measured before;
- ``new_checkpoint_100_outputs_s``: 100 registered counterfactual outputs traced over base + 4; the fifth checkpoint
  is indexed; then one refresh of every registered output derives, embeds and folds all 100 at that checkpoint;
- ``full_vs_lora_cpu_per_output``: 16 outputs (8 with a correction) traced against the same checkpoints saved
  as full weights (each LoRA checkpoint merged) over their cost against the LoRA checkpoints; a store of
  ``--n-small`` samples for both (the model side is what differs).

Results: ``benchmarks/results/attribute_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "attribute_latency.json"
WORK = Path(__file__).resolve().parents[1] / ".bench-work" / "attribute_latency"
EPOCHS = 5


def _child(args: argparse.Namespace) -> None:
    """One timed tracing run in this (fresh) process; prints one JSON line."""
    import tasks.models as models
    import tasks.tracing as tracing
    from tasks.attribution import attribute_queries, refresh_queries
    from tasks.config import PipelineConfig

    loads: list[str] = []
    cpu = {"derive": 0.0, "embed": 0.0, "load": 0.0, "load_in_derive": 0.0, "load_in_embed": 0.0}
    phase = [""]  # the timed step a model load happens in: its CPU is counted as loading, not as that step

    def loading(f: Any, *a: Any, **k: Any) -> Any:
        start = time.process_time()
        try:
            return f(*a, **k)
        finally:
            spent = time.process_time() - start
            cpu["load"] += spent
            if phase[0]:
                cpu[f"load_in_{phase[0]}"] += spent

    for name in ("load_base_model", "load_checkpoint"):
        real = getattr(models, name)
        setattr(models, name, lambda *a, _f=real, _n=name, **k: loads.append(_n) or loading(_f, *a, **k))
    attach = models.attach_adapter

    def counted_attach(resident: Any, folder: Any, base: str) -> None:
        before = resident.adapter
        loading(attach, resident, folder, base)
        if resident.adapter != before:  # an adapter read from disk (re-attaching the active one reads nothing)
            loads.append(f"adapter {Path(folder).name}")

    models.attach_adapter = counted_attach  # type: ignore[assignment]
    for name, key in (("derive_corrections", "derive"), ("embed_rows", "embed")):
        real = getattr(tracing, name)

        def timed(*a: Any, _f: Any = real, _k: str = key, **k: Any) -> Any:
            start = time.process_time()
            phase[0] = _k
            try:
                return _f(*a, **k)
            finally:
                phase[0] = ""
                cpu[_k] += time.process_time() - start

        setattr(tracing, name, timed)
    config = PipelineConfig()
    wall, start = time.perf_counter(), time.process_time()
    if args.queries:
        report = attribute_queries(args.data_dir, args.base, args.queries, [], config)
    else:
        report = refresh_queries(args.data_dir, args.base, None, config)
    out = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - start, "loads": loads,
           "derive_cpu_s": cpu["derive"] - cpu["load_in_derive"], "embed_cpu_s": cpu["embed"] - cpu["load_in_embed"],
           "load_cpu_s": cpu["load"], "load_in_derive_cpu_s": cpu["load_in_derive"], "queries": report["queries"],
           "folds": report["folds"], "failed": report["failed"]}  # fmt: skip
    print(json.dumps(out))


def _run_child(data_dir: Path, base: str, queries: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.attribute_latency", "child", "--data-dir", str(data_dir), "--base", base]
    cmd += ["--queries", str(queries)] if queries else []
    env = {**os.environ, "DDA_INDEXING__PROGRESS": "false", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["failed"]:
        raise RuntimeError(f"outputs failed in a timed run: {result['failed']}")
    return result


def _outputs(world: Any) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in Path(world.queries_file).read_text().splitlines()]
    if not rows:
        raise RuntimeError("the world's fine-tuned model hallucinated on no unseen document: nothing to trace")
    return rows


def _write(path: Path, rows: list[dict[str, str]], prefix: str, corrected: int = 0) -> Path:
    """Rows as outputs with ids ``<prefix>NNN``; the first ``corrected`` keep their correction."""
    with path.open("w") as f:
        for i, r in enumerate(rows):
            row = {"id": f"{prefix}{i:03d}", "prompt": r["prompt"], "response": r["response"]}
            if i < corrected:
                row["corrected"] = r["corrected"]
            f.write(json.dumps(row) + "\n")
    return path


def _store(root: Path, world: Any, states: list[tuple[str, str | None]], n: int, layout: Any) -> Path:
    """A data folder: N synthetic samples, their vectors at ``states`` [(checkpoint id, model folder)]."""
    from storage.samples import SampleIn, ingest_samples
    from storage.store import LineageStore
    from tasks.checkpoints import fingerprint_files
    from tasks.finalize import layout_record

    shutil.rmtree(root, ignore_errors=True)
    store = LineageStore.open(root / "store", layout.fingerprint, layout.dim, layout_record(layout))
    rows = [SampleIn(id=f"s{i:07d}", prompt=f"document {i}", response=f"summary {i}") for i in range(n)]
    ingest_samples(store, rows, dataset="synthetic")
    for cid, folder in states:
        add_state(store, cid, folder or world.base_model, n, layout, fingerprint_files(folder or world.base_model))
    return root


def add_state(store: Any, cid: str, folder: str, n: int, layout: Any, fingerprint: str) -> None:
    """Index one state's synthetic vectors, its ``checkpoints`` row pointing at the real model folder."""
    from benchmarks.query_latency import index_checkpoint

    index_checkpoint(store, cid, n, 4096, 0, layout=layout, where=(folder, fingerprint))


def _full_run(world: Any, work: Path) -> Path:
    """Each LoRA checkpoint merged into full weights (the same model states saved as a full fine-tune would be)."""
    from tasks.models import load_checkpoint

    out = work / "run-full"
    for ckpt in sorted(Path(world.run_dir).glob("checkpoint-*")):
        dest = out / ckpt.name
        if (dest / "model.safetensors").is_file():
            continue
        model, tokenizer = load_checkpoint(world.base_model, ckpt)
        merged = model.merge_and_unload()
        tmp = dest.with_name(dest.name + ".tmp")
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copy(ckpt / "trainer_state.json", tmp / "trainer_state.json")
        tmp.replace(dest)
    return out


def _floor() -> float:
    cmd = [sys.executable, "-c", "import torch, transformers, lancedb"]
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build (or reuse) the world, run every timed tracing run, write and return the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "child"])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--n-small", type=int, default=2_000)
    ap.add_argument("--registered", type=int, default=100, help="outputs registered before the new checkpoint")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--base")
    ap.add_argument("--queries")
    args = ap.parse_args(argv)
    if args.mode == "child":
        _child(args)
        return {}
    from benchmarks.query_latency import write_results
    from tasks.checkpoints import discover_checkpoints
    from tasks.config import PipelineConfig
    from tasks.demo import build_world
    from tasks.indexing import model_layout

    t0 = time.perf_counter()
    world = build_world(args.work / "world", seed=0, model="smollm2", n_prompts=128, epochs=EPOCHS, log=print)
    outputs = _outputs(world)
    print(f"world: {len(outputs)} hallucinated outputs, {time.perf_counter() - t0:.0f} s", flush=True)
    ckpts = [str(c.path) for c in discover_checkpoints(world.run_dir, 0.0)]
    states = [("base", None)] + [(f"run/{Path(c).name}", c) for c in ckpts]
    layout = model_layout(world.base_model, PipelineConfig())
    pool = (outputs * (1 + 140 // len(outputs)))[:140]  # repeated texts get their own ids
    q = args.work / "queries"
    q.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = _store(args.work / "lora", world, states[:-1], args.n, layout)
    build_s = time.perf_counter() - t0
    hundred = _run_child(data, world.base_model, _write(q / "hundred.jsonl", pool[: args.registered], "h"))
    from storage.store import LineageStore
    from tasks.checkpoints import fingerprint_files

    t0 = time.perf_counter()
    add_state(LineageStore.open(data / "store"), states[-1][0], ckpts[-1], args.n, layout, fingerprint_files(ckpts[-1]))
    index_last_s = time.perf_counter() - t0
    new_ckpt = _run_child(data, world.base_model, None)
    singles = [_run_child(data, world.base_model, _write(q / f"one{k}.jsonl", pool[100 + k : 101 + k], f"c{k}-"))
               for k in range(3)]  # fmt: skip
    contrast = [_run_child(data, world.base_model, _write(q / f"fix{k}.jsonl", pool[103 + k : 104 + k], f"x{k}-", 1))
                for k in range(3)]  # fmt: skip
    sixteens = [
        _run_child(data, world.base_model, _write(q / f"sixteen{k}.jsonl", pool[106:122], f"s{k}-")) for k in range(3)
    ]  # the same texts under new ids: each run derives and embeds them anew
    sixteen = sorted(sixteens, key=lambda r: r["wall_s"])[1]
    full_dir = _full_run(world, args.work)
    full_states = [("base", None)] + [(f"run/{Path(c).name}", str(full_dir / Path(c).name)) for c in ckpts]
    mixed = _write(q / "mixed.jsonl", pool[122:138], "m", corrected=8)
    small_lora = _run_child(_store(args.work / "small-lora", world, states, args.n_small, layout), world.base_model,
                            mixed)  # fmt: skip
    small_full = _run_child(_store(args.work / "small-full", world, full_states, args.n_small, layout),
                            world.base_model, mixed)  # fmt: skip
    runs = [hundred, new_ckpt, *singles, *contrast, *sixteens, small_lora, small_full]
    n_states = len(states)
    results = {
        "one_output_counterfactual_s": round(statistics.median(r["wall_s"] for r in singles), 2),
        "one_output_contrastive_s": round(statistics.median(r["wall_s"] for r in contrast), 2),
        "sixteen_outputs_counterfactual_s": round(sixteen["wall_s"], 2),
        "sixteen_vs_one_counterfactual": round(sixteen["wall_s"] / statistics.median(r["wall_s"] for r in singles), 2),
        "model_loads_per_state": round(max(len(r["loads"]) for r in runs[2:]) / n_states, 3),
        "derivation_vs_embedding_cpu": round(
            sum(r["derive_cpu_s"] for r in sixteens) / sum(r["embed_cpu_s"] for r in sixteens), 3
        ),
        "derivation_with_loads_vs_embedding_cpu": round(
            sum(r["derive_cpu_s"] + r["load_in_derive_cpu_s"] for r in sixteens)
            / sum(r["embed_cpu_s"] for r in sixteens),
            3,
        ),
        f"new_checkpoint_{args.registered}_outputs_s": round(new_ckpt["wall_s"], 2),
        "full_vs_lora_cpu_per_output": round(small_full["cpu_s"] / small_lora["cpu_s"], 3),
        "python_import_floor_s": round(_floor(), 2),
        "one_output_counterfactual_runs_s": [round(r["wall_s"], 2) for r in singles],
        "one_output_contrastive_runs_s": [round(r["wall_s"], 2) for r in contrast],
        "sixteen_outputs_counterfactual_runs_s": [round(r["wall_s"], 2) for r in sixteens],
        "registered_outputs": args.registered,
        "registered_outputs_base_plus_4_s": round(hundred["wall_s"], 1),
        "runs": {
            name: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "failed"}
            for name, r in (
                ("hundred", hundred),
                ("new_checkpoint", new_ckpt),
                ("sixteen", sixteen),
                ("small_lora", small_lora),
                ("small_full", small_full),
            )
        },
        "build_store_s": round(build_s, 1),
        "index_last_checkpoint_s": round(index_last_s, 1),
        "n_samples": args.n,
        "n_samples_full_vs_lora": args.n_small,
        "states": n_states,
        "outputs_available": len(outputs),
    }
    return write_results(results, args.out)


if __name__ == "__main__":
    main()
