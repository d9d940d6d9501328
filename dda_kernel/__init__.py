"""Pure tensor math of DDA (Debias and Denoise Attribution): embeddings, projection, scores, state.

Imports only torch and the standard library. See docs/method.md for the notation. Names are loaded
on first use (PEP 562), so ``dda_kernel.spec`` and ``dda_kernel.fingerprint`` can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dda_kernel.counterfactual import (
        Span as Span,
    )
    from dda_kernel.counterfactual import (
        apply_edit as apply_edit,
    )
    from dda_kernel.counterfactual import (
        apply_span as apply_span,
    )
    from dda_kernel.counterfactual import (
        best_edit as best_edit,
    )
    from dda_kernel.counterfactual import (
        changed_words as changed_words,
    )
    from dda_kernel.counterfactual import (
        edit_candidates as edit_candidates,
    )
    from dda_kernel.counterfactual import (
        word_spans as word_spans,
    )
    from dda_kernel.dda import (
        DDAState as DDAState,
    )
    from dda_kernel.dda import (
        checkpoint_weights as checkpoint_weights,
    )
    from dda_kernel.dda import (
        dda_init as dda_init,
    )
    from dda_kernel.dda import (
        dda_merge as dda_merge,
    )
    from dda_kernel.dda import (
        dda_update as dda_update,
    )
    from dda_kernel.dda import (
        dda_value as dda_value,
    )
    from dda_kernel.errors import (
        EmptyResponseError as EmptyResponseError,
    )
    from dda_kernel.errors import (
        KernelError as KernelError,
    )
    from dda_kernel.errors import (
        LayoutMismatchError as LayoutMismatchError,
    )
    from dda_kernel.errors import (
        NonFiniteLossError as NonFiniteLossError,
    )
    from dda_kernel.errors import (
        NoTrackedModulesError as NoTrackedModulesError,
    )
    from dda_kernel.errors import (
        StateError as StateError,
    )
    from dda_kernel.fingerprint import (
        stable_fingerprint as stable_fingerprint,
    )
    from dda_kernel.gradients import (
        IGNORE_INDEX as IGNORE_INDEX,
    )
    from dda_kernel.gradients import (
        EmbeddingBatch as EmbeddingBatch,
    )
    from dda_kernel.gradients import (
        TokenBatch as TokenBatch,
    )
    from dda_kernel.gradients import (
        autocast_to as autocast_to,
    )
    from dda_kernel.gradients import (
        contrastive_query as contrastive_query,
    )
    from dda_kernel.gradients import (
        embed_batch as embed_batch,
    )
    from dda_kernel.gradients import (
        finetune_delta_weights as finetune_delta_weights,
    )
    from dda_kernel.gradients import (
        pad_batch as pad_batch,
    )
    from dda_kernel.gradients import (
        per_sample_loss as per_sample_loss,
    )
    from dda_kernel.gradients import (
        response_log_probs as response_log_probs,
    )
    from dda_kernel.modules import (
        layout_for as layout_for,
    )
    from dda_kernel.modules import (
        linear_modules as linear_modules,
    )
    from dda_kernel.modules import (
        normalise_name as normalise_name,
    )
    from dda_kernel.modules import (
        tracked_modules as tracked_modules,
    )
    from dda_kernel.precondition import (
        CovarianceState as CovarianceState,
    )
    from dda_kernel.precondition import (
        Preconditioner as Preconditioner,
    )
    from dda_kernel.precondition import (
        apply_preconditioner as apply_preconditioner,
    )
    from dda_kernel.precondition import (
        covariance_init as covariance_init,
    )
    from dda_kernel.precondition import (
        covariance_merge as covariance_merge,
    )
    from dda_kernel.precondition import (
        covariance_update as covariance_update,
    )
    from dda_kernel.precondition import (
        fit_preconditioner as fit_preconditioner,
    )
    from dda_kernel.projection import (
        EmbeddingLayout as EmbeddingLayout,
    )
    from dda_kernel.projection import (
        ModuleSlot as ModuleSlot,
    )
    from dda_kernel.projection import (
        ProjectionSpec as ProjectionSpec,
    )
    from dda_kernel.projection import (
        Projector as Projector,
    )
    from dda_kernel.projection import (
        build_projector as build_projector,
    )
    from dda_kernel.projection import (
        gaussian_matrix as gaussian_matrix,
    )
    from dda_kernel.projection import (
        make_layout as make_layout,
    )
    from dda_kernel.projection import (
        project_gradient as project_gradient,
    )
    from dda_kernel.scoring import (
        debias as debias,
    )
    from dda_kernel.scoring import (
        difference_norms as difference_norms,
    )
    from dda_kernel.scoring import (
        normalise_scores as normalise_scores,
    )
    from dda_kernel.scoring import (
        pairwise_scores as pairwise_scores,
    )
    from dda_kernel.scoring import (
        row_norms as row_norms,
    )

_WHERE: dict[str, str] = {
    "CovarianceState": "dda_kernel.precondition",
    "DDAState": "dda_kernel.dda",
    "EmbeddingBatch": "dda_kernel.gradients",
    "EmbeddingLayout": "dda_kernel.projection",
    "EmptyResponseError": "dda_kernel.errors",
    "IGNORE_INDEX": "dda_kernel.gradients",
    "KernelError": "dda_kernel.errors",
    "LayoutMismatchError": "dda_kernel.errors",
    "ModuleSlot": "dda_kernel.projection",
    "NoTrackedModulesError": "dda_kernel.errors",
    "NonFiniteLossError": "dda_kernel.errors",
    "Preconditioner": "dda_kernel.precondition",
    "ProjectionSpec": "dda_kernel.projection",
    "Projector": "dda_kernel.projection",
    "StateError": "dda_kernel.errors",
    "TokenBatch": "dda_kernel.gradients",
    "Span": "dda_kernel.counterfactual",
    "apply_edit": "dda_kernel.counterfactual",
    "apply_span": "dda_kernel.counterfactual",
    "changed_words": "dda_kernel.counterfactual",
    "word_spans": "dda_kernel.counterfactual",
    "apply_preconditioner": "dda_kernel.precondition",
    "autocast_to": "dda_kernel.gradients",
    "best_edit": "dda_kernel.counterfactual",
    "build_projector": "dda_kernel.projection",
    "checkpoint_weights": "dda_kernel.dda",
    "contrastive_query": "dda_kernel.gradients",
    "covariance_init": "dda_kernel.precondition",
    "covariance_merge": "dda_kernel.precondition",
    "covariance_update": "dda_kernel.precondition",
    "dda_init": "dda_kernel.dda",
    "dda_merge": "dda_kernel.dda",
    "dda_update": "dda_kernel.dda",
    "dda_value": "dda_kernel.dda",
    "debias": "dda_kernel.scoring",
    "difference_norms": "dda_kernel.scoring",
    "edit_candidates": "dda_kernel.counterfactual",
    "embed_batch": "dda_kernel.gradients",
    "finetune_delta_weights": "dda_kernel.gradients",
    "fit_preconditioner": "dda_kernel.precondition",
    "gaussian_matrix": "dda_kernel.projection",
    "layout_for": "dda_kernel.modules",
    "linear_modules": "dda_kernel.modules",
    "make_layout": "dda_kernel.projection",
    "normalise_name": "dda_kernel.modules",
    "normalise_scores": "dda_kernel.scoring",
    "pad_batch": "dda_kernel.gradients",
    "pairwise_scores": "dda_kernel.scoring",
    "per_sample_loss": "dda_kernel.gradients",
    "project_gradient": "dda_kernel.projection",
    "response_log_probs": "dda_kernel.gradients",
    "row_norms": "dda_kernel.scoring",
    "stable_fingerprint": "dda_kernel.fingerprint",
    "tracked_modules": "dda_kernel.modules",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module 'dda_kernel' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
