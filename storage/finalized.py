"""Finalized checkpoints: what every query needs from a checkpoint, computed once when it is indexed.

``<store>/finalized/<ckpt-tag>/`` holds, for one checkpoint (or the base model):

- ``vectors.npy`` — the sample vectors ĝ_i(θ_t), (n, D) float16, rows in the canonical sample order
  (sorted ids, the sample set ``sample_set_id``), contiguous and memory-mapped by every query. float16 is
  the precision the ``embeddings`` table stores, so the matrix is an exact copy of the system of record;
- ``grad_norms.npy`` — ‖ĝ_i‖ (n,) float64, for cosine normalisation;
- ``covariance.npy`` — Σ_i ĝ_{i,m} ĝ_{i,m}ᵀ of every module m, flattened block after block (float64), with
  the sample count in the meta: the sufficient statistics of the Fisher preconditioner (any damping);
- ``meta.json`` — what it was derived from (checkpoint and projection fingerprints, sample set, row count).

Everything here is derived from Lance (the system of record) and rebuilt when missing or stale; a folder
is written beside its target and swapped in whole, so a killed build never leaves half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage.store import LineageStore, tag_name

FORMAT = 1
DTYPE = np.float16


@dataclass(frozen=True)
class FinalizedMeta:
    """What a finalized checkpoint was derived from; a mismatch with the store makes it stale."""

    checkpoint_id: str
    checkpoint_fingerprint: str
    projection_fingerprint: str
    sample_set_id: str
    n_samples: int
    dim: int
    covariance_count: int
    format: int = FORMAT


@dataclass(frozen=True)
class Finalized:
    """A finalized checkpoint opened for scoring: ``vectors`` is a read-only memory map (n, D) float16."""

    meta: FinalizedMeta
    vectors: np.ndarray
    grad_norms: np.ndarray
    covariance: np.ndarray


def finalized_dir(store: LineageStore, checkpoint_id: str) -> Path:
    """``<store>/finalized/ckpt-<id>``: where the finalized files of ``checkpoint_id`` live."""
    return store.root / "finalized" / tag_name(checkpoint_id)


def read_meta(store: LineageStore, checkpoint_id: str) -> FinalizedMeta | None:
    """The meta of a finalized checkpoint, or None when there is none (or it is of another format)."""
    path = finalized_dir(store, checkpoint_id) / "meta.json"
    try:
        meta = FinalizedMeta(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return meta if meta.format == FORMAT else None


def open_finalized(store: LineageStore, meta: FinalizedMeta) -> Finalized:
    """Memory-map the files of a finalized checkpoint whose ``meta`` was read by :func:`read_meta`.

    Copy-on-write mapping: nothing is read until used, and a page is never written back.
    """
    folder = finalized_dir(store, meta.checkpoint_id)
    vectors = np.load(folder / "vectors.npy", mmap_mode="c")
    if vectors.shape != (meta.n_samples, meta.dim) or vectors.dtype != DTYPE:
        raise ValueError(f"{folder}/vectors.npy is {vectors.shape} {vectors.dtype}, its meta says {meta}")
    return Finalized(meta, vectors, np.load(folder / "grad_norms.npy"), np.load(folder / "covariance.npy"))


@dataclass
class FinalizedWriter:
    """The files of a finalized checkpoint being written in a temporary folder (see :func:`writing`)."""

    folder: Path
    vectors: np.ndarray
    grad_norms: np.ndarray


@contextmanager
def writing(store: LineageStore, checkpoint_id: str, n: int, dim: int) -> Iterator[FinalizedWriter]:
    """Write the finalized files of ``checkpoint_id``: fill ``vectors`` (n, D) and ``grad_norms`` (n,), then call
    :func:`commit`; the folder replaces the previous one only then. An exception leaves the previous one."""
    parent = store.root / "finalized"
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{tag_name(checkpoint_id)}-"))
    try:
        vectors = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=DTYPE, shape=(n, dim))
        yield FinalizedWriter(tmp, vectors, np.zeros(n, dtype=np.float64))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit(store: LineageStore, writer: FinalizedWriter, meta: FinalizedMeta, covariance: np.ndarray) -> None:
    """Flush ``writer``'s files with ``covariance`` and ``meta``, then swap the folder in atomically."""
    flush = getattr(writer.vectors, "flush", None)
    if flush is not None:
        flush()
    np.save(writer.folder / "grad_norms.npy", writer.grad_norms)
    np.save(writer.folder / "covariance.npy", np.asarray(covariance, dtype=np.float64))
    _write_json(writer.folder / "meta.json", asdict(meta))
    for name in ("vectors.npy", "grad_norms.npy", "covariance.npy"):
        with open(writer.folder / name, "rb+") as f:
            os.fsync(f.fileno())
    target = finalized_dir(store, meta.checkpoint_id)
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(writer.folder, target)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def disk_bytes(store: LineageStore) -> int:
    """Bytes on disk of every finalized checkpoint."""
    folder = store.root / "finalized"
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
