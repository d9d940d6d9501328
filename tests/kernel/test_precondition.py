"""Preconditioned scores against explicit solves, and influence against exact leave-one-out."""

from __future__ import annotations

import torch

from dda_kernel import (
    ProjectionSpec,
    apply_preconditioner,
    covariance_init,
    covariance_merge,
    covariance_update,
    fit_preconditioner,
    make_layout,
    pairwise_scores,
)

LAYOUT = make_layout(ProjectionSpec(k_in=3, k_out=2), [("a", 10, 10), ("b", 10, 10), ("c", 10, 10)])


def _vectors(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 3.0, LAYOUT.dim, dtype=torch.float64)
    return torch.randn(n, LAYOUT.dim, generator=gen, dtype=torch.float64) * scale


def test_preconditioned_scores_equal_explicit_solve():
    train, queries, damping = _vectors(50, 0), _vectors(4, 1), 0.3
    pre = fit_preconditioner(covariance_update(covariance_init(LAYOUT), LAYOUT, train), damping)
    got = pairwise_scores(apply_preconditioner(pre, LAYOUT, queries), train, chunk_size=7, dtype=torch.float64)
    want = torch.zeros(4, 50, dtype=torch.float64)
    for slot in LAYOUT.slots:
        sl = LAYOUT.slice_of(slot)
        f = train[:, sl].T @ train[:, sl] / 50
        f = f + damping * torch.trace(f) / slot.size * torch.eye(slot.size, dtype=torch.float64)
        want += (torch.linalg.solve(f, queries[:, sl].T).T) @ train[:, sl].T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_streamed_and_sharded_covariance_equal_one_shot():
    train = _vectors(60, 2)
    one_shot = covariance_update(covariance_init(LAYOUT), LAYOUT, train)
    shards = [covariance_update(covariance_init(LAYOUT), LAYOUT, train[i : i + 13]) for i in range(0, 60, 13)]
    forward = shards[0]
    for s in shards[1:]:
        forward = covariance_merge(forward, s)
    backward = shards[-1]
    for s in reversed(shards[:-1]):
        backward = covariance_merge(s, backward)
    for merged in (forward, backward):
        assert merged.count == 60
        for x, y in zip(merged.blocks, one_shot.blocks, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_influence_matches_closed_form_leave_one_out_for_ridge_regression():
    """Ridge regression: the preconditioned influence gives the exact LOO change up to 1/(1 − h_ii).

    L(θ) = ½ Σ_i (x_iᵀθ − y_i)² + ½ λ‖θ‖², H = XᵀX + λI. Removing sample i changes the prediction
    f_q = x_qᵀθ by Δ_i = +x_qᵀ H⁻¹ x_i r_i / (1 − h_ii) (Sherman–Morrison), r_i = x_iᵀθ − y_i, h_ii = x_iᵀ H⁻¹ x_i. With
    ĝ_i = x_i r_i, ĝ_q = x_q and F = H / n (the covariance of the Jacobians x_i, damped so that
    F + εμI = H/n), the kernel's score is s_i = n x_qᵀ H⁻¹ x_i r_i, so Δ_i = s_i / (n (1 − h_ii)).
    """
    n, d, lam = 40, 6, 2.0
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(
        n, generator=gen, dtype=torch.float64
    )
    x_q = torch.randn(1, d, generator=gen, dtype=torch.float64)
    hess = x.T @ x + lam * torch.eye(d, dtype=torch.float64)
    theta = torch.linalg.solve(hess, x.T @ y)
    exact = []
    for i in range(n):
        keep = torch.arange(n) != i
        h_i = x[keep].T @ x[keep] + lam * torch.eye(d, dtype=torch.float64)
        exact.append(float(x_q @ (torch.linalg.solve(h_i, x[keep].T @ y[keep]) - theta)))
    layout = make_layout(ProjectionSpec(identity=True), [("w", d, 1)])
    state = covariance_update(covariance_init(layout), layout, x)
    mean_eig = float(torch.trace(x.T @ x / n)) / d
    pre = fit_preconditioner(state, damping=(lam / n) / mean_eig)
    residual = x @ theta - y
    scores = pairwise_scores(apply_preconditioner(pre, layout, x_q), x * residual[:, None], dtype=torch.float64)[0]
    leverage = torch.einsum("id,de,ie->i", x, torch.linalg.inv(hess), x)
    predicted = scores / (n * (1 - leverage))
    torch.testing.assert_close(predicted, torch.tensor(exact, dtype=torch.float64), rtol=1e-8, atol=1e-10)
