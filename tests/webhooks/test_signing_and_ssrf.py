"""Signatures checked against the Standard Webhooks verification written here from the spec,
and the outbound address check."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress

import pytest

from chat_domain import generate_webhook_secret
from chat_pipeline.webhooks import (
    UnsafeDestinationError,
    WebhookSettings,
    blocked_reason,
    resolve_destination,
    sign,
    signature_header,
)
from webhook_delivery.worker import retry_delay_s


def reference_verify(secret: str, msg_id: str, timestamp: str, body: bytes, header: str) -> bool:
    """The spec's receiver: strip whsec_, base64-decode the key, HMAC-SHA256 over
    f"{id}.{timestamp}.{body}", base64, compare in constant time against any v1 entry."""
    key = base64.b64decode(secret.split("_", 1)[1])
    content = f"{msg_id}.{timestamp}.{body.decode()}".encode()
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    for entry in header.split(" "):
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return True
    return False


# The vector published with the reference libraries (and in docs/webhooks.md).
VECTOR = {
    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
    "timestamp": 1614265330,
    "body": b'{"test": 2432232314}',
    "signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
}


def test_the_published_vector() -> None:
    v = VECTOR
    got = sign(str(v["secret"]), str(v["id"]), int(v["timestamp"]), v["body"])  # type: ignore[call-overload]
    assert got == v["signature"]
    assert reference_verify(str(v["secret"]), str(v["id"]), str(v["timestamp"]),
                            v["body"], got)  # type: ignore[arg-type]  # fmt: skip


def test_generated_secrets_sign_what_the_reference_verifies_and_nothing_else() -> None:
    old, new = generate_webhook_secret(), generate_webhook_secret()
    assert old != new and len(base64.b64decode(new[6:])) == 32
    body = b'{"type":"message.received","data":{"text":"h\xc3\xa9"}}'
    header = signature_header([new, old], "evt_1", 1700000000, body)
    assert len(header.split(" ")) == 2  # rotation: both keys sign
    assert reference_verify(new, "evt_1", "1700000000", body, header)
    assert reference_verify(old, "evt_1", "1700000000", body, header)
    assert not reference_verify(generate_webhook_secret(), "evt_1", "1700000000", body, header)
    assert not reference_verify(new, "evt_1", "1700000001", body, header)
    assert not reference_verify(new, "evt_1", "1700000000", body + b" ", header)


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def resolver_to(*addresses: str):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


@pytest.mark.parametrize(
    ("url", "addresses", "why"),
    [
        ("http://evil.example/h", ["127.0.0.1"], "loopback"),
        ("http://evil.example/h", ["10.1.2.3"], "private"),
        ("http://evil.example/h", ["::ffff:10.0.0.1"], "private"),
        ("http://[::ffff:127.0.0.1]/h", [], "loopback"),
        ("http://[::ffff:a9fe:a9fe]/h", [], "metadata"),
        ("http://169.254.169.254/latest/meta-data/", [], "metadata"),
        ("http://[fd00:ec2::254]/", [], "metadata"),
        ("http://100.64.0.1/", [], "not a public"),
        ("http://[64:ff9b::7f00:1]/", [], "loopback"),
        ("http://0.0.0.0:8080/", [], "unspecified"),
        ("http://224.0.0.1/", [], "multicast"),
        ("http://[fe80::1]/", [], "link-local"),
        ("file:///etc/passwd", [], "only http and https"),
        ("gopher://example.com/", [], "only http and https"),
        ("http://user:pw@example.com/", ["93.184.216.34"], "credentials"),
        ("http://:80/", [], "no host"),
    ],
)
async def test_destinations_that_are_refused(url: str, addresses: list[str], why: str) -> None:
    with pytest.raises(UnsafeDestinationError, match=why):
        await resolve_destination(url, resolver=resolver_to(*addresses))


async def test_the_allow_list_opens_loopback_but_never_metadata() -> None:
    dest = await resolve_destination(
        "http://hooks.internal:8080/x", LOOPBACK, resolver=resolver_to("127.0.0.1")
    )
    assert (dest.ip, dest.host_header) == ("127.0.0.1", "hooks.internal:8080")
    everything = (ipaddress.ip_network("0.0.0.0/0"),)
    with pytest.raises(UnsafeDestinationError, match="metadata"):
        await resolve_destination("http://169.254.169.254/", everything)
    assert blocked_reason(ipaddress.ip_address("10.0.0.1"), everything) is None


async def test_a_public_address_is_pinned_among_private_ones() -> None:
    dest = await resolve_destination(
        "https://mixed.example/h", resolver=resolver_to("10.0.0.5", "93.184.216.34")
    )
    assert dest.ip == "93.184.216.34" and dest.host_header == "mixed.example"


async def test_the_real_resolver_refuses_localhost() -> None:
    with pytest.raises(UnsafeDestinationError, match="loopback"):
        await resolve_destination("http://localhost:9/hook")


def test_the_retry_schedule_with_jitter_and_retry_after() -> None:
    s = WebhookSettings()
    assert retry_delay_s(s, 1, None, rand=lambda: 0.5) == 5
    assert retry_delay_s(s, 2, None, rand=lambda: 0.0) == pytest.approx(240)
    assert retry_delay_s(s, 7, None, rand=lambda: 1.0) == pytest.approx(43200)
    assert retry_delay_s(s, 8, None) is None  # 8 attempts in all
    assert retry_delay_s(s, 1, 120, rand=lambda: 0.5) == 120  # the receiver asked for longer
    assert retry_delay_s(s, 3, 1, rand=lambda: 0.5) == 1800  # never shorter than the schedule
    assert retry_delay_s(s, 1, 10**9, rand=lambda: 0.5) == s.retry_after_cap_s
