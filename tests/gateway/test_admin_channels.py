"""`gateway-admin channels`: connect WhatsApp channels from the command line, as an operator
would (a real process, a migrated SQLite database, Redis for the sending state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from devstack import RedisServer

from .conftest import Bots


def _admin(
    db: str, redis_url: str, secret_key: str, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": db,
        "REDIS_URL": redis_url,
        "PLATFORM_SECRET_KEY": secret_key,
        "GATEWAY_PUBLIC_URL": "https://chat.example",
    }
    return subprocess.run(
        [sys.executable, "-m", "gateway.admin", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def chatbot_id(gateway_db: str, bots: Bots) -> str:
    import asyncio

    from chat_domain import create_engine, create_session_factory, get_chatbot_by_widget_key

    async def find() -> str:
        engine = create_engine(gateway_db)
        try:
            async with create_session_factory(engine)() as s:
                bot = await get_chatbot_by_widget_key(s, bots.plain)
                assert bot is not None
                return str(bot.id)
        finally:
            await engine.dispose()

    return asyncio.run(find())


def test_a_cloud_channel_is_added_listed_updated_and_disabled(
    gateway_db: str, gateway_redis: RedisServer, secret_key: str, chatbot_id: str
) -> None:
    run = lambda *a: _admin(gateway_db, gateway_redis.url, secret_key, *a)  # noqa: E731
    number = f"pn-{uuid.uuid4().hex[:10]}"
    added = _json(
        run("channels", "add-cloud", "--chatbot", chatbot_id, "--phone-number-id", number,
            "--access-token", "EAAG-secret-token", "--app-secret", "app-secret-1", "--json")
    )  # fmt: skip
    assert added["callback_url"] == f"https://chat.example/v1/channels/{added['id']}/whatsapp-cloud"
    assert len(added["verify_token"]) >= 20, "a verify token is generated and shown once"
    listed = run("channels", "list", "--chatbot", chatbot_id, "--json")
    rows = {r["id"]: r for r in _json(listed)}
    assert rows[added["id"]]["sending"] == "ok"
    for secret in ("EAAG-secret-token", "app-secret-1", added["verify_token"]):
        assert secret not in listed.stdout, "secrets are never printed again"
    updated = _json(run("channels", "update", added["id"], "--access-token", "new-token", "--json"))
    assert updated["sending"] == "ok" and "new-token" not in json.dumps(updated)
    assert _json(run("channels", "disable", added["id"], "--json"))["active"] is False
    assert _json(run("channels", "enable", added["id"], "--json"))["active"] is True
    text = run("channels", "list", "--chatbot", chatbot_id)
    assert text.returncode == 0 and added["callback_url"] in text.stdout


def test_a_qr_channel_gets_a_webhook_secret(
    gateway_db: str, gateway_redis: RedisServer, secret_key: str, chatbot_id: str
) -> None:
    added = _json(
        _admin(
            gateway_db, gateway_redis.url, secret_key, "channels", "add-qr", "--chatbot",
            chatbot_id, "--service", "waha", "--base-url", "http://waha:3000/",
            "--session", f"s-{uuid.uuid4().hex[:8]}", "--api-key", "waha-key", "--json",
        )
    )  # fmt: skip
    assert added["kind"] == "whatsapp_qr" and len(added["webhook_secret"]) >= 20
    assert added["config"]["base_url"] == "http://waha:3000"
    assert added["callback_url"].endswith(f"/v1/channels/{added['id']}/whatsapp-qr")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("channels", "update", "not-an-id"), "must be an id"),
        (("channels", "disable", str(uuid.UUID(int=7))), "does not exist"),
        (
            (
                "channels",
                "add-cloud",
                "--chatbot",
                str(uuid.UUID(int=7)),
                "--phone-number-id",
                "x",
                "--access-token",
                "t",
                "--app-secret",
                "s",
            ),
            "does not exist",
        ),
    ],
)
def test_errors_are_one_line_and_an_exit_status(
    gateway_db: str,
    gateway_redis: RedisServer,
    secret_key: str,
    args: tuple[str, ...],
    says: str,
) -> None:
    done = _admin(gateway_db, gateway_redis.url, secret_key, *args)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_number_routed_twice_is_refused_in_one_line(
    gateway_db: str, gateway_redis: RedisServer, secret_key: str, chatbot_id: str
) -> None:
    number = f"pn-{uuid.uuid4().hex[:10]}"
    args = ("channels", "add-cloud", "--chatbot", chatbot_id, "--phone-number-id", number,
            "--access-token", "t", "--app-secret", "s")  # fmt: skip
    assert _admin(gateway_db, gateway_redis.url, secret_key, *args).returncode == 0
    again = _admin(gateway_db, gateway_redis.url, secret_key, *args)
    assert again.returncode == 1 and "already routed" in again.stderr
    assert "Traceback" not in again.stderr


async def test_the_pairing_qr_is_fetched_from_the_qr_service(
    gateway_db: str, gateway_redis: RedisServer, secret_key: str, chatbot_id: str, tmp_path: Any
) -> None:
    import asyncio

    from tests.fakes.whatsapp import FakeEvolutionServer, FakeWahaServer

    async def run(*a: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(_admin, gateway_db, gateway_redis.url, secret_key, *a)

    session = f"s-{uuid.uuid4().hex[:8]}"
    async with FakeWahaServer(api_key="waha-key", sessions={session: "SCAN_QR_CODE"}) as waha:
        added = _json(
            await run("channels", "add-qr", "--chatbot", chatbot_id, "--service", "waha",
                      "--base-url", waha.url, "--session", session, "--api-key", "waha-key",
                      "--json")
        )  # fmt: skip
        png = tmp_path / "qr.png"
        shown = _json(await run("channels", "qr", added["id"], "--out", str(png), "--json"))
        assert shown["state"] == "scan_qr" and shown["raw"] == "SCAN_QR_CODE"
        assert png.read_bytes().startswith(b"\x89PNG"), "the service's QR image, as it sent it"
        text = await run("channels", "qr", added["id"])
        assert text.returncode == 0 and "data:image/png;base64," in text.stdout
        waha.set_session_status(session, "WORKING", notify=False)
        paired = _json(await run("channels", "qr", added["id"], "--json"))
        assert paired["state"] == "working" and "qr_data_url" not in paired
        assert "waha-key" not in json.dumps(paired)
        # the API key was refused: said plainly, the key not printed
        _json(await run("channels", "update", added["id"], "--api-key", "nope", "--json"))
        refused = await run("channels", "qr", added["id"])
        assert refused.returncode == 1 and "waha" in refused.stderr and "nope" not in refused.stderr
    instance = f"i-{uuid.uuid4().hex[:8]}"
    async with FakeEvolutionServer(api_key="evo-key", instances={instance: "close"}) as evo:
        added = _json(
            await run("channels", "add-qr", "--chatbot", chatbot_id, "--service", "evolution",
                      "--base-url", evo.url, "--session", instance, "--api-key", "evo-key",
                      "--json")
        )  # fmt: skip
        shown = _json(await run("channels", "qr", added["id"], "--json"))
        assert shown["state"] in ("stopped", "failed", "starting")
        assert shown["qr_data_url"].startswith("data:image/png;base64,")
    gone = await run("channels", "qr", added["id"])  # the service is down
    assert gone.returncode == 1 and "evolution" in gone.stderr


def test_bootstrap_twice_on_one_plan_and_bad_input_in_one_line(
    gateway_db: str, gateway_redis: RedisServer, secret_key: str, tmp_path: Any
) -> None:
    """A second tenant on an existing plan is set up (it crashed with a 100-line IntegrityError);
    what cannot be done is one line on stderr and exit status 1, never a traceback."""
    run = lambda *a: _admin(gateway_db, gateway_redis.url, secret_key, *a)  # noqa: E731
    plan = f"Team-{uuid.uuid4().hex[:6]}"
    first = _json(run("bootstrap", "--tenant", "A", "--bot", "A", "--plan-name", plan, "--json"))
    second = _json(run("bootstrap", "--tenant", "B", "--bot", "B", "--plan-name", plan, "--json"))
    assert first["plan_id"] == second["plan_id"] and first["tenant_id"] != second["tenant_id"]
    assert second["admin_api_key"].startswith("cbk_")
    for args in (
        ("bootstrap", "--tenant", "C", "--bot", "C", "--kb", str(tmp_path / "missing.md")),
        ("channels", "update", "not-an-id"),
        ("channels", "enable", str(uuid.uuid4())),
    ):
        done = run(*args)
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("gateway-admin: ")
