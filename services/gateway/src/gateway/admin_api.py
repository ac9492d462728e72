"""The tenant admin API under /api/v1: chatbots, channels, knowledge, conversations (the agent
inbox's handoff), API keys and usage for a tenant's keys; tenants, plans and raw queue jobs for
the operator's.

Every route is declared once in `ROUTES` with the least role it needs and its scope; the wrapper
authenticates (`Authorization: Bearer cbk_...`), checks the role and fixes the tenant before the
handler runs, so no handler can forget either. A handler reaches a row only through `_owned`,
which answers 404 for another tenant's ids exactly as for ids that do not exist. Path ids are
resolved before a body is read: a key of tenant A learns nothing about B's ids from a 400.
Errors have the widget's shape: {"error": {"code", "message", "field"}}.
"""

from __future__ import annotations

import base64
import binascii
import html.parser
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from sqlalchemy.exc import IntegrityError

from chat_domain import (
    ApiKeyView,
    ChatbotView,
    ConversationSummary,
    ConversationView,
    DocumentView,
    MessageView,
    PlanView,
    TenantView,
    create_api_key,
    create_chatbot,
    create_plan,
    create_tenant,
    delete_document,
    get_channel,
    get_chatbot,
    get_contact,
    get_conversation,
    get_document_owner,
    get_plan,
    get_plan_by_name,
    get_queue_priority,
    get_tenant,
    ingest_document,
    list_api_keys,
    list_chatbots,
    list_conversations,
    list_documents,
    list_plans,
    list_tenants,
    messages_since,
    monthly_totals,
    revoke_api_key,
    set_chatbot_secrets,
    set_conversation_status,
    store_reply,
    unanswered_messages,
    update_chatbot,
    verify_api_key,
)
from chat_domain.errors import AlreadyAnsweredError
from chat_domain.payloads import IncomingMessage, OutgoingMessage
from chat_domain.types import CONVERSATION_STATUSES, ApiKeyRole, ConversationStatus, QrService
from chat_pipeline import Runtime
from chat_pipeline.events import conversation_status_data
from chat_pipeline.send import ChannelGate
from gateway.channel_ops import AdminError, ChannelOps, CloudUpdate, QrUpdate
from gateway.errors import ApiError
from gateway.keys import runtime_key
from gateway.whatsapp import read_body
from queue_core.errors import SerializationError

PREFIX = "/api/v1"
ROLE_RANK: dict[ApiKeyRole, int] = {"agent": 1, "admin": 2, "operator": 3}
DOCUMENT_MAX_BYTES = 2 * 1024 * 1024
MAX_PAGE = 200


@dataclass(frozen=True, slots=True)
class Ctx:
    """Who calls, and the tenant they act on (None on the operator's platform routes)."""

    rt: Runtime
    key: ApiKeyView
    tenant_id: uuid.UUID | None

    @property
    def tenant(self) -> uuid.UUID:
        assert self.tenant_id is not None  # (tenant routes only)
        return self.tenant_id


