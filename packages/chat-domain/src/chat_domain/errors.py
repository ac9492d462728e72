"""Exceptions raised by chat_domain."""

from __future__ import annotations


class DomainError(Exception):
    """Base class of every chat_domain error."""


class ConfigError(DomainError):
    """Settings are missing or invalid."""


class NotFoundError(DomainError):
    """A row the caller named does not exist."""


class PermissionDenied(DomainError):
    """An API key lacks the role or the tenant an operation needs."""


class SecretDecryptionError(DomainError):
    """A stored secret cannot be decrypted with the configured keys (wrong or rotated-out key)."""


class RecorderClosedError(DomainError):
    """A usage event was recorded after ``UsageRecorder.close()``."""


class AlreadyAnsweredError(DomainError):
    """Some of the messages a reply was to answer were answered by another reply meanwhile (two
    answer runs overlapped); the caller's transaction must roll back."""
