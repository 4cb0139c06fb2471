"""Typed keys for what the agent's app holds."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from node_agent.node import Node

NODE_KEY = web.AppKey("node", Node)
HTTP_KEY = web.AppKey("http", aiohttp.ClientSession)
UPSTREAM_TIMEOUT_KEY = web.AppKey("upstream_timeout", aiohttp.ClientTimeout)
