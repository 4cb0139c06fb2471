"""An aiohttp runner whose HTTP-level errors are in the OpenAI error shape too.

aiohttp answers a request it cannot parse (a control character in a header, a small body
whose Content-Encoding does not decode while the parser still holds it) itself, before any
middleware runs: with a plain-text 400 and an "Error handling request" traceback in the log.
Clients of an OpenAI API expect `{"error": {...}}` on every error, and a malformed request
is the client's mistake, not ours: this runner's connections answer those with the same
JSON envelope and one info line. Only the error path changes; requests that parse go
through the app (and its middlewares) as before.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web, web_protocol, web_server

from rolemesh.errors import error_body

log = structlog.get_logger("rolemesh.http")


class _JsonErrorHandler(web_protocol.RequestHandler):
    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        text = (message or str(exc or "") or "bad request").strip().splitlines()[0][:300]
        log.info("request.malformed", status=status, error=text)
        resp = web.json_response(error_body(f"the request is not valid HTTP: {text}",
                                            "invalid_request_error", "malformed_request"),
                                 status=status)
        resp.force_close()
        return resp


class _JsonErrorServer(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # the same server, with the handler above
        return server
