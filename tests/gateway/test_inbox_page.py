"""The inbox page as the gateway serves it: linked from the landing page, and locked down, since
the page holds an API key (its behaviour: tests/e2e/test_inbox_browser.py, in a browser)."""

from __future__ import annotations

from aiohttp.test_utils import TestClient


async def test_the_inbox_is_served_with_a_policy_that_keeps_its_key_in(
    client: TestClient[object, object],
) -> None:
    assert 'href="/inbox"' in await (await client.get("/")).text()
    page = await client.get("/inbox")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert '<script src="/inbox.js"></script>' in html
    assert "<script>" not in html, "no inline script: the policy forbids it"
    policy = page.headers["Content-Security-Policy"]
    for directive in (
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ):
        assert directive in policy
    assert page.headers["Referrer-Policy"] == "no-referrer"
    script = await client.get("/inbox.js")
    assert script.status == 200 and script.content_type == "application/javascript"
    body = await script.text()
    assert "sessionStorage" in body and ".innerHTML" not in body
