"""`rolemesh-dispatcher --config FILE [--check-config]`."""

from __future__ import annotations

import argparse
import json
import sys

from dispatcher.app import build_app
from dispatcher.config import DispatcherConfig
from rolemesh.config_loading import ConfigError, load_config_file
from rolemesh.logging import setup_logging
from rolemesh.service import run_service

EXIT_CONFIG = 2


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
    return run_service("rolemesh-dispatcher", build_app(config), config.listen_host,
                       config.listen_port, shutdown_grace_s=config.shutdown_grace_s)


if __name__ == "__main__":
    raise SystemExit(main())
