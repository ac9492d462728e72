"""A service's connections and shared objects, created on startup and closed on shutdown."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from chat_domain import SecretBox, UsageRecorder, create_engine, create_session_factory
from chat_pipeline.config import PipelineSettings
from chat_pipeline.events import Events
from chat_pipeline.queues import Pipeline
from queue_core import connect

__all__ = ["Runtime"]


@dataclass
class Runtime:
    settings: PipelineSettings
    redis: Any
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    box: SecretBox
    usage: UsageRecorder
    pipeline: Pipeline
    events: Events

    @classmethod
    async def start(cls, settings: PipelineSettings) -> Runtime:
        engine = create_engine(settings.db)
        sessions = create_session_factory(engine)
        redis = connect(settings.redis_url)
        return cls(
            settings=settings,
            redis=redis,
            engine=engine,
            sessions=sessions,
            box=SecretBox(settings.db.resolve_secret_key()),
            usage=UsageRecorder(sessions, batch_size=200, flush_interval=0.5),
            pipeline=Pipeline.open(redis),
            events=Events(redis),
        )

    async def close(self) -> None:
        # usage first: its buffered events need the database
        await self.usage.close()
        await self.engine.dispose()
        await self.redis.aclose()
