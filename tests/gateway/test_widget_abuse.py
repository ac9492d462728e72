"""Hostile input and abuse at the widget API: ids that must fit the database and the queue,
external ids that must not collide, input that used to turn into a 500 (with the user's text in
the logged traceback), per-IP limits behind a TLS proxy, per-chatbot and per-tenant ceilings,
read limits, and which visitor ids an unsigned chatbot accepts.

Each test builds its own tenant (fresh UUIDs) in SQLite and, where the database matters, in
PostgreSQL; a private Valkey per module keeps these limits away from the other modules'
buckets. Rate windows are an hour long so that no test straddles a window boundary."""

from __future__ import annotations

import ipaddress
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import Uuid, bindparam, text
from sqlalchemy.exc import DBAPIError

from chat_domain import (
    ConfigError,
    SecretBox,
    WidgetConfig,
    create_channel,
    create_chatbot,
    create_engine,
    create_plan,
    create_session_factory,
    create_tenant,
    sign_visitor_id,
)
from chat_pipeline import PipelineSettings
from devstack import RedisServer
from gateway.app import create_app
from gateway.errors import error_middleware
from gateway.net import client_ip_from
from queue_core import connect
from tests.domain.conftest import postgres_server, postgres_url

from .conftest import settings_for

__all__ = ["postgres_server", "postgres_url"]

Client = TestClient[Any, Any]
HOUR = 3_600_000
SECRET = "abuse-identity-secret"
MARKER = "private-words-of-the-visitor"


def visitor() -> str:
    """What the real widget generates (widget.js `uuid()`)."""
    return str(uuid.uuid4())


@dataclass(frozen=True)
class World:
    db: str
    tenant_id: uuid.UUID
    plain: str
    other: str  # a second unsigned chatbot of the same tenant
    signed: str


@pytest.fixture(scope="module")
def abuse_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("gateway_db"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def sqlite_db(gateway_db: str) -> str:
    return gateway_db


async def _world(db: str, secret_key: str) -> World:
    engine = create_engine(db)
    box = SecretBox(secret_key)
    try:
        async with create_session_factory(engine)() as session, session.begin():
            plan = await create_plan(session, name=f"P-{uuid.uuid4()}", monthly_price_cents=1900)
            tenant = await create_tenant(session, name="T", plan_id=plan.id)
            keys = []
            for extra in ({}, {}, {"identity_secret": SECRET}):
                bot = await create_chatbot(
                    session, box, tenant_id=tenant.id, name="B", model="m", **extra
                )  # type: ignore[arg-type]
                await create_channel(session, box, chatbot_id=bot.id, config=WidgetConfig())
                keys.append(bot.widget_public_key)
    finally:
        await engine.dispose()
    return World(db, tenant.id, *keys)


@pytest.fixture
async def world(db: str, secret_key: str) -> World:
    return await _world(db, secret_key)


@pytest.fixture
async def sqlite_world(sqlite_db: str, secret_key: str) -> World:
    return await _world(sqlite_db, secret_key)


@asynccontextmanager
async def gateway(
    world: World, redis: RedisServer, secret_key: str, **overrides: Any
) -> AsyncIterator[Client]:
    # Limits not under test are out of the way (the module's tests share one peer address).
    limits: dict[str, Any] = {
        "visitor_rate": (1000, HOUR),
        "ip_rate": (1000, HOUR),
        "chatbot_rate": (1000, HOUR),
        "tenant_rate": (1000, HOUR),
        "visitor_read_rate": (1000, HOUR),
        "ip_read_rate": (1000, HOUR),
    }
    limits.update(overrides)
    # every test starts with empty buckets (this module's own server: nobody else's keys)
    flush = connect(redis.url)
    try:
        await flush.flushall()
    finally:
        await flush.aclose()
    settings = settings_for(redis.url, world.db, secret_key, **limits)
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def _count(db: str, statement: Any, **params: Any) -> int:
    engine = create_engine(db)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(statement, params)).scalar_one())
    finally:
        await engine.dispose()


async def _messages_of(world: World) -> int:
    statement = text(
        "SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id"
        " JOIN chatbots b ON b.id = c.chatbot_id WHERE b.tenant_id = :t"
    ).bindparams(bindparam("t", type_=Uuid))
    return await _count(world.db, statement, t=world.tenant_id)


def _post(visitor_id: str, client_id: str | None = None, **extra: Any) -> dict[str, Any]:
    body = {"visitor_id": visitor_id, "text": "hello", "client_message_id": client_id or visitor()}
    body.update(extra)
    return body


