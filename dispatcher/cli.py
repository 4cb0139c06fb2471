"""`rolemesh-dispatcher --config FILE [--check-config]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import structlog
from aiohttp import web

from dispatcher.app import build_app
from dispatcher.config import DispatcherConfig
from rolemesh.config_loading import ConfigError, load_config_file
from rolemesh.logging import setup_logging

EXIT_CONFIG = 2
EXIT_START = 3


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rolemesh-dispatcher", description=(
        "Keep the registry of RoleMesh node agents and route OpenAI requests to them."))
    parser.add_argument("--config", required=True, help="the dispatcher's YAML config")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config, print it resolved (secrets masked), exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        config = load_config_file(args.config, DispatcherConfig)
    except ConfigError as exc:
        print(f"rolemesh-dispatcher: config error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(json.dumps(config.public_dump(), indent=2))
        return 0
    setup_logging("dispatcher", fmt=config.log_format, level=config.log_level)
    log = structlog.get_logger("dispatcher.cli")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    app = build_app(config)
    try:
        asyncio.run(_serve(app, config))
    except Exception as exc:  # start-up failures (port taken...): say so, exit
        log.error("dispatcher.failed", error=str(exc))
        print(f"rolemesh-dispatcher: {exc}", file=sys.stderr)
        return EXIT_START
    return 0


async def _serve(app: web.Application, config: DispatcherConfig) -> None:
    # handler_cancellation: a client that goes away cancels its forwarding, which closes
    # the connection to the agent, which stops the generation there.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.listen_host, config.listen_port)
        await site.start()
        print(f"rolemesh-dispatcher: listening on http://{config.listen_host}:"
              f"{config.listen_port}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
