"""API keys: created once (plaintext shown once), stored as SHA-256, verified in constant time.

Plaintext format: ``cbk_<prefix>_<secret>``; the 12-hex-character prefix is stored in clear to
find the row, the whole string is hashed. The secret is 256 random bits, so a fast hash is right
(no password stretching needed).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain.errors import PermissionDenied
from chat_domain.models import ApiKey, utcnow
from chat_domain.types import ApiKeyRole

KEY_SCHEME = "cbk"
LAST_USED_RESOLUTION = timedelta(minutes=1)
ROLE_RANK: dict[ApiKeyRole, int] = {"agent": 1, "admin": 2, "operator": 3}


@dataclass(frozen=True, slots=True)
class ApiKeyView:
    id: uuid.UUID
    tenant_id: uuid.UUID | None
    role: ApiKeyRole
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> ApiKeyView:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            role=row.role,
            name=row.name,
            prefix=row.prefix,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
            last_used_at=row.last_used_at,
        )


@dataclass(frozen=True, slots=True)
class CreatedApiKey:
    """The new key's row and its plaintext, which is not stored and cannot be shown again."""

    key: ApiKeyView
    plaintext: str = field(repr=False)


def hash_api_key(plaintext: str) -> bytes:
    return hashlib.sha256(plaintext.encode("utf-8")).digest()


def _split(plaintext: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    scheme, sep, rest = plaintext.partition("_")
    if scheme != KEY_SCHEME or not sep:
        return None
    prefix, sep, secret = rest.partition("_")
    if len(prefix) != 12 or not sep or not secret:
        return None
    return prefix


async def create_api_key(
    session: AsyncSession,
    *,
    role: ApiKeyRole,
    tenant_id: uuid.UUID | None = None,
    name: str = "",
) -> CreatedApiKey:
    """A new key. ``operator`` keys are platform-wide (no tenant); ``admin``/``agent`` keys need
    a tenant."""
    if (role == "operator") != (tenant_id is None):
        raise ValueError("operator keys have no tenant; admin and agent keys need one")
    prefix = secrets.token_hex(6)
    plaintext = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        tenant_id=tenant_id, role=role, name=name, prefix=prefix, key_hash=hash_api_key(plaintext)
    )
    session.add(row)
    await session.flush()
    return CreatedApiKey(key=ApiKeyView.of(row), plaintext=plaintext)


async def verify_api_key(
    session: AsyncSession, plaintext: str, *, now: datetime | None = None
) -> ApiKeyView | None:
    """The key's row when ``plaintext`` is a valid, unrevoked key, else None.

    Records ``last_used_at`` at most once a minute per key (one conditional UPDATE, so
    concurrent requests do not all write); commit the session to keep it.
    """
    prefix = _split(plaintext)
    if prefix is None:
        return None
    row = await session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None or not hmac.compare_digest(row.key_hash, hash_api_key(plaintext)):
        return None
    if row.revoked_at is not None:
        return None
    now = now or utcnow()
    stale_before = now - LAST_USED_RESOLUTION
    if row.last_used_at is None or row.last_used_at <= stale_before:
        await session.execute(
            update(ApiKey)
            .where(
                ApiKey.id == row.id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= stale_before),
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
        return replace(ApiKeyView.of(row), last_used_at=now)
    return ApiKeyView.of(row)


async def revoke_api_key(
    session: AsyncSession, key_id: uuid.UUID, *, now: datetime | None = None
) -> bool:
    """Revoke a key; False when it does not exist or was already revoked."""
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now or utcnow())
        .returning(ApiKey.id)
        .execution_options(synchronize_session=False)
    )
    return result.scalar_one_or_none() is not None


async def list_api_keys(session: AsyncSession, tenant_id: uuid.UUID | None) -> list[ApiKeyView]:
    """A tenant's keys, or the operator keys for ``None``; never any hash or plaintext."""
    condition = ApiKey.tenant_id.is_(None) if tenant_id is None else ApiKey.tenant_id == tenant_id
    rows = await session.scalars(select(ApiKey).where(condition).order_by(ApiKey.created_at))
    return [ApiKeyView.of(row) for row in rows]


def has_role(key: ApiKeyView, role: ApiKeyRole, *, tenant_id: uuid.UUID | None = None) -> bool:
    """Roles nest: operator > admin > agent. Operator keys act on every tenant; tenant keys only
    on their own (``tenant_id`` given) and never on platform-wide operations (``tenant_id``
    None with role ``operator``)."""
    if key.revoked_at is not None or ROLE_RANK[key.role] < ROLE_RANK[role]:
        return False
    if key.role == "operator":
        return True
    return tenant_id is not None and key.tenant_id == tenant_id


def require_role(
    key: ApiKeyView | None, role: ApiKeyRole, *, tenant_id: uuid.UUID | None = None
) -> ApiKeyView:
    """``key`` when it may act as ``role`` (on ``tenant_id``), else raise ``PermissionDenied``."""
    if key is None or not has_role(key, role, tenant_id=tenant_id):
        raise PermissionDenied(
            f"requires role {role!r}" + (" for this tenant" if tenant_id else "")
        )
    return key
