"""The dispatcher's access log: one JSON line per request, for people and for replay.

Off by default; `access_log: {path, max_bytes, backups}` in the dispatcher config turns it
on. Each line: when the request came (`ts`, Unix seconds), the name asked (`model`), the
model, node and device that served it, prompt and completion tokens when the answer says
(`usage`; for a stream, the last chunk that carries one), time to first byte of a stream,
duration, status and outcome. `rolemesh simulate --access-log PATH` replays it.

Lines go through a queue to a thread that writes and rotates the file
(logging.handlers.RotatingFileHandler: PATH, PATH.1 ... PATH.<backups>), so a slow disk
never holds up the event loop.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from dispatcher.request_trace import RequestTrace

TAIL_BYTES = 8192  # of a stream, kept to find its last usage chunk


class AccessLogConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)  # 0: never rotate
    backups: int = Field(default=5, ge=0)


class _Tokens:
    __slots__ = ("body", "stream", "tail")

    def __init__(self) -> None:
        self.body: bytes | None = None
        self.tail = bytearray()
        self.stream = False

    def usage(self) -> dict[str, Any] | None:
        if self.body is not None and b'"usage"' in self.body:
            return _usage_of(self.body)
        for raw in reversed(bytes(self.tail).split(b"\n")):
            line = raw.strip()
            if line.startswith(b"data:") and b'"usage"' in line:
                usage = _usage_of(line[5:])
                if usage is not None:
                    return usage
        return None


TOKENS_KEY = web.RequestKey("rolemesh_access_tokens", _Tokens)


def _usage_of(data: bytes) -> dict[str, Any] | None:
    try:
        usage = json.loads(data).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _count(usage: dict[str, Any] | None, key: str) -> int | None:
    value = usage.get(key) if usage else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _TailContent:
    def __init__(self, content: Any, tokens: _Tokens) -> None:
        self._content = content
        self._tokens = tokens

    async def iter_any(self) -> AsyncIterator[bytes]:
        tail = self._tokens.tail
        async for chunk in self._content.iter_any():
            tail += chunk
            if len(tail) > 2 * TAIL_BYTES:
                del tail[:-TAIL_BYTES]
            yield chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._content, name)


class _TailUpstream:
    def __init__(self, upstream: Any, tokens: _Tokens) -> None:
        self._upstream = upstream
        self.content = _TailContent(upstream.content, tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._upstream, name)


class NoAccessLog:
    """The access log when it is off: every call does nothing."""

    def start(self) -> None: ...
    def close(self) -> None: ...
    def saw_body(self, request: web.Request, data: bytes) -> None: ...

    def tap(self, request: web.Request, upstream: Any) -> Any:
        return upstream

    def record(self, trace: RequestTrace, request: web.Request) -> None: ...


NO_ACCESS_LOG = NoAccessLog()


class AccessLog:
    def __init__(self, config: AccessLogConfig,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.path = config.path.expanduser()
        handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=config.max_bytes, backupCount=config.backups,
            encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._wall = wall_clock
        self._started = False

    def start(self) -> None:
        """Open the file (a clear start-up error if it cannot be written), start the writer."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise OSError(f"access_log.path: cannot write {self.path}: "
                          f"{exc.strerror or exc}") from exc
        self._listener.start()
        self._started = True

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._started:
            self._listener.stop()
            self._started = False
        for h in self._listener.handlers:
            h.close()

    # -- what the forwarder tells it -----------------------------------------------------------

    def saw_body(self, request: web.Request, data: bytes) -> None:
        """A buffered answer: its `usage`, if any, is read when the line is written."""
        self._tokens(request).body = data

    def tap(self, request: web.Request, upstream: Any) -> Any:
        """A streamed answer: keep its tail, where the last usage chunk is."""
        tokens = self._tokens(request)
        tokens.stream = True
        return _TailUpstream(upstream, tokens)

    def record(self, trace: RequestTrace, request: web.Request) -> None:
        tokens = request.get(TOKENS_KEY)
        usage = tokens.usage() if tokens is not None else None
        duration = time.perf_counter() - trace.started
        ttft = trace.ttft_s
        line = {
            "ts": round(self._wall() - duration, 6), "request_id": trace.request_id,
            "endpoint": trace.endpoint, "model": trace.name, "served_model": trace.model_id,
            "node": trace.node_id, "device": trace.device_id,
            "stream": bool(tokens and tokens.stream), "status": trace.status,
            "outcome": str(trace.outcome), "attempts": trace.attempts,
            "prompt_tokens": _count(usage, "prompt_tokens"),
            "completion_tokens": _count(usage, "completion_tokens"),
            "ttft_s": None if ttft is None else round(ttft, 4),
            "duration_s": round(duration, 4)}
        self._queue.put_nowait(logging.makeLogRecord({"msg": json.dumps(line),
                                                      "levelno": logging.INFO,
                                                      "levelname": "INFO"}))

    @staticmethod
    def _tokens(request: web.Request) -> _Tokens:
        tokens = request.get(TOKENS_KEY)
        if tokens is None:
            tokens = request[TOKENS_KEY] = _Tokens()
        return tokens
