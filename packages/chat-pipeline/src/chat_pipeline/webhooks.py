"""What the gateway and the webhook-delivery service share about tenant webhooks: settings,
Standard Webhooks signing, the outbound address check (SSRF), and queueing dispatches.

Producers (the message pipeline, the admin API) do::

    async with rt.sessions() as session, session.begin():
        ...  # the change itself
        emitted = await emit_event(session, tenant_id, "message.received", data, dedupe_key=...)
    await enqueue_dispatches(webhook_queue(rt.redis), emitted.dispatches)

The event commits with the change or not at all; a crash before `enqueue_dispatches` is repaired
by the delivery service's relay (the dispatch is pending and overdue), and queueing a dispatch
twice is one job (its id is derived from the event, the endpoint and the dispatch generation).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from chat_domain import ConfigError, DispatchRef
from chat_domain.payloads import WebhookEventJob
from chat_pipeline.config import IPNetwork, _float, _int, _networks
from chat_pipeline.queues import WEBHOOKS
from queue_core import Backoff, BulkJob, JobOptions, KeepJobs, Queue, QueueSettings
from queue_core.types import RedisClient

__all__ = [
    "DEFAULT_RETRY_SCHEDULE_S",
    "Destination",
    "UnsafeDestinationError",
    "WebhookSettings",
    "blocked_reason",
    "enqueue_dispatches",
    "resolve_destination",
    "sign",
    "signature_header",
    "webhook_queue",
]

# Delays before attempts 2..8 (the first is immediate): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_RETRY_SCHEDULE_S: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)


def _schedule(env: Mapping[str, str], name: str) -> tuple[float, ...]:
    raw = env.get(name)
    if not raw:
        return DEFAULT_RETRY_SCHEDULE_S
    try:
        delays = tuple(float(x) for x in re.split(r"[\s,]+", raw.strip()) if x)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a list of seconds, got {raw!r}") from exc
    if any(d < 0 or d != d for d in delays):
        raise ConfigError(f"{name}: delays must be >= 0, got {raw!r}")
    return delays


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    """The WEBHOOK_* environment (docs/configuration.md, docs/webhooks.md)."""

    timeout_s: float = 15.0
    retry_schedule_s: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE_S
    jitter: float = 0.2  # +-20 % on every scheduled delay
    retry_after_cap_s: float = 86_400.0  # a receiver's Retry-After is honoured up to a day
    disable_after_s: float = 5 * 86_400.0  # failing with no success this long: disabled
    rotation_grace_s: float = 86_400.0
    max_payload_bytes: int = 256 * 1024
    allow_private_networks: tuple[IPNetwork, ...] = ()
    concurrency: int = 50  # delivery attempts in flight per service process
    endpoint_concurrency: int = 4  # per endpoint, across every replica (queue group)
    relay_interval_s: float = 5.0
    relay_after_s: float = 60.0  # a pending dispatch overdue this long has lost its job
    relay_batch: int = 500
    lock_ms: int = 60_000  # job lease: well above the request timeout

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebhookSettings:
        env = os.environ if environ is None else environ
        jitter = float(env.get("WEBHOOK_RETRY_JITTER") or 0.2)
        if not 0 <= jitter < 1:
            raise ConfigError(f"WEBHOOK_RETRY_JITTER must be in [0, 1), got {jitter}")
        timeout = _float(env, "WEBHOOK_TIMEOUT_S", 15.0)
        return cls(
            timeout_s=timeout,
            retry_schedule_s=_schedule(env, "WEBHOOK_RETRY_SCHEDULE_S"),
            jitter=jitter,
            retry_after_cap_s=_float(env, "WEBHOOK_RETRY_AFTER_CAP_S", 86_400.0),
            disable_after_s=_float(env, "WEBHOOK_DISABLE_AFTER_S", 5 * 86_400.0),
            rotation_grace_s=_float(env, "WEBHOOK_ROTATION_GRACE_S", 86_400.0),
            max_payload_bytes=_int(env, "WEBHOOK_MAX_PAYLOAD_BYTES", 256 * 1024, 1024),
            allow_private_networks=_networks(env, "WEBHOOK_ALLOW_PRIVATE_NETWORKS"),
            concurrency=_int(env, "WEBHOOK_CONCURRENCY", 50, 1),
            endpoint_concurrency=_int(env, "WEBHOOK_ENDPOINT_CONCURRENCY", 4, 1),
            relay_interval_s=_float(env, "WEBHOOK_RELAY_INTERVAL_S", 5.0),
            relay_after_s=_float(env, "WEBHOOK_RELAY_AFTER_S", 60.0),
            relay_batch=_int(env, "WEBHOOK_RELAY_BATCH", 500, 1),
            lock_ms=max(_int(env, "WEBHOOK_LOCK_MS", 60_000, 1000), int(timeout * 2000)),
        )


# -- signing (Standard Webhooks v1) ----------------------------------------------------------


def _key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body`` keyed with the secret's bytes."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature_header(secrets: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """One signature per active secret, space-separated (a receiver accepts any match)."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets)


