"""The kernel's exception tree: every error names the offending sample or module and the fix."""

from __future__ import annotations


class KernelError(ValueError):
    """Base class of every error raised by :mod:`dda_kernel` for bad input."""


class EmptyResponseError(KernelError):
    """A sample has no response token left to compute a loss on (empty, or truncated away)."""


class NoTrackedModulesError(KernelError):
    """The module-name patterns of a projection spec match no linear layer of the model."""


class NonFiniteLossError(KernelError):
    """A sample's loss (or gradient) is NaN or infinite."""


class LayoutMismatchError(KernelError):
    """Two embeddings, states or models were built with different projection layouts."""


class StateError(KernelError):
    """A running DDA state is used inconsistently (a checkpoint counted twice, shapes differ)."""
