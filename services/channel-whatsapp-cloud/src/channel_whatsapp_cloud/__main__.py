"""`channel-whatsapp-cloud` / `python -m channel_whatsapp_cloud`: sends the platform's replies
through Meta's WhatsApp Cloud API.

Consumes the `whatsapp-cloud-send` queue (chat_pipeline.channels.registry): status-first
skip, the channel's circuit and rate, typed failures (docs/channels.md). Settings come from the
environment (docs/configuration.md); `channel-whatsapp-cloud health` checks a running one.
"""

from __future__ import annotations

from functools import partial

from chat_pipeline.service import Runner, run_service

SERVICE = "channel-whatsapp-cloud"


def _runner() -> Runner:
    from chat_pipeline.channels.registry import run_channel_service

    return partial(run_channel_service, "whatsapp_cloud")


def main() -> int:
    return run_service(SERVICE, _runner)


if __name__ == "__main__":
    raise SystemExit(main())