Handler = Callable[[web.Request, Ctx], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter, for the OpenAPI document."""

    name: str
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    role: ApiKeyRole  # the least role that may call it
    scope: Literal["tenant", "platform"]
    summary: str
    body: Any = None  # the request body's pydantic model (or TypeAdapter), for the docs
    query: tuple[Param, ...] = ()
    created: bool = False  # answers 201 (else 200, or 204 for DELETE)


ROUTES: list[Route] = []


def route(
    method: str,
    path: str,
    role: ApiKeyRole,
    summary: str,
    scope: Literal["tenant", "platform"] = "tenant",
    *,
    body: Any = None,
    query: tuple[Param, ...] = (),
    created: bool = False,
) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        full = path if path.startswith("/api/") else PREFIX + path
        ROUTES.append(Route(method, full, handler, role, scope, summary, body, query, created))
        return handler

    return register


_ID = {"type": "string", "format": "uuid"}
_LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": 200}, "page size")


# -- plumbing --------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_NAIVE_UTC),
        status=status,
        content_type="application/json",
    )


async def _authenticate(request: web.Request, rt: Runtime) -> ApiKeyView:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "unauthorized", "send an API key: Authorization: Bearer cbk_...", "Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    async with rt.sessions() as session, session.begin():
        key = await verify_api_key(session, token.strip())
    if key is None:
        raise ApiError(
            401, "unauthorized", "this API key is not valid or was revoked", "Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    return key


async def _tenant_for(request: web.Request, rt: Runtime, key: ApiKeyView) -> uuid.UUID:
    """A tenant key acts on its own tenant; an operator key only on one it names."""
    if key.role != "operator":
        assert key.tenant_id is not None
        tenant_id = key.tenant_id
    else:
        named = request.headers.get("X-Tenant-Id")
        if not named:
            raise ApiError(
                403, "tenant_required",
                "an operator key acts on a tenant's data only when it names the tenant",
                "X-Tenant-Id",
            )  # fmt: skip
        tenant_id = _uuid_or_404(named, "X-Tenant-Id", "tenant")
    async with rt.sessions() as session:
        tenant = await get_tenant(session, tenant_id)
    if tenant is None:
        raise ApiError(404, "not_found", "no such tenant", "X-Tenant-Id")
    if tenant.status != "active":
        raise ApiError(403, "tenant_suspended", "this tenant is suspended")
    return tenant_id


def _wrap(r: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        rt = request.app[runtime_key]
        key = await _authenticate(request, rt)
        if ROLE_RANK[key.role] < ROLE_RANK[r.role]:
            raise ApiError(403, "forbidden", f"this needs an {r.role} key")
        tenant_id = await _tenant_for(request, rt, key) if r.scope == "tenant" else None
        try:
            return await r.handler(request, Ctx(rt, key, tenant_id))
        except AdminError as exc:
            raise ApiError(exc.status, exc.code, str(exc), exc.field) from None

    handle.__name__ = r.handler.__name__
    return handle


def routes() -> list[web.RouteDef]:
    return [web.route(r.method, r.path, _wrap(r)) for r in ROUTES]


def _uuid_or_404(raw: str, field: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(404, "not_found", f"no such {what}", field) from None


def _path_id(request: web.Request, name: str) -> uuid.UUID:
    return _uuid_or_404(request.match_info[name], name, name.removesuffix("_id"))


M = TypeVar("M", bound=BaseModel)


def _field_of(exc: ValidationError) -> tuple[str | None, str]:
    first = exc.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    return (loc or None), first["msg"]


async def _body(request: web.Request, model: type[M], limit: int = 64 * 1024) -> M:
    raw = await read_body(request, limit)
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    nul = _nul_at(data)
    if nul is not None:  # PostgreSQL cannot store U+0000 in text (a 500 there); no field needs it
        raise ApiError(400, "invalid", "text must not contain NUL characters", nul or None)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        field, message = _field_of(exc)
        raise ApiError(400, "invalid", message, field) from None


def _nul_at(data: Any) -> str | None:
    """The dotted path of the first string (key or value) holding U+0000, else None."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                here = f"{path}.{key}" if path else str(key)
                if "\x00" in str(key):
                    return here
                stack.append((here, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value))
    return None


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid", f"{name} must be a whole number", name) from None
    if not low <= value <= high:
        raise ApiError(400, "invalid", f"{name} must be between {low} and {high}", name)
    return value


def _query_uuid(request: web.Request, name: str) -> uuid.UUID | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "invalid", f"{name} must be an id (a UUID)", name) from None


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Text = Annotated[str, StringConstraints(max_length=20_000)]
Secret = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Url = Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2000)]
Phrase = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Origin = Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+$", max_length=300)]


# -- views -----------------------------------------------------------------------------------


def _chatbot(bot: ChatbotView, base_url: str) -> dict[str, Any]:
    out = asdict(bot)
    out["widget_snippet"] = (
        f'<script src="{base_url}/widget.js" data-key="{bot.widget_public_key}" async></script>'
    )
    out["demo_url"] = f"{base_url}/demo/{bot.widget_public_key}"
    return out


def _conversation(c: ConversationView) -> dict[str, Any]:
    return asdict(c)


def _summary(s: ConversationSummary) -> dict[str, Any]:
    return {
        **asdict(s.conversation),
        "contact": {"external_id": s.contact_external_id, "name": s.contact_name},
    }


def _message(m: MessageView) -> dict[str, Any]:
    return {
        "id": m.id,
        "seq": m.seq,
        "role": m.role,
        "text": m.text,
        "status": m.status,
        "error_code": m.error_code,
        "created_at": m.created_at,
        "status_updated_at": m.status_updated_at,
        "attachment": m.attachment,
        "answered_by": m.reply_id,
    }


def _key(k: ApiKeyView) -> dict[str, Any]:
    return asdict(k)


def _plan(p: PlanView) -> dict[str, Any]:
    return {**asdict(p), "queue_priority": p.queue_priority.priority}


def _tenant(t: TenantView) -> dict[str, Any]:
    return asdict(t)


def _document(d: DocumentView) -> dict[str, Any]:
    return asdict(d)


# -- ownership: another tenant's row is "not found" ------------------------------------------


async def _own_chatbot(ctx: Ctx, chatbot_id: uuid.UUID, field: str = "chatbot_id") -> ChatbotView:
    async with ctx.rt.sessions() as session:
        bot = await get_chatbot(session, chatbot_id)
    if bot is None or bot.tenant_id != ctx.tenant:
        raise ApiError(404, "not_found", "no such chatbot", field)
    return bot


async def _own_conversation(ctx: Ctx, conversation_id: uuid.UUID) -> ConversationView:
    async with ctx.rt.sessions() as session:
        conversation = await get_conversation(session, conversation_id)
    if conversation is None or conversation.tenant_id != ctx.tenant:
        raise ApiError(404, "not_found", "no such conversation", "conversation_id")
    return conversation


