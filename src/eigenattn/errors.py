"""Exceptions that carry a config key or file and a fix, so that users see what to change."""


class EigenattnError(Exception):
    """Base class for errors a user can fix by changing config or inputs."""


class ConfigError(EigenattnError):
    """A config value is wrong. The message names the key and the fix."""

    def __init__(self, key: str, problem: str, fix: str | None = None):
        self.key, self.problem, self.fix = key, problem, fix
        msg = f"config key '{key}': {problem}"
        if fix:
            msg += f"\n  fix: {fix}"
        super().__init__(msg)

    def __reduce__(self):  # pickled across Dask processes with its fields, not the formatted message
        return type(self), (self.key, self.problem, self.fix)


class SourceError(EigenattnError):
    """A model or corpus source could not be materialised (bad checksum, offline hub, ...)."""


class InputError(EigenattnError):
    """An input file or store is missing or malformed. The message names the path and the fix.

    ``path``: the file or store (or, for an input that is no file, what it is: "passages",
    "partial attention input"); ``problem``: what is wrong with it; ``fix``: what to do.
    """

    def __init__(self, path, problem: str, fix: str | None = None):
        self.path, self.problem, self.fix = str(path), problem, fix
        msg = f"input '{self.path}': {problem}"
        if fix:
            msg += f"\n  fix: {fix}"
        super().__init__(msg)

    def __reduce__(self):
        return type(self), (self.path, self.problem, self.fix)


class UnsupportedModelError(EigenattnError):
    """A model whose attention scores cannot be captured exactly, refused before any score is written.

    The message names the model (config key or path), its ``model_type``, the cause and the fix.
    ``model`` may be filled in by the caller that knows the config key (the attention backend does not).
    """

    def __init__(
        self, problem: str, fix: str | None = None, *, model: str | None = None, model_type: str | None = None
    ):
        self.problem, self.fix, self.model, self.model_type = problem, fix, model, model_type
        super().__init__(problem)

    def __str__(self) -> str:
        who = f"model {self.model}" if self.model else "this model"
        if self.model_type:
            who += f" (model_type '{self.model_type}')"
        msg = f"{who} is refused: {self.problem}"
        if self.fix:
            msg += f"\n  fix: {self.fix}"
        return msg
