"""Usage-log benchmark: bulk insert, then time the monthly per-tenant aggregate and show its plan.

    scripts/uv.sh run python bench/usage_bench.py                      # SQLite in a temp dir
    scripts/uv.sh run python bench/usage_bench.py --postgres postgresql://postgres@127.0.0.1/postgres

Builds a temporary database with ``alembic upgrade head`` (on PostgreSQL a uniquely named
database on that server, dropped at the end), inserts ``--rows`` usage events through
``write_usage`` (the recorder's write path: multi-row INSERT + monthly totals), spread over 12
months and ``--tenants`` tenants with one large tenant taking ``--big-share`` of the rows. Then
it runs the monthly aggregate for the large tenant and a small one, prints the EXPLAIN plan and,
last, one JSON object with the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from _pg import temporary_database
from chat_domain import (
    UsageRecord,
    create_engine,
    create_plan,
    create_session_factory,
    create_tenant,
    month_bounds,
    monthly_totals,
    write_usage,
)
from chat_domain.types import USAGE_KINDS
from chat_domain.usage import monthly_usage_query

ROOT = Path(__file__).resolve().parents[1]
YEAR = 2025
BATCH = 1000


async def migrate(engine: AsyncEngine) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))

    def upgrade(conn: Connection) -> None:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")

    async with engine.begin() as conn:
        await conn.run_sync(upgrade)


async def make_tenants(engine: AsyncEngine, count: int) -> list[uuid.UUID]:
    factory = create_session_factory(engine)
    async with factory() as session, session.begin():
        plan = await create_plan(session, name="bench", monthly_price_cents=0)
        return [
            (await create_tenant(session, name=f"t{i}", plan_id=plan.id)).id for i in range(count)
        ]


def generate(rows: int, tenants: list[uuid.UUID], big_share: float, seed: int) -> list[UsageRecord]:
    rng = random.Random(seed)
    start = datetime(YEAR, 1, 1, tzinfo=UTC)
    span = (datetime(YEAR + 1, 1, 1, tzinfo=UTC) - start).total_seconds()
    big, rest = tenants[0], tenants[1:]
    out = []
    for _ in range(rows):
        tenant = big if rng.random() < big_share else rng.choice(rest)
        kind = rng.choice(USAGE_KINDS)
        quantity = rng.randint(50, 2000) if kind.startswith("ai_") else 1
        occurred = start + timedelta(seconds=rng.random() * span)
        model = "m" if kind.startswith("ai_") else None
        out.append(UsageRecord(tenant, kind, quantity, occurred, model=model))
    out.sort(key=lambda r: r.occurred_at)  # events arrive in time order, as in production
    return out


async def insert(engine: AsyncEngine, records: list[UsageRecord]) -> float:
    factory = create_session_factory(engine)
    began = time.perf_counter()
    for i in range(0, len(records), BATCH * 10):
        async with factory() as session, session.begin():
            await write_usage(session, records[i : i + BATCH * 10])
    return time.perf_counter() - began


async def analyze(engine: AsyncEngine) -> None:
    if engine.dialect.name == "postgresql":
        # Index-only scans need the visibility map that VACUUM builds.
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("VACUUM ANALYZE usage_events"))
    else:
        async with engine.begin() as conn:
            await conn.execute(text("ANALYZE"))


async def explain(engine: AsyncEngine, tenant: uuid.UUID, month: int) -> list[str]:
    start, end = month_bounds(YEAR, month)
    stmt = monthly_usage_query(tenant, start, end)
    # Render with ":name" parameters (the async drivers use "$1"/"?") for a typed text() clause.
    named = (
        PGDialect(paramstyle="named")
        if engine.dialect.name == "postgresql"
        else SQLiteDialect(paramstyle="named")
    )
    compiled = stmt.compile(dialect=named)
    binds = [bindparam(name, b.value, type_=b.type) for b, name in compiled.bind_names.items()]
    prefix = (
        "EXPLAIN (ANALYZE, BUFFERS) "
        if engine.dialect.name == "postgresql"
        else "EXPLAIN QUERY PLAN "
    )
    async with engine.connect() as conn:
        sql = str(compiled).replace("::UUID", "")  # text() cannot parse ":name::TYPE"
        result = await conn.execute(text(prefix + sql).bindparams(*binds))
        rows = result.all()
    if engine.dialect.name == "postgresql":
        return [row[0] for row in rows]
    return [f"{row[0]}|{row[1]}| {row[3]}" for row in rows]


async def time_query(engine: AsyncEngine, tenant: uuid.UUID, repeat: int) -> dict[str, Any]:
    factory = create_session_factory(engine)
    samples: list[float] = []
    rows_in_month = 0
    for i in range(repeat):
        month = i % 12 + 1
        start, end = month_bounds(YEAR, month)
        async with factory() as session:
            began = time.perf_counter()
            totals = dict((await session.execute(monthly_usage_query(tenant, start, end))).all())
            samples.append((time.perf_counter() - began) * 1000)
            if i == 0:
                count = await session.scalar(
                    text(
                        "SELECT count(*) FROM usage_events WHERE tenant_id = :t "
                        "AND occurred_at >= :s AND occurred_at < :e"
                    ).bindparams(
                        bindparam("t", tenant, type_=_uuid_type()),
                        bindparam("s", start, type_=_ts_type()),
                        bindparam("e", end, type_=_ts_type()),
                    )
                )
                rows_in_month = int(count or 0)
                first_totals = totals
    samples.sort()
    return {
        "rows_in_month": rows_in_month,
        "median_ms": round(statistics.median(samples), 2),
        "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 2),
        "first_month_totals": {k: int(v) for k, v in first_totals.items()},
    }


def _uuid_type() -> Any:
    from sqlalchemy import Uuid

    return Uuid()


def _ts_type() -> Any:
    from chat_domain.models import UTCDateTime

    return UTCDateTime()


async def time_totals(engine: AsyncEngine, tenant: uuid.UUID, repeat: int) -> float:
    factory = create_session_factory(engine)
    samples = []
    for i in range(repeat):
        async with factory() as session:
            began = time.perf_counter()
            await monthly_totals(session, tenant, YEAR, i % 12 + 1)
            samples.append((time.perf_counter() - began) * 1000)
    return round(statistics.median(samples), 3)


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        await migrate(engine)
        tenants = await make_tenants(engine, args.tenants)
        records = generate(args.rows, tenants, args.big_share, args.seed)
        seconds = await insert(engine, records)
        del records
        await analyze(engine)
        plan = await explain(engine, tenants[0], 6)
        print(f"EXPLAIN ({engine.dialect.name}) monthly aggregate, large tenant, June {YEAR}:")
        for line in plan:
            print("   ", line)
        big = await time_query(engine, tenants[0], args.repeat)
        small = await time_query(engine, tenants[1], args.repeat)
        totals_ms = await time_totals(engine, tenants[0], args.repeat)
        return {
            "database": engine.dialect.name,
            "server_version": ".".join(map(str, engine.dialect.server_version_info or ())),
            "rows": args.rows,
            "tenants": args.tenants,
            "insert_seconds": round(seconds, 2),
            "insert_rows_per_s": round(args.rows / seconds),
            "monthly_query_large_tenant": big,
            "monthly_query_small_tenant": small,
            "monthly_totals_lookup_median_ms": totals_ms,
            "plan_uses_index": any(
                "ix_usage_events_tenant_id_occurred_at" in line for line in plan
            ),
        }
    finally:
        await engine.dispose()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.postgres:
        async with temporary_database(args.postgres, "usage_bench") as url:
            return await run(url, args)
    with tempfile.TemporaryDirectory(prefix="usage-bench-") as tmp:
        return await run(f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}", args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", metavar="URL", help="PostgreSQL server to benchmark")
    parser.add_argument("--rows", type=int, default=1_500_000)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--big-share", type=float, default=0.2)
    parser.add_argument("--repeat", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.tenants < 2 or args.rows < 1:
        parser.error("need at least 2 tenants and 1 row")
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
