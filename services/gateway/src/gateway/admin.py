"""`gateway-admin`: set up tenants, chatbots and their channels from the command line.

    gateway-admin bootstrap --tenant "Harbor & Pine" --bot "Harbor & Pine" \\
        --plan-name Pro --plan-price-cents 9900 --kb path/to/docs ... [--demo-kb] [--json]
    gateway-admin channels add-cloud --chatbot ID --phone-number-id N --access-token T \\
        --app-secret S [--verify-token V] [--json]
    gateway-admin channels add-qr --chatbot ID --service waha|evolution --base-url URL \\
        --session NAME [--api-key K] [--json]
    gateway-admin channels list [--chatbot ID | --tenant ID] [--json]
    gateway-admin channels update ID [--access-token T] [--app-secret S] [--api-key K] \\
        [--base-url URL] [--phone-number-id N] [--session NAME]
    gateway-admin channels disable ID | enable ID

Databases are migrated separately (`alembic upgrade head`). A new channel prints its callback
URL (and the verify token or webhook secret to configure on the provider's side) once; secrets
are stored encrypted and never printed again. Updating a channel's secrets lets a channel
whose sends were stopped (an expired token) send again. Errors are one line and a non-zero
exit status. See docs/channels.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import sys
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from chat_domain import (
    ChannelView,
    ConfigError,
    NotFoundError,
    SecretBox,
    WhatsAppCloudConfig,
    WhatsAppCloudSecrets,
    WhatsAppQrConfig,
    WhatsAppQrSecrets,
    WidgetConfig,
    create_api_key,
    create_channel,
    create_chatbot,
    create_engine,
    create_plan,
    create_session_factory,
    create_tenant,
    get_channel,
    get_channel_secrets,
    ingest_document,
    list_channels,
    set_channel_active,
    update_channel,
)
from chat_pipeline import PipelineSettings
from chat_pipeline.channels import whatsapp_qr
from chat_pipeline.channels.base import SendError
from chat_pipeline.queues import Pipeline
from chat_pipeline.send import ChannelGate, CircuitState
from queue_core import connect

DEFAULT_PROMPT = (
    "You are the friendly assistant of {name}. Answer briefly and only from the knowledge "
    "base; when it does not cover the question, say so and offer to pass it on to the team."
)


def _documents(args: argparse.Namespace) -> list[tuple[str, str]]:
    docs: list[tuple[str, str]] = []
    if args.demo_kb:
        for entry in sorted(
            (resources.files("gateway") / "demo_kb").iterdir(), key=lambda e: e.name
        ):
            if entry.name.endswith(".md"):
                docs.append((entry.name.removesuffix(".md"), entry.read_text(encoding="utf-8")))
    for raw in args.kb or []:
        path = Path(raw)
        files = sorted(path.glob("*.md")) + sorted(path.glob("*.txt")) if path.is_dir() else [path]
        for file in files:
            docs.append((file.stem, file.read_text(encoding="utf-8")))
    return docs


async def bootstrap(args: argparse.Namespace, settings: PipelineSettings) -> dict[str, Any]:
    engine = create_engine(settings.db)
    sessions = create_session_factory(engine)
    box = SecretBox(settings.db.resolve_secret_key())
    try:
        async with sessions() as session, session.begin():
            plan = await create_plan(
                session,
                name=args.plan_name,
                monthly_price_cents=args.plan_price_cents,
                messages_per_month=args.messages_per_month,
            )
            tenant = await create_tenant(session, name=args.tenant, plan_id=plan.id)
            bot = await create_chatbot(
                session,
                box,
                tenant_id=tenant.id,
                name=args.bot,
                model=args.model,
                system_prompt=args.prompt or DEFAULT_PROMPT.format(name=args.bot),
                kb_enabled=True,
                allowed_origins=args.origin or (),
                provider_api_key=args.provider_api_key,
                provider_base_url=args.provider_base_url,
            )
            channel = await create_channel(session, box, chatbot_id=bot.id, config=WidgetConfig())
            docs = _documents(args)
            for title, text in docs:
                await ingest_document(session, chatbot_id=bot.id, title=title, text=text)
            key = await create_api_key(session, role="admin", tenant_id=tenant.id, name="bootstrap")
    finally:
        await engine.dispose()
    base = settings.base_url
    return {
        "tenant_id": str(tenant.id),
        "plan_id": str(plan.id),
        "chatbot_id": str(bot.id),
        "channel_id": str(channel.id),
        "public_key": bot.widget_public_key,
        "documents": len(docs),
        "admin_api_key": key.plaintext,
        "demo_url": f"{base}/demo/{bot.widget_public_key}",
        "snippet": (
            f'<script src="{base}/widget.js" data-key="{bot.widget_public_key}" async></script>'
        ),
    }


# -- channels ---------------------------------------------------------------------------------


class AdminError(Exception):
    """A refusal the operator can act on: printed as one line, exit status 1."""


def callback_url(base_url: str, channel: ChannelView) -> str | None:
    """Where the provider sends this channel's webhooks."""
    if channel.kind == "whatsapp_cloud":
        return f"{base_url}/v1/channels/{channel.id}/whatsapp-cloud"
    if channel.kind == "whatsapp_qr":
        return f"{base_url}/v1/channels/{channel.id}/whatsapp-qr"
    return None


