"""The API-key guard decides on the path the router matches on, whatever the mount prefix.

The reference is starlette's own public `Route.matches`: for every scope, the guard's
`routed_path` names a route exactly when the router would send the request to it.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Match, Route

from compiled_serve.server.middleware import ApiKeyAuth, routed_path

ROOTS = ["", "/api", "/api/"]
PATHS = ["/health", "/api/health", "/apihealth", "/api", "/api/", "/api/health/", "/x/api/health",
         "/api/api/health", "/HEALTH", "/", ""]


async def _ok(request: object) -> PlainTextResponse:
    return PlainTextResponse("ok")


@pytest.mark.parametrize("root", ROOTS)
@pytest.mark.parametrize("path", PATHS)
def test_routed_path_agrees_with_the_router(root: str, path: str) -> None:
    scope = {"type": "http", "method": "GET", "path": path, "root_path": root}
    for route_path in ("/health", "/api/health", "/", "/health/"):
        routed = Route(route_path, _ok).matches(scope)[0] is Match.FULL
        assert routed == (routed_path(scope) == route_path), (root, path, route_path)


def test_health_is_open_under_a_root_path_and_the_rest_is_not() -> None:
    app = ApiKeyAuth(Starlette(routes=[Route("/health", _ok), Route("/secret", _ok)]), api_key="k")

    async def get(path: str, **headers: str) -> int:
        transport = httpx.ASGITransport(app=app, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get(path, headers=headers)).status_code

    async def run() -> list[int]:
        return [await get("/api/health"), await get("/api/secret"), await get("/api/secret", authorization="Bearer k"),
                await get("/apihealth"), await get("/api/health/../secret")]

    assert asyncio.run(run()) == [200, 401, 200, 401, 401]
