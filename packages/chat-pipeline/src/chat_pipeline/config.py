"""Settings of the platform's services, read from the environment (see docs/configuration.md)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from chat_domain import ConfigError
from chat_domain import Settings as DatabaseSettings

__all__ = ["IPNetwork", "PipelineSettings"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def _networks(env: Mapping[str, str], name: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in re.split(r"[\s,]+", env.get(name) or ""):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ConfigError(f"{name}: {item!r} is not an IP address or CIDR ({exc})") from exc
    return tuple(networks)


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = (env.get(name) or default).strip().lower()
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _per_minute(env: Mapping[str, str], name: str, default: int) -> tuple[int, int]:
    return (_int(env, name, default, 1), 60_000)


@dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    """Everything a service of the platform reads from its environment. Secrets (database URL
    with a password, LLM key, platform secret key) never appear in repr()."""

    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    db: DatabaseSettings = field(default_factory=DatabaseSettings)
    # message handling
    debounce_ms: int = 1500
    max_message_chars: int = 4000
    history_messages: int = 20
    prompt_token_budget: int = 3000
    kb_passages: int = 4
    # AI
    ai_attempts: int = 3
    # this many fallback replies in a row hand the conversation to a person (0: never)
    handoff_after_failures: int = 2
    ai_backoff_ms: int = 1000
    ai_timeout_ms: int = 60_000
    ai_lock_ms: int = 30_000
    stalled_interval_ms: int = 30_000
    queue_lock_ms: int = 30_000  # the gateway's workers' job lease (the AI worker: ai_lock_ms)
    # a job whose worker died this often is failed (then answered by the fallback): a kill or
    # two (a deploy, an OOM) must not cost a visitor the answer
    max_stalls: int = 3
    # the reconciler (chat_pipeline.reconcile): every interval, stored messages the queues owe
    # work for, older than `after` (x requeues + 1), are queued again; after max requeues
    # questions get the fallback reply and undeliverable replies are marked failed
    reconcile_interval_ms: int = 10_000
    reconcile_after_ms: int = 60_000
    reconcile_max_requeues: int = 3
    reconcile_lookback_h: int = 24
    llm_base_url: str = "https://api.openai.com/v1"
    llm_api_key: str = field(default="", repr=False)
    llm_model: str = "gpt-4o-mini"
    llm_timeout_s: float = 30.0
    # WhatsApp channels (docs/channels.md)
    whatsapp_graph_url: str = "https://graph.facebook.com"
    whatsapp_graph_version: str = "v25.0"
    whatsapp_rate_per_s: int = 80  # per phone number, across every sender replica
    qr_rate_per_s: int = 1  # per QR session: gentle, a Baileys number is easy to ban
    qr_typing_ms_per_char: int = 0  # QR: show "typing" this long per character (0: off)
    channel_concurrency: int = 10
    # a send call's time limit; one that runs out after the request went is resolved by status
    # webhooks or a bounded retry, never a blind second send
    whatsapp_send_timeout_s: float = 15.0
    # provider webhooks one gateway process works on at once; beyond it 503 (the provider retries)
    max_pending_webhooks: int = 200
    # messages a minute from one WhatsApp contact before a person gets the conversation
    whatsapp_contact_rate: int = 30
    qr_send_timeout_s: float = 30.0  # WAHA holds a send up to 5 s waiting for its session
    # workers
    incoming_concurrency: int = 20
    outgoing_concurrency: int = 20
    ai_concurrency: int = 10
    # gateway
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    # the landing page's pointers to the demo `make run` made (empty: no demo links)
    demo_public_key: str = ""
    demo_state_file: str = ""
    gateway_role: str = "all"
    # request limits: (count, window ms); see docs/configuration.md for why these defaults
    visitor_rate: tuple[int, int] = (30, 60_000)
    ip_rate: tuple[int, int] = (120, 60_000)
    chatbot_rate: tuple[int, int] = (300, 60_000)
    tenant_rate: tuple[int, int] = (600, 60_000)
    visitor_read_rate: tuple[int, int] = (60, 60_000)
    ip_read_rate: tuple[int, int] = (600, 60_000)
    # peers whose X-Forwarded-For is believed (the TLS proxy / load balancer in front)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    max_pending_posts: int = 100
    # live WebSockets (per gateway process)
    ws_max_per_ip: int = 20
    ws_frame_rate: float = 10.0
    ws_frame_burst: int = 200
    ws_send_queue: int = 256
    ws_send_timeout_s: float = 5.0
    log_level: str = "INFO"
    event_loop: str = "uvloop"  # or "asyncio" (the standard library's loop)

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PipelineSettings:
        env = os.environ if environ is None else environ
        role = env.get("GATEWAY_ROLE", "all")
        if role not in ("all", "http", "workers"):
            raise ConfigError(f"GATEWAY_ROLE must be all, http or workers, got {role!r}")
        return cls(
            redis_url=env.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
            db=DatabaseSettings.from_env(env),
            debounce_ms=_int(env, "PIPELINE_DEBOUNCE_MS", 1500),
            max_message_chars=_int(env, "MAX_MESSAGE_CHARS", 4000, 1),
            history_messages=_int(env, "AI_HISTORY_MESSAGES", 20, 1),
            prompt_token_budget=_int(env, "AI_PROMPT_TOKEN_BUDGET", 3000, 100),
            kb_passages=_int(env, "AI_KB_PASSAGES", 4),
            ai_attempts=_int(env, "AI_ATTEMPTS", 3, 1),
            handoff_after_failures=_int(env, "HANDOFF_AFTER_FAILURES", 2, 0),
            ai_backoff_ms=_int(env, "AI_BACKOFF_MS", 1000),
            ai_timeout_ms=_int(env, "AI_JOB_TIMEOUT_MS", 60_000, 1000),
            ai_lock_ms=_int(env, "AI_LOCK_MS", 30_000, 500),
            stalled_interval_ms=_int(env, "QUEUE_STALLED_INTERVAL_MS", 30_000, 100),
            queue_lock_ms=_int(env, "QUEUE_LOCK_MS", 30_000, 500),
            max_stalls=_int(env, "QUEUE_MAX_STALLS", 3),
            reconcile_interval_ms=_int(env, "RECONCILE_INTERVAL_MS", 10_000, 100),
            reconcile_after_ms=_int(env, "RECONCILE_AFTER_MS", 60_000, 100),
            reconcile_max_requeues=_int(env, "RECONCILE_MAX_REQUEUES", 3),
            reconcile_lookback_h=_int(env, "RECONCILE_LOOKBACK_H", 24, 1),
            llm_base_url=env.get("LLM_BASE_URL") or "https://api.openai.com/v1",
            llm_api_key=env.get("LLM_API_KEY", ""),
            llm_model=env.get("LLM_MODEL") or "gpt-4o-mini",
            llm_timeout_s=_float(env, "LLM_TIMEOUT_S", 30.0),
            whatsapp_graph_url=(
                env.get("WHATSAPP_GRAPH_URL") or "https://graph.facebook.com"
            ).rstrip("/"),
            whatsapp_graph_version=env.get("WHATSAPP_GRAPH_VERSION") or "v25.0",
            whatsapp_rate_per_s=_int(env, "WHATSAPP_RATE_PER_S", 80, 1),
            qr_rate_per_s=_int(env, "QR_RATE_PER_S", 1, 1),
            qr_typing_ms_per_char=_int(env, "QR_TYPING_MS_PER_CHAR", 0),
            channel_concurrency=_int(env, "CHANNEL_CONCURRENCY", 10, 1),
            whatsapp_send_timeout_s=_float(env, "WHATSAPP_SEND_TIMEOUT_S", 15.0),
            max_pending_webhooks=_int(env, "WHATSAPP_MAX_PENDING_WEBHOOKS", 200, 1),
            whatsapp_contact_rate=_int(env, "WHATSAPP_CONTACT_RATE", 30, 1),
            qr_send_timeout_s=_float(env, "QR_SEND_TIMEOUT_S", 30.0),
            incoming_concurrency=_int(env, "INCOMING_CONCURRENCY", 20, 1),
            outgoing_concurrency=_int(env, "OUTGOING_CONCURRENCY", 20, 1),
            ai_concurrency=_int(env, "AI_CONCURRENCY", 10, 1),
            host=env.get("GATEWAY_HOST") or "127.0.0.1",
            port=_int(env, "GATEWAY_PORT", 8080, 0),
            public_url=(env.get("GATEWAY_PUBLIC_URL") or "").rstrip("/"),
            demo_public_key=env.get("DEMO_PUBLIC_KEY", ""),
            demo_state_file=env.get("DEMO_STATE_FILE", ""),
            gateway_role=role,
            visitor_rate=_per_minute(env, "WIDGET_VISITOR_RATE", 30),
            ip_rate=_per_minute(env, "WIDGET_IP_RATE", 120),
            chatbot_rate=_per_minute(env, "WIDGET_CHATBOT_RATE", 300),
            tenant_rate=_per_minute(env, "WIDGET_TENANT_RATE", 600),
            visitor_read_rate=_per_minute(env, "WIDGET_VISITOR_READ_RATE", 60),
            ip_read_rate=_per_minute(env, "WIDGET_IP_READ_RATE", 600),
            trusted_proxies=_networks(env, "GATEWAY_TRUSTED_PROXIES"),
            max_pending_posts=_int(env, "WIDGET_MAX_PENDING_POSTS", 100, 1),
            ws_max_per_ip=_int(env, "WIDGET_WS_MAX_PER_IP", 20, 1),
            ws_frame_rate=_float(env, "WIDGET_WS_FRAME_RATE", 10.0),
            ws_frame_burst=_int(env, "WIDGET_WS_FRAME_BURST", 200, 1),
            ws_send_queue=_int(env, "WIDGET_WS_SEND_QUEUE", 256, 1),
            ws_send_timeout_s=_float(env, "WIDGET_WS_SEND_TIMEOUT_S", 5.0),
            log_level=(env.get("LOG_LEVEL") or "INFO").upper(),
            event_loop=_choice(env, "EVENT_LOOP", "uvloop", ("uvloop", "asyncio")),
        )
