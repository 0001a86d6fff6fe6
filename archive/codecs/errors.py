"""The two ways a conversion fails, shared by every module of the package."""

from __future__ import annotations


class TranscodeError(ValueError):
    """The object cannot be converted: unsupported syntax or image, corrupt or
    undecodable pixel data, or a re-encode that is not bit-exact."""


class LossySource(TranscodeError):
    """The object arrived lossy compressed: it is never re-encoded."""
