"""The one settings tree of DDA lineage (pydantic-settings, ``DDA_`` prefix), read once at the flow or CLI edge.

Nested fields are set with a double underscore: ``DDA_SCORING__NORMALISATION=zscore``,
``DDA_RUNNER__KIND=dask``. ``python -m flows.settings`` prints the README's configuration table.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from dda_kernel.spec import LossReduction, ProjectionSpec
from tasks.config import IndexSettings, PipelineConfig, ScoringConfig, upgrade_scoring

_SPEC = ProjectionSpec()  # the projection's defaults are the kernel's


class ProjectionSettings(BaseModel):
    """The factored random projection (fixed for a data folder: it is part of its fingerprint); defaults from
    :class:`dda_kernel.spec.ProjectionSpec`, which the flow edge builds from these by name."""

    model_config = ConfigDict(extra="forbid")

    k_in: int = Field(_SPEC.k_in, ge=1, le=4096, description="projected size of each tracked module's input (k_in)")
    k_out: int = Field(
        _SPEC.k_out, ge=1, le=4096, description="projected size of each tracked module's output gradient (k_out)"
    )
    seed: int = Field(_SPEC.seed, ge=0, description="seed of the projection matrices")
    include: list[str] = Field(
        default_factory=lambda: list(_SPEC.include), description="regexes of tracked linear modules"
    )
    exclude: list[str] = Field(
        default_factory=lambda: list(_SPEC.exclude), description="regexes of linear modules left out"
    )
    loss_reduction: LossReduction = Field(
        _SPEC.loss_reduction, description="per-sample loss: mean or sum of response NLL"
    )


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
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    indexing: IndexSettings = Field(default_factory=IndexSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)

    def pipeline_config(self) -> PipelineConfig:
        """The task configuration these settings describe, every field passed by name."""
        p = self.projection
        spec = ProjectionSpec(k_in=p.k_in, k_out=p.k_out, seed=p.seed, include=tuple(p.include),
                              exclude=tuple(p.exclude), loss_reduction=p.loss_reduction)  # fmt: skip
        return PipelineConfig(projection=spec, scoring=self.scoring, **self.indexing.model_dump())

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
        if key == "scoring" and isinstance(value, dict):
            value = upgrade_scoring(value)  # an old option name overrides the default under its new name
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
