"""The gateway's OpenAPI 3.1 document, built from the admin API's route table and its pydantic
request models, plus the widget and webhook routes below (which validate by hand and are
described here). A test keeps it true: every route the app serves is in it and every path in it
is served."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from gateway import admin_api

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "examples": ["invalid", "not_found"]},
                "message": {"type": "string"},
                "field": {"type": ["string", "null"], "description": "the input at fault"},
            },
        }
    },
}
_ERRORS = {
    "400": "invalid input (error.field names it)",
    "401": "no valid API key",
    "403": "the key's role or tenant may not do this",
    "404": "no such row (another tenant's rows answer the same)",
    "409": "conflicts with the current state",
}


def _error_responses(codes: tuple[str, ...]) -> dict[str, Any]:
    return {
        code: {
            "description": _ERRORS.get(code, "error"),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for code in codes
    }


class WidgetMessageIn(BaseModel):
    """What the widget posts (validated by hand in gateway.widget; kept in step by a test)."""

    model_config = ConfigDict(extra="allow")
    visitor_id: str = Field(max_length=128, description="the visitor's id (no ':')")
    text: str = Field(min_length=1, description="at most WIDGET_MAX_MESSAGE_CHARS characters")
    client_message_id: str = Field(max_length=64, description="retries with it store once")
    signature: str | None = Field(
        default=None, description="HMAC of visitor_id when the chatbot verifies identities"
    )


def _path_params(path: str) -> list[dict[str, Any]]:
    out = []
    for name in re.findall(r"\{(\w+)\}", path):
        schema: dict[str, Any] = (
            {"type": "string", "format": "uuid"} if name.endswith("_id") else {"type": "string"}
        )
        out.append({"name": name, "in": "path", "required": True, "schema": schema})
    return out


def _schema_of(body: Any, components: dict[str, Any]) -> dict[str, Any]:
    adapter = body if isinstance(body, TypeAdapter) else TypeAdapter(body)
    schema = adapter.json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components[name] = definition
    if isinstance(body, type) and issubclass(body, BaseModel):
        components[body.__name__] = schema
        return {"$ref": f"#/components/schemas/{body.__name__}"}
    return schema


def _admin_operation(r: admin_api.Route, components: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": r.summary,
        "operationId": r.handler.__name__,
        "tags": [r.path.removeprefix(admin_api.PREFIX).split("/")[1] or "admin"],
        "security": [{"apiKey": []}],
        "x-least-role": r.role,
        "parameters": _path_params(r.path)
        + [
            {"name": p.name, "in": "query", "required": False, "schema": p.schema}
            | ({"description": p.description} if p.description else {})
            for p in r.query
        ],
    }
    if r.scope == "tenant":
        op["description"] = (
            f"Needs an {r.role} key of the tenant (or an operator key naming the tenant in "
            "X-Tenant-Id)."
        )
    else:
        op["description"] = "Needs an operator key."
    if r.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema_of(r.body, components)}},
        }
    if r.method == "DELETE":
        ok: dict[str, Any] = {"204": {"description": "done"}}
    else:
        ok = {
            "201" if r.created else "200": {
                "description": "done",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        }
    op["responses"] = ok | _error_responses(("400", "401", "403", "404", "409"))
    return op


def _op(
    summary: str,
    tag: str,
    responses: dict[str, Any],
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _param(name: str, where: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": where, "schema": schema, **extra}


def _public_operations(components: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The routes that are not the admin API: widget, webhooks, health, pages."""
    html = {"200": {"description": "an HTML page", "content": {"text/html": {}}}}
    text = {"type": "string"}
    key = [_param("public_key", "path", text, required=True)]
    visitor = [
        _param("visitor_id", "query", text, required=True),
        _param("after", "query", {"type": "integer"}, description="the last seq seen"),
        _param("signature", "query", text),
    ]
    channel = [_param("channel_id", "path", {"type": "string", "format": "uuid"}, required=True)]
    ok = {"description": "done", "content": {"application/json": {"schema": {"type": "object"}}}}
    errors = _error_responses(("400", "404"))
    provider = {"200": ok} | _error_responses(("400", "401", "404", "413"))
    widget_body = _schema_of(WidgetMessageIn, components)
    return {
        "/": {"get": _op("The front door", "pages", html)},
        "/demo/{public_key}": {"get": _op("A chatbot's demo page", "pages", html, key)},
        "/widget.js": {"get": _op("The widget", "widget", {"200": {"description": "JS"}})},
        "/v1/widget/{public_key}/messages": {
            "post": _op(
                "A visitor's message (202: stored, the answer comes live)",
                "widget",
                {"202": ok} | errors | _error_responses(("429", "503")),
                key,
                widget_body,
            ),
            "get": _op(
                "The visitor's messages after a seq", "widget", {"200": ok} | errors, key + visitor
            ),
            "options": _op("CORS preflight", "widget", {"204": {"description": "allowed"}}, key),
        },
        "/v1/widget/{public_key}/ws": {
            "get": _op(
                "WebSocket: live messages, typing, delivery ticks",
                "widget",
                {"101": {"description": "switching protocols"}} | errors,
                key + visitor,
            )
        },
        "/v1/channels/{channel_id}/whatsapp-cloud": {
            "get": _op(
                "Meta's callback verification (hub.challenge)",
                "webhooks",
                {"200": {"description": "the challenge"}} | _error_responses(("403", "404")),
                channel,
            ),
            "post": _op(
                "WhatsApp Cloud API events (X-Hub-Signature-256)", "webhooks", provider, channel
            ),
        },
        "/v1/channels/{channel_id}/whatsapp-qr": {
            "post": _op("WAHA / Evolution API events", "webhooks", provider, channel)
        },
        "/healthz": {"get": _op("Alive", "operations", {"200": ok})},
        "/readyz": {
            "get": _op("Ready: database, Redis, workers", "operations", {"200": ok, "503": ok})
        },
        "/metrics": {
            "get": _op("Prometheus metrics", "operations", {"200": {"description": "text"}})
        },
        admin_api.PREFIX: {"get": _op("The admin API's routes and roles", "admin", {"200": ok})},
        "/openapi.json": {"get": _op("This document", "operations", {"200": ok})},
        "/api/docs": {"get": _op("This document, to read", "pages", html)},
        "/inbox": {
            "get": _op("The agent inbox (sign in with an agent or admin key)", "pages", html)
        },
        "/inbox.js": {"get": _op("The inbox's script", "pages", {"200": {"description": "JS"}})},
    }


def build(base_url: str) -> dict[str, Any]:
    components: dict[str, Any] = {"Error": _ERROR}
    paths: dict[str, dict[str, Any]] = _public_operations(components)
    for r in admin_api.ROUTES:
        paths.setdefault(r.path, {})[r.method.lower()] = _admin_operation(r, components)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Chatbot platform gateway",
            "version": "1",
            "description": "The widget API, WhatsApp webhooks and the tenant admin API. Errors "
            'are always {"error": {"code", "message", "field"}}.',
        },
        "servers": [{"url": base_url}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "cbk_... API key"}
            },
        },
    }
