"""`webhook-delivery` / `python -m webhook_delivery`: signs and delivers tenants' webhook events
(docs/webhooks.md), retrying on a schedule, and re-queues events a crashed producer left behind.

Settings come from the environment (docs/configuration.md, WEBHOOK_*); `webhook-delivery
health` checks a running one.
"""

from __future__ import annotations

import sys
from functools import partial

from chat_domain import ConfigError
from chat_pipeline.service import Runner, run_service

SERVICE = "webhook-delivery"


def main() -> int:
    from chat_pipeline.webhooks import WebhookSettings

    if sys.argv[1:] != ["health"]:
        try:
            webhooks = WebhookSettings.from_env()
        except ConfigError as exc:
            print(f"{SERVICE}: configuration error: {exc}", file=sys.stderr)
            return 2
    else:
        webhooks = WebhookSettings()

    def runner() -> Runner:
        from webhook_delivery.service import run_delivery

        return partial(run_delivery, webhooks=webhooks)

    return run_service(SERVICE, runner)


if __name__ == "__main__":
    raise SystemExit(main())