def _ops(ctx: Ctx) -> ChannelOps:
    return ChannelOps(
        ctx.rt.sessions, ctx.rt.box, ChannelGate(ctx.rt.redis), ctx.rt.settings.base_url
    )


async def _own_channel(ctx: Ctx, channel_id: uuid.UUID) -> None:
    async with ctx.rt.sessions() as session:
        channel = await get_channel(session, channel_id)
    if channel is None or channel.tenant_id != ctx.tenant:
        raise ApiError(404, "not_found", "no such channel", "channel_id")


# -- who am I --------------------------------------------------------------------------------


@route("GET", "/me", "agent", "The calling key and its tenant")
async def me(request: web.Request, ctx: Ctx) -> web.Response:
    async with ctx.rt.sessions() as session:
        tenant = await get_tenant(session, ctx.tenant)
        plan = None if tenant is None else await get_plan(session, tenant.plan_id)
    return _json(
        {
            "key": _key(ctx.key),
            "tenant": None if tenant is None else _tenant(tenant),
            "plan": None if plan is None else _plan(plan),
        }
    )


# -- chatbots --------------------------------------------------------------------------------


class ChatbotIn(_In):
    name: Name
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    system_prompt: Text = ""
    provider_base_url: Url | None = None
    provider_api_key: Secret | None = None
    temperature: float = Field(default=0.3, ge=0, le=2)
    max_tokens: int = Field(default=512, ge=1, le=32_000)
    fallback_reply: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None
    limit_reply: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None
    kb_enabled: bool = True
    allowed_origins: list[Origin] = Field(default_factory=list, max_length=50)
    identity_secret: Secret | None = None
    handoff_phrases: list[Phrase] | None = Field(default=None, max_length=30)
    handoff_reply: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None


class ChatbotPatch(_In):
    name: Name | None = None
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    system_prompt: Text | None = None
    provider_base_url: Url | None = None
    provider_api_key: Secret | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1, le=32_000)
    fallback_reply: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None
    limit_reply: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None
    kb_enabled: bool | None = None
    allowed_origins: list[Origin] | None = Field(default=None, max_length=50)
    identity_secret: Secret | None = None
    handoff_phrases: list[Phrase] | None = Field(default=None, max_length=30)
    handoff_reply: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None
    remove_provider_api_key: bool = False
    remove_identity_secret: bool = False


@route("GET", "/chatbots", "agent", "The tenant's chatbots")
async def chatbots_list(request: web.Request, ctx: Ctx) -> web.Response:
    async with ctx.rt.sessions() as session:
        bots = await list_chatbots(session, ctx.tenant)
    base = ctx.rt.settings.base_url
    return _json({"items": [_chatbot(b, base) for b in bots]})


@route("POST", "/chatbots", "admin", "Create a chatbot (and its widget channel)",
       body=ChatbotIn, created=True)  # fmt: skip
async def chatbots_create(request: web.Request, ctx: Ctx) -> web.Response:
    body = await _body(request, ChatbotIn)
    values = body.model_dump(exclude_none=True)
    values["model"] = values.get("model") or ctx.rt.settings.llm_model
    async with ctx.rt.sessions() as session, session.begin():
        bot = await create_chatbot(session, ctx.rt.box, tenant_id=ctx.tenant, **values)
    await _ops(ctx).add_widget(bot.id)  # a chatbot answers on its widget from the start
    return _json(_chatbot(bot, ctx.rt.settings.base_url), 201)


@route("GET", "/chatbots/{chatbot_id}", "agent", "One chatbot")
async def chatbots_get(request: web.Request, ctx: Ctx) -> web.Response:
    bot = await _own_chatbot(ctx, _path_id(request, "chatbot_id"))
    return _json(_chatbot(bot, ctx.rt.settings.base_url))


@route("PATCH", "/chatbots/{chatbot_id}", "admin", "Change a chatbot; secrets are write-only",
       body=ChatbotPatch)  # fmt: skip
async def chatbots_update(request: web.Request, ctx: Ctx) -> web.Response:
    bot = await _own_chatbot(ctx, _path_id(request, "chatbot_id"))
    body = await _body(request, ChatbotPatch)
    secrets: dict[str, str | None] = {}
    if body.provider_api_key is not None or body.remove_provider_api_key:
        secrets["provider_api_key"] = body.provider_api_key
    if body.identity_secret is not None or body.remove_identity_secret:
        secrets["identity_secret"] = body.identity_secret
    changes = body.model_dump(
        exclude_none=True,
        exclude={
            "provider_api_key",
            "identity_secret",
            "remove_provider_api_key",
            "remove_identity_secret",
        },
    )
    async with ctx.rt.sessions() as session, session.begin():
        if changes:
            bot = await update_chatbot(session, bot.id, **changes)
        if secrets:
            bot = await set_chatbot_secrets(session, ctx.rt.box, bot.id, **secrets)
    return _json(_chatbot(bot, ctx.rt.settings.base_url))


# -- knowledge -------------------------------------------------------------------------------


