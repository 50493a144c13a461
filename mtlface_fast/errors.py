"""Errors of mtlface_fast that the ``mtlface-fast`` command reports as one line (exit code 2)."""


class MTLFaceError(Exception):
    """Base class of the package's own errors."""


class CheckpointError(MTLFaceError, ValueError):
    """A checkpoint or saved-model file that cannot be read or does not fit the model; the message names the
    file and what is wrong with it. A ``ValueError``, so ``except ValueError`` catches it too."""
