# syntax=docker/dockerfile:1.7
# One parameterised image for every service: docker build --build-arg SERVICE=gateway .
# Each image holds only its service's declared dependencies (uv sync --package).
ARG PYTHON_VERSION=3.11

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG SERVICE
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Dependencies first (cached until the lockfile or a manifest changes), then the code.
COPY pyproject.toml uv.lock ./
COPY packages/queue-core/pyproject.toml packages/queue-core/
COPY packages/chat-domain/pyproject.toml packages/chat-domain/
COPY packages/chat-pipeline/pyproject.toml packages/chat-pipeline/
COPY packages/devstack/pyproject.toml packages/devstack/
COPY services/gateway/pyproject.toml services/gateway/
COPY services/ai-worker/pyproject.toml services/ai-worker/
COPY services/channel-whatsapp-cloud/pyproject.toml services/channel-whatsapp-cloud/
COPY services/channel-whatsapp-qr/pyproject.toml services/channel-whatsapp-qr/
COPY services/webhook-delivery/pyproject.toml services/webhook-delivery/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --package "${SERVICE}"
COPY packages packages
COPY services services
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package "${SERVICE}"

FROM python:${PYTHON_VERSION}-slim-bookworm
ARG SERVICE
# ca-certificates: the LLM client (httpx2) uses the system trust store
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --create-home --uid 10001 app
COPY --from=build /app/.venv /app/.venv
COPY alembic.ini /app/alembic.ini
COPY migrations /app/migrations
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 SERVICE=${SERVICE}
WORKDIR /app
USER app
CMD ["sh", "-c", "exec \"$SERVICE\""]
