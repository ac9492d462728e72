"""A throwaway PostgreSQL database for a benchmark run."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy.engine import make_url


@asynccontextmanager
async def temporary_database(server_url: str, prefix: str) -> AsyncIterator[str]:
    """Create a uniquely named database on the server of ``server_url``; yield its
    ``postgresql+asyncpg://`` URL; drop it (closing any connections left) at the end."""
    server = make_url(server_url).set(drivername="postgresql")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server.render_as_string(hide_password=False), timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = server.set(drivername="postgresql+asyncpg", database=name)
            yield url.render_as_string(hide_password=False)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
