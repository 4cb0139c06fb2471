"""Start the processes a benchmark measures, wait until they answer, and always stop them.

Every service listens on 127.0.0.1 only. Each runs in its own session (process group) so a
stop can take its children with it; `Services` stops everything it started, in reverse.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rolemesh.net import free_loopback_port

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


free_port = free_loopback_port


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: this checkout importable, no proxies."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra or {})
    return env


class StartError(RuntimeError):
    pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines (structlog) this process wrote."""
        events = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # anything left in its group


def http_get(url: str, timeout_s: float = 2.0, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        return exc.code, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def wait_until(predicate: Any, timeout_s: float, what: str, proc: Proc | None = None,
               interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.popen.poll() is not None:
            raise StartError(f"{proc.name} exited with code {proc.popen.returncode} while "
                             f"waiting for {what}:\n{proc.log()[-3000:]}")
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            tail = f":\n{proc.log()[-3000:]}" if proc is not None else ""
            raise StartError(f"timed out after {timeout_s:g}s waiting for {what}{tail}")
        time.sleep(interval_s)


@dataclass
class Services:
    """Processes started for one benchmark run; `close()` stops them all."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], port: int, *,
              env: dict[str, str] | None = None, health_path: str | None = "/health",
              timeout_s: float = 30.0, token: str | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env or bench_env(),
                                     cwd=self.workdir, start_new_session=True)
        proc = Proc(name, popen, port, log_path)
        self.procs.append(proc)
        if health_path is not None:
            wait_until(lambda: http_get(proc.url + health_path, token=token)[0] == 200,
                       timeout_s, f"{name} to answer {health_path}", proc)
        return proc

    def start_python(self, name: str, module: str, args: Sequence[str], port: int,
                     **kwargs: Any) -> Proc:
        return self.start(name, [sys.executable, "-m", module, *args], port, **kwargs)

    def write_config(self, name: str, config: dict[str, Any]) -> Path:
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


@contextlib.contextmanager
def services(workdir: Path) -> Iterator[Services]:
    s = Services(workdir)
    try:
        yield s
    finally:
        s.close()


def agent_config(*, node_id: str, port: int, state_dir: Path, models: list[dict[str, Any]],
                 llama_server_bin: str | None = None, dispatcher_url: str | None = None,
                 token: str | None = None, pending: int = 256, log_level: str = "warning",
                 **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "node_id": node_id, "listen_host": HOST, "listen_port": port,
        "advertise_url": f"http://{HOST}:{port}", "backend": "cpu",
        "state_dir": str(state_dir), "log_format": "json", "log_level": log_level,
        "max_pending_requests_per_device": pending, "models": models,
        "llama_server_probe_interval_s": 0.5,
    }
    if llama_server_bin is not None:
        config["llama_server_bin"] = llama_server_bin
    if dispatcher_url is not None:
        config["dispatcher_base_url"] = dispatcher_url
        config["cluster_token"] = token
    config.update(extra)
    return config


def dispatcher_config(*, port: int, token: str | None, log_level: str = "warning",
                      **extra: Any) -> dict[str, Any]:
    return {"listen_host": HOST, "listen_port": port, "cluster_token": token,
            "log_format": "json", "log_level": log_level, **extra}
