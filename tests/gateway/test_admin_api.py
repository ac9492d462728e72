"""The tenant admin API (in-process gateway, real Redis and SQLite). Isolation, roles and bad
input are checked over the route table itself, so a route added later is covered without a new
test."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chat_domain import (
    create_api_key,
    get_chatbot,
    get_conversation,
    get_message,
    get_or_create_contact,
    get_or_create_conversation,
    ingest_document,
    insert_message,
    list_api_keys,
    list_documents,
)
from chat_pipeline import Runtime
from chat_pipeline.processors import IncomingProcessor
from devstack import RedisServer
from gateway import admin_api
from gateway.app import create_app
from queue_core import JobState

from .conftest import settings_for
from .helpers import _tenant

Client = TestClient[Any, Any]


@dataclass
class Side:
    tenant: uuid.UUID
    bot: uuid.UUID
    widget: uuid.UUID
    wa: uuid.UUID
    conversation: uuid.UUID
    question: uuid.UUID
    document: uuid.UUID
    admin: str
    agent: str
    agent_key_id: uuid.UUID

    def ids(self) -> dict[str, uuid.UUID]:
        return {
            "chatbot_id": self.bot,
            "channel_id": self.wa,
            "conversation_id": self.conversation,
            "document_id": self.document,
            "key_id": self.agent_key_id,
        }


async def _side(rt: Runtime) -> Side:
    t = await _tenant(rt)
    async with rt.sessions() as s, s.begin():
        contact = await get_or_create_contact(
            s, tenant_id=t["tenant"], channel_id=t["widget"], external_id=f"v-{uuid.uuid4()}"
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=t["bot"])
        question = (
            await insert_message(
                s, conversation_id=conversation.id, role="user", text="where is my order?"
            )
        ).message
        doc = await ingest_document(s, chatbot_id=t["bot"], title="Hours", text="Open 9-5.")
        admin = await create_api_key(s, role="admin", tenant_id=t["tenant"])
        agent = await create_api_key(s, role="agent", tenant_id=t["tenant"])
    return Side(
        t["tenant"], t["bot"], t["widget"], t["wa"], conversation.id, question.id, doc.id,
        admin.plaintext, agent.plaintext, agent.key.id,
    )  # fmt: skip


@dataclass
class World:
    a: Side
    b: Side
    operator: str


@pytest.fixture
async def world(rt: Runtime) -> World:
    a, b = await _side(rt), await _side(rt)
    async with rt.sessions() as s, s.begin():
        operator = await create_api_key(s, role="operator")
    return World(a, b, operator.plaintext)


@pytest.fixture
async def client(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str
) -> AsyncIterator[Client]:
    app = create_app(settings_for(gateway_redis.url, gateway_db, secret_key))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def _auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def _fill(path: str, ids: dict[str, uuid.UUID]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(ids.get(m.group(1), "incoming-messages")), path)


async def _call(client: Client, r: admin_api.Route, path: str, key: str | None, **kw: Any) -> Any:
    headers = kw.pop("headers", {})
    if key is not None:
        headers = {**_auth(key), **headers}
    return await client.request(r.method, path, headers=headers, **kw)


# -- auth, isolation and roles over the route table ------------------------------------------


async def test_every_route_wants_a_valid_key(client: Client, world: World) -> None:
    for r in admin_api.ROUTES:
        path = _fill(r.path, world.a.ids())
        for key in (None, "cbk_000000000000_forged", world.a.admin + "x"):
            resp = await _call(client, r, path, key, json={})
            assert resp.status == 401, (r.method, r.path, key)
            assert (await resp.json())["error"]["field"] == "Authorization"


async def test_a_tenant_never_reaches_another_tenants_rows(
    client: Client, world: World, rt: Runtime
) -> None:
    """Tenant A's admin key on every route that names a row, with B's ids: 404 as for an id that
    does not exist, and B's data is unchanged. Listings never show B's ids."""
    a, b = world.a, world.b
    named = [r for r in admin_api.ROUTES if r.scope == "tenant" and "{" in r.path]
    assert len(named) >= 12
    for r in named:
        resp = await _call(client, r, _fill(r.path, b.ids()), a.admin, json={"text": "hi"})
        assert resp.status == 404, (r.method, r.path, resp.status, await resp.text())
        missing = await _call(client, r, _fill(r.path, {k: uuid.uuid4() for k in b.ids()}),
                              a.admin, json={"text": "hi"})  # fmt: skip
        assert (await resp.json())["error"] == (await missing.json())["error"], r.path
    b_ids = {str(v) for v in b.ids().values()} | {str(b.tenant), str(b.widget)}
    for r in admin_api.ROUTES:
        if r.scope == "tenant" and r.method == "GET" and "{" not in r.path:
            resp = await _call(client, r, r.path, a.admin)
            text = await resp.text()
            assert resp.status == 200 and not any(i in text for i in b_ids), r.path
    # a filter or a body naming B's rows finds nothing either
    resp = await client.get(f"/api/v1/channels?chatbot_id={b.bot}", headers=_auth(a.admin))
    assert (await resp.json())["items"] == []
    resp = await client.post(
        "/api/v1/channels",
        headers=_auth(a.admin),
        json={"kind": "widget", "chatbot_id": str(b.bot)},
    )
    assert resp.status == 404 and (await resp.json())["error"]["field"] == "chatbot_id"
    async with rt.sessions() as s:
        assert (await get_conversation(s, b.conversation)).status == "open"  # type: ignore[union-attr]
        assert (await get_chatbot(s, b.bot)).name == "B"  # type: ignore[union-attr]
        assert len(await list_documents(s, b.bot)) == 1
        assert all(k.revoked_at is None for k in await list_api_keys(s, b.tenant))
        assert (await get_message(s, b.question)).reply_id is None  # type: ignore[union-attr]


async def test_roles_nest_and_the_operator_names_its_tenant(client: Client, world: World) -> None:
    a = world.a
    for r in admin_api.ROUTES:
        path = _fill(r.path, a.ids())
        if r.role != "agent":
            resp = await _call(client, r, path, a.agent, json={})
            assert resp.status == 403, (r.method, r.path)
        if r.role == "operator":
            resp = await _call(client, r, path, a.admin, json={})
            assert resp.status == 403, (r.method, r.path)
        if r.scope == "tenant":
            resp = await _call(client, r, path, world.operator, json={})
            assert resp.status == 403, (r.method, r.path)
            assert (await resp.json())["error"]["field"] == "X-Tenant-Id"
    me = await client.get(
        "/api/v1/me", headers=_auth(world.operator, **{"X-Tenant-Id": str(a.tenant)})
    )
    assert me.status == 200 and (await me.json())["tenant"]["id"] == str(a.tenant)
    mine = await client.get("/api/v1/me", headers=_auth(a.agent))
    assert (await mine.json())["key"]["role"] == "agent"


async def test_odd_input_on_every_route_is_a_4xx_never_a_500(client: Client, world: World) -> None:
    bodies: list[Any] = [
        b"not json", b"[1,2]", b'"text"', b"{" * 5000, b'{"a":' * 300 + b"1" + b"}" * 300,
        b'{"name": null, "text": 7, "kind": "sms", "role": "root", "chatbot_id": "x"}',
        b'{"text": "\\u0000\\ud800"}', "é".encode("latin-1"),
    ]  # fmt: skip
    for r in admin_api.ROUTES:
        for ids in (world.a.ids(), {k: "../../etc" for k in world.a.ids()}):
            path = _fill(r.path, ids)  # type: ignore[arg-type]
            for body in bodies:
                key = world.operator if r.scope == "platform" else world.a.admin
                resp = await _call(
                    client, r, path, key, data=body, headers={"Content-Type": "application/json"}
                )
                assert 200 <= resp.status < 500, (r.method, path, body[:40], resp.status)
                if resp.status >= 400:
                    assert "error" in await resp.json()


# -- what a tenant does ----------------------------------------------------------------------


async def test_a_chatbot_is_made_changed_and_its_secrets_stay_write_only(
    client: Client, world: World
) -> None:
    h = _auth(world.a.admin)
    resp = await client.post(
        "/api/v1/chatbots",
        headers=h,
        json={"name": "Support", "provider_api_key": "sk-very-secret", "temperature": 0.5},
    )
    assert resp.status == 201
    bot = await resp.json()
    assert bot["has_provider_api_key"] is True and "sk-very-secret" not in await resp.text()
    assert bot["widget_snippet"].endswith("async></script>")
    channels = await (
        await client.get(f"/api/v1/channels?chatbot_id={bot['id']}", headers=h)
    ).json()
    assert [c["kind"] for c in channels["items"]] == ["widget"]
    resp = await client.patch(
        f"/api/v1/chatbots/{bot['id']}", headers=h,
        json={"name": "Help desk", "remove_provider_api_key": True},
    )  # fmt: skip
    changed = await resp.json()
    assert changed["name"] == "Help desk" and changed["has_provider_api_key"] is False
    for body, field in (
        ({"temperature": 5}, "temperature"),
        ({"colour": "red"}, "colour"),
        ({"allowed_origins": ["javascript:alert(1)"]}, "allowed_origins.0"),
        ({"name": "  "}, "name"),
    ):
        resp = await client.patch(f"/api/v1/chatbots/{bot['id']}", headers=h, json=body)
        assert resp.status == 400 and (await resp.json())["error"]["field"] == field, body


async def test_a_whatsapp_channel_is_connected_once_and_its_secrets_never_shown_again(
    client: Client, world: World
) -> None:
    h = _auth(world.a.admin)
    number = f"pn-{uuid.uuid4().hex[:10]}"
    body = {
        "kind": "whatsapp_cloud", "chatbot_id": str(world.a.bot), "phone_number_id": number,
        "access_token": "EAAG-token", "app_secret": "app-secret",
    }  # fmt: skip
    resp = await client.post("/api/v1/channels", headers=h, json=body)
    assert resp.status == 201
    made = await resp.json()
    assert made["callback_url"].endswith(f"/v1/channels/{made['id']}/whatsapp-cloud")
    shown = await client.get(f"/api/v1/channels/{made['id']}", headers=h)
    text = await shown.text()
    assert made["verify_token"] not in text and "EAAG-token" not in text
    assert (await shown.json())["sending"] == "ok"
    again = await client.post("/api/v1/channels", headers=h, json=body)
    assert again.status == 409
    wrong = await client.patch(f"/api/v1/channels/{made['id']}", headers=h, json={"session": "x"})
    assert wrong.status == 400 and (await wrong.json())["error"]["field"] == "session"
    bad = await client.post("/api/v1/channels", headers=h, json={**body, "kind": "sms"})
    assert bad.status == 400 and (await bad.json())["error"]["field"] == "kind"
    no_token = {k: v for k, v in body.items() if k != "access_token"}
    bad = await client.post("/api/v1/channels", headers=h, json=no_token)
    assert (await bad.json())["error"]["field"] == "access_token"
    off = await client.post(f"/api/v1/channels/{made['id']}/disable", headers=h)
    assert (await off.json())["active"] is False


async def test_knowledge_documents_html_is_read_as_text(client: Client, world: World) -> None:
    h = _auth(world.a.admin)
    page = "<html><head><title>x</title><script>steal()</script></head><body><h1>Returns</h1>"
    page += "<p>Within 30&nbsp;days.</p></body></html>"
    resp = await client.post(
        f"/api/v1/chatbots/{world.a.bot}/documents", headers=h,
        json={"title": "Returns", "text": page, "format": "html"},
    )  # fmt: skip
    assert resp.status == 201 and (await resp.json())["chunk_count"] == 1
    assert admin_api.html_text(page) == "Returns\nWithin 30 days."
    docs = await (await client.get(f"/api/v1/chatbots/{world.a.bot}/documents", headers=h)).json()
    assert sorted(d["title"] for d in docs["items"]) == ["Hours", "Returns"]
    gone = await client.delete(f"/api/v1/documents/{world.a.document}", headers=h)
    assert gone.status == 204
    again = await client.delete(f"/api/v1/documents/{world.a.document}", headers=h)
    assert again.status == 404


async def test_an_agent_takes_over_replies_and_hands_back(
    client: Client, world: World, rt: Runtime
) -> None:
    a = world.a
    h = _auth(a.agent)
    url = f"/api/v1/conversations/{a.conversation}"
    listed = await (await client.get("/api/v1/conversations?status=open", headers=h)).json()
    assert str(a.conversation) in {c["id"] for c in listed["items"]}
    resp = await client.post(f"{url}/take-over", headers=h)
    assert (await resp.json())["status"] == "pending_human"
    waiting = await (
        await client.get("/api/v1/conversations?status=pending_human", headers=h)
    ).json()
    assert [c["id"] for c in waiting["items"]] == [str(a.conversation)]
    # while a human has it, the bot does not answer a new question
    async with rt.sessions() as s, s.begin():
        late = (
            await insert_message(s, conversation_id=a.conversation, role="user", text="hello?")
        ).message
    job = await rt.pipeline.enqueue_incoming(_incoming(a, late.id, "hello?"), _plan())
    assert await IncomingProcessor(rt)(job) == "no-bot"
    # the agent's reply answers both questions and goes out on the conversation's channel
    sent = await client.post(
        f"{url}/messages", headers=h, json={"text": "On its way!", "client_message_id": "m1"}
    )
    assert sent.status == 201
    reply = await sent.json()
    assert reply["role"] == "agent" and reply["status"] == "queued"
    twice = await client.post(
        f"{url}/messages", headers=h, json={"text": "On its way!", "client_message_id": "m1"}
    )
    assert twice.status == 200 and (await twice.json())["id"] == reply["id"]
    (out,) = await rt.pipeline.outgoing.list_jobs(JobState.WAITING)
    assert out.data["message_id"] == reply["id"] and out.data["channel_kind"] == "widget"
    detail = await (await client.get(url, headers=h)).json()
    assert [m["answered_by"] for m in detail["messages"] if m["role"] == "user"] == [
        reply["id"]
    ] * 2
    # handed back with a question the agent left open: the bot gets it at once
    async with rt.sessions() as s, s.begin():
        await insert_message(s, conversation_id=a.conversation, role="user", text="and the refund?")
    back = await client.post(f"{url}/hand-back", headers=h)
    assert (await back.json())["status"] == "open"
    (incoming,) = [
        j for j in await rt.pipeline.incoming.list_jobs(JobState.WAITING) if j.id != job.id
    ]
    assert incoming.data["conversation_id"] == str(a.conversation)
    done = await client.post(f"{url}/resolve", headers=h)
    assert (await done.json())["status"] == "resolved"
    closed = await client.post(f"{url}/messages", headers=h, json={"text": "hi"})
    assert closed.status == 409


async def test_conversation_pages_follow_the_cursor_and_the_search(
    client: Client, world: World, rt: Runtime
) -> None:
    a = world.a
    async with rt.sessions() as s, s.begin():
        for i in range(5):
            contact = await get_or_create_contact(
                s, tenant_id=a.tenant, channel_id=a.widget, external_id=f"pager-{i}-{uuid.uuid4()}"
            )
            c = await get_or_create_conversation(s, contact, chatbot_id=a.bot)
            await insert_message(s, conversation_id=c.id, role="user", text=f"parcel {i} 100%")
    h = _auth(a.admin)
    seen: list[str] = []
    cursor = ""
    for _ in range(10):
        page = await (await client.get(f"/api/v1/conversations?limit=2{cursor}", headers=h)).json()
        seen += [c["id"] for c in page["items"]]
        if not page["next_cursor"]:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert len(seen) == len(set(seen)) == 6
    found = await (await client.get("/api/v1/conversations?q=parcel 3", headers=h)).json()
    assert len(found["items"]) == 1
    literal = await (await client.get("/api/v1/conversations?q=0%25", headers=h)).json()
    assert len(literal["items"]) == 5, "% is matched literally"
    bad = await client.get("/api/v1/conversations?cursor=!!", headers=h)
    assert bad.status == 400 and (await bad.json())["error"]["field"] == "cursor"


async def test_keys_are_shown_once_and_revoked_keys_stop_working(
    client: Client, world: World
) -> None:
    h = _auth(world.a.admin)
    made = await (
        await client.post("/api/v1/api-keys", headers=h, json={"role": "agent", "name": "Ana"})
    ).json()
    assert made["key"].startswith("cbk_")
    assert (await client.get("/api/v1/me", headers=_auth(made["key"]))).status == 200
    listed = await (await client.get("/api/v1/api-keys", headers=h)).text()
    assert made["key"] not in listed and "key_hash" not in listed
    assert (await client.delete(f"/api/v1/api-keys/{made['id']}", headers=h)).status == 204
    assert (await client.get("/api/v1/me", headers=_auth(made["key"]))).status == 401
    bad = await client.post("/api/v1/api-keys", headers=h, json={"role": "operator"})
    assert bad.status == 400 and (await bad.json())["error"]["field"] == "role"


async def test_the_operator_makes_plans_tenants_and_raw_jobs(
    client: Client, world: World, rt: Runtime
) -> None:
    h = _auth(world.operator)
    plan = f"Scale-{uuid.uuid4().hex[:6]}"
    made = await client.post(
        "/api/v1/plans", headers=h, json={"name": plan, "monthly_price_cents": 29900}
    )
    assert made.status == 201
    assert (
        await client.post("/api/v1/plans", headers=h, json={"name": plan, "monthly_price_cents": 1})
    ).status == 409
    tenant = await (
        await client.post("/api/v1/tenants", headers=h, json={"name": "Nova", "plan": plan})
    ).json()
    me = await (await client.get("/api/v1/me", headers=_auth(tenant["admin_api_key"]))).json()
    assert me["tenant"]["name"] == "Nova" and me["plan"]["name"] == plan
    job = await client.post(
        "/api/queue/add/maintenance", headers=h, json={"id": "op-1", "name": "noop"}
    )
    assert job.status == 201 and (await job.json())["id"] == "op-1"
    assert await rt.pipeline.maintenance.get_state("op-1") is not None
    unknown = await client.post("/api/queue/add/nope", headers=h, json={})
    assert unknown.status == 404 and (await unknown.json())["error"]["field"] == "queue"


async def test_the_front_door_and_the_route_list(client: Client) -> None:
    page = await client.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    text = await page.text()
    assert 'href="/api/v1"' in text and "/readyz" in text
    index = await (await client.get("/api/v1")).json()
    listed = {(r["method"], r["path"]) for r in index["routes"]}
    assert listed == {(r.method, r.path) for r in admin_api.ROUTES}


def _plan() -> Any:
    from chat_domain import QueuePriority

    return QueuePriority(priority=5, weight=1)


def _incoming(side: Side, message_id: uuid.UUID, text: str) -> Any:
    from chat_domain.models import utcnow
    from chat_domain.payloads import IncomingMessage

    return IncomingMessage(
        tenant_id=side.tenant, chatbot_id=side.bot, channel_id=side.widget, channel_kind="widget",
        external_user_id="v", text=text, external_message_id=None, received_at=utcnow(),
        message_id=message_id, conversation_id=side.conversation,
    )  # fmt: skip


async def test_each_route_validates_with_the_model_it_documents(
    client: Client, world: World
) -> None:
    """A field the documented model does not know is refused, named, by the route itself: the
    OpenAPI document (built from `Route.body`) and the validation cannot drift apart."""
    checked = 0
    for r in admin_api.ROUTES:
        model = r.body
        if not isinstance(model, type) or model.model_config.get("extra") != "forbid":
            continue
        key = world.operator if r.scope == "platform" else world.a.admin
        resp = await _call(client, r, _fill(r.path, world.a.ids()), key, json={"zz_unknown": 1})
        assert resp.status == 400, (r.method, r.path, resp.status)
        fields = {(await resp.json())["error"]["field"]}
        assert fields & (
            {"zz_unknown"} | {n for n, f in model.model_fields.items() if f.is_required()}
        )
        checked += 1
    assert checked >= 8


async def test_conversation_times_with_or_without_a_zone_are_a_2xx_or_a_400(
    client: Client, world: World
) -> None:
    """`since` reached the UTC column type as a naive datetime, which it refuses: every `since`
    answered 500. A cursor with a naive time (not one this API gives) did too."""
    h = _auth(world.a.agent)
    mine = str(world.a.conversation)
    for since in ("2000-01-01T00:00:00Z", "2000-01-01T02:00:00+02:00", "2000-01-01T00:00:00"):
        resp = await client.get("/api/v1/conversations", params={"since": since}, headers=h)
        assert resp.status == 200, await resp.text()
        assert mine in {c["id"] for c in (await resp.json())["items"]}
    later = await client.get(
        "/api/v1/conversations", params={"since": "2999-01-01T00:00:00Z"}, headers=h
    )
    assert later.status == 200 and (await later.json())["items"] == []
    naive = base64.urlsafe_b64encode(f"2999-01-01T00:00:00|{uuid.uuid4()}".encode()).decode()
    resp = await client.get("/api/v1/conversations", params={"cursor": naive}, headers=h)
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "cursor"


async def test_an_agent_reply_with_a_nul_character_is_a_400(client: Client, world: World) -> None:
    """PostgreSQL cannot store NUL in text: the reply was a 500 there (SQLite took it). The
    widget refuses it the same way."""
    url = f"/api/v1/conversations/{world.a.conversation}/messages"
    resp = await client.post(url, headers=_auth(world.a.agent), json={"text": "on\x00its way"})
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "text"


async def test_nul_in_any_text_field_is_a_400_naming_it(client: Client, world: World) -> None:
    """Every body, not only the agent's reply: PostgreSQL refuses U+0000 in text columns."""
    h = _auth(world.a.admin)
    resp = await client.patch(
        f"/api/v1/chatbots/{world.a.bot}", headers=h, json={"name": "ok", "system_prompt": "a\x00b"}
    )
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "system_prompt"
    resp = await client.patch(
        f"/api/v1/chatbots/{world.a.bot}", headers=h, json={"handoff_phrases": ["ok", "x\x00"]}
    )
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "handoff_phrases.1"
