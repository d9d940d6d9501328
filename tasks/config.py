"""The plain, picklable configuration tasks receive (built once from the settings tree at the flow edge)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dda_kernel.fingerprint import stable_fingerprint
from dda_kernel.spec import CheckpointWeighting, Normalisation, ProjectionSpec

Preconditioning = Literal["identity", "fisher"]
Precision = Literal["auto", "float32", "bfloat16"]
QueryKind = Literal["auto", "plain", "contrastive"]


@dataclass(frozen=True)
class ScoringConfig:
    """How s_t, s_t^db and S are computed (DESIGN.md section 2, steps 4-6).

    ``preconditioner``: F = I, or the damped per-module Fisher of the checkpoint's training embeddings.
    ``normalisation`` s̃ before debias; ``debias_coefficient`` λ in s̃_t − λ s̃_0; ``weighting`` w_t;
    ``standardise`` z-scores s_t^db per checkpoint before averaging. ``query_kind`` ``auto`` uses the
    contrastive query when a corrected response is known and the plain query otherwise.
    """

    preconditioner: Preconditioning = "fisher"
    damping: float = 0.1
    normalisation: Normalisation = "zscore"
    debias_coefficient: float = 0.0
    weighting: CheckpointWeighting = "uniform"
    standardise: bool = False
    query_kind: QueryKind = "auto"


@dataclass(frozen=True)
class PipelineConfig:
    """Everything an indexing or scoring task needs besides ids and paths."""

    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    batch_size: int = 64
    shard_size: int = 256
    max_length: int = 512
    device: str = "cpu"
    settle_seconds: float = 30.0
    progress: bool = False
    max_tokens: int = 512
    precision: Precision = "auto"

    @property
    def settings_fingerprint(self) -> str:
        """Fingerprint of what the scores depend on beyond the vectors: the scoring options and projection."""
        return stable_fingerprint((self.scoring, self.projection))
