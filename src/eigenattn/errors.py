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


class ConfigErrors(ConfigError):
    """Several config values that are wrong together, reported in one message (each with its key and
    fix), so that one edit fixes them all. ``errors``: the :class:`ConfigError` of each key; ``key``,
    ``problem`` and ``fix`` are the first's."""

    def __init__(self, errors: list[ConfigError], headline: str = ""):
        self.errors = list(errors)
        first = self.errors[0]
        self.key, self.problem, self.fix, self.headline = first.key, first.problem, first.fix, headline
        head = headline or f"{len(self.errors)} config keys cannot work"
        Exception.__init__(self, head + ":\n" + "\n".join(str(e) for e in self.errors))

    def __reduce__(self):
        return type(self), (self.errors, self.headline)


def raise_all(errors: list[ConfigError], headline: str = "") -> None:
    """Raise nothing for no error, the error itself for one, and :class:`ConfigErrors` for several."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors, headline)


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
