"""The settings tree: environment overrides, nested groups, bounds, and the README table generated from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.pipeline import load_settings
from flows.settings import DDASettings, settings_table
from tasks.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]


def test_environment_overrides_nested_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("DDA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DDA_SCORING__NORMALISATION", "cosine")
    monkeypatch.setenv("DDA_PROJECTION__K_IN", "16")
    s = DDASettings()
    assert (s.data_dir, s.scoring.normalisation, s.projection.k_in) == (tmp_path, "cosine", 16)
    config = s.pipeline_config()
    assert (config.scoring.normalisation, config.projection.k_in, config.projection.k_out) == ("cosine", 16, 8)


def test_overrides_merge_into_groups_and_change_the_fingerprint(tmp_path):
    a = load_settings(data_dir=str(tmp_path))
    b = load_settings({"scoring": {"debias_coefficient": 0.5}}, data_dir=str(tmp_path))
    assert b.scoring.normalisation == a.scoring.normalisation
    assert b.scoring.debias_coefficient == 0.5
    assert a.fingerprint != b.fingerprint
    assert load_settings({"indexing": {"batch_size": 3}}, data_dir=str(tmp_path)).fingerprint == a.fingerprint
    assert a.data_dir.is_absolute()


def test_out_of_bounds_setting_is_refused(monkeypatch):
    monkeypatch.setenv("DDA_INDEXING__BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="batch_size"):
        DDASettings()


def test_readme_configuration_table_is_generated_from_the_settings():
    assert settings_table() in (ROOT / "README.md").read_text()


def test_cli_names_a_bad_setting_in_one_line(monkeypatch, tmp_path, capsys):
    from flows.cli import main

    monkeypatch.setenv("DDA_INDEXING__BATCH_SIZE", "0")
    assert main(["ingest", str(tmp_path / "train.jsonl"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    expected = "setting indexing.batch_size: Input should be greater than or equal to 1"
    assert err == f"dda ingest: error: {expected} (see the README's configuration table)"


def test_cli_names_an_unknown_edit_fallback_in_one_line(monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("DDA_SCORING__EDIT_FALLBACK", "base")
    assert main(["settings"]) == 2
    err = capsys.readouterr().err.strip()
    expected = "setting scoring.edit_fallback: Input should be 'plain' or 'base_edit'"
    assert err == f"dda settings: error: {expected} (see the README's configuration table)"


def test_serving_the_watcher_without_a_server_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["watch", "--data-dir", str(tmp_path), "--base", str(tmp_path), "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "needs a Prefect server" in err
    assert "dda watch --once" in err


def test_each_setting_is_defined_once_and_reaches_the_tasks_by_name(tmp_path):
    """The scoring options are one class for settings and tasks; every indexing and projection setting has the
    task/kernel field of the same name and default; and every field, set to a value other than its default,
    arrives under its own name (a positional hand-over swapping two floats would fail here)."""
    from dda_kernel.spec import ProjectionSpec
    from flows.settings import ProjectionSettings
    from tasks.config import IndexSettings, ScoringConfig

    assert DDASettings.model_fields["scoring"].annotation is ScoringConfig
    assert DDASettings.model_fields["indexing"].annotation is IndexSettings
    config_fields = {f.name: f for f in dataclasses.fields(PipelineConfig)}
    for name, info in IndexSettings.model_fields.items():
        if name != "progress":  # tasks run quiet unless the edge asks (the CLI's --quiet sets the setting)
            assert config_fields[name].default == info.default, name
    spec_fields = {f.name: f for f in dataclasses.fields(ProjectionSpec)}
    defaults = ProjectionSpec()
    for name, value in ProjectionSettings().model_dump().items():
        want = getattr(defaults, name)
        assert name in spec_fields
        assert value == (list(want) if isinstance(want, tuple) else want), name
    changed = {
        "projection": {"k_in": 3, "k_out": 5, "seed": 7, "include": ["a"], "exclude": ["b"], "loss_reduction": "sum"},
        "scoring": {"preconditioner": "identity", "damping": 0.7, "normalisation": "cosine", "base_weight": 0.9,
                    "weighting": "lr", "standardise": True, "query_kind": "plain", "query_weighting": "uniform",
                    "train_debias": 0.4, "counterfactual": False, "min_edit_gain": 1.3, "edit_fallback": "base_edit"},
        "indexing": {"batch_size": 3, "max_tokens": 99, "precision": "float32", "shard_size": 11, "max_length": 77,
                     "device": "cuda", "settle_seconds": 4.5, "progress": False},
    }  # fmt: skip
    assert set(changed["scoring"]) == set(ScoringConfig.model_fields)
    assert set(changed["indexing"]) == set(IndexSettings.model_fields)
    assert set(changed["projection"]) == set(ProjectionSettings.model_fields)
    config = load_settings(changed, data_dir=str(tmp_path)).pipeline_config()
    assert config.scoring.model_dump() == changed["scoring"]
    assert {k: getattr(config, k) for k in changed["indexing"]} == changed["indexing"]
    got = {k: getattr(config.projection, k) for k in changed["projection"]}
    assert got == {**changed["projection"], "include": ("a",), "exclude": ("b",)}


def test_stores_keep_their_settings_fingerprints():
    """Fingerprints of stores scored by earlier releases (the same settings give the same lineage rows)."""
    from tasks.config import ScoringConfig

    def fp(**scoring):
        return dataclasses.replace(PipelineConfig(), scoring=ScoringConfig(**scoring)).settings_fingerprint

    assert DDASettings().fingerprint == fp() == "b6b295e71038c72b"
    assert fp(query_weighting="uniform", counterfactual=False, min_edit_gain=None) == "da338c0ed5d8721e"
    assert fp(debias_coefficient=0.5, normalisation="cosine", preconditioner="identity") == "59a0bc6db22abe93"
    assert fp(train_debias=0.25, min_edit_gain=1.5) == "1b979cf2051735f0"
    assert fp(base_weight=-0.5, normalisation="cosine", preconditioner="identity") == "59a0bc6db22abe93"  # λ = 0.5
    assert fp(base_weight=0.0) == fp(debias_coefficient=0.0)  # λ = +0.0, never −0.0


def test_the_old_debias_coefficient_is_read_as_base_weight_for_one_release(monkeypatch, tmp_path):
    """``DDA_SCORING__DEBIAS_COEFFICIENT`` λ (whose default −0.5 added the base model's influence) sets
    ``base_weight`` = −λ; both at once is refused naming them."""
    assert load_settings({"scoring": {"debias_coefficient": 1.0}}, data_dir=str(tmp_path)).scoring.base_weight == -1.0
    monkeypatch.setenv("DDA_SCORING__DEBIAS_COEFFICIENT", "-0.25")
    settings = load_settings(data_dir=str(tmp_path))  # re-reads the environment with the converted value: agrees
    assert (settings.scoring.base_weight, settings.scoring.debias_coefficient) == (0.25, -0.25)
    assert load_settings(settings.model_dump(mode="json")).fingerprint == settings.fingerprint  # a flow's payload
    monkeypatch.setenv("DDA_SCORING__BASE_WEIGHT", "1")
    with pytest.raises(ValidationError, match="not both"):
        DDASettings()


def test_options_added_later_leave_old_fingerprints_unchanged_at_their_old_behaviour():
    from dda_kernel.fingerprint import canonical
    from tasks.config import ScoringConfig

    old = canonical(ScoringConfig(query_weighting="uniform", train_debias=0.0))
    assert "query_weighting" not in old
    assert "train_debias" not in old
    new = canonical(ScoringConfig(query_weighting="finetune_delta", train_debias=0.5))
    assert new["query_weighting"] == "finetune_delta"
    assert new["train_debias"] == {"__float__": "0.5"}
    assert ScoringConfig(train_debias=0.5) != ScoringConfig()


def test_min_edit_gain_null_from_the_environment_is_the_fingerprint_of_before_the_option(monkeypatch, tmp_path):
    from dda_kernel.fingerprint import canonical

    assert "min_edit_gain" in canonical(load_settings(data_dir=str(tmp_path)).pipeline_config().scoring)
    monkeypatch.setenv("DDA_SCORING__MIN_EDIT_GAIN", "null")
    settings = load_settings(data_dir=str(tmp_path))
    assert settings.scoring.min_edit_gain is None
    assert "min_edit_gain" not in canonical(settings.pipeline_config().scoring)
    monkeypatch.setenv("DDA_SCORING__MIN_EDIT_GAIN", "-2.5")
    assert load_settings(data_dir=str(tmp_path)).pipeline_config().scoring.min_edit_gain == -2.5
