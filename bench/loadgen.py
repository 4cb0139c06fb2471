"""A closed-loop HTTP/1.1 load generator on raw asyncio: cheap enough not to be the bottleneck.

`concurrency` keep-alive connections each send the same pre-encoded request again and
again until `requests` have been sent in all. Per request it records the round trip, and for
SSE answers the time to the first `data:` event and the number of events (chunk framing
and TCP reads are undone, so a proxy that coalesces or splits chunks is counted fairly).
Its own CPU time is measured over the run, so a report can show that it had room to spare.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bench.sockets import set_nodelay

_EVENT = b"data:"
_DONE = b"data: [DONE]"


@dataclass
class RunResult:
    requests: int
    errors: int
    wall_s: float
    cpu_s: float  # the load generator's own CPU time over the run
    latencies_s: list[float] = field(default_factory=list)
    first_chunk_s: list[float] = field(default_factory=list)
    events: int = 0  # SSE data events received, [DONE] excluded
    max_gap_s: float = 0.0  # the longest pause between two SSE reads of one stream
    error_samples: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0


def build_request(host: str, port: int, path: str, body: dict[str, Any],
                  headers: dict[str, str] | None = None) -> bytes:
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
            "Content-Type: application/json", f"Content-Length: {len(data)}",
            "Accept: */*"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


class _Conn(asyncio.Protocol):
    """One keep-alive connection; `request()` sends and waits for one whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.buf = bytearray()
        self.done: asyncio.Future[None] | None = None
        self.status = 0
        self.headers_done = False
        self.length: int | None = None
        self.chunked = False
        self.body_left = 0
        self.chunk_left = -1  # -1: expecting a size line
        self.sse_tail = b""
        self.events = 0
        self.first_event_at = 0.0
        self.last_read_at = 0.0
        self.max_gap = 0.0
        self.close_after = False
        self.saw_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        set_nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def request(self, raw: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        await self.done

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.events and self.last_read_at:
            self.max_gap = max(self.max_gap, now - self.last_read_at)
        self.last_read_at = now
        self.buf += data
        if not self.headers_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            self.status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.length = int(value.strip())
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
                elif name == b"connection" and value.strip().lower() == b"close":
                    self.close_after = True
            del self.buf[:end + 4]
            self.headers_done = True
            self.body_left = self.length or 0
        if self.chunked:
            self._read_chunked(now)
        elif self.length is not None:
            take = min(len(self.buf), self.body_left)
            self._body(bytes(self.buf[:take]), now)
            del self.buf[:take]
            self.body_left -= take
            if self.body_left == 0:
                self._finish()
        else:  # no length: the body ends with the connection
            self._body(bytes(self.buf), now)
            self.buf.clear()

    def _read_chunked(self, now: float) -> None:
        buf = self.buf
        while True:
            if self.chunk_left < 0:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(buf[:eol]).split(b";")[0], 16)
                if size == 0:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        return
                    del buf[:end + 4]
                    self._finish()
                    return
                del buf[:eol + 2]
                self.chunk_left = size
            if self.chunk_left > 0:
                take = min(len(buf), self.chunk_left)
                if take == 0:
                    return
                self._body(bytes(buf[:take]), now)
                del buf[:take]
                self.chunk_left -= take
            if self.chunk_left == 0:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.chunk_left = -1

    def _body(self, data: bytes, now: float) -> None:
        # Patterns may straddle two reads: keep just too few bytes to hold a whole one.
        tail = self.sse_tail
        window = tail + data
        found = (tail[-(len(_EVENT) - 1):] + data).count(_EVENT)
        done = window.count(_DONE)
        if done:
            self.saw_done = True
            found -= done  # [DONE] is no chunk; its "data:" may have come in an earlier read
        if found:
            if self.events <= 0 < self.events + found:
                self.first_event_at = now
            self.events += found
        self.sse_tail = window[-(len(_DONE) - 1):]

    def _finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)
        if self.close_after and self.transport is not None:
            self.transport.close()


async def run(host: str, port: int, raw: bytes, *, requests: int, concurrency: int,
              stream: bool = False, expect_events: int | None = None,
              timeout_s: float = 120.0) -> RunResult:
    """Send `raw` `requests` times over `concurrency` connections; wait for every answer."""
    loop = asyncio.get_running_loop()
    concurrency = max(1, min(concurrency, requests))
    result = RunResult(requests=requests, errors=0, wall_s=0.0, cpu_s=0.0)
    remaining = requests

    async def connect() -> _Conn:
        _, conn = await loop.create_connection(_Conn, host, port)
        return conn

    conns = [await connect() for _ in range(concurrency)]

    async def worker(conn: _Conn) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                await conn.request(raw)
            except ConnectionError as exc:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(str(exc))
                conn = await connect()
                continue
            ended = time.perf_counter()
            bad = conn.status != 200
            if stream:
                if expect_events is not None and conn.events < expect_events:
                    bad = True
                if conn.events:
                    result.first_chunk_s.append(conn.first_event_at - started)
                result.events += conn.events
                result.max_gap_s = max(result.max_gap_s, conn.max_gap)
            if bad:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(f"status {conn.status}, {conn.events} events")
            else:
                result.latencies_s.append(ended - started)
            if conn.close_after or conn.transport is None or conn.transport.is_closing():
                conn = await connect()
        if conn.transport is not None:
            conn.transport.close()

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(c) for c in conns)), timeout_s)
    result.wall_s = time.perf_counter() - t0
    result.cpu_s = time.process_time() - cpu0
    return result


async def get_json(host: str, port: int, path: str, headers: dict[str, str] | None = None,
                   timeout_s: float = 5.0) -> tuple[int, Any]:
    """A one-off GET on a fresh connection (for readiness checks), stdlib only."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        head = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        data = await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_bytes.lower():
        body = _dechunk_all(body)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def _dechunk_all(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return bytes(out)
        size = int(data[pos:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[eol + 2:eol + 2 + size]
        pos = eol + 2 + size + 2
