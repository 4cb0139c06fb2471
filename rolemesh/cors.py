"""CORS for browser clients, as configuration (`cors_allowed_origins`, off by default).

Answers carry `Access-Control-Allow-Origin` only for an origin on the list (or any, with
"*"); preflight `OPTIONS` requests from such an origin are answered here, before auth, as
browsers send them without credentials. Upstream answers never bring their own CORS
headers (rolemesh.proxying drops them): the service's config alone decides.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
ALLOW_HEADERS = ("Authorization, Content-Type, If-Match, X-Request-Id, X-RoleMesh-Role, "
                 "X-RoleMesh-Task-Type")
EXPOSE_HEADERS = "ETag, Retry-After, X-Request-Id, X-RoleMesh-Routed-To"
MAX_AGE_S = "600"
ORIGIN_KEY = web.RequestKey("rolemesh_cors_origin", str)


def allowed_origin(origin: str | None, allowed: Sequence[str]) -> str | None:
    """The value for Access-Control-Allow-Origin, or None when this origin gets none."""
    if not origin or not allowed:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin in allowed else None


def cors_middleware(allowed: Sequence[str]) -> Middleware:
    allowed = tuple(allowed)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = allowed_origin(request.headers.get("Origin"), allowed)
        if (request.method == "OPTIONS" and origin is not None
                and "Access-Control-Request-Method" in request.headers):
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": MAX_AGE_S})
        if origin is not None:
            request[ORIGIN_KEY] = origin  # on_prepare adds the headers, streams included
        return await handler(request)

    return cors


def setup_cors(app: web.Application, allowed: Sequence[str]) -> None:
    """Before any other middleware (preflights carry no credentials); nothing when off."""
    if allowed:
        app.middlewares.insert(0, cors_middleware(allowed))
        app.on_response_prepare.append(on_prepare)


def add_headers(response: web.StreamResponse, origin: str) -> None:
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    response.headers.add("Vary", "Origin")


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    origin = request.get(ORIGIN_KEY)
    if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
        add_headers(response, origin)
