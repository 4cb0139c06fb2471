"""Typed keys for what the dispatcher's app holds."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from dispatcher.config import DispatcherConfig
from dispatcher.forwarding import Forwarder
from dispatcher.metrics import Metrics
from dispatcher.registry import Registry
from dispatcher.router import Router


@dataclass(frozen=True)
class Dispatcher:
    """What lives as long as the app: built in build_app, shared by the handlers."""

    config: DispatcherConfig
    registry: Registry
    router: Router
    metrics: Metrics
    forwarder: Forwarder  # its client session opens and closes in the app's cleanup_ctx


DISPATCHER_KEY = web.AppKey("dispatcher", Dispatcher)
