"""Exceptions that carry a config key or file and a fix, so that users see what to change."""


class EigenattnError(Exception):
    """Base class for errors a user can fix by changing config or inputs."""


class ConfigError(EigenattnError):
    """A config value is wrong. The message names the key and the fix."""

    def __init__(self, key: str, problem: str, fix: str | None = None):
        self.key = key
        msg = f"config key '{key}': {problem}"
        if fix:
            msg += f"\n  fix: {fix}"
        super().__init__(msg)


class SourceError(EigenattnError):
    """A model or corpus source could not be materialised (bad checksum, offline hub, ...)."""


class InputError(EigenattnError):
    """An input file or store is missing or malformed. The message names the path."""
