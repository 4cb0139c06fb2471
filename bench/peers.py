"""The peers users would run instead: LiteLLM's proxy (Python) and vllm-router (Rust).

Each lives in its own virtual environment under the bench cache (env
ROLEMESH_BENCH_CACHE, default ~/.cache/rolemesh-bench), installed with pip only when the
bench is asked to (`--peers`), so their dependencies never touch the project's venv.
A peer that cannot be installed or started is reported as such, with the reason; the rest
of the run goes on without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.report import say
from bench.services import HOST, Proc, Services, StartError, bench_env, free_port

LITELLM_KEY = "sk-bench-" + "0" * 32  # LiteLLM refuses to start without a master key


@dataclass(frozen=True)
class PeerSpec:
    name: str
    requirement: str
    executable: str


PEERS = {
    "litellm": PeerSpec("litellm", "litellm[proxy]", "litellm"),
    "vllm-router": PeerSpec("vllm-router", "vllm-router", "vllm-router"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("ROLEMESH_BENCH_CACHE",
                               Path.home() / ".cache" / "rolemesh-bench")).expanduser()


def peer_executable(spec: PeerSpec) -> Path:
    return cache_dir() / "peers" / spec.name / "bin" / spec.executable


def ensure_installed(spec: PeerSpec, install: bool) -> tuple[Path | None, str]:
    """The peer's executable, installing it first if asked; else None and why not."""
    exe = peer_executable(spec)
    if exe.exists():
        return exe, "installed"
    if not install:
        return None, f"not installed (run with --peers to install {spec.requirement!r})"
    venv = exe.parent.parent
    say(f"installing {spec.requirement} into {venv} (once; this takes a while)...")
    log = cache_dir() / "peers" / f"{spec.name}-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                  spec.requirement]]
        for step in steps:
            code = subprocess.call(step, stdout=out, stderr=subprocess.STDOUT)
            if code != 0:
                return None, f"pip install {spec.requirement!r} failed (exit {code}; see {log})"
    if not exe.exists():
        return None, f"{spec.requirement} installed but {exe} is missing (see {log})"
    return exe, "installed now"


def start_peer(name: str, svc: Services, upstream_url: str, model: str,
               install: bool) -> tuple[Proc | None, str, dict[str, str]]:
    """Start peer `name` in front of the upstream; (proc, note, headers clients must send)."""
    spec = PEERS[name]
    exe, note = ensure_installed(spec, install)
    if exe is None:
        return None, note, {}
    port = free_port()
    try:
        if name == "vllm-router":
            proc = svc.start(name, [str(exe), "--host", HOST, "--port", str(port),
                                    "--worker-urls", upstream_url, "--policy", "round_robin",
                                    "--prometheus-host", HOST,
                                    "--prometheus-port", str(free_port()),
                                    "--log-level", "warning"],
                             port, timeout_s=60.0)
            return proc, note, {}
        config = svc.write_config("litellm", {
            "model_list": [{"model_name": model, "litellm_params": {
                "model": f"openai/{model}", "api_base": upstream_url + "/v1",
                "api_key": "bench"}}],
            "litellm_settings": {"telemetry": False, "drop_params": True},
            "general_settings": {"master_key": LITELLM_KEY},
        })
        # Keep it on this machine: the cost map from its package, no telemetry.
        env = bench_env({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                         "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"})
        proc = svc.start(name, [str(exe), "--config", str(config), "--host", HOST,
                                "--port", str(port)], port, env=env,
                         health_path="/health/liveliness", timeout_s=120.0)
        return proc, note, {"Authorization": f"Bearer {LITELLM_KEY}"}
    except StartError as exc:
        return None, f"could not start: {str(exc).splitlines()[0]}", {}
