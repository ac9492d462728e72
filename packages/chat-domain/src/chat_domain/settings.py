"""Settings read from the environment, and the development fallback for the secret key."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url

from chat_domain.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///.data/platform.db"
SECRET_KEY_FILENAME = "secret.key"


def normalise_database_url(url: str) -> str:
    """Pick the async driver: ``postgresql://`` -> ``postgresql+asyncpg://``, ``sqlite://`` ->
    ``sqlite+aiosqlite://``. Anything else is returned unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
    return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (relative to the current directory), or None for
    in-memory SQLite and other databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    return Path(database)


@dataclass(frozen=True)
class Settings:
    """Database settings shared by every service.

    ``secret_key`` is the Fernet key (or several, comma-separated, newest first, for rotation) that
    encrypts channel, provider and webhook secrets at rest. It is never part of ``repr()``.
    """

    database_url: str = DEFAULT_DATABASE_URL
    secret_key: str | None = field(default=None, repr=False)
    sqlite_busy_timeout_ms: int = 5000
    echo_sql: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        timeout = env.get("SQLITE_BUSY_TIMEOUT_MS", "5000")
        try:
            busy_timeout = int(timeout)
        except ValueError as exc:
            raise ConfigError(
                f"SQLITE_BUSY_TIMEOUT_MS must be an integer, got {timeout!r}"
            ) from exc
        return cls(
            database_url=normalise_database_url(env.get("DATABASE_URL") or DEFAULT_DATABASE_URL),
            secret_key=env.get("PLATFORM_SECRET_KEY") or None,
            sqlite_busy_timeout_ms=busy_timeout,
            echo_sql=env.get("SQL_ECHO", "").lower() in {"1", "true", "yes"},
        )

    @property
    def is_sqlite(self) -> bool:
        return make_url(self.database_url).get_backend_name() == "sqlite"

    def resolve_secret_key(self) -> str:
        """The configured key, or for a SQLite file database in development a key generated once
        and kept in ``secret.key`` (mode 0600) beside the database file.

        Production must set ``PLATFORM_SECRET_KEY``: losing the generated file makes every stored
        secret unreadable. PostgreSQL deployments get no fallback.
        """
        if self.secret_key:
            return self.secret_key
        db_file = sqlite_path(self.database_url)
        if db_file is None:
            raise ConfigError(
                "PLATFORM_SECRET_KEY is not set; it is required unless the database is a "
                "SQLite file"
            )
        key_file = db_file.parent / SECRET_KEY_FILENAME
        if key_file.exists():
            return key_file.read_text(encoding="ascii").strip()
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key = Fernet.generate_key().decode("ascii")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(key + "\n")
        log.warning(
            "PLATFORM_SECRET_KEY is not set: generated a development key in %s; "
            "production must set PLATFORM_SECRET_KEY",
            key_file,
        )
        return key
