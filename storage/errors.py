"""Errors that carry a one-line, user-facing message.

The CLI prints ``error: <message>`` and exits with code 2 for any of these, so a
message must say what is wrong *and* what to do about it, on one line.
"""


class BrvoError(Exception):
    """Base class for expected, user-facing failures (bad input, bad state)."""


class DatasetFormatError(BrvoError):
    """An HDF5 file is not a valid 'brvo-paired' dataset of a version this code reads."""


class CheckpointError(BrvoError):
    """A checkpoint is missing, truncated, tampered with, or from another config."""


class InputDataError(BrvoError):
    """The input directory or manifest cannot be read as SOUL data."""


class DiskFullError(BrvoError):
    """The disk (or quota) filled up while writing; nothing partial was left at the target path."""

    def __init__(self, path) -> None:
        self.path = path
        super().__init__(f"no space left on device while writing {path}")

    def __reduce__(self):  # pickles as its path, so a copy (e.g. in a Prefect state) keeps the same message
        return (type(self), (self.path,))


class UnsafePathError(BrvoError):
    """A path built from user-supplied text would leave the folder it belongs in."""
