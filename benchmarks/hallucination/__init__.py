"""Hallucination-tracing benchmark (benchmarks/README.md): which method finds the corrupted training samples?

    python -m benchmarks.hallucination                # default size, LoRA and full fine-tuning (CPU)
    python -m benchmarks.hallucination --quick        # the small size the test suite runs

For each fine-tuning mode (``lora``, ``full``) it
1. builds the canary news world (:mod:`benchmarks.canary_world`) and fine-tunes SmolLM2-135M on it with
   the Hugging Face Trainer, one checkpoint per epoch;
2. generates greedy summaries of the held-out documents and keeps the ones that say Y for X (real
   hallucinations; ``--quick`` may fall back to *planted* queries, labelled as such, when a pair has none);
3. runs the system's own flows (``dda-index-checkpoint`` per model state, ``dda-attribute``) on a *study*
   store that tracks every block linear at 8×8, once per scoring variant (preconditioner × normalisation
   × query kind), and reads the per-checkpoint scores s̃_t, s̃_0 back through the ``scores`` SQL view;
4. runs the system once more with its shipped defaults (``default``: in the no-correction column the
   counterfactual query, what ``dda attribute`` runs for an output without a correction), reading ``dda_score``
   from the ``lineage`` SQL view;
5. scores BM25 and CEA (:mod:`benchmarks.cea`) beside them;
6. evaluates every ranking per canary pair (ROC-AUC, AP, recall@R) and chooses the data-driven settings
   (normalisation, λ, preconditioner) leave-one-pair-out.

Smaller projections and module subsets are studied from the same study vectors: the projection
matrices depend only on (seed, module, side), and ``torch.randn`` draws rows in order, so the k×k
projection of a module equals (8/k) times the top-left k×k block of its 8×8 projection exactly.

Everything is cached under ``--work`` (worlds, runs, stores), so an interrupted run resumes.
Writes ``benchmarks/results/hallucination[_quick].{json,md,png}``.

The package: :mod:`~benchmarks.hallucination.config` (modes, kinds, sizes, work folder),
:mod:`~benchmarks.hallucination.worlds` (world builders, fine-tuning, queries),
:mod:`~benchmarks.hallucination.system` (the system's flows and SQL views),
:mod:`~benchmarks.hallucination.methods` (study rankings, BM25, CEA),
:mod:`~benchmarks.hallucination.evaluation` (per-pair metrics, leave-one-pair-out choices),
:mod:`~benchmarks.hallucination.report` (tables, plot) and :mod:`~benchmarks.hallucination.run` (the CLI).
"""

from __future__ import annotations

from benchmarks.hallucination.config import (
    KINDS,
    MODELS,
    MODES,
    RESULTS,
    SIZES,
    Log,
    Size,
    cell_fields,
    log_line,
    machine,
    prepare_work,
)
from benchmarks.hallucination.evaluation import Context, ModeResult, evaluate_mode, lopo, mode_context, record
from benchmarks.hallucination.methods import (
    LAMBDAS,
    MODULE_SETS,
    STUDY_INCLUDE,
    STUDY_K,
    bm25_rankings,
    cea_all_states,
    slice_columns,
    study_rankings,
    study_spec,
)
from benchmarks.hallucination.report import METHODS, markdown
from benchmarks.hallucination.run import main
from benchmarks.hallucination.system import lineage_matrix, run_system, score_cube
from benchmarks.hallucination.worlds import build_world, load_truth, lora_model, prepare_mode, read_queries

__all__ = [
    "KINDS",
    "LAMBDAS",
    "METHODS",
    "MODELS",
    "MODES",
    "MODULE_SETS",
    "RESULTS",
    "SIZES",
    "STUDY_INCLUDE",
    "STUDY_K",
    "Context",
    "Log",
    "ModeResult",
    "Size",
    "bm25_rankings",
    "build_world",
    "cea_all_states",
    "cell_fields",
    "evaluate_mode",
    "lineage_matrix",
    "load_truth",
    "log_line",
    "lopo",
    "lora_model",
    "machine",
    "main",
    "markdown",
    "mode_context",
    "prepare_mode",
    "prepare_work",
    "read_queries",
    "record",
    "run_system",
    "score_cube",
    "slice_columns",
    "study_rankings",
    "study_spec",
]
