"""Bergson's TrackStar beside DDA lineage, on the same world, fine-tuning run and traced outputs as the
hallucination benchmark (benchmarks/README.md, "The field's tools").

    python -m benchmarks.bergson_trackstar --size default [--mode lora] [--venv .bench-work/tda-venv] [--reuse]

Bergson (EleutherAI, PyPI ``bergson==2.5.1``) is a benchmark-only dependency in its own virtual environment,
never imported by this project: this script calls its command line (``<venv>/bin/bergson trackstar``) and reads
the scores it writes. Make the environment once (torch pinned, or pip resolves a CUDA build)::

    python3 -m venv .bench-work/tda-venv
    .bench-work/tda-venv/bin/pip install torch==2.13.0
    printf 'torch==2.13.0\\ntransformers==5.23.0\\n' > constraints.txt
    .bench-work/tda-venv/bin/pip install -c constraints.txt bergson==2.5.1
    .bench-work/tda-venv/bin/pip uninstall -y torchvision torchaudio

Per checkpoint of the cached fine-tuning run (``.bench-work/<size>/<mode>/run``, the LoRA adapters as they are):
TrackStar end to end (Hessian statistics on the training set, query and training gradients, scores) with every
query its own (``--score individual``) and the loss on the response only (prompt and completion columns). The
queries at checkpoint t are each traced output y, its known correction y_c, and the correction y'_t that DDA
lineage derived for it at t (the ``derived_corrections`` of ``benchmarks.no_correction``'s run on the same
store, ids ``words:<id>``; run that first). Rows, each the mean of the per-checkpoint scores (Bergson's own
per-checkpoint use) and ``…_last`` (the last checkpoint):

- ``bergson_trackstar`` on the plain query: s_t(y);
- ``bergson_trackstar@counterfactual``: s_t(y) − s_t(y'_t), the same counterfactual contrast the default traces for
  an output without a correction;
- ``bergson_trackstar@contrastive``: s_t(y) − s_t(y_c), the contrast the default traces with a known correction.

TrackStar's own contrastive query set aggregates all queries into one (``--contrast`` needs
``--query.aggregation mean``); the differences of per-query scores above are the per-output form. Time-to-scores
is Bergson's wall time, start-up included (three query sets per run). ``ci95``: bootstrap interval of the mean AUC
over outputs (:func:`benchmarks.evaluate.bootstrap_ci`).

Results: ``benchmarks/results/bergson_<size>_<mode>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.hallucination.config import RESULTS, SIZES, cell_fields, log_line, machine
from benchmarks.hallucination.evaluation import mode_context, record
from benchmarks.hallucination.worlds import prepare_mode

VENV = Path(".bench-work/tda-venv")
PROJECTION_DIM = 16  # TrackStar's per-module random projection (its default is 0: no projection)


def trackstar(bergson: Path, checkpoint: Path, tokenizer: Path, train: Path, queries: Path, out: Path) -> float:
    """Run ``bergson trackstar`` for one checkpoint into ``out`` (the tokenizer from the base model's folder: an
    adapter folder has none); its wall seconds."""
    cmd = [
        str(bergson), "trackstar", str(out), "--model", str(checkpoint), "--tokenizer", str(tokenizer),
        "--overwrite", "true",
        "--data.dataset", str(train), "--data.prompt_column", "prompt", "--data.completion_column", "response",
        "--query.dataset", str(queries), "--query.prompt_column", "prompt", "--query.completion_column", "response",
        "--score", "individual", "--projection_dim", str(PROJECTION_DIM), "--token_batch_size", "512",
        "--precision", "fp32",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bergson trackstar failed on {checkpoint.name}: {done.stderr[-3000:]}")
    return time.perf_counter() - started


def load_scores(folder: Path) -> np.ndarray:
    """Bergson's ``scores.bin`` under ``folder`` as a (queries, training items) array (every cell written)."""
    paths = [p.parent for p in folder.rglob("scores.bin")]
    if len(paths) != 1:
        raise RuntimeError(f"expected one scores.bin under {folder}, found {len(paths)}")
    info = json.loads((paths[0] / "info.json").read_text())
    table = np.memmap(paths[0] / "scores.bin", dtype=np.dtype(info["dtype"]), mode="r", shape=(info["num_rows"],))
    columns = [np.asarray(table[f"score_{i}"], dtype=np.float64) for i in range(info["num_scores"])]
    if not all(bool(np.asarray(table[f"written_{i}"]).all()) for i in range(info["num_scores"])):
        raise RuntimeError(f"{paths[0]}: some scores were not written")
    return np.stack(columns)


def derived_corrections(store_root: Path) -> dict[tuple[str, str], str]:
    """(output id, checkpoint id) → the response DDA lineage derived there (``benchmarks.no_correction``'s ``words:``
    outputs)."""
    from storage.store import LineageStore

    rows = LineageStore.open(store_root).read("derived_corrections", ["query_id", "checkpoint_id", "response"])
    prefix = "words:"
    return {(r["query_id"][len(prefix) :], r["checkpoint_id"]): r["response"] for r in rows.to_pylist()
            if r["query_id"].startswith(prefix)}  # fmt: skip


