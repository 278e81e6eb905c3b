"""The base of agman_milvus' typed errors.

Every error the package raises on purpose (bad input, missing configuration, an unreachable
or unready service) derives from :class:`AgmanError` besides its usual built-in base
(``ValueError``, ``LookupError``...), so callers can catch "anything agman tells me about" in
one clause, and the CLI prints it as one line (exit status 2) instead of a traceback.
"""

from __future__ import annotations

__all__ = ["AgmanError", "ConfigurationError", "InvalidProductError"]


class AgmanError(Exception):
    """A known failure; its message says what is wrong and, where it can, what to do."""


class ConfigurationError(AgmanError, ValueError):
    """Settings or options that cannot work (nothing configured, a missing file, a clash)."""


class InvalidProductError(AgmanError, ValueError):
    """A product event that cannot be stored as given (its id or metadata break the rules of
    ``agman_milvus.services.store.validation``); raised before anything is stored. ``field``
    names the offending part (``"product_id"`` or ``"metadata['brand']"``)."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field
