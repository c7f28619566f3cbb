"""Errors that carry a one-line, user-facing message.

The CLI prints ``error: <message>`` and exits with code 2 for any of these, so a
message must say what is wrong *and* what to do about it, on one line.
"""


class BrvoError(Exception):
    """Base class for expected, user-facing failures (bad input, bad state)."""


class DatasetFormatError(BrvoError):
    """An HDF5 file is not a valid 'brvo-paired' v1 dataset."""


class CheckpointError(BrvoError):
    """A checkpoint is missing, truncated, tampered with, or from another config."""


class InputDataError(BrvoError):
    """The input directory or manifest cannot be read as SOUL data."""
