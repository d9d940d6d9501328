"""A writer process for the integrity tests: upserts embeddings in batches, printing after each commit.

python -m tests.storage.writer ROOT PREFIX N_BATCHES BATCH [--no-lock]

Like every writer of the system it holds the data folder's writer lock for its whole run; ``--no-lock``
drops it (to show what the lock prevents).
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from storage.lock import writer_lock
from storage.vectors import write_embeddings
from tests.storage.helpers import open_store, random_vectors


def main(root: str, prefix: str, n_batches: int, batch: int, lock: bool = True) -> None:
    with writer_lock(root, "test writer", 120) if lock else contextlib.nullcontext():
        store = open_store(root)
        for b in range(n_batches):
            ids = [f"{prefix}{b * batch + i:05d}" for i in range(batch)]
            write_embeddings(store, "ckpt", ids, random_vectors(batch, seed=b), np.zeros(batch), np.ones(batch))
            print(f"committed {b}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), lock="--no-lock" not in sys.argv)