async def _error(response: Any) -> tuple[int, str, str | None]:
    error = (await response.json())["error"]
    return response.status, error["code"], error["field"]


# -- 1. ids that fit -------------------------------------------------------------------------


async def test_the_longest_accepted_ids_fit_the_database_and_the_queue(
    world: World, abuse_redis: RedisServer, secret_key: str
) -> None:
    """visitor 128 + ':' + client id 64 = 193 <= messages.external_id (200); the incoming job's
    group <tenant>:<channel>:<visitor> = 74 + 128 = 202 <= queue-core's 256."""
    long_visitor = "v" * 128
    body = _post(long_visitor, "c" * 64, signature=sign_visitor_id(SECRET, long_visitor))
    async with gateway(world, abuse_redis, secret_key) as client:
        r = await client.post(f"/v1/widget/{world.signed}/messages", json=body)
        assert r.status == 202, await r.text()
    statement = text("SELECT count(*) FROM messages WHERE external_id = :e")
    stored = await _count(world.db, statement, e=f"{'v' * 128}:{'c' * 64}")
    assert stored == 1


@pytest.mark.parametrize(
    ("visitor_len", "client_len", "field"),
    [
        pytest.param(190, 36, "visitor_id", id="visitor-190-overflows-the-job-group"),
        pytest.param(129, 36, "visitor_id", id="visitor-129"),
        pytest.param(36, 65, "client_message_id", id="client-id-65"),
        pytest.param(200, 200, "visitor_id", id="both-200-overflow-external-id"),
    ],
)
async def test_too_long_ids_are_refused_before_anything_is_stored(
    world: World,
    abuse_redis: RedisServer,
    secret_key: str,
    visitor_len: int,
    client_len: int,
    field: str,
) -> None:
    long_visitor = "v" * visitor_len
    body = _post(long_visitor, "c" * client_len, signature=sign_visitor_id(SECRET, long_visitor))
    async with gateway(world, abuse_redis, secret_key) as client:
        r = await client.post(f"/v1/widget/{world.signed}/messages", json=body)
        assert await _error(r) == (400, "invalid", field)
        q = f"/v1/widget/{world.signed}/messages?visitor_id={long_visitor}"
        r = await client.get(q, headers={"X-Visitor-Signature": body["signature"]})
        if visitor_len > 128:
            assert await _error(r) == (400, "invalid", "visitor_id")
    assert await _messages_of(world) == 0


# -- 2. external ids do not collide ------------------------------------------------------------


async def test_external_ids_of_two_visitors_cannot_collide(
    sqlite_world: World, abuse_redis: RedisServer, secret_key: str
) -> None:
    """`X:b` + `c` and `X` + `b:c` used to be the same external id `X:b:c`: the second visitor
    got the first one's message ids and their text was dropped."""
    world = sqlite_world
    url = f"/v1/widget/{world.signed}/messages"
    async with gateway(world, abuse_redis, secret_key) as client:
        first = await client.post(
            url, json=_post("X:b", "c", signature=sign_visitor_id(SECRET, "X:b"), text="one")
        )
        assert first.status == 202
        second = await client.post(
            url, json=_post("X", "b:c", signature=sign_visitor_id(SECRET, "X"), text="two")
        )
        assert await _error(second) == (400, "invalid", "client_message_id")
        # a visitor id with ':' reads back its own client message id
        page = await client.get(
            f"{url}?visitor_id=X:b", headers={"X-Visitor-Signature": sign_visitor_id(SECRET, "X:b")}
        )
        [message] = (await page.json())["messages"]
        assert (message["text"], message["client_message_id"]) == ("one", "c")
    assert await _messages_of(world) == 1


# -- 3. bad input is a 4xx, and no text reaches an error log ------------------------------------


def _assert_nothing_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    # a 4xx is not an error of ours; before, each of these was a 500 whose logged traceback
    # quoted the request (the database error's parameters)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, caplog.text


