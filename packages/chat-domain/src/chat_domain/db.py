"""Engine and session factory. Services create these at startup and pass them in."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

from chat_domain.settings import Settings, normalise_database_url, sqlite_path


def create_engine(settings: Settings | str, **engine_kwargs: Any) -> AsyncEngine:
    """An async engine for ``settings.database_url`` (or a URL string).

    SQLite gets WAL journaling, ``foreign_keys=ON`` and a busy timeout on every new connection,
    one connection per process (see below), and the folder of its database file is created.
    Errors never carry the statements' bound parameters (``hide_parameters``).
    Call ``await engine.dispose()`` on shutdown.
    """
    if isinstance(settings, str):
        settings = Settings(database_url=normalise_database_url(settings))
    # A database error's message otherwise quotes the statement's parameters: visitors' text,
    # contact details, encrypted secrets. Services log such errors.
    engine_kwargs.setdefault("hide_parameters", True)
    url = normalise_database_url(settings.database_url)
    if make_url(url).get_backend_name() == "sqlite":
        db_file = sqlite_path(url)
        if db_file is not None:
            db_file.parent.mkdir(parents=True, exist_ok=True)
            # SQLite has one writer at a time; connections of one process that contend for it
            # wait in its busy handler, which sleeps up to 100 ms per try, so under load
            # latency exploded and writers gave up ("database is locked"). One connection per
            # process makes the process's sessions queue in the pool (FIFO, no sleeping) and
            # leaves only the other processes to contend with. So a task must not open a
            # second session while it holds one: it would wait for itself until the pool's
            # timeout (SQLAlchemy's "QueuePool limit of size 1 overflow 0 reached").
            engine_kwargs.setdefault("pool_size", 1)
            engine_kwargs.setdefault("max_overflow", 0)
        engine = _create_async_engine(url, echo=settings.echo_sql, **engine_kwargs)
        _install_sqlite_pragmas(engine, settings.sqlite_busy_timeout_ms, wal=db_file is not None)
        return engine
    engine_kwargs.setdefault("pool_pre_ping", True)
    return _create_async_engine(url, echo=settings.echo_sql, **engine_kwargs)


def _install_sqlite_pragmas(engine: AsyncEngine, busy_timeout_ms: int, *, wal: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        finally:
            cursor.close()


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded values after commit (``expire_on_commit=False``)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def dialect_name(session: AsyncSession) -> str:
    """``"sqlite"`` or ``"postgresql"`` for the session's bind."""
    return session.get_bind().dialect.name