class DocumentIn(_In):
    title: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
    text: Annotated[str, StringConstraints(min_length=1, max_length=DOCUMENT_MAX_BYTES)]
    format: Literal["text", "markdown", "html"] = "text"
    source: Annotated[str, StringConstraints(max_length=1000)] | None = None


class _TextOfHtml(html.parser.HTMLParser):
    """The readable text of an HTML page: script and style dropped, blocks on their own lines."""

    _SKIP = frozenset({"script", "style", "noscript", "template", "head"})
    _BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_text(page: str) -> str:
    parser = _TextOfHtml()
    parser.feed(page)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


@route("GET", "/chatbots/{chatbot_id}/documents", "agent", "A chatbot's knowledge documents")
async def documents_list(request: web.Request, ctx: Ctx) -> web.Response:
    bot = await _own_chatbot(ctx, _path_id(request, "chatbot_id"))
    async with ctx.rt.sessions() as session:
        docs = await list_documents(session, bot.id)
    return _json({"items": [_document(d) for d in docs]})


@route("POST", "/chatbots/{chatbot_id}/documents", "admin", "Add a knowledge document",
       body=DocumentIn, created=True)  # fmt: skip
async def documents_create(request: web.Request, ctx: Ctx) -> web.Response:
    bot = await _own_chatbot(ctx, _path_id(request, "chatbot_id"))
    body = await _body(request, DocumentIn, limit=DOCUMENT_MAX_BYTES + 64 * 1024)
    text = html_text(body.text) if body.format == "html" else body.text
    if not text.strip():
        raise ApiError(400, "invalid", "the document has no text", "text")
    async with ctx.rt.sessions() as session, session.begin():
        doc = await ingest_document(
            session, chatbot_id=bot.id, title=body.title, text=text, source=body.source
        )
    return _json(_document(doc), 201)


@route("DELETE", "/documents/{document_id}", "admin", "Delete a knowledge document")
async def documents_delete(request: web.Request, ctx: Ctx) -> web.Response:
    document_id = _path_id(request, "document_id")
    async with ctx.rt.sessions() as session, session.begin():
        owner = await get_document_owner(session, document_id)
        if owner != ctx.tenant:
            raise ApiError(404, "not_found", "no such document", "document_id")
        await delete_document(session, document_id)
    return web.Response(status=204)


# -- channels --------------------------------------------------------------------------------


class WidgetChannelIn(_In):
    kind: Literal["widget"]
    chatbot_id: uuid.UUID


class CloudChannelIn(_In):
    kind: Literal["whatsapp_cloud"]
    chatbot_id: uuid.UUID
    phone_number_id: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    access_token: Secret
    app_secret: Secret
    verify_token: Annotated[str, StringConstraints(min_length=8, max_length=200)] | None = None


class QrChannelIn(_In):
    kind: Literal["whatsapp_qr"]
    chatbot_id: uuid.UUID
    service: QrService
    base_url: Url
    session: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    api_key: Secret | None = None


class ChannelIn(BaseModel):
    channel: Annotated[WidgetChannelIn | CloudChannelIn | QrChannelIn, Field(discriminator="kind")]


CHANNEL_BODY: TypeAdapter[WidgetChannelIn | CloudChannelIn | QrChannelIn] = TypeAdapter(
    Annotated[WidgetChannelIn | CloudChannelIn | QrChannelIn, Field(discriminator="kind")]
)


class ChannelPatch(_In):
    phone_number_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    access_token: Secret | None = None
    app_secret: Secret | None = None
    base_url: Url | None = None
    session: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    api_key: Secret | None = None


@route("GET", "/channels", "agent", "The tenant's channels, with their sending state",
       query=(Param("chatbot_id", _ID, "only this chatbot's"),))  # fmt: skip
async def channels_list(request: web.Request, ctx: Ctx) -> web.Response:
    chatbot_id = _query_uuid(request, "chatbot_id")
    items = await _ops(ctx).list(tenant_id=ctx.tenant, chatbot_id=chatbot_id)
    return _json({"items": items})


@route("POST", "/channels", "admin", "Connect a channel; its webhook secret is shown once",
       body=CHANNEL_BODY, created=True)  # fmt: skip
async def channels_create(request: web.Request, ctx: Ctx) -> web.Response:
    raw = await _body(request, _Raw)
    try:
        spec = ChannelIn.model_validate({"channel": raw.model_dump()}).channel
    except ValidationError as exc:
        field, message = _field_of(exc)
        field = (field or "").removeprefix("channel").lstrip(".")
        # (the discriminator's member name is noise for the caller: drop it)
        field = field.split(".", 1)[1] if field.split(".", 1)[0] in _KINDS else field
        raise ApiError(400, "invalid", message, field or "kind") from None
    await _own_chatbot(ctx, spec.chatbot_id)
    ops = _ops(ctx)
    if isinstance(spec, WidgetChannelIn):
        return _json(await ops.add_widget(spec.chatbot_id), 201)
    if isinstance(spec, CloudChannelIn):
        created = await ops.add_cloud(
            spec.chatbot_id,
            phone_number_id=spec.phone_number_id,
            access_token=spec.access_token,
            app_secret=spec.app_secret,
            verify_token=spec.verify_token,
        )
    else:
        created = await ops.add_qr(
            spec.chatbot_id,
            service=spec.service,
            base_url=spec.base_url,
            session=spec.session,
            api_key=spec.api_key,
        )
    return _json(created, 201)


