#!/usr/bin/env bash
# Every check CI runs: formatting, lint, types (dda_kernel, storage), dead links, the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
$BIN/ruff format --check .
$BIN/ruff check .
$BIN/mypy dda_kernel storage
$BIN/python scripts/check_links.py
$BIN/python -m pytest "$@"
