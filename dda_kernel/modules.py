"""Which modules of a (possibly PEFT-wrapped) causal LM are tracked, under which stable names.

A LoRA layer is tracked as one module with its *effective* weight W_0 + s·B·A: its input is the
input x of the wrapper and its output gradient δ is taken at the wrapper's output, so
G = Σ_t δ_t x_tᵀ is the gradient of the merged model's weight. Names are normalised by removing
PEFT's ``base_model.model.`` prefix, so a base model and its adapters share one layout.
"""

from __future__ import annotations

from torch import nn

from dda_kernel.errors import NoTrackedModulesError
from dda_kernel.projection import EmbeddingLayout, ProjectionSpec, make_layout

_PEFT_PREFIX = "base_model.model."


def normalise_name(name: str) -> str:
    """Strip PEFT's wrapper prefix: ``base_model.model.model.layers.0.q_proj`` → ``model.layers.0.q_proj``."""
    while name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name


def is_lora_linear(module: nn.Module) -> bool:
    """True for a PEFT LoRA wrapper of a linear layer (duck-typed: ``base_layer``, ``lora_A``, ``lora_B``)."""
    base = getattr(module, "base_layer", None)
    return isinstance(base, nn.Linear) and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """Every linear layer as (normalised name, module to hook, d_in, d_out), in model order.

    LoRA wrappers stand for their base layer; the wrapped base layer and the adapter's own A and B
    linears are not listed.
    """
    found: list[tuple[str, nn.Module, int, int]] = []
    wrappers: set[str] = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(".".join(parts[:k]) in wrappers for k in range(1, len(parts))):  # inside a LoRA wrapper
            continue
        if is_lora_linear(module):
            wrappers.add(name)
            base = module.base_layer
            assert isinstance(base, nn.Linear)
            found.append((normalise_name(name), module, base.in_features, base.out_features))
        elif isinstance(module, nn.Linear):
            found.append((normalise_name(name), module, module.in_features, module.out_features))
    return found


def tracked_modules(model: nn.Module, spec: ProjectionSpec) -> list[tuple[str, nn.Module, int, int]]:
    """The linear modules selected by ``spec``; raises :class:`NoTrackedModulesError` if none is."""
    candidates = linear_modules(model)
    chosen = [c for c in candidates if spec.selects(c[0])]
    if not chosen:
        sample = ", ".join(c[0] for c in candidates[:4]) or "none"
        raise NoTrackedModulesError(
            f"no linear module matches include={list(spec.include)} exclude={list(spec.exclude)}; "
            f"the model has {len(candidates)} linear modules (e.g. {sample}): fix the module patterns"
        )
    return chosen


def layout_for(model: nn.Module, spec: ProjectionSpec) -> EmbeddingLayout:
    """The embedding layout of ``spec`` on ``model`` (same for a base model and its LoRA checkpoints)."""
    return make_layout(spec, [(n, d_in, d_out) for n, _, d_in, d_out in tracked_modules(model, spec)])
