"""Errors meant for users: each says which file or key is wrong and what to do."""


class PipelineError(Exception):
    """Base class of the errors the CLI reports as one clear message (no traceback)."""


class InputError(PipelineError):
    """An input file is missing, unreadable, or holds data of the wrong kind."""


class ConfigError(PipelineError):
    """A configuration key is missing, misspelt or has a bad value."""
