"""Start RoleMesh services as real subprocesses, and make sure they and their children end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def llama_server_pids(under: int | None = None) -> set[int]:
    """Every live llama-server (real or fake) on this machine, or only those descended from
    process `under` (other tests on the machine start and stop their own meanwhile)."""
    pids = set()
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(proc.name)] = int(stat[1])
        if stat[0] != "Z" and any(part.endswith((b"llama-server", b"fake_llama_server.py"))
                                  for part in cmdline[:2]):
            pids.add(int(proc.name))
    if under is None:
        return pids

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == under:
                return True
        return False

    return {pid for pid in pids if descends(pid)}


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, token: str | None = None) -> Any:
        request = urllib.request.Request(self.url + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.name} did not stop within {timeout_s}s") from None
        return self.proc.returncode


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], log_path: Path,
                 timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url} exited with {proc.returncode}:\n"
                                 f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} not up in {timeout_s}s:\n"
                         f"{log_path.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def start_service(kind: str, config: dict[str, Any], workdir: Path,
                  env: dict[str, str] | None = None, module: str | None = None
                  ) -> Iterator[Service]:
    """kind: 'node_agent' or 'dispatcher' (run as `-m KIND.cli`, or `-m MODULE` when given).
    Yields once /health answers; stops it after."""
    name = config.get("node_id", kind)
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / f"{name}.log"
    full_env = {**os.environ, **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", module or f"{kind}.cli", "--config",
                                 str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                env=full_env)
    url = f"http://127.0.0.1:{config['listen_port']}"
    service = Service(name, proc, url, log_path)
    try:
        wait_http_ok(url + "/health", proc, log_path)
        yield service
    finally:
        service.stop()
