"""The fake WhatsApp providers themselves (tests/fakes/whatsapp.py): endpoint shapes, scripting,
state switches, webhook emission with signatures checked here with hashlib, process mode."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.fakes.whatsapp import (
    PHONE_NUMBER_ID,
    USER_WA_ID,
    Behaviour,
    FakeEvolutionServer,
    FakeGraphServer,
    FakeWahaServer,
    StatusEvent,
    behaviour_from_json,
    behaviour_to_json,
    button_reply_message,
    delay,
    disconnect,
    error,
    failed,
    fake_whatsapp_process,
    hang,
    http_error,
    media_message,
    meta_json,
    meta_signature,
    node_json,
    timeout_after_send,
    waha_signature,
)

TOKEN = "graph-token"
APP_SECRET = "app-secret-1"
SEND = f"/v21.0/{PHONE_NUMBER_ID}/messages"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The reference's signature vectors (§6.5 and §6.6), byte for byte.
META_VECTOR = (
    b'{"object":"whatsapp_business_account","entry":[{"id":"730012345678901","changes":[{"value":'
    b'{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550001111",'
    b'"phone_number_id":"109876543210987"},"contacts":[{"profile":{"name":"Jos\\u00e9 Silva"},'
    b'"wa_id":"5511987654321"}],"messages":[{"from":"5511987654321","id":"wamid.HBgNNTUxMTk4NzY1'
    b'NDMyMRUCABIYFjNFQjBBMUIyQzNENEU1RjZBN0I4QzkA","timestamp":"1732300000","type":"text","text":'
    b'{"body":"Ol\\u00e1, preciso de ajuda"}}]},"field":"messages"}]}]}'
)
META_VECTOR_SIGNATURE = "sha256=d511a1cab75968a8e539522510aa1b08e8e39295172f52bb1f398db1cfc5f456"
WAHA_VECTOR = (
    b'{"id":"evt_01jd8x6k2m3n4p5q6r7s8t9v0w","timestamp":1732300000123,"event":"message",'
    b'"session":"tenant-42","engine":"NOWEB","payload":{"id":"false_5511987654321@c.us_3A554E20E'
    b'CABF3D45BB2","timestamp":1732300000,"from":"5511987654321@c.us","fromMe":false,"to":'
    b'"5511912345678@c.us","body":"Oi","hasMedia":false}}'
)
WAHA_VECTOR_HMAC = (
    "0c28cd93b349fb5c73532aea85737da674cdcd540c961a7efd48b6357930cbf630831b3092fec9d03a4a29f01fb6"
    "76ae325887da641cd750e013cc576b9bd421"
)


def text_body(to: str = "+55 11 98765-4321", text: str = "Olá", **extra: Any) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"preview_url": False, "body": text},
        **extra,
    }


# --- a webhook receiver -------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A webhook endpoint: records raw bodies, answers the next queued statuses (else 200), and
    answers Meta's verification GET for the token ``verify-me``."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.answers: deque[int] = deque()
        self.url = ""
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        hit = Hit(request.method, request.path, request.query_string, headers, await request.read())
        self.hits.append(hit)
        self._changed.set()
        if request.method == "GET":
            if request.query.get("hub.verify_token") == "verify-me":
                return web.Response(text=request.query["hub.challenge"])
            return web.Response(status=403)
        return web.Response(status=self.answers.popleft() if self.answers else 200, text="ok")

    async def wait(self, count: int, timeout: float = 5.0) -> list[Hit]:
        try:
            async with asyncio.timeout(timeout):
                while len(self.hits) < count:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"{len(self.hits)} of {count} webhooks arrived") from None
        return list(self.hits)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def graph(receiver: Receiver) -> AsyncIterator[FakeGraphServer]:
    async with FakeGraphServer(
        access_token=TOKEN, app_secret=APP_SECRET, webhook_url=receiver.url
    ) as server:
        yield server


def meta_signed(hit: Hit, secret: str = APP_SECRET) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), hit.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(hit.headers.get("x-hub-signature-256", ""), expected)


def waha_signed(hit: Hit, secret: str) -> bool:
    expected = hmac.new(secret.encode(), hit.body, hashlib.sha512).hexdigest()
    return (
        hmac.compare_digest(hit.headers.get("x-webhook-hmac", ""), expected)
        and hit.headers.get("x-webhook-hmac-algorithm") == "sha512"
    )


def value_of(hit: Hit) -> dict[str, Any]:
    entry = hit.json["entry"]
    assert len(entry) == 1 and len(entry[0]["changes"]) == 1
    assert entry[0]["changes"][0]["field"] == "messages"
    value: dict[str, Any] = entry[0]["changes"][0]["value"]
    return value


def status_of(hit: Hit) -> dict[str, Any]:
    [status] = value_of(hit)["statuses"]
    result: dict[str, Any] = status
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- Graph API: sends ---------------------------------------------------------------------------


async def test_graph_send_answers_meta_shape_and_records(graph: FakeGraphServer) -> None:
    async with httpx.AsyncClient(base_url=graph.url) as http:
        first = await http.post(SEND, json=text_body(), headers=AUTH)
        second = await http.post(
            f"/v17.0/{PHONE_NUMBER_ID}/messages", json=text_body(to="5511987654321"), headers=AUTH
        )
        unknown = await http.get("/v21.0/me", headers=AUTH)

    assert first.status_code == 200
    body = first.json()
    assert set(body) == {"messaging_product", "contacts", "messages"}
    assert body["messaging_product"] == "whatsapp"
    assert body["contacts"] == [{"input": "+55 11 98765-4321", "wa_id": USER_WA_ID}]
    [message] = body["messages"]
    assert message["id"].startswith("wamid.")
    assert second.json()["messages"][0]["id"] != message["id"]
    assert unknown.status_code == 404
    assert [(m.id, m.recipient, m.text, m.answered) for m in graph.sent] == [
        (message["id"], USER_WA_ID, "Olá", True),
        (second.json()["messages"][0]["id"], USER_WA_ID, "Olá", True),
    ]
    assert graph.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert graph.requests[0].json == text_body()
    assert [r.path for r in graph.requests] == [
        SEND,
        f"/v17.0/{PHONE_NUMBER_ID}/messages",
        "/v21.0/me",
    ]


async def test_graph_wrong_or_missing_token_is_a_190_and_sends_nothing(
    graph: FakeGraphServer,
) -> None:
    graph.script(error(131047))
    async with httpx.AsyncClient(base_url=graph.url) as http:
        wrong = await http.post(SEND, json=text_body(), headers={"Authorization": "Bearer nope"})
        missing = await http.post(SEND, json=text_body())

    for response in (wrong, missing):
        assert response.status_code == 401
        err = response.json()["error"]
        assert set(err) == {"message", "type", "code", "fbtrace_id"}
        assert (err["code"], err["type"]) == (190, "OAuthException")
        assert "access token" in err["message"]
    assert graph.pending() == 1  # the scripted outcome waits for a request that gets through
    assert graph.sent == []


async def test_graph_rejects_bad_requests_with_code_100(graph: FakeGraphServer) -> None:
    async with (
        FakeGraphServer(access_token=TOKEN, phone_number_ids=[PHONE_NUMBER_ID]) as strict,
        httpx.AsyncClient() as http,
    ):
        no_product = await http.post(
            graph.url + SEND, json={"to": USER_WA_ID, "text": {"body": "x"}}, headers=AUTH
        )
        too_long = await http.post(graph.url + SEND, json=text_body(text="x" * 4097), headers=AUTH)
        no_to = await http.post(
            graph.url + SEND, json={"messaging_product": "whatsapp", "type": "text"}, headers=AUTH
        )
        other_number = await http.post(
            strict.url + "/v21.0/999/messages", json=text_body(), headers=AUTH
        )
        at_limit = await http.post(graph.url + SEND, json=text_body(text="x" * 4096), headers=AUTH)

    for response, needle in [
        (no_product, "messaging_product"),
        (too_long, "4096"),
        (no_to, "to"),
        (other_number, "999"),
    ]:
        assert response.status_code == 400
        err = response.json()["error"]
        assert err["code"] == 100 and needle in err["message"]
    assert other_number.json()["error"]["error_subcode"] == 33
    assert at_limit.status_code == 200
    assert len(graph.sent) == 1


async def test_graph_scripted_errors_run_in_order_then_accept(graph: FakeGraphServer) -> None:
    graph.script(
        error(130429, retry_after=2),
        error(130429, 429),
        error(131000),
        error(190, subcode=463),
        http_error(502, text="<html>502 Bad Gateway</html>"),
    )
    async with httpx.AsyncClient(base_url=graph.url) as http:
        responses = [await http.post(SEND, json=text_body(), headers=AUTH) for _ in range(6)]

    assert [r.status_code for r in responses] == [400, 429, 500, 401, 502, 200]
    throttle = responses[0].json()["error"]
    assert set(throttle) == {"message", "type", "code", "error_data", "fbtrace_id"}
    assert throttle["message"] == "(#130429) Rate limit hit"
    assert throttle["type"] == "OAuthException"
    assert throttle["error_data"] == {
        "messaging_product": "whatsapp",
        "details": "Cloud API message throughput has been reached.",
    }
    assert responses[0].headers["retry-after"] == "2"
    assert "retry-after" not in responses[1].headers
    assert responses[2].json()["error"]["code"] == 131000
    expired = responses[3].json()["error"]
    assert expired["error_subcode"] == 463
    assert expired["message"].startswith("Error validating access token: Session has expired")
    assert responses[4].text == "<html>502 Bad Gateway</html>"
    assert len(graph.sent) == 1 and graph.pending() == 0


async def test_graph_delay_hang_and_disconnect(graph: FakeGraphServer) -> None:
    graph.script(delay(0.3, error(131016)), hang(), disconnect(), delay(0.1))
    async with httpx.AsyncClient(base_url=graph.url, timeout=3) as http:
        started = time.monotonic()
        delayed = await http.post(SEND, json=text_body(), headers=AUTH)
        elapsed = time.monotonic() - started
        with pytest.raises(httpx.ReadTimeout):
            await http.post(SEND, json=text_body(), headers=AUTH, timeout=0.3)
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(SEND, json=text_body(), headers=AUTH)
        accepted = await http.post(SEND, json=text_body(), headers=AUTH)

    assert delayed.status_code == 503 and elapsed >= 0.3
    assert delayed.json()["error"]["code"] == 131016
    assert accepted.status_code == 200
    assert len(graph.requests) == 4
    assert [m.id for m in graph.sent] == [accepted.json()["messages"][0]["id"]]


async def test_graph_timeout_after_send_is_sent_and_reported_by_statuses(
    graph: FakeGraphServer, receiver: Receiver
) -> None:
    graph.script(timeout_after_send())
    async with httpx.AsyncClient(base_url=graph.url) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                SEND,
                json=text_body(biz_opaque_callback_data="out_01"),
                headers=AUTH,
                timeout=0.3,
            )

    [sent] = graph.sent
    assert not sent.answered
    hits = await receiver.wait(2)
    assert [(status_of(h)["id"], status_of(h)["status"]) for h in hits] == [
        (sent.id, "sent"),
        (sent.id, "delivered"),
    ]
    assert {status_of(h)["biz_opaque_callback_data"] for h in hits} == {"out_01"}


# --- Graph API: webhooks ------------------------------------------------------------------------


async def test_graph_status_webhooks_are_signed_meta_envelopes(
    graph: FakeGraphServer, receiver: Receiver
) -> None:
    async with httpx.AsyncClient(base_url=graph.url) as http:
        response = await http.post(SEND, json=text_body(), headers=AUTH)
    wamid = response.json()["messages"][0]["id"]

    hits = await receiver.wait(2)
    await graph.settle()
    for hit in hits:
        assert meta_signed(hit)
        assert hit.headers["content-type"] == "application/json"
        assert hit.path == "/hook"
        body = hit.json
        assert body["object"] == "whatsapp_business_account"
        assert body["entry"][0]["id"] == "730012345678901"
        value = value_of(hit)
        assert value["messaging_product"] == "whatsapp"
        assert value["metadata"] == {
            "display_phone_number": "15550001111",
            "phone_number_id": PHONE_NUMBER_ID,
        }
        status = status_of(hit)
        assert (status["id"], status["recipient_id"]) == (wamid, USER_WA_ID)
        assert isinstance(status["timestamp"], str) and status["timestamp"].isdigit()
        assert status["pricing"]["pricing_model"] == "PMP"
    assert [status_of(h)["status"] for h in hits] == ["sent", "delivered"]
    assert [(d.event, d.outcome, len(d.attempts)) for d in graph.deliveries] == [
        ("status:sent", "delivered", 1),
        ("status:delivered", "delivered", 1),
    ]


async def test_graph_scripted_status_order_duplicates_delay_and_failure(
    graph: FakeGraphServer, receiver: Receiver
) -> None:
    graph.script_statuses(
        ["delivered", "sent", "sent"], [failed(131047)], [StatusEvent("read", delay=0.3)], []
    )
    async with httpx.AsyncClient(base_url=graph.url) as http:
        ids, sent_at = [], []
        for _ in range(4):
            sent_at.append(time.monotonic())
            response = await http.post(SEND, json=text_body(), headers=AUTH)
            ids.append(response.json()["messages"][0]["id"])

    hits = await receiver.wait(5)
    await graph.settle()
    assert len(receiver.hits) == 5  # the fourth message had an empty plan
    by_id: dict[str, list[Hit]] = {}
    for hit in hits:
        by_id.setdefault(status_of(hit)["id"], []).append(hit)

    first = by_id[ids[0]]
    assert [status_of(h)["status"] for h in first] == ["delivered", "sent", "sent"]
    assert first[1].body == first[2].body  # a duplicate is the same bytes, as a retry would be
    timestamps = {status_of(h)["status"]: int(status_of(h)["timestamp"]) for h in first}
    assert timestamps["sent"] < timestamps["delivered"]  # timestamps keep the true order

    [failure] = by_id[ids[1]]
    status = status_of(failure)
    assert status["status"] == "failed" and "pricing" not in status
    [err] = status["errors"]
    assert err["code"] == 131047 and err["title"] == "Re-engagement message"
    assert "24 hours" in err["error_data"]["details"]

    [read] = by_id[ids[2]]
    assert status_of(read)["status"] == "read"
    assert read.at - sent_at[2] >= 0.3
    assert ids[3] not in by_id


async def test_graph_mark_read_and_typing_answer_success(
    graph: FakeGraphServer, receiver: Receiver
) -> None:
    graph.script(error(130429))  # for the next send, not for reads
    read = {"messaging_product": "whatsapp", "status": "read", "message_id": "wamid.IN1"}
    typing = {**read, "typing_indicator": {"type": "text"}}
    async with httpx.AsyncClient(base_url=graph.url) as http:
        answers = [await http.post(SEND, json=body, headers=AUTH) for body in (read, typing)]
        graph.script(error(131000), target="read")
        failed_read = await http.post(SEND, json=read, headers=AUTH)

    assert [(a.status_code, a.json()) for a in answers] == [(200, {"success": True})] * 2
    assert failed_read.status_code == 500
    assert graph.reads == [read, typing]
    assert graph.sent == [] and graph.pending() == 1
    await graph.settle()
    assert receiver.hits == []


async def test_graph_inbound_messages_are_signed_and_ascii_escaped(
    graph: FakeGraphServer, receiver: Receiver
) -> None:
    text = await graph.send_inbound_text("Olá, preciso de ajuda")
    button = await graph.send_inbound(
        button_reply_message("track_order", "Rastrear pedido", context_id="wamid.OUT1")
    )
    image = await graph.send_inbound(media_message("image", "media-1", "image/jpeg", caption="📷"))

    assert [d.outcome for d in (text, button, image)] == ["delivered"] * 3
    hits = await receiver.wait(3)
    assert all(meta_signed(h) for h in hits)
    assert all(h.body.isascii() for h in hits)
    assert b"Ol\\u00e1" in hits[0].body

    value = value_of(hits[0])
    assert value["contacts"] == [{"profile": {"name": "Ana Souza"}, "wa_id": USER_WA_ID}]
    [message] = value["messages"]
    assert (message["type"], message["text"], message["from"]) == (
        "text",
        {"body": "Olá, preciso de ajuda"},
        USER_WA_ID,
    )
    assert message["id"].startswith("wamid.") and message["timestamp"].isdigit()
    reply = value_of(hits[1])["messages"][0]
    assert reply["interactive"] == {
        "type": "button_reply",
        "button_reply": {"id": "track_order", "title": "Rastrear pedido"},
    }
    assert reply["context"]["id"] == "wamid.OUT1"
    media = value_of(hits[2])["messages"][0]
    assert media["type"] == "image"
    assert media["image"]["id"] == "media-1" and media["image"]["caption"] == "📷"


async def test_meta_signature_matches_the_reference_vector(
    graph: FakeGraphServer, receiver: Receiver
) -> None:
    assert meta_json(json.loads(META_VECTOR)) == META_VECTOR  # the fake serialises as Meta does
    assert meta_signature("fake_app_secret_123", META_VECTOR) == META_VECTOR_SIGNATURE
    graph.configure_webhook(receiver.url, secret="fake_app_secret_123")
    await graph.post_webhook(META_VECTOR)
    await graph.post_webhook(META_VECTOR, signature="sha256=" + "0" * 64)
    await graph.post_webhook(META_VECTOR, signature=False)

    hits = await receiver.wait(3)
    assert hits[0].body == META_VECTOR
    assert hits[0].headers["x-hub-signature-256"] == META_VECTOR_SIGNATURE
    assert not meta_signed(hits[1], "fake_app_secret_123")
    assert "x-hub-signature-256" not in hits[2].headers


async def test_graph_verification_request(graph: FakeGraphServer) -> None:
    ok = await graph.verify_webhook("verify-me", challenge="1158201444")
    refused = await graph.verify_webhook("wrong")
    assert (ok.status, ok.text) == (200, "1158201444")
    assert refused.status == 403


async def test_webhook_delivery_retries_with_bounded_backoff_and_records_outcomes(
    receiver: Receiver,
) -> None:
    receiver.answers.extend([503, 500])
    async with FakeGraphServer(webhook_url=receiver.url, app_secret=APP_SECRET) as server:
        retried = await server.send_inbound_text("hi")
        receiver.answers.append(401)
        refused = await server.send_inbound_text("hi again")
    assert [a.status for a in retried.attempts] == [503, 500, 200]
    assert retried.outcome == "delivered"
    assert len({h.body for h in receiver.hits[:3]}) == 1  # every attempt sends the same bytes
    assert [a.status for a in refused.attempts] == [401]  # a 4xx is not retried
    assert refused.outcome == "rejected"

    unreachable = f"http://127.0.0.1:{free_port()}/hook"
    async with FakeGraphServer(webhook_url=unreachable, webhook_attempts=3) as server:
        started = time.monotonic()
        lost = await server.send_inbound_text("nobody listens")
        elapsed = time.monotonic() - started
    assert lost.outcome == "failed"
    assert [a.status for a in lost.attempts] == [None, None, None]
    assert all(a.error for a in lost.attempts)
    assert elapsed < 2


async def test_graph_control_api_drives_everything_over_http(
    graph: FakeGraphServer, receiver: Receiver
) -> None:
    async with httpx.AsyncClient(base_url=graph.url) as http:
        scripted = await http.post(
            "/_fake/script",
            json=[behaviour_to_json(error(131056)), {"kind": "accept", "wa_id": "5511900000000"}],
        )
        bad = await http.post("/_fake/script", json={"kind": "explode"})
        planned = await http.post("/_fake/statuses", json={"plan": ["read"]})
        before_send = time.monotonic()
        throttled = await http.post(SEND, json=text_body(), headers=AUTH)
        accepted = await http.post(SEND, json=text_body(), headers=AUTH)
        after_send = time.monotonic()
        wamid = accepted.json()["messages"][0]["id"]
        await receiver.wait(1)
        emitted = await http.post(
            "/_fake/status",
            json={"id": wamid, "status": {"status": "failed", "error_code": 131026}},
        )
        inbound = await http.post(
            "/_fake/inbound", json={"type": "text", "text": "Oi", "from": "5511911112222"}
        )
        button = await http.post(
            "/_fake/inbound",
            json={"type": "button_reply", "button_id": "b1", "title": "Sim", "context_id": wamid},
        )
        unsigned = await http.post(
            "/_fake/inbound", json={"type": "text", "text": "x", "signature": False}
        )
        missing = await http.post("/_fake/inbound", json={"type": "text"})
        requests = (await http.get("/_fake/requests")).json()["requests"]
        sent = (await http.get("/_fake/sent")).json()["sent"]
        deliveries = (await http.get("/_fake/deliveries")).json()["deliveries"]
        await http.post("/_fake/reset")
        after_reset = [(await http.get(path)).json() for path in ("/_fake/requests", "/_fake/sent")]

    assert scripted.json() == {"pending": 2}
    assert bad.status_code == 400 and "explode" in bad.json()["error"]
    assert planned.json() == {"pending": 1}
    assert throttled.json()["error"]["code"] == 131056
    assert accepted.json()["contacts"][0]["wa_id"] == "5511900000000"
    assert missing.status_code == 400 and "text" in missing.json()["error"]
    assert [r.json()["outcome"] for r in (emitted, inbound, button, unsigned)] == ["delivered"] * 4

    hits = receiver.hits
    assert [status_of(h)["status"] for h in hits[:2]] == ["read", "failed"]
    assert status_of(hits[0])["recipient_id"] == "5511900000000"
    assert status_of(hits[1])["errors"][0]["code"] == 131026
    assert value_of(hits[2])["messages"][0]["from"] == "5511911112222"
    assert value_of(hits[3])["messages"][0]["context"]["id"] == wamid
    assert all(meta_signed(h) for h in hits[:4])
    assert "x-hub-signature-256" not in hits[4].headers

    assert [r["path"] for r in requests] == [SEND, SEND]  # the control API is not recorded
    assert requests[0]["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert [(m["id"], m["recipient"]) for m in sent] == [(wamid, "5511900000000")]
    assert before_send <= sent[0]["at"] <= after_send  # one clock with this process
    assert len(deliveries) == 5 and {d["outcome"] for d in deliveries} == {"delivered"}
    assert after_reset == [{"requests": []}, {"sent": []}]


@pytest.mark.parametrize(
    "behaviour",
    [
        error(130429, 429, retry_after=3, details="slow down"),
        http_error(503, {"oops": 1}, retry_after="5"),
        delay(0.5, timeout_after_send()),
        hang(),
        disconnect(),
    ],
)
def test_behaviours_round_trip_through_json(behaviour: Behaviour) -> None:
    assert behaviour_from_json(json.loads(json.dumps(behaviour_to_json(behaviour)))) == behaviour


def test_behaviours_the_kind_cannot_produce_are_refused() -> None:
    with pytest.raises(ValueError, match="GraphError"):
        FakeWahaServer().script(delay(1, error(130429)))
    with pytest.raises(ValueError, match="target"):
        FakeGraphServer().script(hang(), target="typing")


# --- WAHA ---------------------------------------------------------------------------------------

WAHA_KEY = {"X-Api-Key": "waha-key"}
QR_SECRET = "qr_webhook_secret"
CHAT = f"{USER_WA_ID}@c.us"


@pytest.fixture
async def waha(receiver: Receiver) -> AsyncIterator[FakeWahaServer]:
    async with FakeWahaServer(
        sessions={"tenant-42": "WORKING", "tenant-7": "SCAN_QR_CODE"},
        webhook_url=receiver.url,
        webhook_secret=QR_SECRET,
    ) as server:
        yield server


def send_text(session: str = "tenant-42", text: str = "Olá") -> dict[str, Any]:
    return {"session": session, "chatId": CHAT, "text": text}


async def test_waha_send_text_auth_validation_and_shape(waha: FakeWahaServer) -> None:
    async with httpx.AsyncClient(base_url=waha.url) as http:
        no_key = await http.post("/api/sendText", json=send_text())
        ok = await http.post("/api/sendText", json=send_text(), headers=WAHA_KEY)
        bad_chat = await http.post(
            "/api/sendText", json={**send_text(), "chatId": "+55 11"}, headers=WAHA_KEY
        )
        no_text = await http.post(
            "/api/sendText", json={**send_text(), "text": ""}, headers=WAHA_KEY
        )
        unknown = await http.post("/api/sendText", json=send_text("nope"), headers=WAHA_KEY)

    assert no_key.status_code == 401
    assert no_key.json() == {"statusCode": 401, "code": "unauthorized", "message": "Unauthorized"}
    assert ok.status_code == 201
    body = ok.json()
    assert re.fullmatch(rf"true_{re.escape(CHAT)}_3EB0[0-9A-F]{{18}}", body["id"])
    assert (body["to"], body["fromMe"], body["body"], body["ack"], body["ackName"]) == (
        CHAT,
        True,
        "Olá",
        1,
        "SERVER",
    )
    assert (bad_chat.status_code, bad_chat.json()["field"]) == (400, "chatId")
    assert (no_text.status_code, no_text.json()["field"]) == (400, "text")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "session_not_found")
    assert [(m.id, m.channel, m.text) for m in waha.sent] == [(body["id"], "tenant-42", "Olá")]
    assert waha.requests[1].headers["x-api-key"] == "waha-key"


async def test_waha_session_states_gate_sends_and_are_announced(
    waha: FakeWahaServer, receiver: Receiver
) -> None:
    async with httpx.AsyncClient(base_url=waha.url, headers=WAHA_KEY) as http:
        working = (await http.get("/api/sessions/tenant-42")).json()
        waha.set_session_status("tenant-42", "SCAN_QR_CODE")
        refused = await http.post("/api/sendText", json=send_text())
        scanning = (await http.get("/api/sessions/tenant-42")).json()
        png = await http.get("/api/tenant-42/auth/qr")
        raw = await http.get("/api/tenant-42/auth/qr", params={"format": "raw"})
        as_json = await http.get("/api/tenant-42/auth/qr", headers={"Accept": "application/json"})
        waha.set_session_status("tenant-42", "FAILED")
        refused_failed = await http.post("/api/sendText", json=send_text())
        waha.set_session_status("tenant-42", "WORKING")
        accepted = await http.post("/api/sendText", json=send_text())
        no_qr = await http.get("/api/tenant-42/auth/qr")
        sessions = (await http.get("/api/sessions")).json()

    assert working == {
        "name": "tenant-42",
        "status": "WORKING",
        "me": {"id": "5511912345678@c.us", "pushName": "Loja"},
        "engine": {"engine": "NOWEB"},
    }
    assert refused.status_code == 422
    assert refused.json() == {
        "statusCode": 422,
        "code": "session_not_working",
        "message": "Session status is not as expected. Try again later or restart the session",
        "error": "Session status is not as expected. Try again later or restart the session",
        "session": "tenant-42",
        "status": "SCAN_QR_CODE",
        "expected": ["WORKING"],
    }
    assert (scanning["status"], scanning["me"]) == ("SCAN_QR_CODE", None)
    assert png.headers["content-type"] == "image/png" and png.content.startswith(PNG_MAGIC)
    assert raw.json()["value"].startswith("2@")
    assert as_json.json()["mimetype"] == "image/png"
    assert base64.b64decode(as_json.json()["data"]).startswith(PNG_MAGIC)
    assert refused_failed.json()["status"] == "FAILED"
    assert accepted.status_code == 201
    assert (no_qr.status_code, no_qr.json()["expected"]) == (422, ["SCAN_QR_CODE"])
    assert {s["name"]: s["status"] for s in sessions} == {
        "tenant-42": "WORKING",
        "tenant-7": "SCAN_QR_CODE",
    }

    await waha.wait_for_deliveries(3, event="session.status")
    announced = [h for h in await receiver.wait(3) if h.json["event"] == "session.status"]
    assert Counter(h.json["payload"]["status"] for h in announced) == Counter(
        ["SCAN_QR_CODE", "FAILED", "WORKING"]
    )
    for hit in announced:
        assert waha_signed(hit, QR_SECRET)
        envelope = hit.json
        assert re.fullmatch(r"evt_[0-9a-z]{26}", envelope["id"])
        assert envelope["session"] == "tenant-42" and envelope["engine"] == "NOWEB"
        assert envelope["payload"]["name"] == "tenant-42"
        assert hit.headers["x-webhook-request-id"] and hit.headers["x-webhook-timestamp"].isdigit()


async def test_waha_session_actions(waha: FakeWahaServer) -> None:
    async with httpx.AsyncClient(base_url=waha.url, headers=WAHA_KEY) as http:
        unpaired = (await http.post("/api/sessions/tenant-7/start")).json()["status"]
        waha.set_session_status("tenant-7", "WORKING")  # the user scanned the QR
        stopped = (await http.post("/api/sessions/tenant-7/stop")).json()["status"]
        restarted = (await http.post("/api/sessions/tenant-7/start")).json()["status"]
        await http.post("/api/sessions/tenant-7/logout")
        logged_out = (await http.post("/api/sessions/tenant-7/start")).json()["status"]
        missing = await http.get("/api/sessions/nope")
    assert [unpaired, stopped, restarted, logged_out] == [
        "SCAN_QR_CODE",
        "STOPPED",
        "WORKING",
        "SCAN_QR_CODE",
    ]
    assert missing.status_code == 404


async def test_waha_send_waits_for_a_session_that_recovers_in_time() -> None:
    async with (
        FakeWahaServer(sessions={"s": "STARTING"}, session_wait=3) as server,
        httpx.AsyncClient(base_url=server.url, headers=WAHA_KEY) as http,
    ):
        pending = asyncio.create_task(http.post("/api/sendText", json=send_text("s")))
        await server.wait_for_requests(1)
        server.set_session_status("s", "WORKING")
        response = await asyncio.wait_for(pending, 5)
    assert response.status_code == 201


async def test_waha_acks_echoes_and_inbound_are_signed(receiver: Receiver) -> None:
    async with FakeWahaServer(
        sessions={"tenant-42": "WORKING"},
        webhook_url=receiver.url,
        webhook_secret=QR_SECRET,
        echo_own_sends=True,
        echo_event="message",
    ) as waha:
        waha.script_acks([3, 2, 2])
        async with httpx.AsyncClient(base_url=waha.url, headers=WAHA_KEY) as http:
            sent = (await http.post("/api/sendText", json=send_text())).json()
        hits = await receiver.wait(4)
        inbound = await waha.send_inbound("Oi", session="tenant-42", reply_to=sent["id"])

    assert all(waha_signed(h, QR_SECRET) for h in receiver.hits)
    events = [(h.json["event"], h.json["payload"].get("ack")) for h in hits]
    assert events == [("message", None), ("message.ack", 3), ("message.ack", 2), ("message.ack", 2)]
    echo = hits[0].json["payload"]
    assert (echo["id"], echo["fromMe"], echo["from"], echo["to"], echo["body"]) == (
        sent["id"],
        True,
        "5511912345678@c.us",
        CHAT,
        "Olá",
    )
    acks = [h.json["payload"] for h in hits[1:]]
    assert acks[0] == {
        "id": sent["id"],
        "from": CHAT,
        "to": "5511912345678@c.us",
        "participant": None,
        "fromMe": True,
        "ack": 3,
        "ackName": "READ",
    }
    assert [a["ackName"] for a in acks[1:]] == ["DEVICE", "DEVICE"]
    message = inbound.json["payload"]
    assert inbound.json["event"] == "message"
    assert message["fromMe"] is False and message["from"] == CHAT
    assert message["id"].startswith(f"false_{CHAT}_") and message["body"] == "Oi"
    assert message["replyTo"] == sent["id"]


async def test_waha_envelope_id_is_stable_across_retries(
    waha: FakeWahaServer, receiver: Receiver
) -> None:
    receiver.answers.append(503)
    delivery = await waha.send_inbound("Oi")
    first, second = await receiver.wait(2)
    assert [a.status for a in delivery.attempts] == [503, 200]
    assert first.body == second.body  # same envelope id and signature
    assert first.headers["x-webhook-request-id"] != second.headers["x-webhook-request-id"]


async def test_waha_hmac_matches_the_reference_vector(
    waha: FakeWahaServer, receiver: Receiver
) -> None:
    assert node_json(json.loads(WAHA_VECTOR)) == WAHA_VECTOR
    assert waha_signature(QR_SECRET, WAHA_VECTOR) == WAHA_VECTOR_HMAC
    await waha.post_webhook("message", "tenant-42", WAHA_VECTOR)
    [hit] = await receiver.wait(1)
    assert hit.body == WAHA_VECTOR
    assert hit.headers["x-webhook-hmac"] == WAHA_VECTOR_HMAC


async def test_waha_typing_and_idempotency_keys(waha: FakeWahaServer) -> None:
    async with httpx.AsyncClient(base_url=waha.url, headers=WAHA_KEY) as http:
        typing = [
            await http.post(f"/api/{action}", json={"session": "tenant-42", "chatId": CHAT})
            for action in ("sendSeen", "startTyping", "stopTyping")
        ]
        key1 = {"Idempotency-Key": "out-1"}
        first = await http.post("/api/sendText", json=send_text(), headers=key1)
        again = await http.post("/api/sendText", json=send_text(), headers=key1)

        waha.script(timeout_after_send())
        key2 = {"Idempotency-Key": "out-2"}
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/api/sendText", json=send_text(), headers=key2, timeout=0.3)
        retried = await http.post("/api/sendText", json=send_text(), headers=key2)

        waha.script(delay(0.5))
        key3 = {"Idempotency-Key": "out-3"}
        slow = asyncio.create_task(http.post("/api/sendText", json=send_text(), headers=key3))
        await waha.wait_for_requests(len(waha.requests) + 1)
        in_flight = await http.post("/api/sendText", json=send_text(), headers=key3)
        slow_done = await asyncio.wait_for(slow, 5)

    assert [(r.status_code, r.content) for r in typing] == [(201, b"")] * 3
    assert [t["action"] for t in waha.typing] == ["sendSeen", "startTyping", "stopTyping"]
    assert first.json() == again.json() and again.status_code == 201
    assert retried.status_code == 201
    assert retried.json()["id"] == waha.sent[1].id and not waha.sent[1].answered
    assert in_flight.status_code == 409 and in_flight.json()["code"] == "duplicate_in_flight"
    assert slow_done.status_code == 201
    assert len(waha.sent) == 3


# --- Evolution API v2 ---------------------------------------------------------------------------

EVO_GLOBAL = {"apikey": "evo-global"}
EVO_TOKEN = {"apikey": "tok-42"}


@pytest.fixture
async def evolution(receiver: Receiver) -> AsyncIterator[FakeEvolutionServer]:
    async with FakeEvolutionServer(
        api_key="evo-global",
        instances={"tenant-42": "open"},
        instance_tokens={"tenant-42": "tok-42"},
        webhook_url=receiver.url + "?secret=s3",
        webhook_headers={"X-Channel-Secret": "s3"},
    ) as server:
        yield server


async def test_evolution_send_text_auth_validation_and_shape(
    evolution: FakeEvolutionServer,
) -> None:
    send = "/message/sendText/tenant-42"
    evolution.not_on_whatsapp.add("5511900000000")
    async with httpx.AsyncClient(base_url=evolution.url) as http:
        no_key = await http.post(send, json={"number": USER_WA_ID, "text": "Oi"})
        wrong = await http.post(
            send, json={"number": USER_WA_ID, "text": "Oi"}, headers={"apikey": "x"}
        )
        by_global = await http.post(
            send, json={"number": "+55 11 98765-4321", "text": "Olá"}, headers=EVO_GLOBAL
        )
        by_token = await http.post(
            send, json={"number": USER_WA_ID, "text": "Oi"}, headers=EVO_TOKEN
        )
        no_text = await http.post(send, json={"number": USER_WA_ID}, headers=EVO_TOKEN)
        unknown = await http.post(
            "/message/sendText/nope", json={"number": USER_WA_ID, "text": "Oi"}, headers=EVO_GLOBAL
        )
        absent = await http.post(
            send, json={"number": "5511900000000", "text": "Oi"}, headers=EVO_TOKEN
        )

    unauthorized = {"status": 401, "error": "Unauthorized", "response": {"message": "Unauthorized"}}
    assert (no_key.status_code, no_key.json()) == (401, unauthorized)
    assert (wrong.status_code, wrong.json()) == (401, unauthorized)
    assert by_global.status_code == 201 and by_token.status_code == 201
    body = by_global.json()
    assert body["key"]["remoteJid"] == f"{USER_WA_ID}@s.whatsapp.net"
    assert body["key"]["fromMe"] is True
    assert re.fullmatch(r"3EB0[0-9A-F]{18}", body["key"]["id"])
    assert (body["status"], body["message"], body["messageType"]) == (
        "PENDING",
        {"conversation": "Olá"},
        "conversation",
    )
    assert no_text.status_code == 400 and "text" in no_text.json()["response"]["message"][0]
    assert unknown.json() == {
        "status": 404,
        "error": "Not Found",
        "response": {"message": ['The "nope" instance does not exist']},
    }
    assert absent.status_code == 400
    assert absent.json()["response"]["message"] == [
        {"jid": "5511900000000@s.whatsapp.net", "exists": False, "number": "5511900000000"}
    ]
    assert [m.id for m in evolution.sent] == [body["key"]["id"], by_token.json()["key"]["id"]]


async def test_evolution_connection_state_gates_sends_and_is_announced(
    evolution: FakeEvolutionServer, receiver: Receiver
) -> None:
    send = "/message/sendText/tenant-42"
    message = {"number": USER_WA_ID, "text": "Oi"}
    async with httpx.AsyncClient(base_url=evolution.url, headers=EVO_TOKEN) as http:
        state = (await http.get("/instance/connectionState/tenant-42")).json()
        evolution.set_instance_state("tenant-42", "close", status_reason=401)
        closed = await http.post(send, json=message)
        qr = (await http.get("/instance/connect/tenant-42")).json()
        connecting = (await http.get("/instance/connectionState/tenant-42")).json()
        still_closed = await http.post(send, json=message)
        evolution.set_instance_state("tenant-42", "open")
        opened = await http.get("/instance/connect/tenant-42")
        accepted = await http.post(send, json=message)

    assert state == {"instance": {"instanceName": "tenant-42", "state": "open"}}
    assert closed.status_code == 400
    assert closed.json() == {
        "status": 400,
        "error": "Bad Request",
        "response": {"message": ["Error: Connection Closed"]},
    }
    assert qr["count"] == 1 and qr["code"].startswith("2@")
    prefix = "data:image/png;base64,"
    assert qr["base64"].startswith(prefix)
    assert base64.b64decode(qr["base64"][len(prefix) :]).startswith(PNG_MAGIC)
    assert connecting["instance"]["state"] == "connecting"
    assert still_closed.status_code == 400
    assert opened.json() == state
    assert accepted.status_code == 201

    updates = await evolution.wait_for_deliveries(3, event="connection.update")
    assert Counter(d.json["data"]["state"] for d in updates) == Counter(
        ["close", "connecting", "open"]
    )
    hits = [h for h in receiver.hits if h.json["event"] == "connection.update"]
    for hit in hits:
        assert hit.headers["x-channel-secret"] == "s3" and hit.query == "secret=s3"
        envelope = hit.json
        assert envelope["instance"] == "tenant-42" and envelope["apikey"] == "tok-42"
        assert envelope["sender"] == "5511912345678@s.whatsapp.net"
        assert envelope["server_url"] == evolution.url
    close = next(d.json["data"] for d in updates if d.json["data"]["state"] == "close")
    assert close == {"instance": "tenant-42", "state": "close", "statusReason": 401}


async def test_evolution_acks_echoes_inbound_and_per_event_urls(receiver: Receiver) -> None:
    async with FakeEvolutionServer(
        instances={"tenant-42": "open"},
        webhook_url=receiver.url,
        webhook_by_events=True,
        echo_own_sends=True,
    ) as evolution:
        evolution.script_acks(["READ", "DELIVERY_ACK", "DELIVERY_ACK"])
        async with httpx.AsyncClient(base_url=evolution.url, headers={"apikey": "evo-key"}) as http:
            sent = (
                await http.post(
                    "/message/sendText/tenant-42", json={"number": USER_WA_ID, "text": "Olá"}
                )
            ).json()
        hits = await receiver.wait(4)
        inbound = await evolution.send_inbound("Oi", remote_jid="13718@lid", push_name="Ana")

    key_id = sent["key"]["id"]
    assert [h.path for h in hits] == ["/hook/messages-upsert"] + ["/hook/messages-update"] * 3
    echo = hits[0].json
    assert echo["event"] == "messages.upsert"
    assert echo["data"]["key"] == {
        "remoteJid": f"{USER_WA_ID}@s.whatsapp.net",
        "fromMe": True,
        "id": key_id,
    }
    acks = [h.json["data"] for h in hits[1:]]
    assert [(a["keyId"], a["status"], a["fromMe"]) for a in acks] == [
        (key_id, "READ", True),
        (key_id, "DELIVERY_ACK", True),
        (key_id, "DELIVERY_ACK", True),
    ]
    assert {a["instanceId"] for a in acks} == {echo["data"]["instanceId"]}
    assert inbound.url == receiver.url + "/messages-upsert"
    data = inbound.json["data"]
    assert data["key"]["fromMe"] is False and data["key"]["remoteJid"] == "13718@lid"
    assert (data["pushName"], data["message"]) == ("Ana", {"conversation": "Oi"})
    assert isinstance(data["messageTimestamp"], int)
    assert "á" in receiver.hits[0].body.decode()  # Node sends raw UTF-8, not \\u escapes


# --- process mode -------------------------------------------------------------------------------


async def test_graph_process_mode(receiver: Receiver) -> None:
    args = ["--token", TOKEN, "--app-secret", APP_SECRET, "--webhook-url", receiver.url]
    with fake_whatsapp_process("graph", args) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            sent = await http.post(SEND, json=text_body(), headers=AUTH)
            await http.post("/_fake/script", json={"kind": "error", "code": 131048})
            spam = await http.post(SEND, json=text_body(), headers=AUTH)
            inbound = await http.post("/_fake/inbound", json={"type": "text", "text": "Oi"})
            await receiver.wait(3)
            recorded = (await http.get("/_fake/requests")).json()["requests"]
    assert sent.status_code == 200 and spam.json()["error"]["code"] == 131048
    assert inbound.json()["outcome"] == "delivered"
    assert all(meta_signed(h) for h in receiver.hits)
    assert len([h for h in receiver.hits if "statuses" in value_of(h)]) == 2
    assert len(recorded) == 2


async def test_waha_process_mode(receiver: Receiver) -> None:
    args = ["--session", "tenant-42", "--hmac-key", QR_SECRET, "--webhook-url", receiver.url]
    with fake_whatsapp_process("waha", args) as url:
        async with httpx.AsyncClient(base_url=url, headers=WAHA_KEY) as http:
            sent = await http.post("/api/sendText", json=send_text())
            switched = await http.put("/_fake/sessions/tenant-42", json={"status": "FAILED"})
            refused = await http.post("/api/sendText", json=send_text())
            await receiver.wait(3)
    assert (sent.status_code, switched.json()["status"], refused.status_code) == (
        201,
        "FAILED",
        422,
    )
    assert all(waha_signed(h, QR_SECRET) for h in receiver.hits)
    assert Counter(h.json["event"] for h in receiver.hits) == {
        "message.ack": 2,
        "session.status": 1,
    }


async def test_evolution_process_mode(receiver: Receiver) -> None:
    args = [
        "--instance",
        "tenant-42",
        "--webhook-header",
        "X-Channel-Secret=s3",
        "--webhook-url",
        receiver.url,
    ]
    with fake_whatsapp_process("evolution", args) as url:
        async with httpx.AsyncClient(base_url=url, headers={"apikey": "evo-key"}) as http:
            message = {"number": USER_WA_ID, "text": "Oi"}
            sent = await http.post("/message/sendText/tenant-42", json=message)
            await http.put("/_fake/instances/tenant-42", json={"state": "close"})
            refused = await http.post("/message/sendText/tenant-42", json=message)
            await receiver.wait(3)
    assert (sent.status_code, refused.status_code) == (201, 400)
    assert {h.headers["x-channel-secret"] for h in receiver.hits} == {"s3"}
    assert Counter(h.json["event"] for h in receiver.hits) == {
        "messages.update": 2,
        "connection.update": 1,
    }
