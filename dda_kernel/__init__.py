"""Pure tensor math of DDA (Debias and Denoise Attribution): embeddings, projection, scores, state.

Imports only torch and the standard library. See DESIGN.md section 2 for the notation.
"""

from dda_kernel.dda import DDAState, checkpoint_weights, dda_init, dda_merge, dda_update, dda_value
from dda_kernel.errors import (
    EmptyResponseError,
    KernelError,
    LayoutMismatchError,
    NonFiniteLossError,
    NoTrackedModulesError,
    StateError,
)
from dda_kernel.fingerprint import stable_fingerprint
from dda_kernel.gradients import (
    IGNORE_INDEX,
    EmbeddingBatch,
    TokenBatch,
    contrastive_query,
    embed_batch,
    pad_batch,
    per_sample_loss,
)
from dda_kernel.modules import layout_for, linear_modules, normalise_name, tracked_modules
from dda_kernel.precondition import (
    CovarianceState,
    Preconditioner,
    apply_preconditioner,
    covariance_init,
    covariance_merge,
    covariance_update,
    fit_preconditioner,
)
from dda_kernel.projection import (
    EmbeddingLayout,
    ModuleSlot,
    ProjectionSpec,
    Projector,
    build_projector,
    gaussian_matrix,
    make_layout,
    project_gradient,
)
from dda_kernel.scoring import chunked_scores, debias, normalise_scores, pairwise_scores, row_norms

__all__ = [
    "IGNORE_INDEX",
    "CovarianceState",
    "DDAState",
    "EmbeddingBatch",
    "EmbeddingLayout",
    "EmptyResponseError",
    "KernelError",
    "LayoutMismatchError",
    "ModuleSlot",
    "NoTrackedModulesError",
    "NonFiniteLossError",
    "Preconditioner",
    "ProjectionSpec",
    "Projector",
    "StateError",
    "TokenBatch",
    "apply_preconditioner",
    "build_projector",
    "checkpoint_weights",
    "chunked_scores",
    "contrastive_query",
    "covariance_init",
    "covariance_merge",
    "covariance_update",
    "dda_init",
    "dda_merge",
    "dda_update",
    "dda_value",
    "debias",
    "embed_batch",
    "fit_preconditioner",
    "gaussian_matrix",
    "layout_for",
    "linear_modules",
    "make_layout",
    "normalise_name",
    "normalise_scores",
    "pad_batch",
    "pairwise_scores",
    "per_sample_loss",
    "project_gradient",
    "row_norms",
    "stable_fingerprint",
    "tracked_modules",
]
