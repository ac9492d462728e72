"""Who is on the other end of a request."""

from __future__ import annotations

from aiohttp import web

__all__ = ["client_ip"]


def client_ip(request: web.BaseRequest) -> str:
    """The client's address for per-client limits. One place, so that a trusted-proxy setting
    (X-Forwarded-For from known proxies only) can replace the peer address later."""
    return request.remote or "unknown"