_KINDS = ("widget", "whatsapp_cloud", "whatsapp_qr")


class _Raw(BaseModel):
    model_config = ConfigDict(extra="allow")


@route("GET", "/channels/{channel_id}", "agent", "One channel")
async def channels_get(request: web.Request, ctx: Ctx) -> web.Response:
    channel_id = _path_id(request, "channel_id")
    await _own_channel(ctx, channel_id)
    ops = _ops(ctx)
    return _json(await ops.show(await ops.get(channel_id)))


@route("PATCH", "/channels/{channel_id}", "admin", "New token, secret, number or QR service",
       body=ChannelPatch)  # fmt: skip
async def channels_update(request: web.Request, ctx: Ctx) -> web.Response:
    channel_id = _path_id(request, "channel_id")
    await _own_channel(ctx, channel_id)
    body = await _body(request, ChannelPatch)
    ops = _ops(ctx)
    current = await ops.get(channel_id)
    given = body.model_dump(exclude_none=True)
    fits = {
        "whatsapp_cloud": {"phone_number_id", "access_token", "app_secret"},
        "whatsapp_qr": {"base_url", "session", "api_key"},
    }.get(current.kind, set())
    for name in given:
        if name not in fits:
            raise ApiError(400, "invalid", f"a {current.kind} channel has no {name}", name)
    change = (
        CloudUpdate(body.phone_number_id, body.access_token, body.app_secret)
        if current.kind == "whatsapp_cloud"
        else QrUpdate(body.base_url, body.session, body.api_key)
    )
    return _json(await ops.update(channel_id, change))


@route("POST", "/channels/{channel_id}/disable", "admin", "Stop a channel (webhooks and sends)")
async def channels_disable(request: web.Request, ctx: Ctx) -> web.Response:
    channel_id = _path_id(request, "channel_id")
    await _own_channel(ctx, channel_id)
    return _json(await _ops(ctx).set_active(channel_id, False))


@route("POST", "/channels/{channel_id}/enable", "admin", "Start a disabled channel again")
async def channels_enable(request: web.Request, ctx: Ctx) -> web.Response:
    channel_id = _path_id(request, "channel_id")
    await _own_channel(ctx, channel_id)
    return _json(await _ops(ctx).set_active(channel_id, True))


_FORMAT = Param("format", {"type": "string", "enum": ["json", "png"]}, "png: the image")


@route("GET", "/channels/{channel_id}/qr", "admin", "A QR channel's session and pairing QR",
       query=(_FORMAT,))  # fmt: skip
async def channels_qr(request: web.Request, ctx: Ctx) -> web.Response:
    """Proxied from the QR service at each call (the QR changes every ~20 s); `?format=png`
    answers the image itself, for an <img> tag."""
    channel_id = _path_id(request, "channel_id")
    await _own_channel(ctx, channel_id)
    info = await _ops(ctx).pairing(channel_id, timeout=ctx.rt.settings.qr_send_timeout_s)
    if request.query.get("format") == "png":
        if info.image is None:
            raise ApiError(409, "no_qr", f"no pairing QR now (session {info.state})")
        return web.Response(
            body=info.image,
            content_type=info.content_type or "image/png",
            headers={"Cache-Control": "no-store"},
        )
    return _json(info.as_json())


# -- conversations and handoff ---------------------------------------------------------------


def _cursor(summary: ConversationSummary) -> str:
    c = summary.conversation
    raw = f"{c.last_activity_at.isoformat()}|{c.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_cursor(raw: str) -> tuple[datetime, uuid.UUID]:
    try:
        decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        at, _, ident = decoded.partition("|")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:  # (ours carry UTC's offset; the column refuses naive times)
            raise ValueError(at)
        return when, uuid.UUID(ident)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid", "cursor is not one this API gave", "cursor") from None


def _statuses(raw: str | None) -> tuple[ConversationStatus, ...]:
    if not raw:
        return ()
    out: list[ConversationStatus] = []
    for item in raw.split(","):
        if item not in CONVERSATION_STATUSES:
            raise ApiError(
                400, "invalid", f"status must be among {', '.join(CONVERSATION_STATUSES)}",
                "status",
            )  # fmt: skip
        out.append(item)  # type: ignore[arg-type]  # (checked against the Literal's values)
    return tuple(out)


