"""Errors a user can cause. The CLI turns each into one clear sentence and a non-zero exit."""


class ForgetlessError(Exception):
    """Base class: the message is shown to the user as is."""


class ConfigError(ForgetlessError):
    """A config file or option is invalid (the message names the key)."""


class DataSourceError(ForgetlessError):
    """A data source is missing, empty or malformed (the message names the fix)."""


class CheckpointError(ForgetlessError):
    """A checkpoint folder is missing files, corrupt or inconsistent."""


class TrainingError(ForgetlessError):
    """Training cannot go on (for example a NaN loss)."""
