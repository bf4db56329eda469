"""Errors the harness raises for bad input: one line naming the file, the key and what was expected.

The CLI prints these without a traceback and exits with a non-zero code.
"""


class QBenchError(Exception):
    """Base class: a user-facing, one-line error."""


class ConfigError(QBenchError):
    """A suite file or override is invalid."""


class DatasetError(QBenchError):
    """A dataset root, split file, sequence or frame is missing or malformed."""


class CheckpointError(QBenchError):
    """A checkpoint is missing, unreadable or does not match its model config."""


class NonFiniteError(RuntimeError):
    """A metric or training loss is NaN or infinite: the run is recorded as FAILED with the reason."""


class Pruned(Exception):
    """A search's pruner stopped a run at an intermediate evaluation: recorded KILLED, not FAILED."""


class OutOfMemory(RuntimeError):
    """A training step ran out of device memory: the run is recorded as FAILED with the step, the
    micro-batch and the peak, and the suite goes on."""
