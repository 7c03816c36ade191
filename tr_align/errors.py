"""The project's exception types: problems a user can fix, each reported as one line.

Every type derives from ``Error`` and from the built-in exception it refines (a
``ConfigError`` is a ``ValueError``, a ``RunDirError`` a ``FileNotFoundError``), so callers
that catch the built-in keep working. ``tr_align.cli`` maps each type to its one-line
``tr-align: ...`` message and exit code in one table (``cli.ERRORS``); anything else is a bug
and keeps its traceback.

This module imports nothing from the package, so every module can raise these.
"""

from __future__ import annotations


class Error(Exception):
    """A problem with the user's input or environment (not a bug); the message says what and
    where, in one line."""


class ConfigError(Error, ValueError):
    """An invalid config value or command-line flag; the message names the key, e.g.
    ``trust_region.alpha=1.5: must be in [0, 1]``."""


class DataError(Error, ValueError):
    """Unreadable input data; the message names the file and line (or the dataset and
    split)."""


class RunDirError(Error, FileNotFoundError):
    """A run directory, one of its files, or a checkpoint (or part of one) that is not
    there; the message names the path."""


class ModelNotFoundError(Error, FileNotFoundError):
    """A model source that is none of a Hugging Face directory, a .gguf file, ``smollm2``
    or a tr-align run directory."""


class ModelError(Error, ValueError):
    """A pretrained model that is there but cannot be used: a garbled or incomplete
    ``config.json``, an unreadable or truncated safetensors file, a shard the index lists but
    the directory lacks, a tensor of the wrong shape or an integer dtype; the message names the
    file and what was expected."""


class MissingDependencyError(Error, ImportError):
    """An optional package a feature needs is not installed; the message says what to
    ``pip install``."""


class DistributedSetupError(Error, ValueError):
    """Inconsistent multi-process environment variables (``JAX_NUM_PROCESSES`` ...)."""


class RemoteError(Error, RuntimeError):
    """A remote service (the HTTP judge) failed after its retries."""


class NonFiniteError(Error, FloatingPointError):
    """The loss or the gradient norm became non-finite; the message names the step and the
    last good checkpoint."""


class WorkdirError(Error, OSError):
    """The run directory, or a file in it, cannot be created or written (read-only, full,
    not a directory); the message names the path and the OS error."""


class CheckpointError(Error, OSError):
    """A checkpoint could not be written (a full disk, a read-only or not-a-directory
    ``WORKDIR/checkpoints``, a stalled filesystem) or none of the saved ones can be read; the
    message names the path, the OS error and the last good checkpoint."""


# The exit code of a run that stopped on a signal or a preemption notice, with its state
# saved (or nothing yet to save): "rerun the same command to resume". The launch scripts
# (launch/*) retry on it. 75 = EX_TEMPFAIL of sysexits.h.
EXIT_RESUME = 75
