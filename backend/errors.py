"""Exceptions whose message is meant for the user, shown as-is in the UI."""


class AtlasError(Exception):
    """Base class: the message explains what went wrong and what to do."""


class InputError(AtlasError, ValueError):
    """The text or parameters of a request cannot be analysed (empty, too long, malformed)."""


class JobCancelled(AtlasError):
    """The one cancellation: raised inside a job (by its context's progress, or by a pass or a
    rollout engine polling `should_stop`) once its cancellation was requested."""


class ModelLoadError(AtlasError):
    """A model cannot be found, reached, trusted or used for attention analysis."""


class NotFoundError(AtlasError, KeyError):
    """An analysis id (from a link) that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CacheFileError(AtlasError):
    """The cache file cannot be used; `path` is the file."""

    def __init__(self, message: str, path):
        super().__init__(message)
        self.path = path


class CacheInUseError(CacheFileError):
    """Another process holds the cache file (DuckDB allows one writer process)."""


class CorruptCacheError(CacheFileError):
    """The cache file is truncated or not a DuckDB database: it can be moved aside."""


class JobInterrupted(NotFoundError):
    """A job the worker no longer knows because it restarted since the job was submitted."""


class WorkerUnavailable(AtlasError):
    """The worker service does not answer (stopped, restarting or unreachable)."""
