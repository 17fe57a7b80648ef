"""Exceptions whose message is meant for the user, shown as-is in the UI."""


class AtlasError(Exception):
    """Base class: the message explains what went wrong and what to do."""


class InputError(AtlasError, ValueError):
    """The text or parameters of a request cannot be analysed (empty, too long, malformed)."""


class ModelLoadError(AtlasError):
    """A model cannot be found, reached, trusted or used for attention analysis."""


class NotFoundError(AtlasError, KeyError):
    """An analysis id (from a link) that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
