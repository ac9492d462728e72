"""`ai-worker` / `python -m ai_worker`: the ai-processing queue worker.

Settings come from the environment (docs/configuration.md). Without LLM_API_KEY (and without
a chatbot-specific provider) answers come from the offline responder: the best-matching
knowledge-base passage, so the platform works with no network.
"""

from __future__ import annotations

from chat_pipeline.service import Runner, run_service


def _runner() -> Runner:
    from ai_worker.service import run_worker

    return run_worker


def main() -> int:
    return run_service("ai-worker", _runner)


if __name__ == "__main__":
    raise SystemExit(main())
