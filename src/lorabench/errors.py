"""The error every check of a setting raises (its own module, so that config.py and precision.py, which import each
other's names, can both import it first)."""


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag or file and what to do."""


class DataError(ConfigError):
    """Bad training data: names the file and row."""