async def test_hostile_input_is_refused_with_the_field_named(
    world: World, abuse_redis: RedisServer, secret_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    v = visitor()
    messages = f"/v1/widget/{world.plain}/messages"
    async with gateway(world, abuse_redis, secret_key) as client:
        r = await client.post(messages, json=_post(v, text=f"{MARKER}\x00 and more"))
        assert await _error(r) == (400, "invalid", "text")
        r = await client.post(f"/v1/widget/wpk_{MARKER}%00/messages", json=_post(v))
        assert await _error(r) == (404, "unknown_key", "public_key")
        r = await client.get(f"/v1/widget/wpk_{MARKER}%00/messages?visitor_id={v}")
        assert await _error(r) == (404, "unknown_key", "public_key")

        signed = f"/v1/widget/{world.signed}/messages"
        r = await client.post(signed, json=_post("s1", signature=f"é{MARKER}"))
        assert await _error(r) == (403, "invalid_signature", "signature")
        r = await client.get(f"{signed}?visitor_id=s1&signature=%C3%A9")
        assert await _error(r) == (403, "invalid_signature", "signature")
        r = await client.get(f"{signed}?visitor_id=s1", headers={"X-Visitor-Signature": "é"})
        assert await _error(r) == (403, "invalid_signature", "signature")

        # `after` beyond the BIGINT seq column, or not plain ASCII digits (a conversation exists,
        # so the query runs)
        assert (await client.post(messages, json=_post(v, text=MARKER))).status == 202
        for after in (str(2**63), str(10**30), "\uff11", "1_0", " 1"):
            r = await client.get(messages, params={"visitor_id": v, "after": after})
            assert await _error(r) == (400, "invalid", "after"), after
        r = await client.get(messages, params={"visitor_id": v, "after": str(2**63 - 1)})
        assert r.status == 200 and (await r.json())["messages"] == []
    _assert_nothing_logged_as_an_error(caplog)
    assert await _messages_of(world) == 1


async def test_the_engine_hides_bound_parameters_in_errors(db: str) -> None:
    """A database error's message carries the statement's parameters unless the engine hides
    them, and the gateway logs unexpected errors: that put visitors' text in the log."""
    engine = create_engine(db)
    try:
        with pytest.raises(DBAPIError) as info:
            async with engine.connect() as conn:
                await conn.execute(text("INSERT INTO no_such_table VALUES (:v)"), {"v": MARKER})
    finally:
        await engine.dispose()
    assert MARKER not in str(info.value)


async def test_unexpected_errors_are_logged_without_their_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception's message may quote the user's input (pydantic and the database drivers
    do): at error level the gateway logs where it happened, never what the exception says."""

    async def broken(request: web.Request) -> web.Response:
        try:
            raise KeyError(MARKER)
        except KeyError as exc:
            raise ValueError(f"bad value {MARKER}") from exc

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/broken", broken)
    caplog.set_level(logging.DEBUG)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/broken")
        assert await _error(r) == (500, "internal", None)
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert errors
    logged = "\n".join(
        rec.getMessage()
        + (logging.Formatter().formatException(rec.exc_info) if rec.exc_info else "")
        for rec in errors
    )
    assert "ValueError" in logged and "KeyError" in logged and "broken" in logged, logged
    assert MARKER not in logged, logged


# -- 4. abuse limits -------------------------------------------------------------------------


def test_client_ip_is_the_right_most_untrusted_hop() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    # no trusted proxies: the header is ignored, whatever it says
    assert client_ip_from("198.51.100.1", ["203.0.113.9"], ()) == "198.51.100.1"
    # an untrusted peer cannot choose its address by sending the header
    assert client_ip_from("198.51.100.1", ["203.0.113.9"], trusted) == "198.51.100.1"
    # behind our proxy: the address the proxy saw
    assert client_ip_from("10.0.0.2", ["203.0.113.9"], trusted) == "203.0.113.9"
    # a client's own X-Forwarded-For entries are left of the ones our proxies add
    assert client_ip_from("10.0.0.2", ["6.6.6.6, 203.0.113.9, 10.1.1.1"], trusted) == (
        "203.0.113.9"
    )
    assert client_ip_from("10.0.0.2", ["6.6.6.6", "203.0.113.9"], trusted) == "203.0.113.9"
    # garbage a client sent is never reached past an untrusted hop; a garbage hop is untrusted
    assert client_ip_from("10.0.0.2", ["not-an-ip, 203.0.113.9"], trusted) == "203.0.113.9"
    assert client_ip_from("10.0.0.2", ["203.0.113.9, junk"], trusted) == "junk"
    # every hop is ours: the left-most is the closest we know of the client
    assert client_ip_from("10.0.0.2", ["10.3.3.3, 10.2.2.2"], trusted) == "10.3.3.3"
    # no header from a trusted peer: the peer itself
    assert client_ip_from("10.0.0.2", [], trusted) == "10.0.0.2"
    # IPv4-mapped IPv6 peers are their IPv4 address; IPv6 is normalised
    assert client_ip_from("::ffff:10.0.0.2", ["203.0.113.9"], trusted) == "203.0.113.9"
    assert client_ip_from("fd00::1", ["2001:DB8::0001"], trusted) == "2001:db8::1"
    assert client_ip_from(None, [], trusted) == "unknown"


def test_trusted_proxies_setting() -> None:
    s = PipelineSettings.from_env({"GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7 ,fd00::/8"})
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]
    assert PipelineSettings.from_env({}).trusted_proxies == ()
    with pytest.raises(ConfigError, match="GATEWAY_TRUSTED_PROXIES"):
        PipelineSettings.from_env({"GATEWAY_TRUSTED_PROXIES": "10.0.0.0/33"})
    env = {
        "WIDGET_CHATBOT_RATE": "7",
        "WIDGET_TENANT_RATE": "8",
        "WIDGET_VISITOR_READ_RATE": "9",
        "WIDGET_IP_READ_RATE": "10",
    }
    s = PipelineSettings.from_env(env)
    assert (s.chatbot_rate, s.tenant_rate) == ((7, 60_000), (8, 60_000))
    assert (s.visitor_read_rate, s.ip_read_rate) == ((9, 60_000), (10, 60_000))


async def test_per_ip_limits_behind_a_trusted_proxy(
    sqlite_world: World, abuse_redis: RedisServer, secret_key: str
) -> None:
    """Behind the TLS proxy every request comes from the proxy's address: the limit must key
    on the client the proxy saw, or all visitors share one bucket."""
    world = sqlite_world
    url = f"/v1/widget/{world.plain}/messages"
    a, b = "203.0.113.10", "203.0.113.11"
    async with gateway(
        world,
        abuse_redis,
        secret_key,
        ip_rate=(2, HOUR),
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
    ) as client:

        async def post(xff: str) -> int:
            r = await client.post(url, json=_post(visitor()), headers={"X-Forwarded-For": xff})
            return r.status

        assert [await post(a), await post(a)] == [202, 202]
        r = await client.post(url, json=_post(visitor()), headers={"X-Forwarded-For": a})
        assert await _error(r) == (429, "rate_limited", "ip")
        # a client prepending addresses to the header is still itself
        assert await post(f"198.51.100.1, {a}") == 429
        assert [await post(b), await post(b)] == [202, 202]


async def test_without_trusted_proxies_the_header_cannot_dodge_the_ip_limit(
    sqlite_world: World, abuse_redis: RedisServer, secret_key: str
) -> None:
    world = sqlite_world
    url = f"/v1/widget/{world.plain}/messages"
    async with gateway(world, abuse_redis, secret_key, ip_read_rate=(2, HOUR)) as client:
        codes = []
        for i in range(3):
            r = await client.get(
                url,
                params={"visitor_id": visitor()},
                headers={"X-Forwarded-For": f"203.0.113.{20 + i}"},
            )
            codes.append(r.status)
        assert codes == [200, 200, 429]


async def test_chatbot_and_tenant_ceilings_bound_fresh_visitors(
    sqlite_world: World, abuse_redis: RedisServer, secret_key: str
) -> None:
    """Fresh visitor ids from fresh addresses pass every per-visitor and per-IP limit; the
    chatbot's and the tenant's ceilings still bound how fast they spend the tenant's quota.
    A request refused by any limit counts against none: a visitor hammering beyond its own
    limit does not use up its chatbot's budget."""
    world = sqlite_world
    n = 0

    async def post(client: Client, key: str, visitor_id: str | None = None) -> Any:
        nonlocal n
        n += 1
        return await client.post(
            f"/v1/widget/{key}/messages",
            json=_post(visitor_id or visitor()),
            headers={"X-Forwarded-For": f"198.51.100.{n}"},
        )

    async with gateway(
        world,
        abuse_redis,
        secret_key,
        visitor_rate=(2, HOUR),
        chatbot_rate=(5, HOUR),
        tenant_rate=(7, HOUR),
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
    ) as client:
        hammer = visitor()
        codes = [(await post(client, world.plain, hammer)).status for _ in range(10)]
        assert codes == [202, 202] + [429] * 8
        codes = [(await post(client, world.plain)).status for _ in range(3)]
        assert codes == [202, 202, 202]
        r = await post(client, world.plain)
        assert await _error(r) == (429, "rate_limited", "public_key")
        # the tenant's other chatbot has its own ceiling, the tenant's is shared
        assert [(await post(client, world.other)).status for _ in range(2)] == [202, 202]
        r = await post(client, world.other)
        assert await _error(r) == (429, "rate_limited", "public_key")
        assert r.headers.get("Retry-After") is not None
    assert await _messages_of(world) == 7


async def test_reads_are_limited_per_visitor_and_per_ip(
    sqlite_world: World, abuse_redis: RedisServer, secret_key: str
) -> None:
    world = sqlite_world
    url = f"/v1/widget/{world.plain}/messages"
    async with gateway(
        world,
        abuse_redis,
        secret_key,
        visitor_read_rate=(3, HOUR),
        ip_read_rate=(5, HOUR),
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
    ) as client:

        async def get(visitor_id: str, ip: str) -> Any:
            return await client.get(
                url, params={"visitor_id": visitor_id}, headers={"X-Forwarded-For": ip}
            )

        v = visitor()
        assert [(await get(v, "192.0.2.1")).status for _ in range(3)] == [200] * 3
        assert await _error(await get(v, "192.0.2.2")) == (429, "rate_limited", "visitor_id")
        # reads do not use up the visitor's messages
        assert (await client.post(url, json=_post(v))).status == 202
        assert [(await get(visitor(), "192.0.2.1")).status for _ in range(2)] == [200, 200]
        assert await _error(await get(visitor(), "192.0.2.1")) == (429, "rate_limited", "ip")


async def test_unsigned_chatbots_take_only_the_widgets_random_visitor_ids(
    sqlite_world: World, abuse_redis: RedisServer, secret_key: str
) -> None:
    """Without an identity secret the visitor id is the only credential for a conversation:
    an id the host page made up ("customer-42") is guessable. With a secret, it is signed."""
    world = sqlite_world
    plain = f"/v1/widget/{world.plain}/messages"
    refused = [
        "customer-42",
        "user@example.com",
        str(uuid.uuid5(uuid.NAMESPACE_URL, "customer-42")),  # derived from a guessable name
        str(uuid.uuid1()),  # time based
        uuid.uuid4().hex,  # not the widget's format
    ]
    async with gateway(world, abuse_redis, secret_key) as client:
        for v in refused:
            r = await client.post(plain, json=_post(v))
            assert await _error(r) == (400, "invalid", "visitor_id"), v
            r = await client.get(plain, params={"visitor_id": v})
            assert await _error(r) == (400, "invalid", "visitor_id"), v
        for v in (visitor(), visitor().upper()):
            assert (await client.post(plain, json=_post(v))).status == 202, v
            assert (await client.get(plain, params={"visitor_id": v})).status == 200, v
        sig = sign_visitor_id(SECRET, "customer-42")
        r = await client.post(
            f"/v1/widget/{world.signed}/messages", json=_post("customer-42", signature=sig)
        )
        assert r.status == 202
    assert await _messages_of(world) == 3


async def test_the_signature_may_come_in_a_header(
    sqlite_world: World, abuse_redis: RedisServer, secret_key: str
) -> None:
    """A signature in the URL ends up in proxies' access logs; the header does not."""
    world = sqlite_world
    url = f"/v1/widget/{world.signed}/messages"
    sig = sign_visitor_id(SECRET, "customer-7")
    header = {"X-Visitor-Signature": sig}
    async with gateway(world, abuse_redis, secret_key) as client:
        r = await client.options(
            url,
            headers={
                "Origin": "https://shop.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "x-visitor-signature",
            },
        )
        allowed = r.headers["Access-Control-Allow-Headers"].lower()
        assert r.status == 204 and "x-visitor-signature" in allowed
        r = await client.post(url, json=_post("customer-7"), headers=header)
        assert r.status == 202, await r.text()
        r = await client.get(url, params={"visitor_id": "customer-7"}, headers=header)
        assert r.status == 200 and len((await r.json())["messages"]) == 1
        # the old places still work
        assert (await client.post(url, json=_post("customer-7", signature=sig))).status == 202
        r = await client.get(url, params={"visitor_id": "customer-7", "signature": sig})
        assert r.status == 200
        # a wrong header is refused even with a right body
        bad = {"X-Visitor-Signature": sign_visitor_id("other", "customer-7")}
        r = await client.post(url, json=_post("customer-7", signature=sig), headers=bad)
        assert await _error(r) == (403, "invalid_signature", "signature")
