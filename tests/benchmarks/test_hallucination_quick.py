"""The hallucination benchmark end to end at its ``--quick`` size (SmolLM2-135M, LoRA and full fine-tuning)."""

from __future__ import annotations

import json
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from benchmarks.hallucination import KINDS, METHODS, MODES, main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@contextmanager
def stacks_on_failure(after_s: float) -> Iterator[None]:
    """Snapshot every thread's stack once ``after_s`` seconds have passed; a failure of the block (pytest-timeout's
    too) then carries the snapshot, so that a worker thread stuck under a timed-out test shows where it is."""
    snapshot: list[str] = []

    def take() -> None:
        names = {t.ident: t.name for t in threading.enumerate()}
        snapshot.append("".join(f"--- thread {names.get(i, i)}\n" + "".join(traceback.format_stack(frame, limit=40))
                                for i, frame in sys._current_frames().items()))  # fmt: skip

    timer = threading.Timer(after_s, take)
    timer.daemon = True
    timer.start()
    try:
        yield
    except BaseException as e:
        if not snapshot:
            raise
        pytest.fail(f"{e}\nevery thread's stack {after_s:g} s in:\n{snapshot[0]}", pytrace=False)
    finally:
        timer.cancel()


@pytest.fixture(scope="module")
def report(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("bench")
    with stacks_on_failure(1500):  # alone it takes ~11 min; CI once saw an indexing task never finish
        assert main(["--quick", "--work", str(root / "work"), "--out", str(root / "out")]) == 0
    for suffix in ("json", "md", "png"):
        assert (root / "out" / f"hallucination_quick.{suffix}").stat().st_size > 0
    return json.loads((root / "out" / "hallucination_quick.json").read_text())


def test_every_method_is_reported_once_per_mode_and_query_kind(report):
    keys = [(r["mode"], r["query"], r["method"]) for r in report["results"]]
    assert sorted(keys) == sorted((m, k, x) for m in MODES for k in KINDS for x in METHODS)
    for r in report["results"]:
        pairs = report["extra"][r["mode"]]["pairs"]
        assert list(r["per_pair_auc"]) == pairs
        assert all(0.0 <= v <= 1.0 for v in r["per_pair_auc"].values())
        assert r["mean_auc"] == pytest.approx(np.mean(list(r["per_pair_auc"].values())))
        assert 0.0 < r["mean_ap"] <= 1.0
        assert r["seconds"] > 0
        selection = "out_of_world" if r["method"] == "bm25" else "in_sample"  # BM25: nothing chosen on any world
        assert (r["world"], r["model"], r["selection"], r["ap"]) == ("canary", "SmolLM2-135M", selection, r["mean_ap"])
        lo, hi = r["ci95"]
        assert 0.0 <= lo <= hi <= 1.0
        assert r.get("traced_as") == (
            {"plain": "counterfactual"}.get(r["query"], r["query"]) if r["method"] == "default" else None
        )


def test_query_provenance_is_reported_per_pair(report):
    for info in report["modes"].values():
        for counts in info["per_pair"].values():
            assert 0 <= counts["hallucinated"] <= counts["generated"]
            assert counts["queries"] == ("generated" if counts["hallucinated"] else "planted")


def test_data_driven_choices_are_made_on_the_other_pairs(report):
    for r in report["results"]:
        if r["method"] in ("dda", "dda_debias_only", "dda_denoise_only", "dda_cea"):
            assert list(r["chosen"]) == list(r["per_pair_auc"])


def test_the_systems_default_equals_the_study_slice_of_the_same_projection(report):
    """The default store (own embeddings, own flows) vs the study vectors sliced to the default projection.

    Contrastive queries only: the study scores uniform query token weights, which the default keeps for them
    (plain queries get the query-side debias weights by default, so they are expected to differ)."""
    for mode, by_kind in report["study"].items():
        default_projection = report["extra"][mode]["default_projection"]
        assert default_projection["modules"] is not None, "the default projection is not one of the studied ones"
        for kind, study in by_kind.items():
            if kind != "contrastive":
                continue
            row = next(
                x for x in study["projection"]
                if (x["modules"], x["k"]) == (default_projection["modules"], default_projection["k"])
            )  # fmt: skip
            default = next(
                r for r in report["results"] if (r["mode"], r["query"], r["method"]) == (mode, kind, "default")
            )
            assert default["mean_auc"] == pytest.approx(row["mean_auc"], abs=0.02)
