"""`rolemesh up`: a dispatcher and a node agent on this host, in one command.

    rolemesh up                          the demo models (generated, no download)
    rolemesh up --models-dir ~/models    every *.gguf there is a model; its role from its name
    rolemesh up --config rolemesh.yaml   `dispatcher:` and `agent:` sections (or an agent
                                         config alone)

Both services run as child processes with a fresh cluster token (in their environment, never
in argv), the agent on the CPU when there is no GPU (`backend: auto`). It prints where the
API, the dashboard and the metrics are; Ctrl-C (or SIGTERM) stops both, and the agent stops
its llama-servers before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rolemesh.config_loading import ConfigError

EXIT_FAILED = 1
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
DEFAULT_STATE = Path.home() / ".local" / "state" / "rolemesh" / "up"

# The role a model gets from words in its file name (first match wins; else `chat`).
ROLE_WORDS: tuple[tuple[str, str], ...] = (
    ("embed", "embeddings"), ("rerank", "rerank"), ("coder", "coder"), ("code", "coder"),
    ("vision", "vision"), ("-vl", "vision"), ("llava", "vision"), ("reason", "planner"),
    ("r1", "planner"), ("instruct", "chat"), ("chat", "chat"))


def add_parser(sub: Any) -> None:
    p = sub.add_parser("up", help="run a dispatcher and a node agent on this host")
    p.add_argument("--config", type=Path, help="YAML: `dispatcher:` and `agent:` sections, "
                   "or a node agent config alone")
    p.add_argument("--models-dir", type=Path, help="serve every *.gguf in this folder")
    p.add_argument("--host", default="127.0.0.1", help="where both listen (%(default)s)")
    p.add_argument("--port", type=int, default=8080, help="the dispatcher (%(default)s)")
    p.add_argument("--agent-port", type=int, default=8081, help="the agent (%(default)s)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE,
                   help="configs, logs, pid files, demo models (%(default)s)")
    p.set_defaults(run=run)


def role_from_name(stem: str) -> str:
    lowered = stem.lower()
    return next((role for word, role in ROLE_WORDS if word in lowered), "chat")


def model_id_from_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._:/@+-]+", "-", stem).strip("-") or "model"


def models_from_dir(directory: Path) -> list[dict[str, Any]]:
    files = sorted(p for p in directory.glob("*.gguf") if p.is_file())
    # A split model's later parts (name-00002-of-00003.gguf) are loaded through the first.
    files = [p for p in files if not re.search(r"-0000[2-9]-of-\d+$", p.stem)]
    if not files:
        raise ConfigError(f"--models-dir {directory}: no .gguf file there")
    taken: set[str] = set()
    models = []
    for path in files:
        model_id = model_id_from_name(path.stem)
        role = role_from_name(path.stem)
        entry: dict[str, Any] = {"model_id": model_id, "path": str(path.resolve()),
                                 "roles": [role] if role not in taken | {model_id} else []}
        if role == "embeddings":
            entry["embeddings"] = True
        taken.add(model_id)
        models.append(entry)
    ids = {m["model_id"] for m in models}
    for m in models:  # a role may not be another model's id
        m["roles"] = [r for r in m["roles"] if r not in ids]
    return models


def demo_models(state_dir: Path) -> list[dict[str, Any]]:
    from rolemesh.tiny_gguf import DIGITS, LETTERS, write_tiny_model

    folder = state_dir / "demo-models"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for model_id, charset, roles, seed in (("demo-letters", LETTERS, ["chat", "planner"], 1),
                                           ("demo-digits", DIGITS, ["coder"], 2)):
        path = folder / f"{model_id}.gguf"
        if not path.exists():
            write_tiny_model(path, charset=charset, seed=seed)
        out.append({"model_id": model_id, "path": str(path), "roles": roles,
                    "ctx_size": 512})
    return out


def build_configs(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(dispatcher config, agent config, where the models come from)."""
    dispatcher: dict[str, Any] = {}
    agent: dict[str, Any] = {}
    source = "the demo models (random weights: they write letters or digits)"
    if args.config is not None:
        try:
            data = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{args.config}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config}: the top level must be a mapping")
        if "dispatcher" in data or "agent" in data:
            dispatcher, agent = dict(data.get("dispatcher") or {}), dict(data.get("agent") or {})
        else:
            agent = data
        base = args.config.resolve().parent
        for m in agent.get("models") or []:  # relative paths: from the config's folder
            if isinstance(m, dict) and "path" in m and not Path(str(m["path"])).is_absolute():
                m["path"] = str(base / str(m["path"]))
        source = str(args.config)
    if not agent.get("models"):
        if args.models_dir is not None:
            agent["models"] = models_from_dir(args.models_dir)
            source = f"{args.models_dir} ({len(agent['models'])} GGUF files)"
        else:
            agent["models"] = demo_models(args.state_dir)
    dispatcher.setdefault("listen_host", args.host)
    dispatcher.setdefault("listen_port", args.port)
    dispatcher.setdefault("heartbeat_interval_s", 2.0)
    dispatcher.setdefault("log_format", "console")
    host = dispatcher["listen_host"]
    agent.setdefault("node_id", "local")
    agent.setdefault("listen_host", args.host)
    agent.setdefault("listen_port", args.agent_port)
    agent.setdefault("dispatcher_base_url", f"http://{_client_host(host)}:"
                                            f"{dispatcher['listen_port']}")
    agent.setdefault("state_dir", str(args.state_dir / "agent-state"))
    agent.setdefault("log_format", "console")
    return dispatcher, agent, source


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _get_json(url: str, timeout_s: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.load(resp)


class Children:
    def __init__(self) -> None:
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(self, name: str, module: str, config: Path, log: Path, env: dict[str, str]
              ) -> None:
        with log.open("ab") as out:
            # Their own session: Ctrl-C reaches `rolemesh up`, which stops them in order.
            proc = subprocess.Popen([sys.executable, "-m", module, "--config", str(config)],
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = (proc, log)

    def exited(self) -> tuple[str, int, str] | None:
        for name, (proc, log) in self.procs.items():
            code = proc.poll()
            if code is not None:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                return name, code, "\n".join(tail)
        return None

    def stop(self) -> None:
        """The agent first (it stops its llama-servers), then the dispatcher."""
        for name in ("agent", "dispatcher"):
            entry = self.procs.get(name)
            if entry is None or entry[0].poll() is not None:
                continue
            proc = entry[0]
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"rolemesh up: the {name} did not stop in {STOP_TIMEOUT_S:g}s; killing",
                      file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class Interrupted(Exception):
    pass


def wait_ready(base: str, children: Children, timeout_s: float,
               stopping: Callable[[], bool] = lambda: False) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if stopping():
            raise Interrupted
        gone = children.exited()
        if gone is not None:
            name, code, tail = gone
            raise RuntimeError(f"the {name} exited with code {code}:\n{tail}")
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            nodes = _get_json(base + "/v1/nodes")
            if any(n.get("state") == "up" for n in nodes.get("data", [])):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node agent did not register within {timeout_s:g}s")
        time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    try:
        dispatcher, agent, source = build_configs(args)
    except ConfigError as exc:
        print(f"rolemesh up: {exc}", file=sys.stderr)
        return EXIT_FAILED
    state = args.state_dir
    state.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    _write_private(state / "cluster_token", token + "\n")
    _write_private(state / "dispatcher.yaml", yaml.safe_dump(dispatcher))
    _write_private(state / "agent.yaml", yaml.safe_dump(agent))
    env = {**os.environ, "ROLEMESH_CLUSTER_TOKEN": token}
    children = Children()
    stop_now = False

    def on_signal(_sig: int, _frame: Any) -> None:
        nonlocal stop_now
        stop_now = True
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    base = f"http://{_client_host(dispatcher['listen_host'])}:{dispatcher['listen_port']}"
    agent_url = f"http://{_client_host(agent['listen_host'])}:{agent['listen_port']}"
    try:
        children.start("dispatcher", "dispatcher.cli", state / "dispatcher.yaml",
                       state / "dispatcher.log", env)
        children.start("agent", "node_agent.cli", state / "agent.yaml", state / "agent.log",
                       env)
        print(f"rolemesh up: starting a dispatcher and a node agent with {source}", flush=True)
        try:
            wait_ready(base, children, READY_TIMEOUT_S, lambda: stop_now)
        except Interrupted:
            print("rolemesh up: stopping", flush=True)
            return 0
        except RuntimeError as exc:
            print(f"rolemesh up: {exc}\n(logs: {state}/dispatcher.log, {state}/agent.log)",
                  file=sys.stderr)
            return EXIT_FAILED
        names = sorted({r for m in agent["models"] for r in m.get("roles", [])}
                       | {m["model_id"] for m in agent["models"]})
        first = next((r for m in agent["models"] for r in m.get("roles", [])), names[0])
        print(f"""
  OpenAI API   {base}/v1        (models and roles: {', '.join(names)})
  dashboard    {base}/
  metrics      {base}/metrics   (agent: {agent_url}/metrics, with the cluster token)
  cluster token  {state / 'cluster_token'}  (mode 0600)
  logs         {state}/dispatcher.log, {state}/agent.log

  try:  ROLEMESH_URL={base} rolemesh status
        curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{{"model": "{first}", "messages": [{{"role": "user", "content": "hi"}}]}}'

Ctrl-C stops both.""", flush=True)
        while not stop_now:
            gone = children.exited()
            if gone is not None:
                name, code, tail = gone
                print(f"rolemesh up: the {name} exited with code {code}:\n{tail}",
                      file=sys.stderr)
                return EXIT_FAILED
            time.sleep(0.2)
        print("rolemesh up: stopping", flush=True)
        return 0
    finally:
        children.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
