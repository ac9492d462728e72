"""The OpenAPI document tells the truth: every route the gateway serves is in it, every path in
it is served, and every request model it shows is the one the route validates with."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import admin_api


def _served(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("formatter") or info.get("path")
        for r in resource:
            if r.method not in ("HEAD", "*"):
                out.add((r.method.lower(), re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", str(path))))
    return out


async def test_every_served_route_is_documented_and_nothing_else(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    served = _served(client.server.app)  # type: ignore[arg-type]
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == set(re.findall(r"\{(\w+)\}", path)), (method, path)
            assert op["responses"], (method, path)


async def test_documented_bodies_are_the_ones_validated(client: TestClient[Any, Any]) -> None:
    """A body with a field its model does not know is refused naming that field, on every admin
    route that documents a closed model: the document and the validation are one model."""
    doc = await (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    checked = 0
    for r in admin_api.ROUTES:
        if r.body is None or not isinstance(r.body, type):
            continue
        documented = doc["paths"][r.path][r.method.lower()]["requestBody"]
        ref = documented["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
        assert ref == r.body.__name__
        if r.body.model_config.get("extra") == "forbid":
            assert set(schemas[ref]["properties"]) == set(r.body.model_fields)
            checked += 1
    assert checked >= 8


async def test_the_reference_page_is_served(client: TestClient[Any, Any]) -> None:
    page = await client.get("/api/docs")
    assert page.status == 200 and "/openapi.json" in await page.text()
