"""The process environment of the CLI and flows, set before Prefect is imported (standard library only, so
that read-only commands stay cheap to start)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["apply_prefect_environment", "prefect_environment"]


def prefect_environment(data_dir: Path) -> dict[str, str]:
    """Environment defaults for Prefect under the data folder (docs/operations.md, "Installing"): set before
    importing prefect."""
    return {
        "PREFECT_HOME": str((data_dir / "prefect").resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    }


def apply_prefect_environment(data_dir: Path) -> None:
    """Set :func:`prefect_environment` for variables the user has not set."""
    for key, value in prefect_environment(data_dir).items():
        os.environ.setdefault(key, value)
