"""Finding the complete checkpoints of a Trainer output_dir; refusing checkpoints of another base model."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tasks.checkpoints import (
    CheckpointError,
    discover_checkpoints,
    fingerprint_files,
    read_trainer_state,
    safetensors_problem,
)
from tasks.models import load_checkpoint, tiny_llama
from tasks.tokenize import word_level_tokenizer
from tests.tasks.helpers import copy_run


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _age(folder: Path, seconds: float) -> None:
    old = time.time() - seconds
    for p in [folder, *folder.iterdir()]:
        os.utime(p, (old, old))


def test_discovery_classifies_complete_pending_and_corrupt_checkpoints(small_world, tmp_path):
    run = copy_run(small_world, tmp_path / "run")
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    writing = run / "checkpoint-9000"
    shutil.copytree(run / f"checkpoint-{steps[0]}", writing)
    _truncate(writing / "model.safetensors")
    corrupt = run / "checkpoint-9001"
    shutil.copytree(run / f"checkpoint-{steps[0]}", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    _age(corrupt, 3600)
    (run / "tmp-checkpoint-9002").mkdir()
    found = {c.step: c for c in discover_checkpoints(run, settle_seconds=60)}
    assert sorted(found) == [*steps, 9000, 9001]
    assert [found[s].status for s in steps] == ["complete"] * len(steps)
    assert found[9000].status == "pending"
    assert "declares" in found[9000].problem or "truncated" in found[9000].problem
    assert found[9001].status == "corrupt"
    assert found[steps[0]].kind == "full"


def test_safetensors_check_catches_every_truncation(small_world, tmp_path):
    source = next(Path(small_world.run_dir).glob("checkpoint-*")) / "model.safetensors"
    assert safetensors_problem(source) is None
    target = tmp_path / "model.safetensors"
    for keep in (0.0, 0.001, 0.5, 0.999):
        target.write_bytes(source.read_bytes()[: int(source.stat().st_size * keep)])
        assert safetensors_problem(target) is not None


def test_fingerprint_changes_with_any_weight_byte(small_world, tmp_path):
    folder = tmp_path / "checkpoint-1"
    shutil.copytree(next(Path(small_world.run_dir).glob("checkpoint-*")), folder)
    before = fingerprint_files(folder)
    assert fingerprint_files(folder) == before
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint_files(folder) != before


def test_trainer_state_gives_epoch_and_learning_rate(small_world):
    folder = sorted(Path(small_world.run_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    step = int(folder.name.split("-")[1])
    state = read_trainer_state(folder, step)
    logged = json.loads((folder / "trainer_state.json").read_text())
    assert state.epoch == pytest.approx(logged["epoch"])
    assert state.learning_rate == pytest.approx(1e-3)


def test_checkpoint_of_another_shape_is_refused(small_world, tmp_path):
    other = tiny_llama(50, hidden=32, layers=2, heads=4)
    other.save_pretrained(tmp_path / "checkpoint-1")
    with pytest.raises(CheckpointError, match=r"hidden_size 32 vs 64"):
        load_checkpoint(small_world.base_model, tmp_path / "checkpoint-1")


def test_checkpoint_with_another_tokenizer_is_refused(small_world, tmp_path):
    folder = tmp_path / "checkpoint-1"
    shutil.copytree(next(Path(small_world.run_dir).glob("checkpoint-*")), folder)
    word_level_tokenizer(["entirely different words here"]).save_pretrained(folder)
    with pytest.raises(CheckpointError, match="vocabulary differs"):
        load_checkpoint(small_world.base_model, folder)