# -- where a webhook may go (SSRF) -----------------------------------------------------------


class UnsafeDestinationError(Exception):
    """The URL is not one the platform sends webhooks to (the message says why)."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("100.100.100.200"),  # Alibaba
}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded(ip: IPAddress) -> list[IPAddress]:
    """The address and every IPv4 address hidden inside an IPv6 one (mapped, 6to4, Teredo,
    NAT64): a check on the outer address alone lets ::ffff:127.0.0.1 through."""
    out: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            out.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            out.append(ip.sixtofour)
        if ip.teredo is not None:
            out.append(ip.teredo[1])
        if ip in _NAT64:
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def blocked_reason(ip: IPAddress, allow: Sequence[IPNetwork] = ()) -> str | None:
    """Why the platform refuses to connect to `ip`, or None. Only global unicast addresses are
    allowed, unless the operator's allow-list names the address's network; cloud metadata
    addresses are refused even then."""
    candidates = _embedded(ip)
    if any(c in _METADATA for c in candidates):
        return f"{ip} is a cloud metadata address"
    if any(c.version == n.version and c in n for c in candidates for n in allow):
        return None
    for c in reversed(candidates):  # the embedded IPv4 address names the reason best
        for attribute in ("loopback", "link_local", "multicast", "unspecified", "reserved",
                          "private"):  # fmt: skip
            if getattr(c, f"is_{attribute}"):
                return f"{ip} is a {attribute.replace('_', '-')} address"
        if not c.is_global:
            return f"{ip} is not a public address"
    return None


@dataclass(frozen=True, slots=True)
class Destination:
    """A checked URL and the address it was checked at: connect there and nowhere else (a
    second lookup could answer differently: DNS rebinding)."""

    url: str
    scheme: str
    host: str  # as written in the URL (the Host header and TLS name)
    port: int
    ip: str = field(compare=False)

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


async def resolve_destination(
    url: str, allow: Sequence[IPNetwork] = (), *, resolver: Resolver | None = None
) -> Destination:
    """Check a webhook URL: http(s) only, no credentials, and a host whose addresses include an
    allowed one (the first such is pinned). Raises `UnsafeDestinationError`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeDestinationError(f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeDestinationError("only http and https URLs can receive webhooks")
    if parts.username is not None or parts.password is not None:
        raise UnsafeDestinationError("the URL must not carry credentials")
    host = parts.hostname
    if not host:
        raise UnsafeDestinationError("the URL has no host")
    port = port or (443 if scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = await (resolver or _getaddrinfo)(host, port)
        except (OSError, UnicodeError) as exc:
            raise UnsafeDestinationError(f"{host} does not resolve ({exc})") from None
    reasons = []
    for raw in addresses:
        ip = ipaddress.ip_address(raw.split("%", 1)[0])
        reason = blocked_reason(ip, allow)
        if reason is None:
            return Destination(url, scheme, host, port, str(ip))
        reasons.append(reason)
    raise UnsafeDestinationError(
        f"{host} resolves only to addresses webhooks may not go to: " + "; ".join(reasons[:3])
        if reasons
        else f"{host} has no address"
    )


# -- queueing --------------------------------------------------------------------------------

# A job retries only the service's own failures (database or Redis away); the receiver's
# failures are retried on the webhook schedule through the dispatch row (DelayJob).
_JOB = JobOptions(
    attempts=8,
    backoff=Backoff.exponential(2000, jitter=0.3, max_delay=300_000),
    remove_on_complete=KeepJobs(count=2000, age=3600),
)


def webhook_queue(redis: RedisClient) -> Queue:
    return Queue(WEBHOOKS, redis, default_options=_JOB)


def webhook_queue_settings(endpoint_concurrency: int) -> QueueSettings:
    """One group per endpoint: a slow or failing receiver holds at most this many of the
    workers' slots, and other endpoints keep flowing."""
    return QueueSettings(
        group_concurrency=endpoint_concurrency,
        strict_group_order=False,
        dead_letter_queue=f"{WEBHOOKS}-dlq",
    )


async def enqueue_dispatches(queue: Queue, dispatches: Sequence[DispatchRef]) -> None:
    """Queue one job per dispatch, in one round trip; a dispatch already queued is one job."""
    if not dispatches:
        return
    await queue.add_bulk(
        BulkJob(
            "deliver",
            WebhookEventJob(
                tenant_id=d.tenant_id,
                event_id=d.event_id,
                endpoint_id=d.endpoint_id,
                event_type=d.event_type,
            ).model_dump(mode="json"),
            overrides={"job_id": d.job_id, "group": str(d.endpoint_id)},
        )
        for d in dispatches
    )