def _uuid(raw: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise AdminError(f"{what} must be an id (a UUID), got {raw!r}") from None


def _describe(channel: ChannelView, base_url: str, circuit: CircuitState | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": str(channel.id),
        "kind": channel.kind,
        "chatbot_id": str(channel.chatbot_id),
        "tenant_id": str(channel.tenant_id),
        "active": channel.active,
        "config": channel.config.model_dump(mode="json"),
        "callback_url": callback_url(base_url, channel),
    }
    if circuit is not None:
        out["sending"] = "stopped" if circuit.open else "ok"
        if circuit.open:
            out["stopped_because"] = {"code": circuit.code, "reason": circuit.reason}
    return out


async def channels_command(args: argparse.Namespace, settings: PipelineSettings) -> Any:
    engine = create_engine(settings.db)
    sessions = create_session_factory(engine)
    box = SecretBox(settings.db.resolve_secret_key())
    redis = connect(settings.redis_url)
    gate = ChannelGate(redis)
    try:
        return await _channels(args, settings, sessions, box, gate)
    except IntegrityError:
        raise AdminError("that phone number id or session is already routed to a channel") from None
    except NotFoundError as exc:
        raise AdminError(str(exc)) from None
    finally:
        await redis.aclose()
        await engine.dispose()


async def _circuit(gate: ChannelGate, channel: ChannelView) -> CircuitState | None:
    if channel.kind == "widget":
        return None
    try:
        return await gate.state(channel.id)
    except RedisError:
        return None  # Redis unreachable: the listing still works


async def _channels(
    args: argparse.Namespace,
    settings: PipelineSettings,
    sessions: Any,
    box: SecretBox,
    gate: ChannelGate,
) -> Any:
    base = settings.base_url
    op = args.channels_command
    if op == "list":
        async with sessions() as session:
            channels = await list_channels(
                session,
                tenant_id=_uuid(args.tenant, "--tenant") if args.tenant else None,
                chatbot_id=_uuid(args.chatbot, "--chatbot") if args.chatbot else None,
            )
        return [_describe(c, base, await _circuit(gate, c)) for c in channels]
    if op in ("add-cloud", "add-qr"):
        chatbot_id = _uuid(args.chatbot, "--chatbot")
        shown: dict[str, str] = {}
        config: WhatsAppCloudConfig | WhatsAppQrConfig
        secrets_: WhatsAppCloudSecrets | WhatsAppQrSecrets
        if op == "add-cloud":
            verify = args.verify_token or secrets.token_urlsafe(24)
            config = WhatsAppCloudConfig(phone_number_id=args.phone_number_id)
            secrets_ = WhatsAppCloudSecrets(
                access_token=args.access_token, app_secret=args.app_secret, verify_token=verify
            )
            shown["verify_token"] = verify
        else:
            webhook_secret = secrets.token_urlsafe(24)
            config = WhatsAppQrConfig(
                service=args.service, base_url=args.base_url.rstrip("/"), session=args.session
            )
            secrets_ = WhatsAppQrSecrets(api_key=args.api_key, webhook_secret=webhook_secret)
            shown["webhook_secret"] = webhook_secret
        async with sessions() as session, session.begin():
            channel = await create_channel(
                session, box, chatbot_id=chatbot_id, config=config, secrets=secrets_
            )
        # shown once: the provider needs it; it is stored encrypted and never printed again
        return {**_describe(channel, base, None), **shown}
    channel_id = _uuid(args.channel_id, "the channel id")
    if op == "qr":
        return await _pairing(sessions, box, settings, channel_id, args.out)
    async with sessions() as session, session.begin():
        current = await get_channel(session, channel_id)
        if current is None:
            raise AdminError(f"channel {channel_id} does not exist")
        if op in ("disable", "enable"):
            await set_channel_active(session, channel_id, op == "enable")
            updated = await get_channel(session, channel_id)
        else:
            updated = await _update(session, box, current, args)
    assert updated is not None
    queue = Pipeline.open(gate.redis).channel_queue(updated.kind)
    if op in ("update", "enable") and queue is not None:
        await gate.resume(channel_id, queue)  # new settings: waiting sends go at once
    return _describe(updated, base, await _circuit(gate, updated))


async def _pairing(
    sessions: Any,
    box: SecretBox,
    settings: PipelineSettings,
    channel_id: uuid.UUID,
    out: str | None,
) -> dict[str, Any]:
    """A QR channel's session state and, while it waits for a scan, its pairing QR, asked of the
    service itself (WAHA/Evolution hold it; we never store it: it changes every ~20 s)."""
    async with sessions() as session:
        channel = await get_channel(session, channel_id)
        found = None if channel is None else await get_channel_secrets(session, box, channel_id)
    if channel is None or not isinstance(channel.config, WhatsAppQrConfig):
        raise AdminError(f"channel {channel_id} is not a WhatsApp QR channel")
    api_key = found.api_key if isinstance(found, WhatsAppQrSecrets) else None
    make = (
        whatsapp_qr.WahaSender if channel.config.service == "waha" else whatsapp_qr.EvolutionSender
    )
    sender = make(
        channel.config.base_url, channel.config.session, api_key, timeout=settings.qr_send_timeout_s
    )
    result: dict[str, Any] = {"id": str(channel_id), "service": channel.config.service}
    try:
        status = await sender.session_status()
        result |= {"session": channel.config.session, "state": status.status, "raw": status.raw}
        if status.status != "working":
            try:
                image, content_type = await sender.qr_code()
            except whatsapp_qr.QrNotAvailableError as exc:
                result["qr"] = f"not available now: {exc}"
            else:
                if out:
                    target = Path(out)
                    await asyncio.to_thread(target.write_bytes, image)
                    result["qr_image"] = str(await asyncio.to_thread(target.resolve))
                else:
                    encoded = base64.b64encode(image).decode()
                    result["qr_data_url"] = f"data:{content_type};base64,{encoded}"
    except SendError as exc:  # the service is down, or refuses our key: say which
        raise AdminError(f"{channel.config.service} at {channel.config.base_url}: {exc}") from None
    finally:
        await sender.aclose()
    return result


async def _update(
    session: Any, box: SecretBox, current: ChannelView, args: argparse.Namespace
) -> ChannelView:
    old = await get_channel_secrets(session, box, current.id)
    config: WhatsAppCloudConfig | WhatsAppQrConfig
    secrets_: WhatsAppCloudSecrets | WhatsAppQrSecrets
    if isinstance(current.config, WhatsAppCloudConfig) and isinstance(old, WhatsAppCloudSecrets):
        config = current.config.model_copy(
            update={"phone_number_id": args.phone_number_id or current.config.phone_number_id}
        )
        secrets_ = old.model_copy(
            update={
                "access_token": args.access_token or old.access_token,
                "app_secret": args.app_secret or old.app_secret,
            }
        )
    elif isinstance(current.config, WhatsAppQrConfig) and isinstance(old, WhatsAppQrSecrets):
        config = current.config.model_copy(
            update={
                "base_url": (args.base_url or current.config.base_url).rstrip("/"),
                "session": args.session or current.config.session,
            }
        )
        secrets_ = old.model_copy(update={"api_key": args.api_key or old.api_key})
    else:
        raise AdminError(f"a {current.kind} channel has nothing to update here")
    return await update_channel(session, box, current.id, config=config, secrets=secrets_)


def _print_pairing(row: dict[str, Any]) -> None:
    print(f"{row['id']}  {row['service']} session {row['session']}: {row['raw']} ({row['state']})")
    if row.get("qr_image"):
        print(f"    scan the QR in {row['qr_image']} with WhatsApp > Linked devices")
    elif row.get("qr_data_url"):
        print("    scan this QR (open the data: URL in a browser) with WhatsApp > Linked devices:")
        print(f"    {row['qr_data_url']}")
    elif row.get("qr"):
        print(f"    QR {row['qr']}")


def _print_channels(result: Any) -> None:
    if isinstance(result, dict) and "state" in result:
        _print_pairing(result)
        return
    rows = result if isinstance(result, list) else [result]
    for row in rows:
        state = row.get("sending", "-")
        if row.get("stopped_because"):
            why = row["stopped_because"]
            state = f"stopped ({why.get('code') or ''}: {why.get('reason') or ''})"
        print(f"{row['id']}  {row['kind']:<15} active={row['active']}  sending={state}")
        if row.get("callback_url"):
            print(f"    callback URL  {row['callback_url']}")
        for key in ("verify_token", "webhook_secret"):
            if key in row:
                print(f"    {key.replace('_', ' ')} (shown once)  {row[key]}")


def _channels_parser(sub: Any) -> None:
    c = sub.add_parser("channels", help="WhatsApp channels of a chatbot (see docs/channels.md)")
    ops = c.add_subparsers(dest="channels_command", required=True)
    cloud = ops.add_parser("add-cloud", help="connect a WhatsApp Cloud API number")
    cloud.add_argument("--chatbot", required=True)
    cloud.add_argument("--phone-number-id", required=True)
    cloud.add_argument("--access-token", required=True)
    cloud.add_argument("--app-secret", required=True)
    cloud.add_argument("--verify-token", help="generated when omitted")
    qr = ops.add_parser("add-qr", help="connect a WAHA session or an Evolution API instance")
    qr.add_argument("--chatbot", required=True)
    qr.add_argument("--service", required=True, choices=("waha", "evolution"))
    qr.add_argument("--base-url", required=True)
    qr.add_argument("--session", required=True, help="the WAHA session / Evolution instance")
    qr.add_argument("--api-key")
    lst = ops.add_parser("list", help="channels with their callback URL and sending state")
    lst.add_argument("--chatbot")
    lst.add_argument("--tenant")
    up = ops.add_parser("update", help="new token, secret, number or service address")
    up.add_argument("channel_id")
    for flag in ("--access-token", "--app-secret", "--api-key", "--base-url"):
        up.add_argument(flag)
    up.add_argument("--phone-number-id")
    up.add_argument("--session")
    for name in ("disable", "enable"):
        op = ops.add_parser(name, help=f"{name} a channel")
        op.add_argument("channel_id")
    pair = ops.add_parser("qr", help="a QR channel's session state and its pairing QR")
    pair.add_argument("channel_id")
    pair.add_argument("--out", help="write the QR image to this file (else print a data: URL)")
    for p in (cloud, qr, lst, up, *ops.choices.values()):
        if not any(a.dest == "json" for a in p._actions):
            p.add_argument("--json", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gateway-admin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bootstrap", help="create a tenant, chatbot, widget and knowledge base")
    b.add_argument("--tenant", required=True)
    b.add_argument("--bot", required=True)
    b.add_argument("--plan-name", default="Pro")
    b.add_argument("--plan-price-cents", type=int, default=9900)
    b.add_argument("--messages-per-month", type=int, default=None)
    b.add_argument("--model", default=None)
    b.add_argument("--prompt", default=None)
    b.add_argument("--provider-base-url", default=None)
    b.add_argument("--provider-api-key", default=None)
    b.add_argument("--origin", action="append", help="allowed page origin (repeatable)")
    b.add_argument("--kb", action="append", help="a .md/.txt file or a folder of them (repeatable)")
    b.add_argument("--demo-kb", action="store_true", help="add the bundled demo documents")
    b.add_argument("--json", action="store_true")
    _channels_parser(sub)
    args = parser.parse_args(argv)
    try:
        settings = PipelineSettings.from_env()
    except ConfigError as exc:
        print(f"gateway-admin: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "channels":
        try:
            channels = asyncio.run(channels_command(args, settings))
        except (AdminError, ValidationError, ValueError) as exc:
            print(f"gateway-admin: {_one_line(exc)}", file=sys.stderr)
            return 1
        except (RedisError, SQLAlchemyError, OSError) as exc:
            print(f"gateway-admin: cannot reach the database or Redis ({type(exc).__name__})",
                  file=sys.stderr)  # fmt: skip
            return 1
        if args.json:
            print(json.dumps(channels))
        else:
            _print_channels(channels)
        return 0
    args.model = args.model or settings.llm_model
    result = asyncio.run(bootstrap(args, settings))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"tenant   {result['tenant_id']}\nchatbot  {result['chatbot_id']}\n"
            f"widget   {result['public_key']} ({result['documents']} documents)\n"
            f"admin key (shown once) {result['admin_api_key']}\n\n"
            f"Embed on any page:\n  {result['snippet']}\nDemo page: {result['demo_url']}"
        )
    return 0


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
