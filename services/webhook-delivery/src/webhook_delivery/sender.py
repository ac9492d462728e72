"""One signed HTTP attempt to a tenant's endpoint: the destination checked and pinned, no
redirects followed, a hard time limit, and only a small excerpt of the answer read."""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass
from datetime import UTC

import httpx

from chat_pipeline.webhooks import (
    Resolver,
    UnsafeDestinationError,
    WebhookSettings,
    resolve_destination,
    signature_header,
)

__all__ = ["EXCERPT_BYTES", "SendResult", "Sender", "parse_retry_after"]

EXCERPT_BYTES = 1024
USER_AGENT = "chatbot-platform-webhooks/1"


@dataclass(frozen=True, slots=True)
class SendResult:
    status_code: int | None  # None: no HTTP answer (refused, unreachable, timed out)
    duration_ms: int
    error: str | None
    excerpt: str | None
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def parse_retry_after(raw: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), else None."""
    if not raw:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


class Sender:
    def __init__(
        self,
        settings: WebhookSettings,
        *,
        resolver: Resolver | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        # Proxies from the environment would connect elsewhere than the checked address.
        self.client = client or httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(settings.timeout_s),
            limits=httpx.Limits(max_connections=settings.concurrency * 2,
                                max_keepalive_connections=settings.concurrency),
        )  # fmt: skip

    async def aclose(self) -> None:
        await self.client.aclose()

    async def send(
        self, url: str, msg_id: str, body: bytes, secrets: tuple[str, ...]
    ) -> SendResult:
        started = time.monotonic()

        def elapsed() -> int:
            return int((time.monotonic() - started) * 1000)

        try:
            dest = await resolve_destination(
                url, self.settings.allow_private_networks, resolver=self.resolver
            )
        except UnsafeDestinationError as exc:
            return SendResult(None, elapsed(), f"refused: {exc}", None)
        timestamp = int(time.time())
        headers = {
            "Host": dest.host_header,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(secrets, msg_id, timestamp, body),
        }
        # Connect to the address that was checked; the name still goes in Host and TLS SNI
        # (and the certificate is verified against the name).
        target = httpx.URL(url).copy_with(host=dest.ip)
        extensions = {"sni_hostname": dest.host} if dest.scheme == "https" else {}
        try:
            async with (
                asyncio.timeout(self.settings.timeout_s),
                self.client.stream(
                    "POST", target, content=body, headers=headers, extensions=extensions
                ) as response,
            ):
                excerpt = bytearray()
                async for chunk in response.aiter_bytes():
                    excerpt += chunk
                    if len(excerpt) >= EXCERPT_BYTES:
                        break
                retry_after = None
                if response.status_code in (429, 502, 503, 504):
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                return SendResult(
                    response.status_code,
                    elapsed(),
                    None,
                    bytes(excerpt[:EXCERPT_BYTES]).decode("utf-8", "replace"),
                    retry_after,
                )
        except (TimeoutError, httpx.TimeoutException):
            limit = f"timed out after {self.settings.timeout_s:g} s"
            return SendResult(None, elapsed(), limit, None)
        except (httpx.HTTPError, OSError) as exc:
            return SendResult(None, elapsed(), f"{type(exc).__name__}: {exc}"[:500], None)
