"""User errors: one family, one light module (no torch, no pyarrow).

Each stage raises its kind; the command line catches UserError and prints one
line with exit 2. Anything else is a bug or an environment problem: traceback,
exit 1.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2  # a UserError: the job as given cannot run
EXIT_FAILED = 1  # anything else: a rank died, a collective timed out, a bug
ERROR_PREFIX = "hvd_infer: error: "  # how every one-line error starts, on every launcher


class UserError(ValueError):
    """Something the user can fix; the message names it and what would be right."""

    # True when every rank raised the same error (checks shared by RankContext.agree):
    # the command line then prints it once, from rank 0.
    all_ranks: bool = False


class ConfigError(UserError):
    """A config key or value is wrong; the message names it and what would be right."""

    all_ranks = True  # every rank parses the same config


class DataError(UserError):
    """The input data is not what the config says; the message names the file or column."""


class ModelError(UserError):
    """The model directory cannot do what the config asks; the message says why."""


class OutputError(UserError):
    """The output directory cannot be used as asked; the message says what to do."""