@route(
    "GET", "/conversations", "agent", "Conversations, most recent first (filters, cursor)",
    query=(
        Param("status", {"type": "string"}, "comma-separated: open, pending_human, resolved"),
        Param("channel_id", _ID), Param("chatbot_id", _ID),
        Param("q", {"type": "string", "maxLength": 200}, "in the contact or any message text"),
        Param("since", {"type": "string", "format": "date-time"}, "active since"),
        Param("cursor", {"type": "string"}, "next_cursor of the previous page"), _LIMIT,
    ),
)  # fmt: skip
async def conversations_list(request: web.Request, ctx: Ctx) -> web.Response:
    limit = _query_int(request, "limit", 50, 1, MAX_PAGE)
    since_raw = request.query.get("since")
    since = None
    if since_raw:
        try:
            since = datetime.fromisoformat(since_raw)
        except ValueError:
            raise ApiError(400, "invalid", "since must be an ISO 8601 time", "since") from None
        # the column type takes aware times only; a time without a zone is read as UTC
        since = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
    cursor = request.query.get("cursor")
    q = request.query.get("q") or None
    if q is not None and len(q) > 200:
        raise ApiError(400, "invalid", "q is at most 200 characters", "q")
    async with ctx.rt.sessions() as session:
        rows = await list_conversations(
            session,
            tenant_id=ctx.tenant,
            statuses=_statuses(request.query.get("status")),
            channel_id=_query_uuid(request, "channel_id"),
            chatbot_id=_query_uuid(request, "chatbot_id"),
            contains=q,
            since=since,
            before=_parse_cursor(cursor) if cursor else None,
            limit=limit,
        )
    return _json(
        {
            "items": [_summary(r) for r in rows],
            "next_cursor": _cursor(rows[-1]) if len(rows) == limit else None,
        }
    )


@route(
    "GET", "/conversations/{conversation_id}", "agent", "A conversation and its messages",
    query=(Param("after_seq", {"type": "integer", "minimum": 0}, "the last seq seen"), _LIMIT),
)  # fmt: skip
async def conversations_get(request: web.Request, ctx: Ctx) -> web.Response:
    """Messages in order after `after_seq` (the last `seq` seen): poll with it for new ones."""
    conversation = await _own_conversation(ctx, _path_id(request, "conversation_id"))
    after = _query_int(request, "after_seq", 0, 0, 2**62)
    limit = _query_int(request, "limit", 100, 1, MAX_PAGE)
    async with ctx.rt.sessions() as session:
        contact = await get_contact(session, conversation.contact_id)
        messages = await messages_since(session, conversation.id, after_seq=after, limit=limit)
    return _json(
        {
            **_conversation(conversation),
            "contact": None
            if contact is None
            else {"external_id": contact.external_id, "name": contact.display_name},
            "messages": [_message(m) for m in messages],
            "next_after_seq": messages[-1].seq if messages else after,
        }
    )


async def _set_status(ctx: Ctx, conversation: ConversationView, status: ConversationStatus) -> None:
    if conversation.status == "resolved" and status != "resolved":
        raise ApiError(409, "resolved", "the conversation is resolved", "conversation_id")
    dispatches = []
    async with ctx.rt.sessions() as session, session.begin():
        await set_conversation_status(session, conversation.id, status)
        if status != conversation.status:
            data = conversation_status_data(conversation.id, status, conversation.status, "agent")
            dispatches = await ctx.rt.events.emit(
                session, ctx.tenant, "conversation.status_changed", data
            )
    await ctx.rt.events.send(dispatches)


@route("POST", "/conversations/{conversation_id}/take-over", "agent", "A human answers now")
async def conversations_take_over(request: web.Request, ctx: Ctx) -> web.Response:
    conversation = await _own_conversation(ctx, _path_id(request, "conversation_id"))
    await _set_status(ctx, conversation, "pending_human")
    return _json(_conversation(await _own_conversation(ctx, conversation.id)))


@route("POST", "/conversations/{conversation_id}/hand-back", "agent", "The bot answers again")
async def conversations_hand_back(request: web.Request, ctx: Ctx) -> web.Response:
    """Questions the agent left unanswered go to the bot at once."""
    conversation = await _own_conversation(ctx, _path_id(request, "conversation_id"))
    await _set_status(ctx, conversation, "open")
    async with ctx.rt.sessions() as session:
        waiting = await unanswered_messages(session, conversation.id, limit=1)
        plan = await get_queue_priority(session, ctx.tenant)
        channel = await get_channel(session, conversation.channel_id)
        contact = await get_contact(session, conversation.contact_id)
    if waiting and channel is not None and contact is not None:
        m = waiting[0]  # (the answer job reads every unanswered question of the conversation)
        await ctx.rt.pipeline.enqueue_incoming(
            IncomingMessage(
                tenant_id=ctx.tenant,
                chatbot_id=conversation.chatbot_id,
                channel_id=channel.id,
                channel_kind=channel.kind,
                external_user_id=contact.external_id,
                text=m.text,
                external_message_id=m.external_id,
                received_at=m.created_at,
                message_id=m.id,
                conversation_id=conversation.id,
            ),
            plan,
            requeue=m.requeues + 1,
        )
    return _json(_conversation(await _own_conversation(ctx, conversation.id)))


