"""The configuration tasks receive: the scoring and indexing options, each defined once here (default, bounds,
description), and the plain :class:`PipelineConfig` the flow edge builds from the settings tree by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dda_kernel.fingerprint import OMIT_IF, canonical, stable_fingerprint
from dda_kernel.spec import CheckpointWeighting, Normalisation, ProjectionSpec

Preconditioning = Literal["identity", "fisher"]
Precision = Literal["auto", "float32", "bfloat16"]
QueryKind = Literal["auto", "plain", "contrastive", "counterfactual"]
QueryWeighting = Literal["uniform", "finetune_delta", "finetune_delta_plain"]
EditFallback = Literal["plain", "base_edit"]


class ScoringConfig(BaseModel):
    """How s_t, s_t^db and S are computed (docs/method.md): the one definition of every scoring option, its
    default, bounds and description (the settings tree nests it as ``DDA_SCORING__…``).

    ``preconditioner``: F = I, or the damped per-module Fisher of the checkpoint's training embeddings.
    ``normalisation`` s̃ before debias; ``base_weight`` the weight of the base model's score: the debias
    s̃_t − λ s̃_0 with λ = −``base_weight`` (:attr:`debias_coefficient`; the option's name before this release,
    still accepted, whose default −0.5 *added* the base model's influence); ``weighting`` w_t;
    ``standardise`` z-scores s_t^db per checkpoint before averaging. ``query_kind`` ``auto`` uses the
    contrastive query when a corrected response is known; otherwise, with ``counterfactual`` (the default), the
    contrastive query against a correction derived at each checkpoint (:mod:`tasks.counterfactual`: the edit θ_0
    and θ_t find most plausible, of one token or a whole word), else the plain query. ``query_kind``
    ``counterfactual`` uses the derived correction even where one is given. ``min_edit_gain``: a checkpoint whose
    best edit gains no more than this many nats ([log p_θ0(y') + log p_θt(y')] − [log p_θ0(y) + log p_θt(y)] ≤ it:
    θ_0 and θ_t prefer the output to every edit, so no edit names what fine-tuning changed) traces the plain query
    there, with the plain query's token weights (``edit_fallback`` ``base_edit``: the base model's edit where that
    one gained); None: the derived edit is always used (the behaviour before the option).

    Two further debias forms (docs/method.md): ``query_weighting`` ``finetune_delta`` weights each
    response token of the query loss at checkpoint t by w = max(0, log p_θt(y) − log p_θ0(y)) (normalised to
    mean 1 per response; uniform at the base model), so that what the base model already predicted stops
    dominating ĝ_q (``finetune_delta_plain``: plain queries only; contrastive ones keep uniform weights);
    ``train_debias`` β scores s_t = ĝ_q(θ_t)ᵀ F_t⁻¹ [ĝ_i(θ_t) − β ĝ_i(θ_0)].

    Options marked ``OMIT_IF`` were added after stores were scored: at that value they leave the settings
    fingerprint as it was (:func:`dda_kernel.fingerprint.canonical`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preconditioner: Preconditioning = Field("fisher", description="F in ĝ_qᵀ F⁻¹ ĝ_i")
    damping: float = Field(0.3, gt=0, le=100, description="relative damping ε of the Fisher preconditioner")
    normalisation: Normalisation = Field("zscore", description="score normalisation s̃")
    base_weight: float = Field(
        0.5,
        ge=-10,
        le=10,
        description="weight of the base model's score in S = mean_t s̃_t + base_weight·s̃_0 (0: off; > 0 counts the "
        "base model's influence as evidence; < 0 subtracts it, the paper's debias); was DEBIAS_COEFFICIENT λ = "
        "−base_weight, still read for one release",
    )
    weighting: CheckpointWeighting = Field("uniform", description="checkpoint weights w_t of the denoise mean")
    standardise: bool = Field(False, description="z-score s_t^db per checkpoint before averaging")
    query_kind: QueryKind = Field(
        "auto",
        description="auto: contrastive when a corrected response is given, else counterfactual (or plain with "
        "counterfactual off); counterfactual: against the derived correction even where one is given",
    )
    query_weighting: QueryWeighting = Field(
        "finetune_delta_plain",
        description="query-side debias: finetune_delta weights query tokens by max(0, log p_θt − log p_θ0); "
        "finetune_delta_plain for plain queries only",
        json_schema_extra={OMIT_IF: "uniform"},
    )
    train_debias: float = Field(
        0.0, ge=0, le=10, description="β in ĝ_qᵀ F⁻¹ [ĝ_i(θ_t) − β·ĝ_i(θ_0)] (0: off)", json_schema_extra={OMIT_IF: 0.0}
    )
    counterfactual: bool = Field(
        True,
        description="an output without a correction is traced against the edit (one token, or the whole word "
        "fine-tuning made likely) the base model and the checkpoint find most plausible (a derived correction, per "
        "checkpoint)",
        json_schema_extra={OMIT_IF: False},
    )
    min_edit_gain: float | None = Field(
        0.0,
        ge=-1000,
        le=1000,
        description="a checkpoint whose best derived edit gains no more than this (nats; θ_0 and θ_t both prefer "
        "the output) traces the plain query there; null: always the derived edit",
        json_schema_extra={OMIT_IF: None},
    )
    edit_fallback: EditFallback = Field(
        "plain",
        description="where a checkpoint's best edit gains no more than min_edit_gain: plain traces the plain "
        "query; base_edit contrasts with the edit derived at the base model (where it gained), else plain",
        json_schema_extra={OMIT_IF: "plain"},
    )

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return upgrade_scoring(data) if isinstance(data, dict) else data

    @property
    def debias_coefficient(self) -> float:
        """λ = −``base_weight``, the coefficient of the debias s̃_t − λ·s̃_0 (the kernel's and the stored λ)."""
        return 0.0 - self.base_weight  # 0.0 − 0.0 is +0.0: λ = 0 keeps its fingerprint

    def fingerprint_view(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The canonical fields as fingerprints have named them: λ as ``debias_coefficient`` (stores scored before
        the rename keep their fingerprints, and with them their lineage)."""
        out = {k: v for k, v in fields.items() if k != "base_weight"}
        return {**out, "debias_coefficient": canonical(self.debias_coefficient)}

    def kind_for(self, corrected: bool) -> str:
        """The query kind an output is scored as (:func:`scored_kind` of these options)."""
        return scored_kind(corrected, self.query_kind, self.counterfactual)


def upgrade_scoring(values: dict[str, Any]) -> dict[str, Any]:
    """Scoring options under their current names: the old ``debias_coefficient`` λ becomes ``base_weight`` = −λ.
    Both at once is an error naming them, unless they agree (settings re-read with the old variable still set)."""
    if "debias_coefficient" not in values:
        return values
    out = {k: v for k, v in values.items() if k != "debias_coefficient"}
    try:
        weight = 0.0 - float(values["debias_coefficient"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"debias_coefficient {values['debias_coefficient']!r} is not a number") from e
    if "base_weight" in out and float(out["base_weight"]) != weight:  # the same value twice is no conflict
        raise ValueError("give base_weight, or the old debias_coefficient (λ = −base_weight), not both")
    return {**out, "base_weight": weight}


def scored_kind(corrected: bool, query_kind: str, counterfactual: bool) -> str:
    """``query_kind`` when it names one, else (``auto``) 'contrastive' with a correction, 'counterfactual' without
    one when ``counterfactual`` is on, else 'plain'."""
    if query_kind != "auto":
        return query_kind
    if corrected:
        return "contrastive"
    return "counterfactual" if counterfactual else "plain"


class IndexSettings(BaseModel):
    """Embedding work: batches, shards, sequence length, device — the one definition of each option (the
    settings tree nests it as ``DDA_INDEXING__…``; :class:`PipelineConfig` takes its defaults from here)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(64, ge=1, le=4096, description="most samples per forward/backward pass")
    max_tokens: int = Field(
        512, ge=8, description="token budget of a forward/backward pass: samples × longest (padded) length"
    )
    precision: Precision = Field(
        "auto", description="embedding compute precision (auto: bfloat16 where the device has native kernels)"
    )
    shard_size: int = Field(256, ge=1, description="samples per indexing task")
    max_length: int = Field(512, ge=8, description="longest prompt+response in tokens; longer rows are errors")
    device: str = Field("cpu", description="torch device for embedding (cpu, cuda)")
    settle_seconds: float = Field(
        30.0, ge=0, description="an invalid checkpoint younger than this is still being written"
    )
    progress: bool = Field(True, description="show progress bars")


_INDEX = IndexSettings()


@dataclass(frozen=True)
class PipelineConfig:
    """Everything an indexing or scoring task needs besides ids and paths: the projection, the scoring options
    and the indexing options (by name, defaults from :class:`IndexSettings`; ``progress`` off unless asked)."""

    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    batch_size: int = _INDEX.batch_size
    shard_size: int = _INDEX.shard_size
    max_length: int = _INDEX.max_length
    device: str = _INDEX.device
    settle_seconds: float = _INDEX.settle_seconds
    progress: bool = False
    max_tokens: int = _INDEX.max_tokens
    precision: Precision = _INDEX.precision

    @property
    def settings_fingerprint(self) -> str:
        """Fingerprint of what the scores depend on beyond the vectors: the scoring options and projection."""
        return stable_fingerprint((self.scoring, self.projection))
