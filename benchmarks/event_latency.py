"""Lineage on save (benchmarks/README.md, "Events"): from the Trainer's save to refreshed lineage, through a real
local Prefect server and the served ``dda-on-checkpoint`` deployment, with no interval watcher.

    .venv/bin/python -m benchmarks.event_latency [--work .bench-work/event_latency] [--epochs 3]

The tiny demo world (tiny LLaMA, 240 samples; built once under ``--work``). Steps, all real: ``prefect server
start``; ``dda ingest``; ``dda index`` of the base model; ``dda attribute`` of the world's outputs; then

- ``callback_overhead``: the world's fine-tuning (the Hugging Face Trainer, a checkpoint per epoch,
  ``--overhead-epochs`` epochs) run ``--reps`` times without and with :class:`flows.callback.LineageCallback`
  announcing to the server, alternated in one process after one warm-up round of both (reported apart), no
  deployment served (nobody indexes these); the median over the ``--reps`` pairs of the ``trainer.train()``
  wall with / without − 1 (pairs cancel the machine's drift; the ratio of the two medians is reported beside).
  Beside it, the callback's own cost counted directly: the wall of ``on_save`` in the training thread plus the
  CPU time of each announcement in its thread, per save (``per_save_s``) and as a share of the training wall
  (``per_save_share_of_train``). Neither counts the server's own work when it shares the machine. Building
  the callback (importing ``prefect.events``, once per process) happens before training and is reported apart
  (``callback_build_s``, first build in the process).
- ``save_to_lineage_s_minus_index_s``: ``python -m deployments.serve --no-watcher`` serves the deployments; the same
  fine-tuning runs in a subprocess with the callback, ``--pause-after-save`` seconds after each save so that each
  checkpoint's run starts on an idle deployment (a checkpoint that comes while another is indexed waits for it:
  queueing is indexing time, not event latency). Per checkpoint: the time from ``on_save`` until this process
  sees every output's lineage fold it (the ``dda_state`` table, polled every 0.2 s), minus that checkpoint's own
  run (``runs.started_at`` → ``finished_at``: index, lineage refresh, summary artifacts). The key is the largest
  over the checkpoints; the rest is the event path: event → trigger → flow run created → picked up by the served
  process (polling every second) → a fresh Python process importing the pipeline → the flow's start.

Results: ``benchmarks/results/event_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from storage.store import LineageStore
from tasks.demo import build_world
from tests.flows.servers import BIN, prefect_env, prefect_server, stop, wait_for
from tests.flows.train_with_callback import train

RESULTS = Path(__file__).parent / "results" / "event_latency.json"
ROOT = Path(__file__).resolve().parents[1]


def _dda(env: dict[str, str], *args: str) -> None:
    done = subprocess.run([str(BIN / "dda"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"dda {args[0]} failed: {done.stderr[-2000:]}")


def _folded(data_dir: Path) -> dict[str, set[str]]:
    store = LineageStore.open(data_dir / "store")
    if not store.has_table("dda_state"):
        return {}
    return {
        r["query_id"]: set(r["checkpoints"]) for r in store.read("dda_state", ["query_id", "checkpoints"]).to_pylist()
    }


def callback_overhead(world: Any, url: str, work: Path, reps: int, epochs: int) -> dict[str, Any]:
    """Median ``trainer.train()`` wall with / without the callback (alternated, same process), minus 1.

    One round of both arms first, reported apart (``warmup_s``): the first training in a process pays one-off
    costs (the first with the callback also starts Prefect's events client and its connection)."""
    os.environ["PREFECT_API_URL"] = url
    started = time.perf_counter()
    from flows.callback import LineageCallback

    LineageCallback()
    build_s = time.perf_counter() - started
    spent = _account(LineageCallback)
    walls: dict[str, list[float]] = {"with": [], "without": []}
    warmup: dict[str, float] = {}
    for i in range(reps + 1):
        for arm in ("without", "with"):
            folder = work / f"overhead-{arm}-{i}"
            out = train(world.base_model, world.train_file, folder, epochs, arm == "with")
            if i == 0:
                warmup[arm] = round(out["train_s"], 3)
            else:
                walls[arm].append(round(out["train_s"], 3))
            print(f"  train {arm} callback: {out['train_s']:.2f} s ({len(out['announced'])} announced)", flush=True)
    paired = [w / wo - 1 for w, wo in zip(walls["with"], walls["without"], strict=True)]
    saves = len(spent["on_save_s"])
    direct = (sum(spent["on_save_s"]) + sum(spent["announce_cpu_s"])) / max(saves, 1)
    return {"callback_overhead": round(statistics.median(paired), 4), "paired_ratios": [round(r, 4) for r in paired],
            "median_ratio": round(statistics.median(walls["with"]) / statistics.median(walls["without"]) - 1, 4),
            "train_s": walls, "warmup_s": warmup, "epochs": epochs, "callback_build_s": round(build_s, 3),
            "per_save_s": round(direct, 6), "per_save_share_of_train": round(direct * epochs / statistics.median(
                walls["without"]), 5), "saves_timed": saves}  # fmt: skip


def _account(cls: Any) -> dict[str, list[float]]:
    """Wrap the callback's ``on_save`` (training thread, wall) and ``_announce`` (its thread, CPU) with timers."""
    spent: dict[str, list[float]] = {"on_save_s": [], "announce_cpu_s": []}
    on_save, announce = cls.on_save, cls._announce

    def timed_save(self: Any, *a: Any, **k: Any) -> None:
        t = time.perf_counter()
        on_save(self, *a, **k)
        spent["on_save_s"].append(time.perf_counter() - t)

    def timed_announce(self: Any, *a: Any, **k: Any) -> None:
        t = time.thread_time()
        announce(self, *a, **k)
        spent["announce_cpu_s"].append(time.thread_time() - t)

    cls.on_save, cls._announce = timed_save, timed_announce
    return spent


def prefect_timeline(url: str, saves: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per event run (by its checkpoint parameter): seconds from the save to the run's creation by the trigger and
    to each of its states (Scheduled, Pending = picked up by the served process, Running = the new process has
    imported the pipeline and started the flow, Completed), from the server's records."""
    os.environ["PREFECT_API_URL"] = url
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["dda-on-checkpoint"]))
        )
        out: dict[str, dict[str, float]] = {}
        for r in runs:
            cid = f"run/{Path(str(r.parameters.get('checkpoint_path'))).name}"
            if cid in saves and r.created:
                row = {"created_s": round(r.created.timestamp() - saves[cid], 2)}
                for st in sorted(client.read_flow_run_states(r.id), key=lambda x: x.timestamp):
                    row.setdefault(
                        f"{st.name.lower().replace(' ', '_')}_s", round(st.timestamp.timestamp() - saves[cid], 2)
                    )
                out[cid] = row
    return out


