"""The one error type users see: a single line that names the key or file and what to do."""


class PipelineError(Exception):
    """A user-facing failure. The message is one line and names the offending key or file."""


class ConfigError(PipelineError):
    """A composed config that the schema rejects."""
