"""What "just Python" costs: a naive aiohttp pass-through proxy in a few dozen lines.

`python -m bench.naive_proxy --port P --upstream http://127.0.0.1:U`. Forwards the body
and streams the answer back as it arrives, over one pooled keep-alive session, on uvloop
when installed; no routing, no accounting, no error shaping.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


def build_app(upstream: str) -> web.Application:
    app = web.Application()
    key = web.AppKey("http", aiohttp.ClientSession)

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app[key].request(
                request.method, upstream + request.path_qs, data=body,
                headers={"Content-Type": request.headers.get("Content-Type",
                                                             "application/json")}) as up:
            headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            if up.headers.get("Content-Type", "").startswith("text/event-stream"):
                response = web.StreamResponse(status=up.status, headers=headers)
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
            return web.Response(body=await up.read(), status=up.status, headers=headers)

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app[key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[key].close()

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    web.run_app(build_app(args.upstream.rstrip("/")), host=args.host, port=args.port,
                access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
