#!/usr/bin/env python3
"""A stand-in for llama.cpp's llama-server, for fast tests and fault tests.

Standard library only, so it starts in tens of milliseconds under any python3. It takes
llama-server's command line (unknown flags and their values are skipped), answers its
endpoints in its shapes, and writes text that names the model: every token is the model
file's name without extension (`letters.gguf` writes "letters letters ...").

Knobs, each an environment variable and a flag (the flag wins):
  FAKE_LLAMA_LOAD_DELAY_S   --fake-load-delay-s S    /health answers 503 "Loading model" for S s
  FAKE_LLAMA_TOKENS_PER_S   --fake-tokens-per-s R    generation speed (default 1000)
  FAKE_LLAMA_TTFT_S         --fake-ttft-s S          delay before the first token
  FAKE_LLAMA_CRASH_AFTER    --fake-crash-after N     serve N completions; the next one dies
                                                     part-way with exit code 3
  FAKE_LLAMA_NEVER_READY    --fake-never-ready       /health stays 503 for ever
  FAKE_LLAMA_IGNORE_SIGTERM --fake-ignore-sigterm    only SIGKILL stops it
  FAKE_LLAMA_EXIT_AT_START  --fake-exit-at-start C   print an error and exit with code C
  FAKE_LLAMA_RECORD         --fake-record PATH       append {argv, env, pid} as a JSON line
  FAKE_LLAMA_CLOSE_AFTER_STREAM --fake-close-after-stream  close the connection after each
                                                     streamed answer while its headers say
                                                     keep-alive (like the real llama-server)
  FAKE_LLAMA_STALL_AFTER_TOKENS --fake-stall-after-tokens N  a stream stops sending after N
                                                     tokens (the connection stays open)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BIND_DELAY_S = 0.02  # the real server refuses connections briefly while it starts
CRASH_EXIT_CODE = 3
DEFAULT_MAX_TOKENS = 8
EMBEDDING_SIZE = 16
RECORDED_ENV = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
                "GGML_VK_VISIBLE_DEVICES", "ONEAPI_DEVICE_SELECTOR", "GPU_DEVICE_ORDINAL")
RECORDED_ENV_PREFIXES = ("FAKE_LLAMA_", "LLAMA_ARG_")

# llama-server flags that take a value, by every spelling the fake reads.
VALUE_FLAGS = {
    "-m": "model", "--model": "model", "--host": "host", "--port": "port",
    "-c": "ctx_size", "--ctx-size": "ctx_size", "-a": "alias", "--alias": "alias",
    "-np": "parallel", "--parallel": "parallel", "--pooling": "pooling",
}
SWITCHES = {"--embedding": "embeddings", "--embeddings": "embeddings"}
KNOBS = {  # flag → (field, environment variable, type)
    "--fake-load-delay-s": ("load_delay_s", "FAKE_LLAMA_LOAD_DELAY_S", float),
    "--fake-tokens-per-s": ("tokens_per_s", "FAKE_LLAMA_TOKENS_PER_S", float),
    "--fake-ttft-s": ("ttft_s", "FAKE_LLAMA_TTFT_S", float),
    "--fake-crash-after": ("crash_after", "FAKE_LLAMA_CRASH_AFTER", int),
    "--fake-never-ready": ("never_ready", "FAKE_LLAMA_NEVER_READY", bool),
    "--fake-ignore-sigterm": ("ignore_sigterm", "FAKE_LLAMA_IGNORE_SIGTERM", bool),
    "--fake-exit-at-start": ("exit_at_start", "FAKE_LLAMA_EXIT_AT_START", int),
    "--fake-record": ("record", "FAKE_LLAMA_RECORD", str),
    "--fake-close-after-stream": ("close_after_stream", "FAKE_LLAMA_CLOSE_AFTER_STREAM", bool),
    "--fake-stall-after-tokens": ("stall_after_tokens", "FAKE_LLAMA_STALL_AFTER_TOKENS", int),
}
TRUE_WORDS, FALSE_WORDS = {"1", "true", "on", "yes"}, {"0", "false", "off", "no", ""}


@dataclass
class Options:
    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    ctx_size: int = 0
    alias: str = ""
    parallel: int = 1
    pooling: str = ""
    embeddings: bool = False
    load_delay_s: float = 0.0
    tokens_per_s: float = 1000.0
    ttft_s: float = 0.0
    crash_after: int | None = None
    never_ready: bool = False
    ignore_sigterm: bool = False
    exit_at_start: int | None = None
    record: str | None = None
    close_after_stream: bool = False
    stall_after_tokens: int | None = None

    @property
    def stem(self) -> str:
        return Path(self.model).stem if self.model else "fake"

    @property
    def model_name(self) -> str:
        # Like llama-server: the first alias, else the model path as given.
        return self.alias.split(",")[0] if self.alias else (self.model or "fake")


def _convert(kind: type, text: str) -> Any:
    if kind is bool:
        word = text.strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise ValueError(f"not a boolean: {text!r}")
        return word in TRUE_WORDS
    return kind(text)


def _takes_value(token: str | None) -> bool:
    """Whether the token after an unknown flag is its value rather than the next flag."""
    if token is None:
        return False
    return not token.startswith("-") or _is_number(token)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_options(argv: list[str], env: dict[str, str]) -> Options:
    options = Options()
    for field, variable, kind in KNOBS.values():
        if env.get(variable, "") != "":
            setattr(options, field, _convert(kind, env[variable]))
    i = 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        following = argv[i + 1] if i + 1 < len(argv) else None
        value = inline or following
        used = 1 if inline else 2
        if flag in VALUE_FLAGS and value is not None:
            field = VALUE_FLAGS[flag]
            setattr(options, field, type(getattr(options, field))(value))
            i += used
        elif flag in SWITCHES:
            setattr(options, SWITCHES[flag], True)
            i += 1
        elif flag in KNOBS:
            field, _, kind = KNOBS[flag]
            if kind is bool:  # a switch, or a switch followed by an explicit on/off
                explicit = inline or (following if following and following.lower()
                                      in TRUE_WORDS | FALSE_WORDS else None)
                setattr(options, field, True if explicit is None else _convert(bool, explicit))
                i += 1 if explicit is None or inline else 2
            else:
                if value is None:
                    raise SystemExit(f"error: {flag} needs a value")
                setattr(options, field, _convert(kind, value))
                i += used
        else:  # an unknown llama-server flag: skip it and its value, if it has one
            i += 1 if inline or not _takes_value(following) else 2
    return options


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def next(self) -> int:
        with self._lock:
            self.value += 1
            return self.value


class FakeLlamaServer(ThreadingHTTPServer):
    daemon_threads = True  # a stream in flight must not hold up exit

    def __init__(self, options: Options, started: float) -> None:
        self.options = options
        self.ready_at = math.inf if options.never_ready else started + options.load_delay_s
        self.completions = Counter()
        super().__init__((options.host, options.port), Handler)

    @property
    def loading(self) -> bool:
        return time.monotonic() < self.ready_at


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeLlamaServer

    # -- plumbing -----------------------------------------------------------------------------

    def version_string(self) -> str:
        return "llama.cpp"

    def log_message(self, format: str, *args: Any) -> None:
        log(f"srv  log_server_r: {self.address_string()} {format % args}")

    def send_json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str, type_: str) -> None:
        self.send_json(status, {"error": {"code": status, "message": message, "type": type_}})

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def refuse_while_loading(self) -> bool:
        if self.server.loading:
            self.send_error_json(503, "Loading model", "unavailable_error")
            return True
        return False

    # -- routes -------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if not self.refuse_while_loading():
                self.send_json(200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            if not self.refuse_while_loading():
                self.send_json(200, self.models_body())
        else:
            self.send_error_json(404, "File Not Found", "not_found_error")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        raw = self.read_body()
        if path not in ("/v1/chat/completions", "/chat/completions", "/v1/completions",
                        "/completions", "/v1/embeddings", "/embeddings", *OTHER_ENDPOINTS):
            self.send_error_json(404, "File Not Found", "not_found_error")
            return
        if self.refuse_while_loading():
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            self.send_error_json(400, f"parse error: {exc}", "invalid_request_error")
            return
        if not isinstance(body, dict):
            self.send_error_json(400, "the request body must be a JSON object",
                                 "invalid_request_error")
        elif path.endswith("embeddings"):
            self.embeddings(body)
        elif path in OTHER_ENDPOINTS:
            self.send_json(200, other_endpoint(path, body, self.server.options.model_name))
        else:
            self.complete(body, chat=path.endswith("chat/completions"))

    def models_body(self) -> dict[str, Any]:
        options = self.server.options
        aliases = [a for a in options.alias.split(",") if a] or [options.model_name]
        return {"object": "list", "data": [{
            "id": options.model_name, "aliases": [*aliases, Path(options.model).name],
            "object": "model", "created": int(time.time()), "owned_by": "llamacpp",
            "meta": {"n_ctx": options.ctx_size, "n_parallel": options.parallel}}]}

    # -- completions --------------------------------------------------------------------------

    def complete(self, body: dict[str, Any], *, chat: bool) -> None:
        options = self.server.options
        n = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("n_predict")
        n_tokens = int(n) if isinstance(n, int | float) and n > 0 else DEFAULT_MAX_TOKENS
        dies = (options.crash_after is not None
                and self.server.completions.next() > options.crash_after)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": options.model_name, "system_fingerprint": "b0-fake"}
        usage = {"prompt_tokens": prompt_tokens(body), "completion_tokens": n_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + n_tokens
        words = [(" " if i else "") + options.stem for i in range(n_tokens)]
        if body.get("stream") is True:
            include_usage = (body.get("stream_options") or {}).get("include_usage") is True
            self.stream(words, meta, usage if include_usage else None, chat=chat, dies=dies)
        else:
            self.whole(words, meta, usage, chat=chat, dies=dies)

    def pace(self, index: int) -> None:
        """Sleep until token `index` (0-based) is due: the first after ttft, then at the rate."""
        options = self.server.options
        gap = 1.0 / options.tokens_per_s if options.tokens_per_s > 0 else 0.0
        time.sleep(options.ttft_s if index == 0 else gap)

    def whole(self, words: list[str], meta: dict[str, Any], usage: dict[str, int], *,
              chat: bool, dies: bool) -> None:
        for i in range(len(words)):
            self.pace(i)
        text = "".join(words)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        body = {"choices": [choice], **meta,
                "object": "chat.completion" if chat else "text_completion", "usage": usage}
        data = json.dumps(body).encode()
        if dies:
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            crash()
        self.send_json(200, body)

    def stream(self, words: list[str], meta: dict[str, Any], usage: dict[str, int] | None, *,
               chat: bool, dies: bool) -> None:
        options = self.server.options
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")  # keeps the connection reusable
        self.end_headers()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> bool:
            payload = json.dumps({"choices": choices, **meta, "object": kind, **extra})
            return self.chunk(f"data: {payload}\n\n".encode())

        def piece(text: str | None, finish: str | None = None, role: bool = False) -> bool:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = ({"role": "assistant", "content": None} if role
                                   else {} if text is None else {"content": text})
            else:
                choice["text"] = text or ""
            return event([choice])

        if chat and not piece(None, role=True):
            return
        for i, word in enumerate(words):
            if options.stall_after_tokens is not None and i >= options.stall_after_tokens:
                self.stall()
                return
            self.pace(i)
            if not piece(word):
                return  # the client went away: stop generating, like the real server
            if dies and i == len(words) // 2:
                crash()
        if not piece(None, "length") or (usage is not None and not event([], usage=usage)):
            return
        if self.chunk(b"data: [DONE]\n\n"):
            self.chunk(b"")
        if options.close_after_stream:
            # The headers said nothing of closing (HTTP/1.1: keep-alive), as the real one.
            self.close_connection = True

    def stall(self) -> None:
        """Send nothing more, keep the connection open, until the client goes away."""
        log("fake: stalling mid-stream (--fake-stall-after-tokens)")
        self.connection.settimeout(0.2)
        while True:
            try:
                if self.connection.recv(1) == b"":
                    break  # the client closed its end
            except TimeoutError:
                continue
            except OSError:
                break
        self.close_connection = True

    def chunk(self, data: bytes) -> bool:
        """Send one chunk of the chunked body (empty = the end); False if the client left."""
        try:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return False
        return True

    # -- embeddings ---------------------------------------------------------------------------

    def embeddings(self, body: dict[str, Any]) -> None:
        options = self.server.options
        if not options.embeddings:
            self.send_error_json(
                501, "This server does not support embeddings. Start it with `--embeddings`",
                "not_supported_error")
            return
        inputs = body.get("input", "")
        texts = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": embed(str(text))}
                for i, text in enumerate(texts)]
        tokens = sum(len(str(t).encode()) for t in texts)
        self.send_json(200, {"object": "list", "model": options.model_name, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


OTHER_ENDPOINTS = ("/v1/rerank", "/infill", "/v1/messages", "/v1/responses", "/tokenize",
                   "/detokenize")


def other_endpoint(path: str, body: dict[str, Any], model: str) -> dict[str, Any]:
    """The shape of llama-server's answer on its other endpoints, minimal but real."""
    if path == "/tokenize":
        return {"tokens": list(str(body.get("content", "")).encode())}
    if path == "/detokenize":
        return {"content": bytes(t % 256 for t in body.get("tokens", [])).decode(errors="replace")}
    if path == "/v1/rerank":
        docs = body.get("documents") or []
        return {"model": model, "object": "list", "results": [
            {"index": i, "relevance_score": 1.0 / (i + 1)} for i in range(len(docs))]}
    if path == "/v1/messages":
        return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                "model": model, "content": [{"type": "text", "text": "fake"}],
                "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 1}}
    if path == "/v1/responses":
        return {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "model": model,
                "status": "completed", "output": [{"type": "message", "role": "assistant",
                                                   "content": [{"type": "output_text",
                                                                "text": "fake"}]}]}
    return {"content": "fake", "model": model, "stop": True}  # /infill


