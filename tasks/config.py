"""The plain, picklable configuration tasks receive (built once from the settings tree at the flow edge)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dda_kernel.fingerprint import OMIT_IF, stable_fingerprint
from dda_kernel.spec import CheckpointWeighting, Normalisation, ProjectionSpec

Preconditioning = Literal["identity", "fisher"]
Precision = Literal["auto", "float32", "bfloat16"]
QueryKind = Literal["auto", "plain", "contrastive", "counterfactual"]
QueryWeighting = Literal["uniform", "finetune_delta", "finetune_delta_plain"]
# Options added after stores were scored: at their old behaviour they leave the fingerprint as it was.


@dataclass(frozen=True)
class ScoringConfig:
    """How s_t, s_t^db and S are computed (DESIGN.md section 2, steps 4-6).

    ``preconditioner``: F = I, or the damped per-module Fisher of the checkpoint's training embeddings.
    ``normalisation`` s̃ before debias; ``debias_coefficient`` λ in s̃_t − λ s̃_0; ``weighting`` w_t;
    ``standardise`` z-scores s_t^db per checkpoint before averaging. ``query_kind`` ``auto`` uses the
    contrastive query when a corrected response is known; otherwise, with ``counterfactual`` (the default), the
    contrastive query against a correction derived at each checkpoint (:mod:`tasks.counterfactual`: the
    single-token edit θ_0 and θ_t find most plausible), else the plain query. ``query_kind`` ``counterfactual``
    uses the derived correction even where one is given. ``min_edit_gain``: a checkpoint whose best edit gains no
    more than this many nats ([log p_θ0(y') + log p_θt(y')] − [log p_θ0(y) + log p_θt(y)] ≤ it: θ_0 and θ_t
    prefer the output to every edit, so no edit names what fine-tuning changed) traces the plain query there, with
    the plain query's token weights; None: the derived edit is always used (the behaviour before the option).

    Two further debias forms (DESIGN.md section 2, step 5): ``query_weighting`` ``finetune_delta`` weights each
    response token of the query loss at checkpoint t by w = max(0, log p_θt(y) − log p_θ0(y)) (normalised to
    mean 1 per response; uniform at the base model), so that what the base model already predicted stops
    dominating ĝ_q (``finetune_delta_plain``: plain queries only; contrastive ones keep uniform weights);
    ``train_debias`` β scores s_t = ĝ_q(θ_t)ᵀ F_t⁻¹ [ĝ_i(θ_t) − β ĝ_i(θ_0)].
    """

    preconditioner: Preconditioning = "fisher"
    damping: float = 0.3
    normalisation: Normalisation = "zscore"
    debias_coefficient: float = -0.5
    weighting: CheckpointWeighting = "uniform"
    standardise: bool = False
    query_kind: QueryKind = "auto"
    query_weighting: QueryWeighting = field(default="finetune_delta_plain", metadata={OMIT_IF: "uniform"})
    train_debias: float = field(default=0.0, metadata={OMIT_IF: 0.0})
    counterfactual: bool = field(default=True, metadata={OMIT_IF: False})
    min_edit_gain: float | None = field(default=0.0, metadata={OMIT_IF: None})

    def kind_for(self, corrected: bool) -> str:
        """The query kind an output is scored as (:func:`scored_kind` of these options)."""
        return scored_kind(corrected, self.query_kind, self.counterfactual)


def scored_kind(corrected: bool, query_kind: str, counterfactual: bool) -> str:
    """``query_kind`` when it names one, else (``auto``) 'contrastive' with a correction, 'counterfactual' without
    one when ``counterfactual`` is on, else 'plain'."""
    if query_kind != "auto":
        return query_kind
    if corrected:
        return "contrastive"
    return "counterfactual" if counterfactual else "plain"


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