@route("POST", "/conversations/{conversation_id}/resolve", "agent", "Close a conversation")
async def conversations_resolve(request: web.Request, ctx: Ctx) -> web.Response:
    conversation = await _own_conversation(ctx, _path_id(request, "conversation_id"))
    await _set_status(ctx, conversation, "resolved")
    return _json(_conversation(await _own_conversation(ctx, conversation.id)))


class AgentReplyIn(_In):
    text: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4096)]
    # the inbox's own id for the message: a retried POST sends it once
    client_message_id: (
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-]{1,64}$")] | None
    ) = None


@route("POST", "/conversations/{conversation_id}/messages", "agent", "An agent's reply",
       body=AgentReplyIn, created=True)  # fmt: skip
async def conversations_reply(request: web.Request, ctx: Ctx) -> web.Response:
    """Goes out through the outgoing pipeline on the conversation's channel, like the bot's; the
    agent answering takes the conversation over (the bot stops answering it)."""
    conversation = await _own_conversation(ctx, _path_id(request, "conversation_id"))
    body = await _body(request, AgentReplyIn)
    if "\x00" in body.text:  # PostgreSQL cannot store it (the widget refuses it too)
        raise ApiError(400, "invalid", "text must not contain NUL characters", "text")
    if conversation.status == "resolved":
        raise ApiError(409, "resolved", "the conversation is resolved", "conversation_id")
    client_id = body.client_message_id or uuid.uuid4().hex
    async with ctx.rt.sessions() as session, session.begin():
        dispatches = []
        if conversation.status == "open":
            await set_conversation_status(session, conversation.id, "pending_human")
            data = conversation_status_data(conversation.id, "pending_human", "open", "agent")
            dispatches = await ctx.rt.events.emit(
                session, ctx.tenant, "conversation.status_changed", data
            )
        questions = await unanswered_messages(session, conversation.id)
        try:
            stored = await store_reply(
                session,
                conversation_id=conversation.id,
                answers=[q.id for q in questions],
                text=body.text,
                external_id=f"agent:{conversation.id.hex[:12]}:{client_id}",
                role="agent",
            )
        except AlreadyAnsweredError:
            raise ApiError(409, "retry", "the conversation moved on; send again") from None
        channel = await get_channel(session, conversation.channel_id)
        contact = await get_contact(session, conversation.contact_id)
        plan = await get_queue_priority(session, ctx.tenant)
    await ctx.rt.events.send(dispatches)
    message = stored.message
    if not stored.duplicate and channel is not None and contact is not None:
        await ctx.rt.pipeline.enqueue_outgoing(
            OutgoingMessage(
                tenant_id=ctx.tenant,
                conversation_id=conversation.id,
                message_id=message.id,
                channel_id=channel.id,
                channel_kind=channel.kind,
                recipient_external_id=contact.external_id,
                text=message.text,
            ),
            plan,
        )
    return _json(_message(message), 200 if stored.duplicate else 201)


# -- API keys --------------------------------------------------------------------------------


class ApiKeyIn(_In):
    role: Literal["admin", "agent"]
    name: Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)] = ""


@route("GET", "/api-keys", "admin", "The tenant's API keys (never the keys themselves)")
async def keys_list(request: web.Request, ctx: Ctx) -> web.Response:
    async with ctx.rt.sessions() as session:
        keys = await list_api_keys(session, ctx.tenant)
    return _json({"items": [_key(k) for k in keys]})


@route("POST", "/api-keys", "admin", "Create a key: the key is in this answer only",
       body=ApiKeyIn, created=True)  # fmt: skip
async def keys_create(request: web.Request, ctx: Ctx) -> web.Response:
    body = await _body(request, ApiKeyIn)
    async with ctx.rt.sessions() as session, session.begin():
        created = await create_api_key(
            session, role=body.role, tenant_id=ctx.tenant, name=body.name
        )
    return _json({**_key(created.key), "key": created.plaintext}, 201)


@route("DELETE", "/api-keys/{key_id}", "admin", "Revoke a key")
async def keys_revoke(request: web.Request, ctx: Ctx) -> web.Response:
    key_id = _path_id(request, "key_id")
    async with ctx.rt.sessions() as session, session.begin():
        mine = {k.id for k in await list_api_keys(session, ctx.tenant)}
        if key_id not in mine:
            raise ApiError(404, "not_found", "no such key", "key_id")
        await revoke_api_key(session, key_id)
    return web.Response(status=204)


# -- usage -----------------------------------------------------------------------------------


_MONTH = Param("month", {"type": "string", "pattern": "^\\d{4}-\\d{2}$"}, "e.g. 2026-12")


@route("GET", "/usage", "admin", "Month-to-date usage by kind, with the plan's limits",
       query=(_MONTH,))  # fmt: skip
