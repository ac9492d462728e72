"""`gateway` / `python -m gateway`: the HTTP gateway and its queue workers.

GATEWAY_ROLE=all (default) runs both; `http` only the HTTP side; `workers` only the
pipeline's workers, without HTTP (the same as `gateway-workers`; scale them separately).
Settings come from the environment: docs/configuration.md.
"""

from __future__ import annotations

from chat_pipeline.service import Runner, run_service


def _runner() -> Runner:
    from gateway.app import serve

    return serve


def main() -> int:
    return run_service("gateway", _runner)


if __name__ == "__main__":
    raise SystemExit(main())
