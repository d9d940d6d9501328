"""What a projection and a scoring run are asked to do: plain specs and option names, standard library only.

Kept apart from the tensor code so that settings, fingerprints and read-only commands never import torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Normalisation = Literal["none", "zscore", "cosine"]
NORMALISATIONS: tuple[str, ...] = ("none", "zscore", "cosine")
CheckpointWeighting = Literal["uniform", "lr"]
LossReduction = Literal["mean", "sum"]
DEFAULT_INCLUDE: tuple[str, ...] = (r"(^|\.)layers\.\d+\..*(o_proj|down_proj)$",)


@dataclass(frozen=True)
class ProjectionSpec:
    """What to project and how.

    ``identity=True`` keeps the exact per-sample gradient (k = d; only for small modules and tests).
    ``include``/``exclude`` are regular expressions searched in normalised module names
    (e.g. ``model.layers.3.mlp.down_proj``); the default tracks the two linears of every transformer
    block that write into the residual stream, ``self_attn.o_proj`` and ``mlp.down_proj`` (LLaMA-family
    names; chosen by the hallucination benchmark, benchmarks/results/hallucination.md), and leaves out
    ``lm_head``. ``loss_reduction`` is the per-sample loss: the ``mean`` or the
    ``sum`` of the response tokens' negative log-likelihood.
    """

    k_in: int = 8
    k_out: int = 8
    seed: int = 0
    identity: bool = False
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    loss_reduction: LossReduction = "mean"

    def __post_init__(self) -> None:
        if self.k_in < 1 or self.k_out < 1:
            raise ValueError(f"projection sizes must be >= 1, got k_in={self.k_in}, k_out={self.k_out}")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        for pattern in (*self.include, *self.exclude):
            re.compile(pattern)

    def selects(self, name: str) -> bool:
        """True when a normalised module name matches an include pattern and no exclude pattern."""
        included = any(re.search(p, name) for p in self.include)
        return included and not any(re.search(p, name) for p in self.exclude)
