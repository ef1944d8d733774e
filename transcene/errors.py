"""Exceptions and warnings a user can act on. The CLI maps them to exit codes without a traceback."""

from __future__ import annotations

__all__ = [
    "TransceneError",
    "EpochFileError",
    "DatasetError",
    "FitError",
    "TransceneWarning",
    "EpochSkippedWarning",
    "BaselineWarning",
    "ConvergenceWarning",
]


class TransceneError(Exception):
    """Base class of the errors transcene raises for bad input or failed work."""


class EpochFileError(TransceneError, ValueError):
    """An epoch file is unreadable or violates the epoch-file format.

    The message names the file, the HDU or header keyword, and what was expected.
    """

    def __init__(self, path, problem: str, *, field: str | None = None):
        self.path = str(path)
        self.field = field
        self.problem = problem
        where = f"{self.path}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {problem}")


class DatasetError(TransceneError, ValueError):
    """The set of epochs cannot be fitted (none usable, duplicates, mixed time systems...)."""


class FitError(TransceneError, RuntimeError):
    """A fit failed in a way that leaves no result worth reporting."""


class TransceneWarning(UserWarning):
    """Base class of transcene's warnings."""


class EpochSkippedWarning(TransceneWarning):
    """An epoch (or some of its pixels) was left out; the message says which and why."""


class BaselineWarning(TransceneWarning):
    """No transient-free epochs: fluxes are relative to an undefined baseline."""


class ConvergenceWarning(TransceneWarning):
    """The optimiser stopped before its convergence criteria were met."""