def event_latency(world: Any, url: str, work: Path, pause_s: float) -> dict[str, Any]:
    """Per checkpoint: save → lineage folded, its own run time, and the difference (see the module docstring)."""
    data_dir, run = work / "data", work / "run"
    run.mkdir(parents=True)
    env = prefect_env(url, work / "home", DDA_DATA_DIR=str(data_dir), DDA_BASE_MODEL=world.base_model)
    env.pop("DDA_PROJECTION__K_IN")
    env.pop("DDA_PROJECTION__K_OUT")  # the default projection
    _dda(env, "ingest", world.train_file)
    _dda(env, "index", "--run", str(run))
    _dda(env, "attribute", world.queries_file)
    serve = subprocess.Popen([sys.executable, "-m", "deployments.serve", "--no-watcher"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        time.sleep(15)  # deployments and their trigger registered
        times = work / "times.json"
        trainer = subprocess.Popen(
            [sys.executable, "-m", "tests.flows.train_with_callback", world.base_model, world.train_file, str(run),
             "--epochs", str(world.epochs), "--times", str(times), "--pause-after-save", str(pause_s)],
            env=env, cwd=ROOT,
        )  # fmt: skip
        seen: dict[str, float] = {}
        deadline = time.time() + 900
        while time.time() < deadline and (trainer.poll() is None or len(seen) < world.epochs):
            states = _folded(data_dir)
            for ids in [set.intersection(*states.values())] if states else []:
                for cid in ids - set(seen) - {"base"}:
                    seen[cid] = time.time()
            time.sleep(0.2)
        trainer.wait()
        wait_for(lambda: _event_runs(data_dir, len(seen)), 60)
        saves = {f"run/checkpoint-{step}": t for step, t in json.loads(times.read_text())["saves"]}
        timeline = prefect_timeline(url, saves)
    finally:
        stop(serve)
    own = _event_runs(data_dir, len(seen)) or {}
    rows = {cid: {"save_to_lineage_s": round(seen[cid] - saves[cid], 2), "own_run_s": round(own[cid], 2)}
            for cid in sorted(saves, key=lambda c: int(c.split("-")[-1])) if cid in seen and cid in own}  # fmt: skip
    for cid, r in rows.items():
        r["minus_index_s"] = round(r["save_to_lineage_s"] - r["own_run_s"], 2)
        r["prefect"] = timeline.get(cid, {})
    worst = max((r["minus_index_s"] for r in rows.values()), default=None)
    return {"save_to_lineage_s_minus_index_s": worst, "checkpoints": rows, "outputs": len(_folded(data_dir)),
            "checkpoints_saved": len(saves), "checkpoints_folded": len(seen),
            "pause_after_save_s": pause_s}  # fmt: skip


def _event_runs(data_dir: Path, n: int) -> dict[str, float] | None:
    """Checkpoint id → seconds of the completed event run that indexed it, once ``n`` of them are recorded."""
    store = LineageStore.open(data_dir / "store")
    out: dict[str, float] = {}
    for r in store.read("runs").to_pylist():
        if r["flow_name"] == "dda-index-saved-checkpoint" and r["status"] == "completed":
            for cid in json.loads(r["wrote_json"])["indexed"]:
                out[cid] = (r["finished_at"] - r["started_at"]).total_seconds()
    return out if len(out) >= n else None


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", type=Path, default=Path(".bench-work/event_latency"))
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--overhead-epochs", type=int, default=10)
    p.add_argument("--pause-after-save", type=float, default=40.0)
    a = p.parse_args()
    world = build_world(a.work / "world", seed=0, model="tiny", log=print)
    print(f"world: {world.n_train} samples, {world.n_hallucinated} outputs, {world.epochs} checkpoints", flush=True)
    with tempfile.TemporaryDirectory(dir=a.work) as tmp, prefect_server(Path(tmp) / "server") as url:
        overhead = callback_overhead(world, url, Path(tmp), a.reps, a.overhead_epochs)
        print(f"callback overhead {overhead['callback_overhead']:+.2%}", flush=True)
        latency = event_latency(world, url, Path(tmp) / "latency", a.pause_after_save)
        print(json.dumps(latency, indent=1), flush=True)
    result = {**{k: overhead.pop(k) for k in ("callback_overhead",)},
              "save_to_lineage_s_minus_index_s": latency.pop("save_to_lineage_s_minus_index_s"),
              "overhead": overhead, "latency": latency, "world": {"model": "tiny", "samples": world.n_train},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "measured_at": datetime.now().isoformat(timespec="seconds")}  # fmt: skip
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
