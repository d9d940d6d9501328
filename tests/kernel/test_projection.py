"""Projection determinism, the layout fingerprint, and the JL property of the factored projection."""

from __future__ import annotations

import pytest
import torch

from dda_kernel import ProjectionSpec, build_projector, gaussian_matrix, layout_for, make_layout, stable_fingerprint
from tests.conftest import tiny_llama


def test_same_seed_and_name_give_the_same_matrix_in_any_dtype():
    a = gaussian_matrix(3, "model.layers.0.mlp.up_proj", "in", 8, 24)
    b = gaussian_matrix(3, "model.layers.0.mlp.up_proj", "in", 8, 24)
    assert torch.equal(a, b)
    assert not torch.equal(a, gaussian_matrix(4, "model.layers.0.mlp.up_proj", "in", 8, 24))
    assert not torch.equal(a, gaussian_matrix(3, "model.layers.1.mlp.up_proj", "in", 8, 24))
    assert not torch.equal(a, gaussian_matrix(3, "model.layers.0.mlp.up_proj", "out", 8, 24))
    layout = make_layout(ProjectionSpec(k_in=8, k_out=4, seed=3), [("model.layers.0.mlp.up_proj", 24, 40)])
    p32 = build_projector(layout, torch.float32)
    torch.testing.assert_close(p32.p_in[0], a.float())


def test_layout_fingerprint_depends_on_everything_an_embedding_depends_on():
    model = tiny_llama()
    base = layout_for(model, ProjectionSpec())
    assert base.fingerprint == layout_for(tiny_llama(seed=9), ProjectionSpec()).fingerprint
    assert base.dim == 2 * 2 * 64  # default: o_proj and down_proj of each of the 2 layers, 8 x 8 each
    assert [s.name for s in base.slots][:2] == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    for other in (
        ProjectionSpec(seed=1),
        ProjectionSpec(k_in=4),
        ProjectionSpec(loss_reduction="sum"),
        ProjectionSpec(exclude=(r"mlp",)),
        ProjectionSpec(include=(r"(^|\.)layers\.\d+\.",)),
    ):
        assert layout_for(model, other).fingerprint != base.fingerprint, other


def test_stable_fingerprint_is_canonical():
    assert stable_fingerprint({"a": 1, "b": (1.5, "x")}) == stable_fingerprint({"b": [1.5, "x"], "a": 1})
    assert stable_fingerprint({"a": 0.1}) != stable_fingerprint({"a": 0.1000001})
    assert stable_fingerprint(1) != stable_fingerprint(True)
    assert stable_fingerprint(1) != stable_fingerprint("1")
    with pytest.raises(TypeError, match="cannot fingerprint"):
        stable_fingerprint(object())


def _pairs(rank: int, n: int, d_out: int = 128, d_in: int = 96):
    gen = torch.Generator().manual_seed(rank)
    for _ in range(n):
        a = torch.randn(d_out, rank, generator=gen, dtype=torch.float64) @ torch.randn(
            rank, d_in, generator=gen, dtype=torch.float64
        )
        b = torch.randn(d_out, rank, generator=gen, dtype=torch.float64) @ torch.randn(
            rank, d_in, generator=gen, dtype=torch.float64
        )
        yield a, 0.5 * a + b


@pytest.mark.parametrize(("rank", "eps"), [(64, 0.15), (1, 0.45)])
def test_factored_projection_preserves_inner_products(rank, eps):
    """k_in = k_out = 32 (D = 1024), fixed seed: |⟨Pa,Pb⟩ − ⟨a,b⟩| ≤ ε‖a‖‖b‖ for ≥ 95 % of 200 pairs.

    Low-rank gradients (one token) need a larger ε than full-rank ones: the factored projection's
    variance grows as the gradient's rank falls, a property of Kronecker-structured sketches.
    """
    p_in = gaussian_matrix(0, "m", "in", 32, 96)
    p_out = gaussian_matrix(0, "m", "out", 32, 128)
    ok = 0
    for a, b in _pairs(rank, 200):
        err = abs(float((p_out @ a @ p_in.T).flatten() @ (p_out @ b @ p_in.T).flatten() - a.flatten() @ b.flatten()))
        ok += err <= eps * float(a.norm() * b.norm())
    assert ok >= 190


def test_factored_projection_is_unbiased_over_seeds():
    a, b = next(_pairs(4, 1))
    exact = float(a.flatten() @ b.flatten())
    values = torch.tensor(
        [
            float(
                (gaussian_matrix(s, "m", "out", 8, 128) @ a @ gaussian_matrix(s, "m", "in", 8, 96).T).flatten()
                @ (gaussian_matrix(s, "m", "out", 8, 128) @ b @ gaussian_matrix(s, "m", "in", 8, 96).T).flatten()
            )
            for s in range(400)
        ],
        dtype=torch.float64,
    )
    stderr = float(values.std()) / 400**0.5
    assert abs(float(values.mean()) - exact) < 4 * stderr
