"""`rolemesh-node-agent --config FILE [--check-config]`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import structlog

from node_agent.app import build_app
from node_agent.backends import BackendUnavailable, DeviceBackend
from node_agent.backends.select import select_backend
from node_agent.config import NodeAgentConfig
from node_agent.llama_binary import LlamaServerNotFound, resolve_llama_server
from node_agent.node import ModelFileError, check_model_files
from rolemesh.config_loading import ConfigError, load_config_file
from rolemesh.logging import setup_logging
from rolemesh.service import EXIT_START, run_service

EXIT_CONFIG = 2


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rolemesh-node-agent", description=(
        "Run one llama-server per device of this host and serve the OpenAI API."))
    parser.add_argument("--config", required=True, help="the node agent's YAML config")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config and model files, print it resolved, exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None,
         backend_factory: Callable[[str], DeviceBackend] = select_backend) -> int:
    """`backend_factory` is the backend seam: tests run a whole agent on fake GPUs."""
    args = _parse(argv)
    try:
        config = load_config_file(args.config, NodeAgentConfig)
        facts = check_model_files(config)
        config_errors: list[str] = []
        for m in config.models:
            if m.parallel > config.max_pending_requests_per_device:
                config_errors.append(
                    f"{args.config}: models.{m.model_id}.parallel: {m.parallel} is more than "
                    f"max_pending_requests_per_device ({config.max_pending_requests_per_device})"
                    "; raise the limit or llama-server's extra slots can never be used")
        if config_errors:
            raise ConfigError("\n".join(config_errors))
    except ConfigError as exc:
        print(f"rolemesh-node-agent: config error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ModelFileError as exc:  # its lines name the key; say which file holds it
        lines = "\n".join(f"{args.config}: {line}" for line in str(exc).splitlines())
        print(f"rolemesh-node-agent: config error:\n{lines}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        resolved = config.public_dump()
        resolved["advertised_url"] = config.url
        resolved["model_memory_need_mb"] = {k: v.memory_need_mb for k, v in facts.items()}
        print(json.dumps(resolved, indent=2, default=str))
        return 0
    setup_logging("node-agent", fmt=config.log_format, level=config.log_level)
    structlog.contextvars.bind_contextvars(node_id=config.node_id)  # every line names the node
    log = structlog.get_logger("node_agent.cli")
    try:
        binary = resolve_llama_server(config.llama_server_bin)
        backend = backend_factory(config.backend)
    except (LlamaServerNotFound, BackendUnavailable) as exc:
        log.error("agent.cannot_start", error=str(exc))
        print(f"rolemesh-node-agent: cannot start: {exc}", file=sys.stderr)
        return EXIT_START
    return run_service("rolemesh-node-agent", build_app(config, backend, facts, str(binary)),
                       config.listen_host, config.listen_port)


if __name__ == "__main__":
    raise SystemExit(main())
