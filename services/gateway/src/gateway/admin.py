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
import json
import sys
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from chat_domain import (
    ConfigError,
    SecretBox,
    WidgetConfig,
    create_api_key,
    create_channel,
    create_chatbot,
    create_engine,
    create_plan,
    create_session_factory,
    create_tenant,
    get_plan_by_name,
    ingest_document,
)
from chat_pipeline import PipelineSettings
from chat_pipeline.send import ChannelGate
from gateway.channel_ops import AdminError, ChannelOps, CloudUpdate, QrUpdate
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
            try:
                docs.append((file.stem, file.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as exc:
                raise AdminError(f"--kb {file}: cannot read it ({type(exc).__name__})") from None
    return docs


async def bootstrap(args: argparse.Namespace, settings: PipelineSettings) -> dict[str, Any]:
    engine = create_engine(settings.db)
    sessions = create_session_factory(engine)
    box = SecretBox(settings.db.resolve_secret_key())
    try:
        async with sessions() as session, session.begin():
            # a second tenant on the same plan is the common case, not an error
            plan = await get_plan_by_name(session, args.plan_name) or await create_plan(
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


def _uuid(raw: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise AdminError(f"{what} must be an id (a UUID), got {raw!r}") from None


async def channels_command(args: argparse.Namespace, settings: PipelineSettings) -> Any:
    engine = create_engine(settings.db)
    redis = connect(settings.redis_url)
    ops = ChannelOps(
        create_session_factory(engine),
        SecretBox(settings.db.resolve_secret_key()),
        ChannelGate(redis),
        settings.base_url,
    )
    try:
        return await _channels(args, settings, ops)
    finally:
        await redis.aclose()
        await engine.dispose()


async def _channels(args: argparse.Namespace, settings: PipelineSettings, ops: ChannelOps) -> Any:
    op = args.channels_command
    if op == "list":
        return await ops.list(
            tenant_id=_uuid(args.tenant, "--tenant") if args.tenant else None,
            chatbot_id=_uuid(args.chatbot, "--chatbot") if args.chatbot else None,
        )
    if op == "add-cloud":
        return await ops.add_cloud(
            _uuid(args.chatbot, "--chatbot"),
            phone_number_id=args.phone_number_id,
            access_token=args.access_token,
            app_secret=args.app_secret,
            verify_token=args.verify_token,
        )
    if op == "add-qr":
        return await ops.add_qr(
            _uuid(args.chatbot, "--chatbot"),
            service=args.service,
            base_url=args.base_url,
            session=args.session,
            api_key=args.api_key,
        )
    channel_id = _uuid(args.channel_id, "the channel id")
    if op == "qr":
        info = await ops.pairing(channel_id, timeout=settings.qr_send_timeout_s)
        result = info.as_json()
        if args.out and info.image is not None:
            target = Path(args.out)
            await asyncio.to_thread(target.write_bytes, info.image)
            result.pop("qr_data_url", None)
            result["qr_image"] = str(await asyncio.to_thread(target.resolve))
        return result
    if op in ("disable", "enable"):
        return await ops.set_active(channel_id, op == "enable")
    current = await ops.get(channel_id)
    change: CloudUpdate | QrUpdate
    if current.kind == "whatsapp_cloud":
        change = CloudUpdate(args.phone_number_id, args.access_token, args.app_secret)
    else:
        change = QrUpdate(args.base_url, args.session, args.api_key)
    return await ops.update(channel_id, change)


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
    if args.command == "bootstrap":
        args.model = args.model or settings.llm_model
    run = channels_command if args.command == "channels" else bootstrap
    try:
        result = asyncio.run(run(args, settings))
    except (AdminError, ValidationError, ValueError) as exc:
        print(f"gateway-admin: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (RedisError, SQLAlchemyError, OSError) as exc:
        # (the driver's message may quote input; the type says enough to act on)
        print(f"gateway-admin: cannot reach the database or Redis, or it refused the change "
              f"({type(exc).__name__})", file=sys.stderr)  # fmt: skip
        return 1
    if args.json:
        print(json.dumps(result))
    elif args.command == "channels":
        _print_channels(result)
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
