"""`gateway-admin`: set up a tenant with a chatbot and its widget, and print the embed snippet.

    gateway-admin bootstrap --tenant "Harbor & Pine" --bot "Harbor & Pine" \\
        --plan-name Pro --plan-price-cents 9900 --kb path/to/docs ... [--demo-kb] [--json]

Databases are migrated separately (`alembic upgrade head`). Prints the ids, the widget's public
key and the snippet; with --json one JSON object (used by the one-command platform).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

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
    ingest_document,
)
from chat_pipeline import PipelineSettings

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
    args = parser.parse_args(argv)
    try:
        settings = PipelineSettings.from_env()
    except ConfigError as exc:
        print(f"gateway-admin: configuration error: {exc}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    raise SystemExit(main())
