"""Exceptions: every refusal is one sentence that names the thing and the problem."""

__all__ = ["LieError", "AdapterFileError"]


class LieError(ValueError):
    """A refused input or an impossible request; the message is one sentence."""


class AdapterFileError(LieError):
    """An adapter (or base) file that cannot be used; the message names the file."""
