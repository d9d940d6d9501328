"""The guard every reader of the store runs: natural keys read back from a table must not repeat.

Two rows with one natural key (:data:`storage.schemas.TABLE_KEYS`) can only come from two writers that met without
the data folder's lock. A reader that met them would fold or rank one thing twice, so it stops, naming the table
and the fix (``dda doctor --repair``, :mod:`storage.doctor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from storage.errors import DamagedStoreError


def require_unique_keys(table: str, ids: Sequence[Any] | np.ndarray, where: str = "") -> None:
    """Raise :class:`DamagedStoreError` when ``ids`` (the natural keys read from ``table``) repeat."""
    values = np.asarray(ids)
    unique, counts = np.unique(values, return_counts=True)
    if len(unique) != len(values):
        first = str(unique[counts > 1][0])
        raise DamagedStoreError(
            f"table {table}{' ' + where if where else ''} holds {int(counts.max())} rows for key {first!r} "
            f"({len(values) - len(unique)} surplus rows): two writers met without the lock; run `dda doctor --repair`"
        )
