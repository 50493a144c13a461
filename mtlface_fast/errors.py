"""Errors of mtlface_fast that the ``mtlface-fast`` command reports as one line (exit code 2).

Each also subclasses the builtin a caller would catch for that kind of failure (``ValueError`` for a bad
argument or file, ``RuntimeError`` for something this machine lacks), so ``except ValueError`` and ``except
RuntimeError`` keep working. A ``RuntimeError`` that is not one of these (torch, CUDA, Triton) is a failure to
investigate, and the command prints it with its traceback.
"""


class MTLFaceError(Exception):
    """Base class of the package's own errors."""


class CheckpointError(MTLFaceError, ValueError):
    """A checkpoint or saved-model file that cannot be read or does not fit the model; the message names the
    file and what is wrong with it. A ``ValueError``, so ``except ValueError`` catches it too."""


class UsageError(MTLFaceError, ValueError):
    """An argument, or a combination of them, that cannot run here (e.g. a CUDA device on a machine without
    one); the message says what to pass instead."""


class MissingDependencyError(MTLFaceError, RuntimeError):
    """A feature needs an optional package (an extra), a newer torch, or a capability of the installed one
    that is absent; the message names it and how to install it or what to use instead."""


class TrainingDivergedError(MTLFaceError, RuntimeError):
    """Training produced a non-finite loss; the message names the step and what to change."""