def prompt_tokens(body: dict[str, Any]) -> int:
    """One token per byte of prompt text, as the tiny byte-level test models count."""
    if isinstance(body.get("messages"), list):
        text = "".join(str(m.get("content") or "") for m in body["messages"]
                       if isinstance(m, dict))
    else:
        text = str(body.get("prompt") or "")
    return len(text.encode())


def embed(text: str) -> list[float]:
    """A deterministic unit vector per text, so equal inputs embed equally."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b - 127.5 for b in digest[:EMBEDDING_SIZE]]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def crash() -> None:
    log("fake: crashing on purpose (--fake-crash-after)")
    os._exit(CRASH_EXIT_CODE)


def record(path: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if k in RECORDED_ENV or k.startswith(RECORDED_ENV_PREFIXES)}
    line = json.dumps({"argv": sys.argv, "env": env, "pid": os.getpid()})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def main() -> int:
    started = time.monotonic()
    options = parse_options(sys.argv[1:], dict(os.environ))
    if options.record:
        record(options.record)
    if options.exit_at_start is not None:
        log(f"llama_model_load: error loading model: fake failure for '{options.model}'")
        log("srv    load_model: failed to load model")
        return options.exit_at_start

    def on_sigterm(signum: int, frame: object) -> None:
        log("srv    operator(): operator(): cleaning up before exit...")
        os._exit(0)

    signal.signal(signal.SIGTERM,
                  signal.SIG_IGN if options.ignore_sigterm else on_sigterm)
    time.sleep(BIND_DELAY_S)
    try:
        server = FakeLlamaServer(options, started)
    except OSError as exc:
        log(f"srv  llama_server: couldn't bind HTTP server socket, port: {options.port}: {exc}")
        return 1
    host, port = server.server_address[:2]
    log(f"srv  llama_server: loading model '{options.model}'")
    log(f"srv  llama_server: listening on http://{host!s}:{port}")
    if not options.never_ready:
        # Like the real one, say so the moment the model is loaded (agents act on it).
        loaded = threading.Timer(max(0.0, server.ready_at - time.monotonic()),
                                 log, args=("srv  llama_server: model loaded",))
        loaded.daemon = True
        loaded.start()
    with contextlib.suppress(KeyboardInterrupt), server:
        server.serve_forever(poll_interval=0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
