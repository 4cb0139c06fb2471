"""aiohttp pieces both services share: error rendering, request ids, bounded bodies."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from rolemesh import headers
from rolemesh.errors import BadRequest, BodyTooLarge, NotFound, RoleMeshError, error_body
from rolemesh.openai_body import OPENAI_PATHS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID_KEY = web.RequestKey("rolemesh_request_id", str)
# Set by the stream relay when the client went away mid-answer: the request is logged as
# `client_gone` with status 499 (the client closed the request), never as a server error.
CLIENT_GONE_KEY = web.RequestKey("rolemesh_client_gone", bool)
CLIENT_GONE_STATUS = 499

log = structlog.get_logger("rolemesh.http")


def json_response(data: object, *, status: int = 200,
                  extra_headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status,
                        content_type="application/json", headers=extra_headers)


def error_response(err: RoleMeshError) -> web.Response:
    return json_response(err.body(), status=err.status, extra_headers=err.headers)


@web.middleware
async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id (the client's, or a new one) for every log line of this request."""
    request_id = request.headers.get(headers.REQUEST_ID) or secrets.token_hex(8)
    request[REQUEST_ID_KEY] = request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = CLIENT_GONE_STATUS if request.get(CLIENT_GONE_KEY) else response.status
    except RoleMeshError as err:
        status = err.status
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = CLIENT_GONE_STATUS  # the client left; its handler was cancelled
        raise
    finally:
        # One line per OpenAI request (not per heartbeat): with the request id, on both
        # services, it follows a request from the dispatcher to the node.
        if request.path in OPENAI_PATHS:
            log.info("request.done", path=request.path, status=status,
                     duration_ms=round((time.perf_counter() - started) * 1000, 2),
                     **({"outcome": "client_gone"} if status == CLIENT_GONE_STATUS else {}))
        # A keep-alive connection serves its requests in one task: nothing of this
        # request may stick to the next one's log lines.
        structlog.contextvars.unbind_contextvars("request_id", "device", "model", "node",
                                                 "model_id", "role")
    if not response.prepared:
        response.headers[headers.REQUEST_ID] = request_id
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where errors become OpenAI-shaped HTTP responses."""
    try:
        return await handler(request)
    except RoleMeshError as err:
        log.info("request.rejected", path=request.path, status=err.status, code=err.code,
                 message=err.message)
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status == 404:
            return error_response(NotFound(f"no such endpoint: {request.method} {request.path}"))
        if exc.status == 405:
            return json_response(error_body(f"method {request.method} not allowed on "
                                            f"{request.path}", "invalid_request_error",
                                            "method_not_allowed"), status=405)
        if exc.status == 413:
            return error_response(BodyTooLarge("the request body is too large"))
        raise


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The whole body, refusing more than max_bytes before reading it all."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise BodyTooLarge(f"the request body is {request.content_length} bytes; "
                           f"the limit is {max_bytes}")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(f"the request body is over the limit of {max_bytes} bytes") from exc
    except (HttpProcessingError, web.RequestPayloadError) as exc:
        # e.g. Content-Encoding: gzip on bytes that are not gzip. The rest of the body
        # cannot be read either: say it ended (aiohttp would try to drain it after the
        # answer and fail again) and close the connection after the 400.
        request.content.feed_eof()
        raise BadRequest(f"the request body cannot be read: {exc}",
                         headers={"Connection": "close"}) from exc


async def read_json_object(request: web.Request, max_bytes: int = 64 * 1024
                           ) -> dict[str, Any]:
    """A small JSON object body (operator verbs); an empty body is {}; anything else 400."""
    raw = await read_body(request, max_bytes)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def request_id_of(request: web.Request) -> str:
    return str(request.get(REQUEST_ID_KEY, ""))


def bearer_token(request: web.Request) -> str | None:
    value = request.headers.get(headers.AUTHORIZATION, "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip()


def _as_bytes(text: str) -> bytes | None:
    # Header bytes that are not UTF-8 arrive as lone surrogates: such a token is no key.
    try:
        return text.encode()
    except UnicodeError:
        return None


def token_matches(request: web.Request, accepted: str | Sequence[str] | None) -> bool:
    """Whether the request's bearer token is one of `accepted`; never raises.

    Compared in constant time per key, and every key is compared (no early exit to time).
    A header with bytes that are not UTF-8, or no header, is simply no match (401).
    """
    if not accepted:
        return False
    given = bearer_token(request)
    raw = _as_bytes(given) if given is not None else None
    found = False
    for key in (accepted,) if isinstance(accepted, str) else accepted:
        found |= secrets.compare_digest(raw or b"", key.encode())
    return found and raw is not None
