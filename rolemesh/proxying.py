"""Forwarding an OpenAI request's bytes to an upstream and its answer back, unbuffered.

Shared by the node agent (agent -> llama-server) and the dispatcher (dispatcher -> agent).
The body goes out untouched; an SSE answer goes back chunk by chunk as it arrives.

How a relayed stream can end, and what the client sees (`StreamEnd`):
- the upstream finished: its bytes, as they were (`clean`; `error_event` when its last
  event was an SSE error event, which counts as a broken stream in metrics); an OpenAI
  stream is finished at its `data: [DONE]` event (a client that leaves then had it all);
- the upstream broke after the first byte, or sent nothing for `idle_timeout_s`: the bytes
  so far, then exactly one terminal `data: {"error": ...}` event (code `upstream_failed`
  or `upstream_timeout`), no `[DONE]`; the upstream connection is closed, which makes it
  stop generating and frees its place;
- the client went away: nothing more is written (there is no one to write to), the upstream
  is closed, and the request is marked `client_gone` for the log line (never a traceback).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

import aiohttp
import structlog
from aiohttp import web

from rolemesh.errors import GatewayTimeout, UpstreamFailed
from rolemesh.http import CLIENT_GONE_KEY

log = structlog.get_logger("rolemesh.proxying")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                        "content-encoding", "server", "date"})
TAIL_BYTES = 4096  # enough of a stream's end to find its last event
# A connection the pool thought alive but the upstream had closed (llama-server closes
# after each streamed answer while its headers say keep-alive) fails like this before a
# byte of the answer arrives: the request never reached a generation, so sending it again
# on another connection is safe. A refused connection (ClientConnectorError, a subclass)
# is not stale: the upstream is gone.
STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
STALE_RETRIES = 4
# An OpenAI stream's last event. The answer is complete once it is relayed: OpenAI's SDK
# closes the connection as soon as it reads it, often before the upstream's own end of
# body arrives, so the relay ends the client's stream there and reads the upstream's last
# bytes (for its connection's reuse) off the request's path, for at most FINISH_UPSTREAM_S.
SSE_DONE = b"data: [DONE]\n\n"
FINISH_UPSTREAM_S = 10.0
_finishing: set[asyncio.Task[None]] = set()


class StreamEnd(StrEnum):
    CLEAN = "clean"
    ERROR_EVENT = "error_event"  # the upstream ended the stream with an SSE error event
    BROKEN = "broken"
    TIMEOUT = "timeout"
    CLIENT_GONE = "client_gone"


@dataclass(frozen=True, slots=True)
class Relayed:
    response: web.StreamResponse
    end: StreamEnd
    error: str | None = None  # why it broke, for the log
    code: str | None = None  # the error event's code: ours, or the upstream's own


def sse_error_event(message: str, code: str = "upstream_failed",
                    type_: str = "server_error") -> bytes:
    payload = {"error": {"message": message, "type": type_, "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def ends_with_error_event(tail: bytes) -> bool:
    """Whether the last SSE event in `tail` is an error event (`data: {"error": ...}`)."""
    last = tail.rstrip().rsplit(b"\n\n", 1)[-1].strip()
    if not last.startswith(b"data:"):
        return False
    return last[len(b"data:"):].lstrip().startswith(b'{"error"')


def error_event_code(tail: bytes) -> str | None:
    """The `code` of the last SSE event in `tail` when it is an error event."""
    last = tail.rstrip().rsplit(b"\n\n", 1)[-1].strip()
    try:
        code = json.loads(last[len(b"data:"):])["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _copy_headers(upstream: aiohttp.ClientResponse, extra: Mapping[str, str]) -> dict[str, str]:
    # CORS headers come from this service's config (rolemesh.cors), never from upstream:
    # llama-server sends an empty Access-Control-Allow-Origin on every answer.
    out = {k: v for k, v in upstream.headers.items()
           if k.lower() not in HOP_BY_HOP and not k.lower().startswith("access-control-")}
    out.update(extra)
    return out


async def open_upstream(http: aiohttp.ClientSession, url: str, body: bytes,
                        headers: Mapping[str, str],
                        timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
    """POST and wait for the status line; connection failures become UpstreamFailed.

    A stale pooled connection (see STALE_CONNECTION) is retried: the failed one is dropped
    from the pool, so the retry goes out on another; the pool may hold more than one dead
    connection after a burst of streams (llama-server closes each after its answer), hence
    up to STALE_RETRIES tries before the request is given up.
    """
    for attempt in range(1, STALE_RETRIES + 1):
        try:
            return await http.post(url, data=body, headers=headers, timeout=timeout)
        except TimeoutError as exc:
            raise GatewayTimeout(f"the upstream did not answer in time ({url})") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamFailed(f"the upstream failed before answering: {exc}") from exc
        except STALE_CONNECTION as exc:
            if attempt == STALE_RETRIES:
                raise UpstreamFailed(f"the upstream failed before answering: {exc}") from exc
            log.debug("upstream.stale_connection_retried", error=repr(exc))
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"the upstream failed before answering: {exc}") from exc
    raise AssertionError("unreachable")  # pragma: no cover


async def read_whole(upstream: aiohttp.ClientResponse) -> bytes:
    try:
        return await upstream.read()
    except TimeoutError as exc:
        raise GatewayTimeout("the upstream stopped answering mid-response") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamFailed(f"the upstream failed mid-response: {exc}") from exc
    finally:
        upstream.release()


def buffered_response(upstream: aiohttp.ClientResponse, body: bytes,
                      extra_headers: Mapping[str, str]) -> web.Response:
    status = upstream.status
    out = _copy_headers(upstream, extra_headers)
    if status == NOT_IMPLEMENTED:
        status, body = 400, not_supported_body(body)
        out["Content-Type"] = "application/json"
    return web.Response(body=body, status=status, headers=out)


NOT_IMPLEMENTED = 501


def not_supported_body(body: bytes) -> bytes:
    """llama-server's 501 ("does not support embeddings") as the 400 it is for a client.

    A retry cannot fix it (the model does not do that), so it is not a server error.
    """
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:300] or "not supported by this model"
    return json.dumps({"error": {"message": str(message), "type": "invalid_request_error",
                                 "code": "not_supported"}}).encode()


async def relay_stream(request: web.Request, upstream: aiohttp.ClientResponse,
                       extra_headers: Mapping[str, str], *,
                       idle_timeout_s: float | None = None,
                       broken_code: str = "upstream_failed") -> Relayed:
    """Relay the upstream's body to the client as it arrives; say how it ended.

    Returns in every case (the response is prepared, or the client is gone); never raises
    for the client's or the upstream's failures.
    """
    response = web.StreamResponse(status=upstream.status,
                                  headers=_copy_headers(upstream, extra_headers))
    end = StreamEnd.CLIENT_GONE
    error: str | None = "the client went away"
    tail = b""
    code: str | None = None
    # iter_any rather than readany: callers may wrap the content to watch its chunks.
    chunks = upstream.content.iter_any().__aiter__()
    try:
        try:
            await response.prepare(request)
            end, error, tail = await _pump(chunks, response, idle_timeout_s)
            if end is StreamEnd.TIMEOUT:
                code = "upstream_timeout"
                await response.write(sse_error_event(f"{error}; the stream was ended",
                                                     code=code))
            elif end is StreamEnd.BROKEN:
                code = broken_code
                await response.write(sse_error_event(error or "the upstream failed", code=code))
            elif ends_with_error_event(tail):
                end, code = StreamEnd.ERROR_EVENT, error_event_code(tail)
            await response.write_eof()
        except ConnectionError:  # only writes to the client raise it out of _pump
            if not (end is StreamEnd.CLEAN and tail.endswith(SSE_DONE)):  # it had it all
                end, error = StreamEnd.CLIENT_GONE, "the client went away"
                request[CLIENT_GONE_KEY] = True
        return Relayed(response, end, error, code)
    finally:
        # A cleanly finished upstream goes back to the keep-alive pool; any other ending
        # closes it so the upstream notices and stops generating.
        if end is StreamEnd.CLEAN and upstream.content.is_eof():
            upstream.release()
        elif end is StreamEnd.CLEAN:
            task = asyncio.get_running_loop().create_task(_finish(upstream, chunks))
            _finishing.add(task)
            task.add_done_callback(_finishing.discard)
        else:
            upstream.close()


async def _pump(chunks: AsyncIterator[bytes], response: web.StreamResponse,
                idle_timeout_s: float | None) -> tuple[StreamEnd, str | None, bytes]:
    """Copy chunks until the upstream ends, breaks or stalls, or its answer is complete
    ([DONE]): (how, why, the last bytes)."""
    tail = b""
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return StreamEnd.CLEAN, None, tail
        except TimeoutError:
            return StreamEnd.TIMEOUT, f"the upstream sent nothing for {idle_timeout_s} s", tail
        except (aiohttp.ClientError, OSError) as exc:
            return StreamEnd.BROKEN, f"the upstream failed mid-stream: {exc}", tail
        await response.write(chunk)
        tail = chunk[-TAIL_BYTES:] if len(chunk) >= TAIL_BYTES else \
            (tail + chunk)[-TAIL_BYTES:]
        if tail.endswith(SSE_DONE):
            return StreamEnd.CLEAN, None, tail


async def _finish(upstream: aiohttp.ClientResponse, chunks: AsyncIterator[bytes]) -> None:
    """Read what an answered stream's upstream still sends (its end of body), then give its
    connection back to the pool; close it instead if that fails or takes too long."""
    try:
        async with asyncio.timeout(FINISH_UPSTREAM_S):
            async for _ in chunks:
                pass
    except (TimeoutError, aiohttp.ClientError, OSError):
        upstream.close()
    except asyncio.CancelledError:
        upstream.close()
        raise
    else:
        upstream.release()


async def stream_back(request: web.Request, upstream: aiohttp.ClientResponse,
                      extra_headers: Mapping[str, str], *,
                      idle_timeout_s: float | None = None,
                      broken_code: str = "upstream_failed") -> web.StreamResponse:
    """relay_stream for callers that only need the response."""
    relayed = await relay_stream(request, upstream, extra_headers,
                                 idle_timeout_s=idle_timeout_s, broken_code=broken_code)
    return relayed.response
