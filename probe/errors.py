"""Errors probe raises for expected failures.

The CLI turns every :class:`ProbeError` into a one-line message and a non-zero exit, never a traceback.
"""


class ProbeError(Exception):
    """Base class of every expected, user-facing probe failure."""


class BackboneNotFoundError(ProbeError, KeyError):
    """An unknown backbone name (the message carries close-match suggestions)."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class WeightsUnavailableError(ProbeError):
    """Pretrained weights could not be found locally nor downloaded."""


class InputError(ProbeError, ValueError):
    """A data source (folder, CSV, file list) is missing or malformed."""


class ImageDecodeError(ProbeError):
    """One input could not be decoded as an image (reported and skipped, or fatal under --strict)."""


class CacheMismatchError(ProbeError):
    """A feature cache was opened with a description that differs from the one it was written with."""

    def __init__(self, field: str, expected, found, where: str = ""):
        self.field = field
        self.expected = expected
        self.found = found
        loc = f" at {where}" if where else ""
        super().__init__(
            f"feature cache{loc} was written with {field}={found!r}, but {field}={expected!r} was requested; "
            "refusing to reuse features from a different feature space"
        )


class CacheCorruptError(ProbeError):
    """A cache file fails its integrity checks."""


class ModelCompatibilityError(ProbeError):
    """A saved model cannot be used with what is installed (backbone, weights, library versions)."""


class UntrustedModelError(ProbeError):
    """A model file holds objects that can execute code on load and trust was not given."""


class StrictModeError(ProbeError):
    """--strict was given and the run had failures (bad inputs, leakage)."""