async def usage(request: web.Request, ctx: Ctx) -> web.Response:
    now = datetime.now(UTC)
    raw = request.query.get("month") or f"{now.year:04d}-{now.month:02d}"
    try:
        year, month = (int(x) for x in raw.split("-"))
        if not (2000 <= year <= 9999 and 1 <= month <= 12):
            raise ValueError
    except ValueError:
        raise ApiError(400, "invalid", "month must look like 2026-12", "month") from None
    async with ctx.rt.sessions() as session:
        totals = await monthly_totals(session, ctx.tenant, year, month)
        tenant = await get_tenant(session, ctx.tenant)
        plan = None if tenant is None else await get_plan(session, tenant.plan_id)
    return _json(
        {
            "month": f"{year:04d}-{month:02d}",
            "totals": totals,
            "limits": None
            if plan is None
            else {
                "messages_per_month": plan.messages_per_month,
                "ai_tokens_per_month": plan.ai_tokens_per_month,
            },
        }
    )


# -- the operator's: tenants, plans, raw jobs ------------------------------------------------


class PlanIn(_In):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    monthly_price_cents: int = Field(ge=0, le=10**9)
    messages_per_month: int | None = Field(default=None, ge=0)
    ai_tokens_per_month: int | None = Field(default=None, ge=0)


class TenantIn(_In):
    name: Name
    plan: Annotated[str, StringConstraints(min_length=1, max_length=100)] = Field(
        description="the plan's name or id"
    )


@route("GET", "/plans", "operator", "Plans", scope="platform")
async def plans_list(request: web.Request, ctx: Ctx) -> web.Response:
    async with ctx.rt.sessions() as session:
        plans = await list_plans(session)
    return _json({"items": [_plan(p) for p in plans]})


@route("POST", "/plans", "operator", "Create a plan", "platform", body=PlanIn, created=True)
async def plans_create(request: web.Request, ctx: Ctx) -> web.Response:
    body = await _body(request, PlanIn)
    try:
        async with ctx.rt.sessions() as session, session.begin():
            plan = await create_plan(session, **body.model_dump())
    except IntegrityError:
        raise ApiError(409, "conflict", "a plan with this name exists", "name") from None
    return _json(_plan(plan), 201)


@route("GET", "/tenants", "operator", "Tenants (cursor: the last id)", "platform",
       query=(Param("cursor", _ID, "the last id of the previous page"), _LIMIT))  # fmt: skip
async def tenants_list(request: web.Request, ctx: Ctx) -> web.Response:
    limit = _query_int(request, "limit", 100, 1, MAX_PAGE)
    after = _query_uuid(request, "cursor")
    async with ctx.rt.sessions() as session:
        tenants = await list_tenants(session, after=after, limit=limit)
    return _json(
        {
            "items": [_tenant(t) for t in tenants],
            "next_cursor": str(tenants[-1].id) if len(tenants) == limit else None,
        }
    )


@route("POST", "/tenants", "operator", "Create a tenant and its first admin key", "platform",
       body=TenantIn, created=True)  # fmt: skip
async def tenants_create(request: web.Request, ctx: Ctx) -> web.Response:
    body = await _body(request, TenantIn)
    async with ctx.rt.sessions() as session, session.begin():
        plan = await get_plan_by_name(session, body.plan)
        if plan is None:
            try:
                plan = await get_plan(session, uuid.UUID(body.plan))
            except ValueError:
                plan = None
        if plan is None:
            raise ApiError(404, "not_found", "no plan with this name or id", "plan")
        tenant = await create_tenant(session, name=body.name, plan_id=plan.id)
        key = await create_api_key(session, role="admin", tenant_id=tenant.id, name="first")
    return _json({**_tenant(tenant), "admin_api_key": key.plaintext}, 201)


class QueueJobIn(BaseModel):
    """Any JSON object: the job's data. `id` becomes the job id, `name` the job's name."""

    model_config = ConfigDict(extra="allow")
    id: str | None = Field(default=None, min_length=1, max_length=200)
    name: str | None = None


@route("POST", "/api/queue/add/{queue}", "operator", "Enqueue a raw job", "platform",
       body=QueueJobIn, created=True)  # fmt: skip
async def queue_add(request: web.Request, ctx: Ctx) -> web.Response:
    """A payload `id` becomes the job id (adding the same id twice is one job)."""
    name = request.match_info["queue"]
    queue = ctx.rt.pipeline.by_name(name)
    if queue is None:
        raise ApiError(404, "not_found", f"no queue named {name!r}", "queue")
    body = await _body(request, _Raw)
    payload = body.model_dump()
    job_id = payload.get("id")
    if job_id is not None and (not isinstance(job_id, str) or not 0 < len(job_id) <= 200):
        raise ApiError(400, "invalid", "id must be a string of 1 to 200 characters", "id")
    try:
        job = await queue.add(str(payload.get("name") or "job"), payload, job_id=job_id)
    except SerializationError:  # e.g. nested deeper than a job may be
        raise ApiError(400, "invalid", "the payload cannot be stored as a job") from None
    return _json({"id": job.id, "queue": name}, 201)
