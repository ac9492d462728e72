"""The gateway's aiohttp application: the only place that wires routes and resources."""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from collections.abc import AsyncIterator
from importlib import resources

from aiohttp import web
from sqlalchemy import text

from chat_domain import get_chatbot_by_widget_key
from chat_pipeline import PipelineSettings, Runtime
from chat_pipeline.processors import schedule_maintenance, start_workers
from chat_pipeline.reconcile import Reconciler
from chat_pipeline.send import ChannelGate
from chat_pipeline.supervision import WorkerSet, first_of
from gateway import admin_api, openapi, webhooks_api, whatsapp, widget  # noqa: F401 (webhooks_api: routes)
from gateway.errors import ApiError, error_middleware
from gateway.keys import hub_key, runtime_key
from gateway.live_hub import LiveHub
from queue_core import Queue
from queue_core.metrics import escape_label_value

__all__ = ["create_app", "settings_key"]

log = logging.getLogger("gateway")

settings_key = web.AppKey("settings", PipelineSettings)
workers_key = web.AppKey("workers", WorkerSet)
# set when the process must stop on its own (a queue worker died); serve() then raises
stop_key = web.AppKey("stop", asyncio.Event)
failure_key = web.AppKey("failure", list[BaseException])

_STATIC = resources.files("gateway") / "static"


async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    app[runtime_key] = await Runtime.start(app[settings_key])
    yield
    await app[runtime_key].close()


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    hub = LiveHub(
        app[runtime_key].redis,
        max_per_ip=settings.ws_max_per_ip,
        send_queue=settings.ws_send_queue,
        send_timeout=settings.ws_send_timeout_s,
    )
    await hub.start()
    app[hub_key] = hub
    yield
    await hub.close()


async def close_sockets(app: web.Application) -> None:
    """Runs before the server waits for its handlers: an open WebSocket would otherwise hold
    shutdown for the whole shutdown timeout and then be cut (1006)."""
    if hub_key in app:
        await app[hub_key].shutdown()


async def workers_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[runtime_key]
    workers = WorkerSet([])
    tasks = []
    if app[settings_key].gateway_role == "all":
        p = rt.pipeline
        await p.configure(p.incoming, p.outgoing, p.maintenance)
        await schedule_maintenance(rt)
        workers = start_workers(rt)
        tasks.append(asyncio.create_task(Reconciler(rt).run(), name="reconciler"))
    app[workers_key] = workers
    tasks.append(asyncio.create_task(_watch(app, workers), name="gateway-workers-watch"))
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await workers.close(10)


