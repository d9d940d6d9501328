"""Query kinds as values: what an output is scored as, and the name its vectors are stored under.

An output is scored as one of three :class:`Kind` s (plain ĝ(y); contrastive ĝ(y) − ĝ(y_corrected);
counterfactual ĝ(y) − ĝ(y'_t) with a derived correction). Its vectors are stored in ``query_embeddings.kind``
under a :class:`StoredKind` name that also records what changes the vector: the query-side token weights
(``:delta``) and, for counterfactual vectors, the ``min_edit_gain`` under which a state falls back to the plain
query (``>gain``) and whether such a state contrasts with the base model's edit instead (``@base``). The name is
built and parsed here only: ``counterfactual>0.0:delta``, ``counterfactual>0.0@base:delta`` and the like.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from storage.schemas import BASE_CHECKPOINT as BASE_ID
from tasks.config import PipelineConfig

DELTA = ":delta"


class Kind(StrEnum):
    """What an output is scored as."""

    PLAIN = "plain"
    CONTRASTIVE = "contrastive"
    COUNTERFACTUAL = "counterfactual"


_NAME = re.compile(r"^(plain|contrastive|counterfactual)(?:>(.+?))?(@base)?(:delta)?$")
BASE_FALLBACK = "@base"


@dataclass(frozen=True)
class StoredKind:
    """The ``query_embeddings.kind`` of a vector: its :class:`Kind`, the query-side weights (``delta``) and, for a
    counterfactual vector, the ``min_gain`` (nats) at or below which a state holds the plain query instead, or with
    ``base_fallback`` the contrast with the base model's edit where that one gained."""

    kind: Kind
    delta: bool = False
    min_gain: float | None = None
    base_fallback: bool = False

    @property
    def name(self) -> str:
        """``<kind>[>min_gain][@base][:delta]``, e.g. ``counterfactual>0.0:delta``."""
        gain = f">{self.min_gain!r}" if self.min_gain is not None else ""
        fallback = BASE_FALLBACK if self.base_fallback else ""
        return f"{self.kind.value}{gain}{fallback}{DELTA if self.delta else ''}"

    @classmethod
    def parse(cls, name: str) -> StoredKind:
        """The inverse of :attr:`name`; raises ValueError for a name no version of the store writes."""
        match = _NAME.match(name)
        if match is None:
            raise ValueError(f"{name!r} is not a stored query kind (<kind>[>gain][@base][:delta])")
        kind, gain, fallback, delta = match.groups()
        return cls(Kind(kind), delta is not None, None if gain is None else float(gain), fallback is not None)


def kind_of(corrected: bool, config: PipelineConfig) -> Kind:
    """The kind an output is scored as, as a :class:`Kind` (:func:`tasks.config.scored_kind` of ``config.scoring``)."""
    return Kind(config.scoring.kind_for(corrected))


def stored_kind(kind: Kind, config: PipelineConfig, checkpoint_id: str) -> StoredKind:
    """The stored kind that holds ``kind``'s vectors at ``checkpoint_id`` under ``config``.

    ``:delta`` at a fine-tuned checkpoint where the query weighting applies to the kind (``finetune_delta``:
    plain and contrastive; ``finetune_delta_plain``: plain only); at the base model the weights are uniform, so
    the uniform vectors serve. Counterfactual contrasts use uniform weights; with ``scoring.min_edit_gain`` set
    they carry it, and the plain kind's ``:delta`` (a state whose edit gains no more holds the plain query), and
    ``@base`` with ``scoring.edit_fallback`` ``base_edit`` (such a state may hold the base edit's contrast)."""
    weighting = config.scoring.query_weighting
    min_gain = config.scoring.min_edit_gain
    if kind is Kind.COUNTERFACTUAL:
        if min_gain is None:
            return StoredKind(kind)
        fallback = config.scoring.edit_fallback == "base_edit"
        return StoredKind(kind, stored_kind(Kind.PLAIN, config, checkpoint_id).delta, min_gain, fallback)
    applies = weighting == "finetune_delta" or (weighting == "finetune_delta_plain" and kind is Kind.PLAIN)
    return StoredKind(kind, applies and checkpoint_id != BASE_ID)
