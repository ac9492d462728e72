from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import (
    ConfigError,
    SecretBox,
    SecretDecryptionError,
    Settings,
    WhatsAppCloudSecrets,
    WhatsAppQrConfig,
    WhatsAppQrSecrets,
    WidgetConfig,
    create_channel,
    create_webhook_endpoint,
    find_channel_by_phone_number_id,
    find_channel_by_qr_session,
    find_channel_by_widget_key,
    get_channel,
    get_channel_secrets,
    get_chatbot,
    get_chatbot_by_widget_key,
    get_chatbot_secrets,
    get_webhook_secret,
    sign_visitor_id,
    verify_visitor_signature,
)
from chat_domain.settings import normalise_database_url
from tests.domain.helpers import World


async def _raw_text(session: AsyncSession, sql: str, **params: object) -> str:
    rows = (await session.execute(text(sql), params)).all()
    return repr(rows)


async def test_secrets_are_encrypted_at_rest(
    session_factory: async_sessionmaker[AsyncSession], world: World, box: SecretBox
) -> None:
    suffix = world.channel.config.phone_number_id.removeprefix("pn-")  # type: ignore[union-attr]
    plaintexts = [
        f"sk-provider-{suffix}",
        f"identity-{suffix}",
        f"EAAG-token-{suffix}",
        f"app-secret-{suffix}",
        f"verify-{suffix}",
    ]
    async with session_factory() as session, session.begin():
        hook = await create_webhook_endpoint(
            session,
            box,
            tenant_id=world.tenant.id,
            url="https://example.invalid/hook",
            event_types=["message.received"],
        )
    async with session_factory() as session:
        raw = await _raw_text(session, "SELECT * FROM chatbots WHERE name = 'Helper'")
        raw += await _raw_text(session, "SELECT * FROM channels")
        raw += await _raw_text(session, "SELECT * FROM webhook_endpoints")
        for secret in [*plaintexts, hook.secret]:
            assert secret not in raw
        # ...and they decrypt for the workers that need them.
        bot_secrets = await get_chatbot_secrets(session, box, world.chatbot.id)
        assert bot_secrets.provider_api_key == plaintexts[0]
        assert bot_secrets.identity_secret == plaintexts[1]
        channel_secrets = await get_channel_secrets(session, box, world.channel.id)
        assert channel_secrets == WhatsAppCloudSecrets(
            access_token=plaintexts[2], app_secret=plaintexts[3], verify_token=plaintexts[4]
        )
        assert await get_webhook_secret(session, box, hook.endpoint.id) == hook.secret
        # Views and reprs never carry them.
        views = [
            await get_chatbot(session, world.chatbot.id),
            await get_channel(session, world.channel.id),
            await find_channel_by_phone_number_id(session, f"pn-{suffix}"),
            hook.endpoint,
            bot_secrets,
            channel_secrets,
            hook,
        ]
        shown = repr(views) + str(views)
        for secret in [*plaintexts, hook.secret]:
            assert secret not in shown
        chatbot = views[0]
        assert chatbot is not None
        assert chatbot.has_provider_api_key  # type: ignore[union-attr]
        # A different key cannot read them.
        with pytest.raises(SecretDecryptionError):
            await get_chatbot_secrets(
                session, SecretBox(SecretBox.generate_key()), world.chatbot.id
            )


async def test_channel_lookups(
    session_factory: async_sessionmaker[AsyncSession], world: World, box: SecretBox
) -> None:
    session_name = f"t-{world.tenant.id.hex[:12]}"
    async with session_factory() as session, session.begin():
        widget = await create_channel(
            session, box, chatbot_id=world.chatbot.id, config=WidgetConfig()
        )
        qr = await create_channel(
            session,
            box,
            chatbot_id=world.chatbot.id,
            config=WhatsAppQrConfig(
                service="waha", base_url="http://waha:3000", session=session_name
            ),
            secrets=WhatsAppQrSecrets(api_key="waha-key"),
        )
        # another tenant's WAHA has a session of the same name (WAHA Core's is always
        # "default"): a session is unique per service, not across the platform
        twin = await create_channel(
            session,
            box,
            chatbot_id=world.chatbot.id,
            config=WhatsAppQrConfig(
                service="waha", base_url="https://waha.other.example/", session=session_name
            ),
        )
    async with session_factory() as session:
        assert await find_channel_by_widget_key(session, world.chatbot.widget_public_key) == widget
        assert await find_channel_by_widget_key(session, "wpk_unknown") is None
        assert await find_channel_by_qr_session(session, "http://waha:3000/", session_name) == qr
        assert (
            await find_channel_by_qr_session(session, "https://WAHA.other.example", session_name)
            == twin
        )
        assert await find_channel_by_qr_session(session, "http://waha:3000", "nope") is None
        assert await find_channel_by_phone_number_id(session, "nope") is None
        assert (await get_chatbot_by_widget_key(session, world.chatbot.widget_public_key)) == (
            await get_chatbot(session, world.chatbot.id)
        )
        assert await get_channel_secrets(session, box, widget.id) is None
        qr_secrets = await get_channel_secrets(session, box, qr.id)
        assert isinstance(qr_secrets, WhatsAppQrSecrets)
        assert qr_secrets.api_key == "waha-key"
        assert "waha-key" not in repr(qr_secrets)
        assert isinstance(qr.config, WhatsAppQrConfig)
        assert qr.config.service == "waha"