def query_sets(
    queries: list[dict[str, str]], derived: dict[tuple[str, str], str], checkpoint: str
) -> list[dict[str, str]]:
    """The three query sets at ``checkpoint`` (``checkpoint-<step>``), in order: each output y, its known correction
    y_c, the correction y'_t DDA lineage derived there; as {prompt, response}."""
    texts = [q["response"] for q in queries] + [q["corrected"] for q in queries]
    texts += [derived[(q["id"], f"run/{checkpoint}")] for q in queries]
    return [{"prompt": q["prompt"], "response": t} for q, t in zip(queries * 3, texts, strict=True)]


def add_states(cubes: dict[str, list[np.ndarray]], scores: np.ndarray, m: int) -> None:
    """Split one checkpoint's (3m, n) scores of :func:`query_sets` into the plain, contrastive (y − y_c) and
    counterfactual (y − y'_t) cubes."""
    plain, corrected, counter = (scores[i * m : (i + 1) * m] for i in range(3))
    cubes["plain"].append(plain)
    cubes["contrastive"].append(plain - corrected)
    cubes["counterfactual"].append(plain - counter)


def tool_rows(
    tool: str, cubes: dict[str, list[np.ndarray]], seconds: dict[str, float], size_name: str, mode: str, ctx: Any
) -> list[dict[str, Any]]:  # fmt: skip
    """Per query kind, ``tool[@kind]`` (the mean over checkpoints; time: every checkpoint) and ``…_last`` (the last
    checkpoint; its time). Selection ``out_of_world``: the tool runs with its own settings, and the derived
    corrections it is given use ``min_edit_gain`` 0, what the out-of-world choice for the canary world also takes."""
    total, last = sum(seconds.values()), list(seconds.values())[-1]
    cell = cell_fields(size_name, tool)
    rows = []
    for query, cube in cubes.items():
        name = tool + ("" if query == "plain" else f"@{query}")
        rows.append({**cell, **record(mode, query, name, ctx.score(np.mean(cube, 0)), total)})
        rows.append({**cell, **record(mode, query, f"{name}_last", ctx.score(cube[-1]), last)})
    for r in rows:
        log_line(f"{r['method']}: AUC {r['mean_auc']:.3f}, AP {r['mean_ap']:.3f}")
    return rows


def tool_cell(doc: str | None, modes: list[str], tool: str) -> tuple[Any, Path, Path, Any, list[dict[str, str]], Any]:
    """A field's-tool benchmark's command line and its cell: (arguments, work folder, mode folder, evaluation
    context, traced outputs, DDA lineage's derived corrections by (output id, checkpoint id))."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="default", choices=sorted(SIZES))
    p.add_argument("--mode", default="lora", choices=modes)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--venv", type=Path, default=VENV)
    p.add_argument("--reuse", action="store_true", help=f"evaluate the scores of the last run again (no {tool} run)")
    a = p.parse_args()
    work = Path(".bench-work") / a.size
    prepared = prepare_mode(work, work / "base-model", a.mode, SIZES[a.size], a.seed, log_line)
    root = work / a.mode
    ctx, queries, _ = mode_context(root, prepared)
    return a, work, root, ctx, queries, derived_corrections(root / "default" / "store")


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    a, work, root, ctx, queries, derived = tool_cell(__doc__, ["lora", "full"], "Bergson")
    train_ids = [json.loads(line)["id"] for line in (root / "train.jsonl").read_text().splitlines() if line.strip()]
    order = [train_ids.index(sid) for sid in ctx.sids]
    ckpts = sorted((root / "run").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    out_file = RESULTS / f"bergson_{a.size}_{a.mode}.json"
    earlier = json.loads(out_file.read_text())["seconds_per_checkpoint"] if a.reuse and out_file.is_file() else {}
    cubes: dict[str, list[np.ndarray]] = {"plain": [], "counterfactual": [], "contrastive": []}
    seconds = {}
    for ckpt in ckpts:
        out = root / "bergson" / ckpt.name
        qfile = root / "bergson" / f"{ckpt.name}-queries.jsonl"
        qfile.parent.mkdir(parents=True, exist_ok=True)
        qfile.write_text("".join(json.dumps(q) + "\n" for q in query_sets(queries, derived, ckpt.name)))
        if ckpt.name in earlier and any(out.rglob("scores.bin")):  # --reuse: the scores and time of the last run
            seconds[ckpt.name] = earlier[ckpt.name]
        else:
            took = trackstar(a.venv / "bin" / "bergson", ckpt, work / "base-model", root / "train.jsonl", qfile, out)
            seconds[ckpt.name] = round(took, 1)
        scores = load_scores(out)
        m = len(queries)
        if scores.shape != (3 * m, len(train_ids)):
            raise RuntimeError(f"scores of shape {scores.shape}, expected {(3 * m, len(train_ids))}")
        add_states(cubes, scores[:, order], m)
        log_line(f"{ckpt.name}: TrackStar in {seconds[ckpt.name]} s")
    rows = tool_rows("bergson_trackstar", cubes, seconds, a.size, a.mode, ctx)
    report: dict[str, Any] = {
        "command": f"python -m benchmarks.bergson_trackstar --size {a.size} --mode {a.mode}", "machine": machine(),
        "bergson": "2.5.1", "projection_dim": PROJECTION_DIM, "results": rows, "seconds_per_checkpoint": seconds,
        "n_outputs": len(queries), "n_train": len(train_ids),
    }  # fmt: skip
    out_file.write_text(json.dumps(report, indent=1) + "\n")
    log_line(f"wrote {out_file}")


if __name__ == "__main__":
    main()
