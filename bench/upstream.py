"""A fast fake OpenAI upstream that speaks llama-server's command line: the bench's baseline.

Raw asyncio (uvloop when installed) HTTP/1.1 with keep-alive, every answer pre-encoded,
so what it costs per request is small and the same for every target measured against it.

- `POST /v1/chat/completions`, `/v1/completions`: a fixed JSON answer, or with
  `"stream": true` an SSE stream of `max_tokens` chunks (default 16) written one by one
  with `--chunk-delay-ms` (or env BENCH_CHUNK_DELAY_MS) between them, then `[DONE]`.
- `GET /health` 200, `GET /v1/models` listing `--alias` (or the model file's stem).

It accepts llama-server's flags (`--model PATH --host H --port P --alias NAME --parallel N`
and any other, ignored), so a node agent can run it as its `llama_server_bin` through the
shim that `write_shim()` writes. With env BENCH_UPSTREAM_PORT_FILE set it appends
`pid port` to that file once it listens, so the bench can find the agent's child and
measure every target against the very same upstream process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import stat
import sys
from pathlib import Path

from bench.sockets import set_nodelay
from rolemesh.service import install_uvloop

DEFAULT_CHUNKS = 16
MAX_CHUNKS = 100_000
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


def _response(status: int, body: bytes, content_type: bytes = b"application/json",
              close: bool = False) -> bytes:
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
            % (status, _REASONS.get(status, b"Status"), content_type, len(body),
               b"Connection: close\r\n" if close else b"")) + body


class Answers:
    """Every byte the upstream sends, encoded once."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        model = json.dumps(alias)
        self.health = _response(200, b'{"status":"ok"}')
        self.models = _response(200, json.dumps({
            "object": "list",
            "data": [{"id": alias, "object": "model", "created": 0, "owned_by": "bench"}],
            "models": [{"name": alias, "model": alias}]}).encode())
        self.not_found = _response(404, b'{"error":{"message":"not found","type":'
                                        b'"invalid_request_error","code":"not_found"}}')
        self.bad_request = _response(400, b'{"error":{"message":"bad request","type":'
                                          b'"invalid_request_error","code":"bad_request"}}')
        self.chat = _response(200, (
            f'{{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":{model},'
            '"choices":[{"index":0,"message":{"role":"assistant","content":"hello"},'
            '"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":1,'
            '"total_tokens":9}}').encode())
        self.completion = _response(200, (
            f'{{"id":"cmpl-bench","object":"text_completion","created":0,"model":{model},'
            '"choices":[{"index":0,"text":"hello","finish_reason":"stop"}],'
            '"usage":{"prompt_tokens":8,"completion_tokens":1,"total_tokens":9}}').encode())
        self.stream_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.chat_chunk = self._frame(
            'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,'
            f'"model":{model},"choices":[{{"index":0,"delta":{{"content":"a"}},'
            '"finish_reason":null}]}\n\n')
        self.completion_chunk = self._frame(
            f'data: {{"id":"cmpl-bench","object":"text_completion","created":0,"model":{model},'
            '"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n')
        self.chat_last = self._frame(
            'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,'
            f'"model":{model},"choices":[{{"index":0,"delta":{{}},"finish_reason":"length"}}]}}\n\n'
            'data: [DONE]\n\n') + b"0\r\n\r\n"
        self.completion_last = self._frame(
            f'data: {{"id":"cmpl-bench","object":"text_completion","created":0,"model":{model},'
            '"choices":[{"index":0,"text":"","finish_reason":"length"}]}\n\n'
            'data: [DONE]\n\n') + b"0\r\n\r\n"

    @staticmethod
    def _frame(event: str) -> bytes:
        data = event.encode()
        return b"%x\r\n%s\r\n" % (len(data), data)


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parse requests, answer them in order."""

    def __init__(self, answers: Answers, chunk_delay_s: float) -> None:
        self.answers = answers
        self.delay = chunk_delay_s
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.Task[None] | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        set_nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.streaming is not None:
            self.streaming.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.streaming is None:
            self._process()

    def _process(self) -> None:
        while not self.closing and self.streaming is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) < 3:
                self._send(self.answers.bad_request, close=True)
                return
            method, path = parts[0], parts[1].split(b"?", 1)[0]
            length = 0
            chunked = False
            close = parts[2] == b"HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip())
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
            start = end + 4
            if chunked:
                parsed = _dechunk(self.buf, start)
                if parsed is None:
                    return
                body, consumed = parsed
            else:
                if len(self.buf) < start + length:
                    return
                body, consumed = bytes(self.buf[start:start + length]), start + length
            del self.buf[:consumed]
            self._answer(method, path, body, close)

    def _send(self, data: bytes, close: bool = False) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if close:
            self.closing = True
            self.transport.close()

    def _answer(self, method: bytes, path: bytes, body: bytes, close: bool) -> None:
        a = self.answers
        if method == b"GET":
            if path == b"/health":
                self._send(a.health, close)
            elif path in (b"/v1/models", b"/models"):
                self._send(a.models, close)
            else:
                self._send(a.not_found, close)
            return
        chat = path in (b"/v1/chat/completions", b"/chat/completions")
        if method != b"POST" or not (chat or path in (b"/v1/completions", b"/completions")):
            self._send(a.not_found, close)
            return
        try:
            request = json.loads(body)
        except ValueError:
            self._send(a.bad_request, close)
            return
        if not isinstance(request, dict) or not request.get("stream"):
            self._send(a.chat if chat else a.completion, close)
            return
        chunks = request.get("max_tokens") or request.get("n_predict") or DEFAULT_CHUNKS
        chunks = max(1, min(int(chunks), MAX_CHUNKS))
        chunk = a.chat_chunk if chat else a.completion_chunk
        last = a.chat_last if chat else a.completion_last
        if self.delay <= 0:
            self._send(a.stream_head + chunk * chunks + last, close)
            return
        self.streaming = asyncio.ensure_future(self._stream(chunk, chunks, last, close))

    async def _stream(self, chunk: bytes, chunks: int, last: bytes, close: bool) -> None:
        assert self.transport is not None
        try:
            self.transport.write(self.answers.stream_head + chunk)
            for _ in range(chunks - 1):
                await asyncio.sleep(self.delay)
                if self.closing:
                    return
                self.transport.write(chunk)
            await asyncio.sleep(self.delay)
            self._send(last, close)
        finally:
            self.streaming = None
        if not self.closing and self.buf:
            self._process()


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    body = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)  # trailers end with an empty line
            return (bytes(body), end + 2) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos:pos + size]
        pos += size + 2


def _announce(port_file: str, port: int) -> None:
    with open(port_file, "a") as f:
        f.write(f"{os.getpid()} {port}\n")


async def serve(host: str, port: int, alias: str, chunk_delay_s: float,
                port_file: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    answers = Answers(alias)
    server = await loop.create_server(lambda: UpstreamProtocol(answers, chunk_delay_s),
                                      host, port, backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    if port_file:
        _announce(port_file, bound)
    print(f"bench-upstream: listening on http://{host}:{bound} as {alias!r}", file=sys.stderr,
          flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", "-m", default="bench-model.gguf")
    parser.add_argument("--alias", "-a", default=None)
    parser.add_argument("--parallel", "-np", type=int, default=1)
    parser.add_argument("--chunk-delay-ms", type=float,
                        default=float(os.environ.get("BENCH_CHUNK_DELAY_MS", "0")))
    args, _unknown = parser.parse_known_args(argv)  # llama-server's other flags: ignored
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    alias = args.alias or Path(args.model).stem
    install_uvloop()
    asyncio.run(serve(args.host, args.port, alias, args.chunk_delay_ms / 1000.0,
                      os.environ.get("BENCH_UPSTREAM_PORT_FILE")))
    return 0


def write_shim(directory: Path) -> Path:
    """An executable that runs this upstream with whatever flags it is given.

    A node agent's `llama_server_bin` must be an executable file; this is one, using the
    running interpreter and this checkout, so the agent spawns the bench's upstream.
    """
    root = Path(__file__).resolve().parent.parent
    shim = directory / "bench-llama-server"
    shim.write_text("#!/bin/sh\n"
                    f'PYTHONPATH="{root}${{PYTHONPATH:+:$PYTHONPATH}}" '
                    f'exec "{sys.executable}" -m bench.upstream "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return shim


if __name__ == "__main__":
    raise SystemExit(main())