async def test_secrets_must_fit_the_channel(
    session_factory: async_sessionmaker[AsyncSession], world: World, box: SecretBox
) -> None:
    async with session_factory() as session:
        with pytest.raises(ValueError, match="do not fit"):
            await create_channel(
                session,
                box,
                chatbot_id=world.chatbot.id,
                config=WidgetConfig(),
                secrets=WhatsAppQrSecrets(api_key="x"),
            )


def test_visitor_identity_hmac() -> None:
    signature = sign_visitor_id("s3cret", "visitor-42")
    assert verify_visitor_signature("s3cret", "visitor-42", signature)
    assert verify_visitor_signature("s3cret", "visitor-42", signature.upper())
    assert not verify_visitor_signature("s3cret", "visitor-43", signature)
    assert not verify_visitor_signature("other", "visitor-42", signature)


def test_settings_from_env() -> None:
    default = Settings.from_env({})
    assert default.database_url == "sqlite+aiosqlite:///.data/platform.db"
    pg = Settings.from_env(
        {"DATABASE_URL": "postgresql://u:p@db/x", "PLATFORM_SECRET_KEY": "k" * 44}
    )
    assert pg.database_url == "postgresql+asyncpg://u:p@db/x"
    assert "k" * 44 not in repr(pg)
    assert normalise_database_url("postgres://h/d") == "postgresql+asyncpg://h/d"
    assert normalise_database_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert normalise_database_url("postgresql+asyncpg://h/d") == "postgresql+asyncpg://h/d"
    with pytest.raises(ConfigError):
        Settings.from_env({"SQLITE_BUSY_TIMEOUT_MS": "soon"})


def test_development_key_is_generated_once_with_mode_0600(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    with caplog.at_level(logging.WARNING, logger="chat_domain.settings"):
        key = settings.resolve_secret_key()
    key_file = tmp_path / ".data" / "secret.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert Fernet(key.encode())  # a valid key
    assert key not in caplog.text
    assert "PLATFORM_SECRET_KEY" in caplog.text
    assert settings.resolve_secret_key() == key  # reused, not regenerated


def test_configured_key_wins_and_postgres_requires_one() -> None:
    key = SecretBox.generate_key()
    assert Settings(secret_key=key).resolve_secret_key() == key
    with pytest.raises(ConfigError, match="PLATFORM_SECRET_KEY"):
        Settings(database_url="postgresql+asyncpg://h/d").resolve_secret_key()
    with pytest.raises(ConfigError):
        SecretBox("not-a-key")
    assert "not-a-key" not in repr(SecretBox(key))


def test_key_rotation() -> None:
    old, new = SecretBox.generate_key(), SecretBox.generate_key()
    token = SecretBox(old).encrypt("hello")
    assert SecretBox(f"{new},{old}").decrypt(token) == "hello"
    with pytest.raises(SecretDecryptionError):
        SecretBox(new).decrypt(token)


async def test_channels_are_listed_and_updated_with_new_secrets(
    session_factory: async_sessionmaker[AsyncSession],
    world: World,
    other_world: World,
    box: SecretBox,
) -> None:
    from chat_domain import (
        WhatsAppCloudConfig,
        WhatsAppCloudSecrets,
        list_channels,
        update_channel,
    )

    number = f"pn-{world.tenant.id.hex[:10]}"
    async with session_factory() as session, session.begin():
        cloud = await create_channel(
            session,
            box,
            chatbot_id=world.chatbot.id,
            config=WhatsAppCloudConfig(phone_number_id=number),
            secrets=WhatsAppCloudSecrets(access_token="old", app_secret="a", verify_token="v"),
        )
    async with session_factory() as session:
        mine = await list_channels(session, tenant_id=world.tenant.id)
        assert [c.id for c in mine] == [world.channel.id, cloud.id]
        clouds = await list_channels(session, tenant_id=world.tenant.id, kind="whatsapp_cloud")
        assert [c.id for c in clouds] == [c.id for c in mine if c.kind == "whatsapp_cloud"]
        assert cloud.id in {c.id for c in clouds}
        assert cloud.id not in {
            c.id for c in await list_channels(session, tenant_id=other_world.tenant.id)
        }
    moved = f"{number}-2"
    async with session_factory() as session, session.begin():
        updated = await update_channel(
            session,
            box,
            cloud.id,
            config=WhatsAppCloudConfig(phone_number_id=moved),
            secrets=WhatsAppCloudSecrets(access_token="new", app_secret="a", verify_token="v"),
        )
    assert (
        isinstance(updated.config, WhatsAppCloudConfig) and updated.config.phone_number_id == moved
    )
    async with session_factory() as session:
        assert (await find_channel_by_phone_number_id(session, moved)) == updated
        assert await find_channel_by_phone_number_id(session, number) is None
        stored = await get_channel_secrets(session, box, cloud.id)
        assert isinstance(stored, WhatsAppCloudSecrets) and stored.access_token == "new"
    async with session_factory() as session:
        with pytest.raises(ValueError, match="cannot become"):
            await update_channel(session, box, cloud.id, config=WidgetConfig())
