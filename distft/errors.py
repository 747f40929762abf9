"""Errors a user can act on. The CLI prints them as one line, never as a traceback."""


class DistftError(Exception):
    """Base class: the message names the config key, file or rank at fault."""

    exit_code = 2


class ConfigError(DistftError):
    """A config key is unknown, missing or has a bad value."""


class ModelError(DistftError):
    """The model cannot be built or its pretrained weights do not fit it."""


class DataError(DistftError):
    """A data set cannot be read."""


class CheckpointError(DistftError):
    """A checkpoint is missing, corrupt or belongs to another model."""


class NumericalError(DistftError):
    """NaN or Inf in the loss or the gradients."""

    exit_code = 4


class Preempted(DistftError):
    """SIGTERM: every rank stopped at the same step boundary after a checkpoint. Relaunching
    the same command resumes. Exit code 75 (EX_TEMPFAIL: try again)."""

    exit_code = 75


class DistributedError(DistftError):
    """Ranks disagree (frozen weights, state digests) or a rank failed."""

    exit_code = 3


def mxnet_reason(exc: BaseException) -> str:
    """The informative line of an MXNetError (its text starts with a C++ traceback header)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("MXNetError:"):
            return line[len("MXNetError:"):].strip()
    return lines[-1] if lines else type(exc).__name__
