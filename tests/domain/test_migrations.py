"""The migration tree builds the whole schema on an empty database, removes it again, and
matches the models (autogenerate finds nothing to do), on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from chat_domain import create_engine
from chat_domain.fts import is_fts_object
from chat_domain.models import Base
from tests.domain.helpers import ROOT, alembic_config, create_database, drop_database, migrate

APP_TABLES = {table.name for table in Base.metadata.sorted_tables}


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
async def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    server = str(request.getfixturevalue("postgres_server"))
    name = f"chat_domain_mig_{uuid.uuid4().hex[:10]}"
    url = await create_database(server, name)
    try:
        yield url
    finally:
        await drop_database(server, name)


def _include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    return not is_fts_object(name, type_, reflected=reflected)


async def _inspect(url: str) -> tuple[set[str], list[Any], str | None]:
    """(tables, autogenerate diff, current revision)."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:

            def look(sync_conn: Connection) -> tuple[set[str], list[Any], str | None]:
                tables = set(inspect(sync_conn).get_table_names())
                context = MigrationContext.configure(
                    sync_conn, opts={"compare_type": True, "include_object": _include}
                )
                diff = compare_metadata(context, Base.metadata) if tables >= APP_TABLES else []
                return tables, diff, context.get_current_revision()

            return await conn.run_sync(look)
    finally:
        await engine.dispose()


async def _alembic_check(url: str) -> None:
    """``alembic check`` through env.py (its include_object, compare_type and batch settings)."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(lambda c: command.check(alembic_config(c)))
    finally:
        await engine.dispose()


async def test_upgrade_matches_models_and_downgrade_removes_everything(empty_db: str) -> None:
    await migrate(empty_db, "upgrade", "head")
    tables, diff, revision = await _inspect(empty_db)
    assert tables >= APP_TABLES
    assert diff == []
    assert revision is not None
    await _alembic_check(empty_db)
    if empty_db.startswith("sqlite"):
        assert {"kb_chunks_fts", "kb_chunks_fts_data"} <= tables

    await migrate(empty_db, "downgrade", "base")
    tables, _, revision = await _inspect(empty_db)
    assert tables == {"alembic_version"}
    assert revision is None

    await migrate(empty_db, "upgrade", "head")  # and back up again
    tables, diff, _ = await _inspect(empty_db)
    assert tables >= APP_TABLES
    assert diff == []


def test_cli_upgrade_uses_database_url(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "cli.db"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{db}"}
    env.pop("PLATFORM_SECRET_KEY", None)
    for args in (["upgrade", "head"], ["check"]):
        result = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    assert db.exists()


def test_revision_files_are_date_prefixed() -> None:
    names = [p.name for p in (ROOT / "migrations" / "versions").glob("*.py")]
    assert names
    for name in names:
        assert re.match(r"^\d{4}_\d{2}_\d{2}_\d{4}-\w+\.py$", name), name
