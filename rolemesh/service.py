"""Run an aiohttp app as a service until SIGTERM/SIGINT: the part both CLIs share."""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog
from aiohttp import web

from rolemesh.http_server import JsonErrorAppRunner

EXIT_START = 3


def install_uvloop() -> bool:
    """Use uvloop when it is installed (the `fast` extra); says whether it is."""
    try:
        import uvloop
    except ImportError:
        return False
    uvloop.install()
    return True


def run_service(name: str, app: web.Application, host: str, port: int, *,
                shutdown_grace_s: float = 60.0) -> int:
    """Serve until a signal; returns the process exit code (EXIT_START if it cannot start).

    On SIGTERM/SIGINT: stop accepting, let open requests (streams) finish for at most
    shutdown_grace_s, cancel what is left, run the app's cleanup, exit 0.
    """
    install_uvloop()
    try:
        asyncio.run(_serve(name, app, host, port, shutdown_grace_s))
    except Exception as exc:  # start-up failures (port taken, device missing): say so
        structlog.get_logger(name).error(f"{name}.failed", error=str(exc))
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_START
    return 0


async def _serve(name: str, app: web.Application, host: str, port: int,
                 shutdown_grace_s: float = 60.0) -> None:
    # handler_cancellation: a client that goes away cancels its handler, which gives back
    # its queue place and closes the upstream connection, which stops the generation.
    runner = JsonErrorAppRunner(app, handler_cancellation=True, access_log=None,
                                shutdown_timeout=shutdown_grace_s)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"{name}: listening on http://{host}:{port}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        structlog.get_logger(name).info(f"{name}.stopping", grace_s=shutdown_grace_s)
    finally:
        await runner.cleanup()  # the agent stops every llama-server child here