async def _watch(app: web.Application, workers: WorkerSet) -> None:
    """A dead queue worker stops the process (to be restarted) rather than leaving a gateway
    that accepts messages nobody processes."""
    error = await workers.failed()
    log.critical("a queue worker of the gateway died (%s); stopping", error)
    app[failure_key].append(error)
    app[stop_key].set()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[runtime_key]
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            await rt.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    try:
        async with asyncio.timeout(2), rt.sessions() as session:
            await session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    workers = request.app[workers_key].health()
    if workers:
        checks["workers"] = "ok" if all(w["healthy"] for w in workers) else "error: unhealthy"
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if ok else "unavailable", "checks": checks, "workers": workers}
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[runtime_key]
    p = rt.pipeline
    queues: list[Queue] = [p.incoming, p.ai, p.outgoing, p.whatsapp_cloud, p.whatsapp_qr]
    body = await render_metrics(queues) + await _channel_metrics(rt)
    return web.Response(
        text=body,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


async def _channel_metrics(rt: Runtime) -> str:
    """Channels that stopped sending (expired token, QR session down): alert on these."""
    stopped = await ChannelGate(rt.redis).stopped()
    lines = [
        "# HELP chat_channel_stopped A channel whose sends are stopped, by the stopping code.",
        "# TYPE chat_channel_stopped gauge",
    ]
    for channel_id, code in stopped.items():
        labels = f'channel_id="{channel_id}",code="{escape_label_value(code[:60])}"'
        lines.append(f"chat_channel_stopped{{{labels}}} 1")
    lines.append("# HELP chat_channels_stopped Channels whose sends are stopped.")
    lines.append("# TYPE chat_channels_stopped gauge")
    lines.append(f"chat_channels_stopped {len(stopped)}")
    return "\n".join(lines) + "\n"


async def render_metrics(queues: list[Queue]) -> str:
    from queue_core.metrics import render_prometheus

    return await render_prometheus(queues)


async def widget_js(request: web.Request) -> web.Response:
    body = (_STATIC / "widget.js").read_text(encoding="utf-8")
    return web.Response(
        text=body,
        content_type="application/javascript",
        headers={"Cache-Control": "public, max-age=300"},
    )


async def demo_page(request: web.Request) -> web.Response:
    rt = request.app[runtime_key]
    key = request.match_info["public_key"]
    async with rt.sessions() as session:
        bot = await get_chatbot_by_widget_key(session, key)
    if bot is None:
        raise ApiError(404, "unknown_key", "no widget with this public key", "public_key")
    page = (_STATIC / "demo.html").read_text(encoding="utf-8")
    page = page.replace("{{PUBLIC_KEY}}", html.escape(key)).replace(
        "{{TITLE}}", html.escape(bot.name)
    )
    return web.Response(text=page, content_type="text/html")


async def landing_page(request: web.Request) -> web.Response:
    """The front door: what runs here and where to go next (no data, no keys)."""
    settings = request.app[settings_key]
    base = html.escape(settings.base_url)
    demo = ""
    if settings.demo_public_key:
        href = html.escape(f"/demo/{settings.demo_public_key}")
        demo = f'<li><a href="{href}">Demo chat</a>: talk to the demo chatbot</li>'
    hint = (
        "Keys are made with <code>gateway-admin bootstrap</code> "
        "or <code>POST /api/v1/api-keys</code>."
    )
    if settings.demo_state_file:
        where = html.escape(settings.demo_state_file)
        hint = (
            f"<code>make run</code> wrote the demo tenant's admin key to <code>{where}</code> "
            "(<code>admin_api_key</code>)."
        )
    page = (_STATIC / "index.html").read_text(encoding="utf-8")
    page = page.replace("{{BASE_URL}}", base).replace("{{DEMO_ITEM}}", demo)
    page = page.replace("{{KEY_HINT}}", hint)
    return web.Response(text=page, content_type="text/html")


# The inbox holds an API key: this origin's script and API only, never inside a frame, and no
# form may submit anywhere (a sign-in form posted without its script would carry the key).
INBOX_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; "
    "style-src 'unsafe-inline'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


async def inbox_page(request: web.Request) -> web.Response:
    """The agent inbox (static; it signs in to /api/v1 with a key the agent pastes)."""
    page = (_STATIC / "inbox.html").read_text(encoding="utf-8")
    return web.Response(text=page, content_type="text/html", headers=INBOX_HEADERS)


async def inbox_js(request: web.Request) -> web.Response:
    body = (_STATIC / "inbox.js").read_text(encoding="utf-8")
    return web.Response(text=body, content_type="application/javascript", headers=INBOX_HEADERS)


async def api_index(request: web.Request) -> web.Response:
    """The admin API's routes with the least role each needs: a reference to read and to test."""
    return web.json_response(
        {
            "routes": [
                {"method": r.method, "path": r.path, "role": r.role, "summary": r.summary}
                for r in admin_api.ROUTES
            ],
            "auth": "Authorization: Bearer <API key>; an operator key names its tenant in "
            "X-Tenant-Id",
        }
    )


async def openapi_json(request: web.Request) -> web.Response:
    doc = openapi.build(request.app[settings_key].base_url)
    return web.json_response(doc)


async def api_docs(request: web.Request) -> web.Response:
    page = (_STATIC / "api.html").read_text(encoding="utf-8")
    return web.Response(text=page, content_type="text/html")


def create_app(settings: PipelineSettings) -> web.Application:
    app = web.Application(
        # The widget's bound; provider webhooks read up to their own, larger one (read_body).
        middlewares=[widget.cors_middleware, error_middleware],
        client_max_size=64 * 1024,
    )
    app[settings_key] = settings
    app[stop_key] = asyncio.Event()
    app[failure_key] = []
    app[widget.cache_key] = widget.WidgetConfigCache()
    app[widget.pending_key] = widget.PendingPosts()
    app.cleanup_ctx.extend([runtime_ctx, hub_ctx, workers_ctx])
    app.on_shutdown.append(close_sockets)
    app.add_routes(widget.routes())
    app[whatsapp.whatsapp_cache_key] = whatsapp.WebhookChannels()
    app[whatsapp.pending_webhooks_key] = whatsapp.PendingWebhooks()
    app.add_routes(whatsapp.routes())
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/widget.js", widget_js),
            web.get("/demo/{public_key}", demo_page),
            web.get("/", landing_page),
            web.get("/inbox", inbox_page),
            web.get("/inbox.js", inbox_js),
            web.get(admin_api.PREFIX, api_index),
            web.get("/openapi.json", openapi_json),
            web.get("/api/docs", api_docs),
        ]
    )
    app.add_routes(admin_api.routes())
    return app


async def serve(settings: PipelineSettings, stop: asyncio.Event) -> None:
    """Run the app until `stop` is set (signals set it); close cleanly. Raises the error of a
    queue worker that died (the process exits non-zero and is restarted). The `workers` role
    binds no port: it is `gateway-workers` under the old name."""
    if settings.gateway_role == "workers":
        from gateway.worker_service import run_workers

        await run_workers(settings, stop)
        return
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info("gateway listening on %s (role %s)", settings.base_url, settings.gateway_role)
    try:
        await first_of(stop.wait(), app[stop_key].wait())
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
    if app[failure_key]:
        raise app[failure_key][0]
