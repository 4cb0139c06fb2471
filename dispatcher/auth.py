"""Who may call what.

- `/v1/nodes/register` and `/v1/nodes/heartbeat`: the cluster token, when one is set. A
  registration is refused before its body is read, so the dispatcher never calls a URL
  that an unauthenticated caller gave it.
- `/health` and `/metrics`: open.
- everything else (the OpenAI endpoints, `/v1/models`, `/v1/route`, `/v1/nodes`): one of
  `api_keys`, when that list is set; the cluster token is accepted there too, so
  operators' tools need one secret.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware

from rolemesh.errors import Unauthorized
from rolemesh.http import token_matches

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REGISTRY_PATHS = frozenset({"/v1/nodes/register", "/v1/nodes/heartbeat",
                            "/v1/nodes/deregister"})
# The dashboard's page and files hold no data: what they show comes from the API, with a key.
OPEN_PATHS = frozenset({"/health", "/metrics", "/", "/routing"})
OPEN_PREFIXES = ("/ui/",)
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def auth_middleware(cluster_token: str | None, api_keys: Sequence[str] | None,
                    admin_keys: Sequence[str] | None = None) -> Middleware:
    cluster = (cluster_token,) if cluster_token else ()
    # Operators' keys open what clients' keys do (the operator verbs check for them again).
    client_keys = (*api_keys, *(admin_keys or ()), *cluster) if api_keys else ()

    @web.middleware
    async def check_credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in REGISTRY_PATHS:
            if cluster and not token_matches(request, cluster):
                raise Unauthorized("nodes register and heartbeat with 'Authorization: Bearer "
                                   "<cluster_token>'", headers=_CHALLENGE)
        elif client_keys and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES) and \
                not token_matches(request, client_keys):
            raise Unauthorized("this dispatcher needs an API key: 'Authorization: Bearer "
                               "<key>'", headers=_CHALLENGE)
        return await handler(request)

    return check_credentials
