"""A writer process for the integrity tests: upserts embeddings in batches, printing after each commit.

python -m tests.storage.writer ROOT PREFIX N_BATCHES BATCH [--no-lock]
python -m tests.storage.writer ROOT PREFIX N_TRIALS --race

Like every writer of the system it holds the data folder's writer lock for its whole run; ``--no-lock``
drops it (to show what the lock prevents). ``--race`` plays a Dask worker of a flow run that holds the lock:
no lock of its own; for each trial it prints ``ready``, waits for a line on stdin, then writes the first
query embeddings of checkpoint PREFIX into the fresh store ``ROOT/t<trial>``, printing ``ok`` or the error.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from storage.lock import writer_lock
from storage.vectors import write_embeddings, write_query_embeddings
from tests.storage.helpers import open_store, random_vectors


def main(root: str, prefix: str, n_batches: int, batch: int, lock: bool = True) -> None:
    with writer_lock(root, "test writer", 120) if lock else contextlib.nullcontext():
        store = open_store(root)
        for b in range(n_batches):
            ids = [f"{prefix}{b * batch + i:05d}" for i in range(batch)]
            write_embeddings(store, "ckpt", ids, random_vectors(batch, seed=b), np.zeros(batch), np.ones(batch))
            print(f"committed {b}", flush=True)


def race(root: str, checkpoint: str, n_trials: int) -> None:
    for trial in range(n_trials):
        store = open_store(f"{root}/t{trial}")
        print("ready", flush=True)
        sys.stdin.readline()
        try:
            write_query_embeddings(store, checkpoint, "plain", ["q1", "q2"], random_vectors(2))
            print("ok", flush=True)
        except Exception as e:  # reported to the test, which names it
            print(f"error {type(e).__name__}: {e}".replace("\n", " "), flush=True)


if __name__ == "__main__":
    if "--race" in sys.argv:
        race(sys.argv[1], sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), lock="--no-lock" not in sys.argv)
