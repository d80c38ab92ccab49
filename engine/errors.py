"""User-facing errors.

A `CeilingError` is a problem with the user's input (a config, a data file, a flag): the CLI prints
its message without a traceback and exits with status 2. Messages name the file, line or field.
"""


class CeilingError(Exception):
    """Bad input from the user; the message says what and where."""


class ConfigError(CeilingError):
    """A config file or `--set` override is invalid (unknown key, wrong type, bad value)."""


class DataError(CeilingError):
    """A data file is malformed; the message names the file and line (or field)."""


class CheckpointError(CeilingError):
    """A checkpoint cannot be written, or none under a run verifies; the message names the file and reason."""
