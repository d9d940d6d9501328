"""The one settings tree of DDA lineage (pydantic-settings, ``DDA_`` prefix), read once at the flow or CLI edge.

Nested fields are set with a double underscore: ``DDA_SCORING__NORMALISATION=zscore``,
``DDA_RUNNER__KIND=dask``. ``python -m flows.settings`` prints the README's configuration table.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from dda_kernel.spec import DEFAULT_INCLUDE, ProjectionSpec
from tasks.config import PipelineConfig, ScoringConfig


class ProjectionSettings(BaseModel):
    """The factored random projection (fixed for a data folder: it is part of its fingerprint)."""

    k_in: int = Field(8, ge=1, le=4096, description="projected size of each tracked module's input (k_in)")
    k_out: int = Field(8, ge=1, le=4096, description="projected size of each tracked module's output gradient (k_out)")
    seed: int = Field(0, ge=0, description="seed of the projection matrices")
    include: list[str] = Field(
        default_factory=lambda: list(DEFAULT_INCLUDE), description="regexes of tracked linear modules"
    )
    exclude: list[str] = Field(default_factory=list, description="regexes of linear modules left out")
    loss_reduction: Literal["mean", "sum"] = Field("mean", description="per-sample loss: mean or sum of response NLL")


class ScoringSettings(BaseModel):
    """How influence, debias and denoise are computed (DESIGN.md section 2, steps 4-6)."""

    preconditioner: Literal["identity", "fisher"] = Field("fisher", description="F in ĝ_qᵀ F⁻¹ ĝ_i")
    damping: float = Field(0.3, gt=0, le=100, description="relative damping ε of the Fisher preconditioner")
    normalisation: Literal["none", "zscore", "cosine"] = Field("zscore", description="score normalisation s̃")
    debias_coefficient: float = Field(
        -0.5, ge=-10, le=10, description="λ in s̃_t − λ·s̃_0 (0: off; < 0 counts the base model's influence as evidence)"
    )
    weighting: Literal["uniform", "lr"] = Field("uniform", description="checkpoint weights w_t of the denoise mean")
    standardise: bool = Field(False, description="z-score s_t^db per checkpoint before averaging")
    query_kind: Literal["auto", "plain", "contrastive", "counterfactual"] = Field(
        "auto",
        description="auto: contrastive when a corrected response is given, else counterfactual (or plain with "
        "counterfactual off); counterfactual: against the derived correction even where one is given",
    )
    query_weighting: Literal["uniform", "finetune_delta", "finetune_delta_plain"] = Field(
        "finetune_delta_plain",
        description="query-side debias: finetune_delta weights query tokens by max(0, log p_θt − log p_θ0); "
        "finetune_delta_plain for plain queries only",
    )
    train_debias: float = Field(0.0, ge=0, le=10, description="β in ĝ_qᵀ F⁻¹ [ĝ_i(θ_t) − β·ĝ_i(θ_0)] (0: off)")
    counterfactual: bool = Field(
        True,
        description="an output without a correction is traced against the single-token edit the base model and "
        "the checkpoint find most plausible (a derived correction, per checkpoint)",
    )
    min_edit_gain: float | None = Field(
        0.0,
        ge=-1000,
        le=1000,
        description="a checkpoint whose best derived edit gains no more than this (nats; θ_0 and θ_t both prefer "
        "the output) traces the plain query there; null: always the derived edit",
    )


class IndexSettings(BaseModel):
    """Embedding work: batches, shards, sequence length, device."""

    batch_size: int = Field(64, ge=1, le=4096, description="most samples per forward/backward pass")
    max_tokens: int = Field(
        512, ge=8, description="token budget of a forward/backward pass: samples × longest (padded) length"
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="embedding compute precision (auto: bfloat16 where the device has native kernels)"
    )
    shard_size: int = Field(256, ge=1, description="samples per indexing task")
    max_length: int = Field(512, ge=8, description="longest prompt+response in tokens; longer rows are errors")
    device: str = Field("cpu", description="torch device for embedding (cpu, cuda)")
    settle_seconds: float = Field(
        30.0, ge=0, description="an invalid checkpoint younger than this is still being written"
    )
    progress: bool = Field(True, description="show progress bars")


class RunnerSettings(BaseModel):
    """The Prefect task runner: configuration only, the flows do not change."""

    kind: Literal["threads", "dask"] = Field("threads", description="task runner")
    max_workers: int = Field(2, ge=1, description="threads of the thread-pool runner")
    dask_address: str | None = Field(None, description="scheduler address of an existing Dask cluster")
    dask_workers: int = Field(2, ge=1, description="workers of a local Dask cluster when no address is given")


class DDASettings(BaseSettings):
    """Every setting of DDA lineage; environment variables ``DDA_…`` override the defaults."""

    model_config = SettingsConfigDict(
        env_prefix="DDA_", env_nested_delimiter="__", extra="forbid", env_parse_none_str="null"
    )

    data_dir: Path = Field(Path("dda-data"), description="the one folder everything is stored under")
    base_model: str | None = Field(None, description="base model: HF folder, .gguf file or hub name")
    run_dir: Path | None = Field(None, description="the fine-tuning run (a Trainer output_dir) to index and watch")
    run_id: str | None = Field(None, description="name of the run (default: the run folder's name)")
    watch_interval_seconds: int = Field(60, ge=1, description="interval of the scheduled checkpoint watcher")
    lock_timeout_seconds: float = Field(
        300.0, ge=0, description="how long a writer waits for another writer of the data folder before failing"
    )
    projection: ProjectionSettings = Field(default_factory=ProjectionSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    indexing: IndexSettings = Field(default_factory=IndexSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)

    def pipeline_config(self) -> PipelineConfig:
        """The plain task configuration these settings describe."""
        p, s, i = self.projection, self.scoring, self.indexing
        spec = ProjectionSpec(p.k_in, p.k_out, p.seed, False, tuple(p.include), tuple(p.exclude), p.loss_reduction)
        scoring = ScoringConfig(
            s.preconditioner, s.damping, s.normalisation, s.debias_coefficient, s.weighting, s.standardise,
            s.query_kind, s.query_weighting, s.train_debias, s.counterfactual, s.min_edit_gain,
        )  # fmt: skip
        return PipelineConfig(
            spec, scoring, i.batch_size, i.shard_size, i.max_length, i.device, i.settle_seconds, i.progress,
            i.max_tokens, i.precision,
        )  # fmt: skip

    @property
    def effective_run_id(self) -> str:
        """``run_id``, else the run folder's name."""
        if self.run_id:
            return self.run_id
        return self.run_dir.resolve().name if self.run_dir else "run"

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the settings that change results (projection and scoring)."""
        return self.pipeline_config().settings_fingerprint


def load_settings(settings: dict[str, Any] | None = None, **overrides: Any) -> DDASettings:
    """The settings tree from the environment, updated by ``settings`` (nested dict) and non-None ``overrides``."""
    merged = DDASettings().model_dump()
    for key, value in {**(settings or {}), **{k: v for k, v in overrides.items() if v is not None}}.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    resolved = DDASettings(**merged)
    updates: dict[str, Any] = {"data_dir": resolved.data_dir.resolve()}
    if resolved.run_dir is not None:
        updates["run_dir"] = resolved.run_dir.resolve()
    if resolved.base_model is not None and Path(resolved.base_model).exists():
        updates["base_model"] = str(Path(resolved.base_model).resolve())
    return resolved.model_copy(update=updates)


def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    version = metadata.version("dda-lineage")
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
            if out.returncode == 0:
                return f"{version}+{out.stdout.strip()}"
        except OSError:
            pass
    return version


def settings_table() -> str:
    """A Markdown table of every setting: environment variable, default, description."""
    lines = ["| variable | default | description |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name.upper()}__")
                continue
            default = info.get_default(call_default_factory=True)
            shown = str(default).replace("|", "\\|")
            lines.append(f"| `{prefix}{name.upper()}` | `{shown}` | {info.description or ''} |")

    walk(DDASettings, "DDA_")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())
