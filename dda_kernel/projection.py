"""The factored random projection of docs/method.md and the embedding layout it induces.

For a tracked linear module m with weight W_m of shape (d_out, d_in), the projected per-sample
gradient is ĝ_{i,m} = vec(P_out,m · G_{i,m} · P_in,mᵀ), with P_in,m of shape (k_in, d_in) and P_out,m
of shape (k_out, d_out). Entries are i.i.d. N(0, 1/k), so E[PᵀP] = I and inner products are
preserved in expectation. The matrices depend only on (seed, module name, side, shape): the base
model and every checkpoint of a run see the same projection, which the layout fingerprint records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from dda_kernel.fingerprint import stable_fingerprint
from dda_kernel.spec import DEFAULT_INCLUDE, LossReduction, ProjectionSpec

__all__ = ["DEFAULT_INCLUDE", "LossReduction", "ProjectionSpec"]


@dataclass(frozen=True)
class ModuleSlot:
    """One tracked module's place in the embedding: ĝ[offset : offset + k_out·k_in]."""

    name: str
    d_in: int
    d_out: int
    k_in: int
    k_out: int
    offset: int

    @property
    def size(self) -> int:
        """Number of embedding coordinates of this module: k_out · k_in."""
        return self.k_out * self.k_in


@dataclass(frozen=True)
class EmbeddingLayout:
    """The projection spec applied to one model architecture: which modules, where, how big."""

    spec: ProjectionSpec
    slots: tuple[ModuleSlot, ...]

    @property
    def dim(self) -> int:
        """Total embedding dimension D = Σ_m k_out,m · k_in,m."""
        return sum(s.size for s in self.slots)

    @property
    def fingerprint(self) -> str:
        """Stable hex fingerprint of spec + module names and shapes (stored with every embedding)."""
        return stable_fingerprint(self)

    def slice_of(self, slot: ModuleSlot) -> slice:
        """The coordinates of ``slot`` in an embedding vector."""
        return slice(slot.offset, slot.offset + slot.size)


def make_layout(spec: ProjectionSpec, modules: list[tuple[str, int, int]]) -> EmbeddingLayout:
    """Build the layout for ``modules`` = [(normalised name, d_in, d_out)], in the given order."""
    slots: list[ModuleSlot] = []
    offset = 0
    for name, d_in, d_out in modules:
        k_in, k_out = (d_in, d_out) if spec.identity else (spec.k_in, spec.k_out)
        slots.append(ModuleSlot(name, d_in, d_out, k_in, k_out, offset))
        offset += k_in * k_out
    return EmbeddingLayout(spec, tuple(slots))


def _generator(seed: int, name: str, side: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{side}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def gaussian_matrix(seed: int, name: str, side: str, k: int, d: int) -> torch.Tensor:
    """A (k, d) float64 matrix with i.i.d. N(0, 1/k) entries, fixed by (seed, name, side).

    Drawn on the CPU in float64 so the same matrix results on every device and dtype.
    """
    gen = _generator(seed, name, side)
    matrix: torch.Tensor = torch.randn(k, d, generator=gen, dtype=torch.float64) / (k**0.5)
    return matrix


@dataclass(frozen=True)
class Projector:
    """The projection matrices of a layout, materialised once for a dtype and device.

    ``p_in[j]`` is P_in of ``layout.slots[j]`` with shape (k_in, d_in), ``p_out[j]`` is P_out with
    shape (k_out, d_out); both ``None`` for an identity spec.
    """

    layout: EmbeddingLayout
    p_in: tuple[torch.Tensor | None, ...]
    p_out: tuple[torch.Tensor | None, ...]


def build_projector(
    layout: EmbeddingLayout, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Projector:
    """Materialise the projection matrices of ``layout`` (deterministic, see :func:`gaussian_matrix`)."""
    if layout.spec.identity:
        empty = tuple(None for _ in layout.slots)
        return Projector(layout, empty, empty)
    seed = layout.spec.seed
    p_in = tuple(
        gaussian_matrix(seed, s.name, "in", s.k_in, s.d_in).to(device=device, dtype=dtype) for s in layout.slots
    )
    p_out = tuple(
        gaussian_matrix(seed, s.name, "out", s.k_out, s.d_out).to(device=device, dtype=dtype) for s in layout.slots
    )
    return Projector(layout, p_in, p_out)


def project_gradient(projector: Projector, index: int, grad: torch.Tensor) -> torch.Tensor:
    """Project a full gradient G of shape (..., d_out, d_in): vec(P_out G P_inᵀ), shape (..., k_out·k_in).

    The reference path (materialises G); the embedder never calls it for projected specs.
    """
    p_in, p_out = projector.p_in[index], projector.p_out[index]
    if p_in is None or p_out is None:
        return grad.flatten(-2)
    return (p_out.to(grad.dtype) @ grad @ p_in.to(grad.dtype).T).flatten(-2)
