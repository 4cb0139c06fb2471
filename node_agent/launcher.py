"""The seam between an instance and its process: start one llama-server, ready to serve.

`ModelInstance` starts processes only through a `Launcher`, so the scheduler's queueing,
eviction and TTL rules run in unit tests on a virtual clock with a fake launcher, and the
real `LlamaLauncher` is tested against the fake and the real llama-server.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from node_agent.config import ModelConfig
from node_agent.llama_argv import build_argv
from node_agent.llama_process import LlamaProcess, StartFailed
from node_agent.pidfiles import PidFiles
from rolemesh.child_env import child_env

log = structlog.get_logger("node_agent.launcher")


class RunningProcess(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def base_url(self) -> str: ...
    async def wait_exit(self) -> int: ...
    async def stop(self, grace_s: float) -> int: ...
    def tail_text(self, lines: int = 12) -> str: ...


class Launcher(Protocol):
    async def launch(self, model: ModelConfig, devices: tuple[str, ...]) -> RunningProcess:
        """A process serving `model` on `devices`, ready; raises StartFailed."""
        ...


def child_environment(base: Mapping[str, str], pins: Sequence[Mapping[str, str]]
                      ) -> dict[str, str]:
    """The child's environment: ours without RoleMesh's secrets (rolemesh.child_env), pinned
    to its devices.

    A device group's pins are joined: CUDA_VISIBLE_DEVICES=0 and =1 make =0,1.
    """
    env = child_env(base)
    values: dict[str, list[str]] = {}
    for pin in pins:
        for k, v in pin.items():
            seen = values.setdefault(k, [])
            if v and v not in seen:
                seen.append(v)
    for k, seen in values.items():
        env[k] = ",".join(seen)  # "" for the CPU: no GPU visible at all
    return env


def _is_early_exit(exc: BaseException) -> bool:
    return isinstance(exc, StartFailed) and exc.exited


def pid_name(model_id: str, devices: Sequence[str]) -> str:
    """The pid file of an instance: keyed by its placement and its model (a short hash of
    both keeps ids that clean to the same file name, such as a:b and a_b, apart)."""
    key = f"{'+'.join(devices)}--{model_id}"
    return f"{key}--{hashlib.sha256(key.encode()).hexdigest()[:8]}"


class _Running:
    """A ready LlamaProcess whose pid file goes when it does."""

    def __init__(self, proc: LlamaProcess, pidfiles: PidFiles, name: str) -> None:
        self._proc = proc
        self._pidfiles = pidfiles
        self._name = name
        self.process = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def base_url(self) -> str:
        return self._proc.base_url

    async def wait_exit(self) -> int:
        code = await self._proc.wait_exit()
        self._pidfiles.remove(self._name)
        return code

    async def stop(self, grace_s: float) -> int:
        code = await self._proc.stop(grace_s)
        self._pidfiles.remove(self._name)
        return code

    def tail_text(self, lines: int = 12) -> str:
        return self._proc.tail_text(lines)


class LlamaLauncher:
    def __init__(self, binary: Path, pins: Mapping[str, Mapping[str, str]],
                 http: aiohttp.ClientSession, pidfiles: PidFiles, free_port: Callable[[], int],
                 *, startup_timeout_s: float, probe_interval_s: float,
                 start_attempts: int = 3) -> None:
        self._binary = binary
        self._pins = pins
        self._http = http
        self._pidfiles = pidfiles
        self._free_port = free_port
        self._startup_timeout_s = startup_timeout_s
        self._probe_interval_s = probe_interval_s
        self._attempts = start_attempts

    async def launch(self, model: ModelConfig, devices: tuple[str, ...]) -> RunningProcess:
        retrying = AsyncRetrying(stop=stop_after_attempt(self._attempts),
                                 wait=wait_exponential(multiplier=0.2, max=5.0),
                                 retry=retry_if_exception(_is_early_exit), reraise=True)
        async for attempt in retrying:
            with attempt:
                return await self._launch_once(model, devices)
        raise AssertionError("unreachable: tenacity reraises the last failure")

    async def _launch_once(self, model: ModelConfig, devices: tuple[str, ...]
                           ) -> RunningProcess:
        port = self._free_port()
        argv = build_argv(self._binary, model, port)
        env = child_environment(os.environ, [self._pins.get(d, {}) for d in devices])
        try:
            proc = await LlamaProcess.spawn(argv, port, env)
        except OSError as exc:
            raise StartFailed(f"cannot start {argv[0]}: {exc}", exited=True) from exc
        name = pid_name(model.model_id, devices)
        self._pidfiles.write(name, proc.pid)
        try:
            ready = await proc.wait_ready(self._http, model.alias or model.model_id,
                                          self._startup_timeout_s, self._probe_interval_s)
        except BaseException:
            await proc.stop(2.0)
            self._pidfiles.remove(name)
            raise
        log.info("llama.ready", model=model.model_id, devices=list(devices), pid=proc.pid,
                 port=port, ready_s=round(ready.ready_s, 4), probes=ready.probes)
        return _Running(proc, self._pidfiles, name)
