"""Fine-tuning runs on disk (docs/data.md): find complete checkpoints, fingerprint them, read their state.

A run is a Hugging Face Trainer ``output_dir`` holding ``checkpoint-<step>/`` folders with full weights
(``config.json`` + ``model.safetensors`` or an index of shards) or a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``), and ``trainer_state.json`` when present.
A checkpoint is *complete* when every weight file it declares is present and whole: each safetensors
header parses and the file is exactly as long as the header says. A folder that fails the check is
``pending`` while it was modified in the last ``settle_seconds`` (still being written) and ``corrupt``
afterwards.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"

CheckpointKind = Literal["full", "adapter"]
CheckpointStatus = Literal["complete", "pending", "corrupt"]


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete, corrupt or does not fit the base model."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One ``checkpoint-<step>`` folder of a run and what its files say."""

    path: str
    step: int
    kind: CheckpointKind | None
    status: CheckpointStatus
    problem: str | None = None

    @property
    def name(self) -> str:
        """The folder name, ``checkpoint-<step>``."""
        return Path(self.path).name


@dataclass(frozen=True)
class TrainerState:
    """Epoch and learning rate at a checkpoint's step, from ``trainer_state.json`` (None when absent)."""

    epoch: float | None
    learning_rate: float | None


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, or None when it is.

    Layout: 8-byte little-endian header length n, an n-byte JSON header whose tensors' ``data_offsets``
    end at E; the file must be exactly 8 + n + E bytes.
    """
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return f"{path.name} is truncated (header of {n} bytes in a {size}-byte file)"
            header = json.loads(f.read(n))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path.name} is not a safetensors file ({type(e).__name__})"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{path.name} has {size} bytes, its header declares {expected}"
    return None


def _json_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{path.name} is not valid JSON"
    return None


def weight_files(folder: Path) -> tuple[CheckpointKind | None, list[Path], str | None]:
    """(kind, the weight files it declares, the first problem or None) of a model or checkpoint folder."""
    if (folder / ADAPTER_CONFIG).exists():
        return "adapter", [folder / ADAPTER_WEIGHTS], _json_problem(folder / ADAPTER_CONFIG)
    if not (folder / MODEL_CONFIG).exists():
        return None, [], f"neither {MODEL_CONFIG} nor {ADAPTER_CONFIG} is present"
    problem = _json_problem(folder / MODEL_CONFIG)
    if (folder / MODEL_INDEX).exists():
        problem = problem or _json_problem(folder / MODEL_INDEX)
        if problem:
            return "full", [], problem
        shards = sorted(set(json.loads((folder / MODEL_INDEX).read_text())["weight_map"].values()))
        return "full", [folder / s for s in shards], None
    return "full", [folder / MODEL_WEIGHTS], problem


def inspect_checkpoint(folder: Path, settle_seconds: float = 30.0, now: float | None = None) -> CheckpointInfo:
    """Classify one checkpoint folder as complete, pending (being written) or corrupt."""
    match = CHECKPOINT_DIR.match(folder.name)
    step = int(match.group(1)) if match else -1
    kind, files, problem = weight_files(folder)
    for f in files:
        problem = problem or safetensors_problem(f)
    if problem is None:
        return CheckpointInfo(str(folder), step, kind, "complete")
    newest = max((p.stat().st_mtime for p in [folder, *folder.iterdir()] if p.exists()), default=0.0)
    age = (time.time() if now is None else now) - newest
    status: CheckpointStatus = "pending" if age < settle_seconds else "corrupt"
    return CheckpointInfo(str(folder), step, kind, status, problem)


def wait_until_written(folder: str | Path, settle_seconds: float = 30.0, poll_seconds: float = 0.5) -> CheckpointInfo:
    """An announced checkpoint once it is complete; re-checked every ``poll_seconds`` while it is pending.

    A folder that does not exist yet, or is incomplete and was modified in the last ``settle_seconds``, is still
    being written: wait and look again. Returns the complete checkpoint, or the ``corrupt`` one (incomplete and
    unchanged for ``settle_seconds``, or still missing after them). A folder not named ``checkpoint-<step>`` is
    refused (:class:`CheckpointError`): it has no step to order it by.
    """
    folder, started = Path(folder), time.time()
    if not (match := CHECKPOINT_DIR.match(folder.name)):
        raise CheckpointError(f"{folder} is not a checkpoint-<step> folder: announce the folder the Trainer saved")
    while True:
        if folder.is_dir():
            info = inspect_checkpoint(folder, settle_seconds)
            if info.status != "pending":
                return info
        elif time.time() - started >= settle_seconds:
            return CheckpointInfo(str(folder), int(match.group(1)), None, "corrupt", f"{folder} does not exist")
        time.sleep(poll_seconds)


def discover_checkpoints(run_dir: str | Path, settle_seconds: float = 30.0) -> list[CheckpointInfo]:
    """Every ``checkpoint-<step>`` folder of a Trainer ``output_dir``, in step order, each classified.

    Raises :class:`CheckpointError` when ``run_dir`` is not a folder.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise CheckpointError(f"run folder {root} does not exist: pass the Trainer output_dir")
    folders = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name)]
    infos = [inspect_checkpoint(p, settle_seconds) for p in folders]
    return sorted(infos, key=lambda c: c.step)


def fingerprint_files(folder: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (32 hex) over the names and bytes of a folder's config and weight files, in name order."""
    folder = Path(folder)
    kind, files, problem = weight_files(folder)
    if problem is not None:
        raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt: {problem}")
    config = folder / (ADAPTER_CONFIG if kind == "adapter" else MODEL_CONFIG)
    return fingerprint_paths(sorted([config, *files], key=lambda p: p.name), chunk)


def fingerprint_paths(paths: list[Path], chunk: int = 1 << 20) -> str:
    """SHA-256 (32 hex) over each file's name, a NUL byte and its bytes, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\x00")
        with path.open("rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()[:32]


def read_trainer_state(folder: str | Path, step: int) -> TrainerState:
    """Epoch and learning rate logged at ``step`` (the last log entry at or before it) in ``trainer_state.json``."""
    path = Path(folder) / "trainer_state.json"
    if not path.is_file():
        return TrainerState(None, None)
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: the checkpoint is corrupt or still being written") from e
    logged = [h for h in state.get("log_history", []) if "learning_rate" in h and h.get("step", 0) <= step]
    lr = float(logged[-1]["learning_rate"]) if logged else None
    epoch = state.get("epoch")
    return TrainerState(float(epoch) if epoch is not None else None, lr)
